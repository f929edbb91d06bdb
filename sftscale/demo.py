"""End-to-end demo on CPU: corpus -> tokenizer -> shards -> 2-worker Ray + ZeRO-3 fine-tune ->
reload the Hugging Face export -> generate a reply.

    make demo          # or: python -m sftscale.demo --workdir runs/demo
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument(
        "--config", default=str(Path(__file__).resolve().parent / "configs" / "tiny-cpu.yaml")
    )
    parser.add_argument("--conversations", type=int, default=800)
    parser.add_argument(
        "--local", action="store_true", help="train in this process instead of on Ray"
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value for the training config")
    args = parser.parse_args(argv)
    work = Path(args.workdir).resolve()
    if work.exists():  # the demo's own directory: start clean every time
        import shutil

        shutil.rmtree(work)

    # the pipeline's modules load torch and transformers: imported when the demo runs
    from data_tools.prepare import PrepareOptions, prepare, summary_line
    from data_tools.synthetic import (
        conversation_texts,
        make_conversations,
        train_sentencepiece_tokenizer,
        write_jsonl,
    )

    print("== 1. corpus and tokenizer")
    records = make_conversations(args.conversations, seed=0)
    corpus = write_jsonl(records, work / "corpus.jsonl")
    tok_dir = train_sentencepiece_tokenizer(
        conversation_texts(records), work / "tokenizer", vocab_size=512
    )
    print(f"{len(records)} conversations -> {corpus}; SentencePiece tokenizer -> {tok_dir}")

    print("== 2. prepare packed shards")
    manifest = prepare(
        [str(corpus)],
        tokenizer_path=str(tok_dir),
        out_dir=str(work / "prepared"),
        options=PrepareOptions(seq_len=256),
    )
    print(summary_line(manifest))

    print("== 3. fine-tune" + (" (local mode)" if args.local else " (Ray Train, DeepSpeed ZeRO-3)"))
    # the pipeline's modules load torch and transformers: imported when the demo runs
    from sftscale.config import load_config
    from sftscale.launch import run

    cfg = load_config(
        args.config,
        [f"data.path={work / 'prepared'}", f"logging.output_dir={work}", *args.overrides],
    )
    run(cfg, local=args.local)
    lines = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    losses = [r["loss"] for r in map(json.loads, lines) if "loss" in r]
    print("loss by logged step: " + " -> ".join(f"{x:.3f}" for x in losses))

    print("== 4. reload the export and generate")
    # heavy (torch): loaded only on the path that uses it
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = cfg.run_dir / "export"
    model = AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    for question in ["What is the capital of Italy?", "What is 3 plus 4?"]:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        # plain generate(): the export's generation_config.json lists the end-of-turn id as
        # EOS, so the reply stops at the end of its turn
        out = model.generate(ids, max_new_tokens=48, do_sample=False)
        reply = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        print(f"user: {question}\nassistant (reloaded export): {reply}")
    print(f"run directory: {cfg.run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
