"""The steps of sftscale.runtime_probe's measurement, each run in a process of its own
(`python -m sftscale.runtime_probe_steps data|train|lengths DIR`): make the probe's data, train
on it and print the peak RSS and the tensors the plan counts; then what each new micro-batch
length costs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sftscale.runtime_probe import DOC_LENGTHS, LENGTHS, ROW, SEQ_LEN, TRAIN, ProbeError


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


def _lengths(work: Path) -> None:
    """RSS a rank keeps for each micro-batch length and each document length it meets: the
    CPU's kernels are made and kept per shape (oneDNN's bf16 GEMMs: 12-15 MiB a micro-batch
    length on an AMX host, for hidden sizes 64 to 768 alike; fp32 keeps none, its figure is the
    heap's noise, 0-0.8 MiB; per-document attention 2-4 MiB a document length in bf16). The tiny-llama preset in the precision
    `auto` picks here, with per-document attention, checkpointing and the loss as training
    runs them, glibc's mmap threshold pinned: its RSS after each new length (twice each)
    against its RSS before."""
    # heavy (torch, transformers): this step's process only
    import torch
    from transformers import AutoModelForCausalLM

    from sftscale.config import TrainConfig
    from sftscale.devices import pin_mmap_threshold
    from sftscale.loss import token_loss_sum
    from sftscale.model import model_config
    from sftscale.precision import choose, device_native_bf16
    from sftscale.sequence_parallel import apply_document_attention

    pin_mmap_threshold(TrainConfig().cpu_mmap_threshold)
    torch.manual_seed(0)
    native, why = device_native_bf16(cuda=False)
    dtype = torch.bfloat16 if choose("auto", native_bf16=native, why=why).name == "bf16" else None
    model = AutoModelForCausalLM.from_config(
        model_config("tiny-llama", vocab_size=400), dtype=dtype
    )
    apply_document_attention(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def step(n: int, document: int) -> None:
        """A micro-batch of 2 rows of n positions, documents of `document` positions."""
        ids = torch.randint(0, 400, (2, n))
        positions = (torch.arange(n) % document).expand(2, n)
        logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        token_loss_sum(logits, ids, chunk_tokens=1024).backward()
        model.zero_grad(set_to_none=True)

    def per_length(shapes: list[tuple[int, int]]) -> int:
        before = _vm_rss()
        for n, document in shapes:
            step(n, document)
            step(n, document)
        return max(_vm_rss() - before, 0) // len(shapes)

    step(ROW, ROW)
    step(ROW, ROW)
    found = {
        # rows of ROW positions, documents of new lengths (each divides ROW)
        "doc_kernel_bytes": per_length([(ROW, d) for d in DOC_LENGTHS]),
        # rows of new lengths, one document each (their attention is new too)
        "length_kernel_bytes": per_length([(n, n) for n in LENGTHS]),
    }
    print(json.dumps(found))


def _vm_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ProbeError("no VmRSS in /proc/self/status (not Linux?)")


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise ProbeError("no VmHWM in /proc/self/status (not Linux?)")


if __name__ == "__main__":
    {"data": _data, "train": _train, "lengths": _lengths}[sys.argv[1]](Path(sys.argv[2]))
