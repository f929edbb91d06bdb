"""Peak memory and time of the loss (cross-entropy + its backward) on the logits of one
Llama-3-vocabulary row: `train.loss_chunk_tokens` chunking against the plain fp32 loss, each in
a fresh process, same logits.

    .venv/bin/python benchmarks/loss_memory.py [--seq-len 4096 --vocab 128256 --chunks 0 1024 4096]

On CPU, peak = the process's peak RSS minus its RSS with the logits allocated (ru_maxrss, after
a warm-up); on GPU, torch.cuda.max_memory_allocated minus the same baseline. The logits are bf16
and require grad, as a model's output does; what is measured is what the loss adds on top.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, resource, sys, time
import torch
from sftscale.loss import token_loss_sum
seq, vocab, chunk = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
cuda = torch.cuda.is_available()
dev = "cuda" if cuda else "cpu"
g = torch.Generator(device=dev).manual_seed(0)
logits = torch.randn(1, seq, vocab, device=dev, generator=g, dtype=torch.bfloat16).requires_grad_()
targets = torch.randint(0, vocab, (1, seq), device=dev, generator=g)
targets[0, : seq // 3] = -100  # a prompt
def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def current_rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
if cuda:
    torch.cuda.synchronize(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
else:
    base = current_rss()
t0 = time.perf_counter()
loss = token_loss_sum(logits, targets, chunk_tokens=chunk)
loss.backward()
if cuda:
    torch.cuda.synchronize()
seconds = time.perf_counter() - t0
peak = (torch.cuda.max_memory_allocated() if cuda else rss()) - base
print(json.dumps({"chunk_tokens": chunk, "loss": loss.item(), "grad_sum": logits.grad.float().sum().item(),
                  "extra_peak_bytes": peak, "seconds": seconds,
                  "device": torch.cuda.get_device_name() if cuda else "cpu"}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 4096 // 2, 1024, 256])
    args = ap.parse_args()
    results = []
    for chunk in args.chunks:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(args.seq_len), str(args.vocab), str(chunk)],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(
            f"chunk {chunk:>5}: +{r['extra_peak_bytes'] / 2**30:.2f} GiB, {r['seconds']:.2f} s, loss {r['loss']:.4f}"
        )
    ref = results[0]
    command = "python benchmarks/loss_memory.py " + " ".join(sys.argv[1:])
    lines = [
        f"# Loss memory: chunked cross-entropy ({ref['device']}, {time.strftime('%Y-%m-%d')})",
        "",
        f"Command: `{command.strip()}`  ",
        f"Logits of one row: {args.seq_len} tokens x {args.vocab} vocabulary, bf16 ({args.seq_len * args.vocab * 2 / 2**30:.2f} GiB, not counted).",
        "Memory the loss and its backward add on top of the logits (the logits' gradient included).",
        "Unchunked, autograd keeps an fp32 copy of the logits and their fp32 log-softmax; chunked, only",
        "one chunk's fp32 work exists at a time (recomputed in backward). The default is 1024.",
        "",
        "| loss_chunk_tokens | extra peak | vs unchunked | time | vs unchunked | loss, relative to unchunked |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['chunk_tokens'] or 'off'} | {r['extra_peak_bytes'] / 2**30:.2f} GiB "
            f"| {r['extra_peak_bytes'] / ref['extra_peak_bytes']:.2f}x | {r['seconds']:.2f} s "
            f"| {r['seconds'] / ref['seconds']:.2f}x | {(r['loss'] - ref['loss']) / ref['loss']:+.1e} |"
        )
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "loss_memory.md").write_text("\n".join(lines) + "\n")
    (HERE / "results" / "loss_memory.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
