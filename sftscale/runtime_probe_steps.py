"""The two steps of sftscale.runtime_probe's measurement, each run in a process of its own
(`python -m sftscale.runtime_probe_steps data|train DIR`): make the probe's data, then train on
it and print the peak RSS and the tensors the plan counts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sftscale.runtime_probe import SEQ_LEN, TRAIN, ProbeError


def _data(work: Path) -> None:
    # heavy (tokenizer training, Arrow): this step's process only
    from data_tools.prepare import PrepareOptions, prepare
    from data_tools.synthetic import (
        conversation_texts,
        make_conversations,
        train_sentencepiece_tokenizer,
        write_jsonl,
    )

    records = make_conversations(60, seed=0)
    corpus = write_jsonl(records, work / "corpus.jsonl")
    tok = train_sentencepiece_tokenizer(conversation_texts(records), work / "tok", vocab_size=400)
    prepare(
        [str(corpus)],
        tokenizer_path=str(tok),
        out_dir=str(work / "data"),
        options=PrepareOptions(seq_len=SEQ_LEN, progress=False),
    )
    print(json.dumps({}))


def _train(work: Path) -> None:
    # heavy (torch, DeepSpeed, transformers): this step's process only
    from transformers import AutoTokenizer

    from sftscale.config import load_config
    from sftscale.devices import Device
    from sftscale.launch import prepare_run_dir, run_local
    from sftscale.precision import choose, device_native_bf16
    from sftscale.resolve import resolve_run

    cfg = load_config(
        Path(__file__).resolve().parent / "configs" / "tiny-cpu.yaml",
        [*TRAIN, f"data.path={work / 'data'}", f"logging.output_dir={work / 'runs'}"],
    )
    run_local(cfg, prepare_run_dir(cfg))
    peak = _vm_hwm()
    native, why = device_native_bf16(cuda=False)
    tensors = resolve_run(
        cfg,
        world=1,
        seq_len=SEQ_LEN,
        vocab_size=len(AutoTokenizer.from_pretrained(str(work / "tok"))),
        precision=choose(cfg.deepspeed.precision, native_bf16=native, why=why),
        device=Device("probe", 1 << 40, "cpu", 0),
    ).plan.peak_bytes
    print(json.dumps({"peak_rss_bytes": peak, "tensor_bytes": tensors}))


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise ProbeError("no VmHWM in /proc/self/status (not Linux?)")


if __name__ == "__main__":
    (_data if sys.argv[1] == "data" else _train)(Path(sys.argv[2]))
