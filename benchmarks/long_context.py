"""Long rows: peak memory per rank against row length for SP=1, SP=2 and SP=2 with tiling
(`sftscale bench --grid cpu-long`, 2 ranks, ZeRO-3), the slope of each and the longest row that
trains within a per-rank memory budget; and per-document attention against transformers' masked
sdpa on one packed row (fresh processes, same model and row).

    .venv/bin/python benchmarks/long_context.py [--budget-gib 3] [--workdir /tmp/long_bench]
    .venv/bin/python benchmarks/long_context.py --report-only    # tables from the last run

Writes benchmarks/results/long_context.{md,json} (and the suite's runs in
benchmarks/results/bench-cpu-long/). Peak memory is the worst rank's peak RSS (ru_maxrss), so
it includes what the process holds before training (interpreter, libraries, model states):
the slope is what a longer row costs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SERIES = {(1, False): "SP=1", (2, False): "SP=2", (2, True): "SP=2 + tiled MLP and logits"}

ATTENTION_CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from transformers import AutoModelForCausalLM
from sftscale.data import collate
from sftscale.loss import token_loss_sum
from sftscale.model import enable_gradient_checkpointing, model_config
from sftscale.precision import device_native_bf16
from sftscale.sequence_parallel import apply_document_attention
seq, how = int(sys.argv[1]), sys.argv[2]
dtype = torch.bfloat16 if device_native_bf16(cuda=False)[0] else torch.float32
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(model_config("small-llama", vocab_size=4000)).to(dtype)
model.train()
enable_gradient_checkpointing(model)
if how == "per_document":
    apply_document_attention(model)
rng = np.random.default_rng(0)
lens = rng.integers(100, 1200, size=seq // 100)  # documents of 100-1200 tokens fill the row
lens = lens[: np.searchsorted(np.cumsum(lens), seq)]
lens = np.append(lens, seq - lens.sum())
row = (rng.integers(3, 4000, size=seq), np.ones(seq, dtype=np.int8), lens)
batch = collate([row], seq_len=seq, pad_id=0)
def step():
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    loss = token_loss_sum(logits, batch.targets, chunk_tokens=1024)
    loss.backward()
    return loss.item()
step()  # warm-up
t0 = time.perf_counter()
loss = step()
print(json.dumps({"seq_len": seq, "attention": how, "documents": len(lens), "dtype": str(dtype),
                  "loss": loss, "seconds": time.perf_counter() - t0,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


# glibc raises its mmap threshold to the size of every large block freed, after which blocks
# of that size come from the heap and stay resident when freed: peak RSS then counts freed
# activations of earlier layers and steps (measured here: +35% at 64k positions, and SP=2's
# slope 0.72 of SP=1's instead of 0.49). A fixed threshold returns every block of 1 MiB or
# more to the system when it is freed, so peak RSS follows the live tensors.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}


# The same row through the same engine for SP=1 and SP=2: rank 0 trains row 0 of the prepared
# data whole (SP=1; rank 1 trains row 1) or its half of row 0 (SP=2), two steps, ZeRO-3, bf16;
# with oneDNN on (PyTorch's default on CPU) or off. oneDNN's bf16 matmuls keep buffers of their
# own, outside PyTorch's allocator, and those grow with the whole row, not with the rank's slice.
SAME_ROW_CHILD = r"""
import os, resource, sys, time
import deepspeed, torch, torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations import HfDeepSpeedConfig
from sftscale.data import PackedDataset, collate
from sftscale.loss import token_loss_sum
from sftscale.model import enable_gradient_checkpointing, model_config
from sftscale.sequence_parallel import apply_document_attention, apply_ulysses, sequence_parallel_group
data, sp = PackedDataset(sys.argv[1]), int(sys.argv[2])
torch.backends.mkldnn.enabled = sys.argv[3] == "on"
deepspeed.init_distributed(dist_backend="gloo")
rank = dist.get_rank()
ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
      "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
      "zero_optimization": {"stage": 3}}
hf = HfDeepSpeedConfig(ds)
torch.manual_seed(0)
vocab = len(AutoTokenizer.from_pretrained(str(data.tokenizer_dir)))
model = AutoModelForCausalLM.from_config(model_config("small-llama", vocab_size=vocab), dtype=torch.bfloat16)
enable_gradient_checkpointing(model)
if sp > 1:
    apply_ulysses(model, group=sequence_parallel_group(sp), attn_implementation="sdpa")
else:
    apply_document_attention(model)
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
row = data.row(0 if sp > 1 else rank)
batch = collate([row], seq_len=data.seq_len, pad_id=0, pad_to_multiple_of=8)
if sp > 1:
    batch = batch.shard(rank, sp)
for _ in range(2):
    t0 = time.perf_counter()
    logits = engine(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    loss = token_loss_sum(logits, batch.targets, chunk_tokens=1024)
    engine.backward(loss)
    engine.step()
    del logits, loss
if rank == 0:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, time.perf_counter() - t0)
dist.destroy_process_group()
"""


def same_row_runs(workdir: Path, lengths: list[int], off_lengths: list[int]) -> list[dict]:
    """oneDNN off makes bf16 matmuls ~12x slower here: fewer lengths for it."""
    import os

    out = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **FIXED_MMAP_THRESHOLD}
    for onednn, seqs in (("on", lengths), ("off", off_lengths)):
        for seq in seqs:
            data = workdir / f"data-corpus-4000-s{seq}-packed"
            for sp in (1, 2):
                proc = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "torch.distributed.run",
                        "--standalone",
                        "--nproc-per-node",
                        "2",
                        "--no-python",
                        sys.executable,
                        "-c",
                        SAME_ROW_CHILD,
                        str(data),
                        str(sp),
                        onednn,
                    ],
                    capture_output=True,
                    text=True,
                    env=env,
                )
                run = {"seq_len": seq, "sp": sp, "onednn": onednn}
                if proc.returncode != 0:
                    out.append({**run, "error": proc.stderr[-500:]})
                else:
                    peak, seconds = proc.stdout.strip().splitlines()[-1].split()
                    out.append({**run, "peak_rss_bytes": int(peak), "step_s": float(seconds)})
                print(out[-1], flush=True)
    return out


def run_grid(workdir: Path, *, out: Path, glibc_default: bool) -> None:
    import os

    if glibc_default:  # `sftscale bench` runs the config's default: the pinned threshold
        raise SystemExit(
            "sftscale's CPU workers pin glibc's mmap threshold at train.cpu_mmap_threshold "
            "(1 MiB) since that setting exists, and the bench grid has no axis for it: the "
            "saved glibc-default table (bench-cpu-long-glibc-default) predates it"
        )
    env = {**os.environ, **FIXED_MMAP_THRESHOLD}
    cmd = [
        sys.executable,
        "-m",
        "sftscale",
        "bench",
        "--grid",
        "cpu-long",
        "--no-baseline",
        "--out",
        str(out),
        "--workdir",
        str(workdir),
    ]
    subprocess.run(cmd, check=True, env=env)


def attention_runs(lengths: list[int]) -> list[dict]:
    out = []
    for seq in lengths:
        for how in ("masked", "per_document"):  # masked: transformers' own packed-row path
            env = {"OMP_NUM_THREADS": "1", **__import__("os").environ}
            proc = subprocess.run(
                [sys.executable, "-c", ATTENTION_CHILD, str(seq), how],
                capture_output=True,
                text=True,
                env=env,
            )
            if proc.returncode != 0:
                out.append({"seq_len": seq, "attention": how, "error": proc.stderr[-500:]})
            else:
                out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(out[-1], flush=True)
    return out


def series(grid_dir: Path) -> dict[str, list[tuple[int, int, float]]]:
    """(seq_len, worst rank's peak bytes, s/step) per series, from the grid's run records."""
    out: dict[str, list[tuple[int, int, float]]] = {name: [] for name in SERIES.values()}
    for f in sorted(grid_dir.glob("*.sftscale.json")):
        rec = json.loads(f.read_text())
        p, fig = rec["point"], rec["figures"]
        if "error" in fig:
            continue
        name = SERIES[(p["sequence_parallel_size"], p["tiled"])]
        out[name].append((p["seq_len"], fig["peak_memory_bytes"], fig["step_time_s"]))
    return {k: sorted(v) for k, v in out.items()}


def slope(points: list[tuple[int, int, float]]) -> tuple[float, float]:
    """Least-squares (bytes per position, intercept bytes) of peak memory on row length."""
    n = len(points)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return b, my - b * mx


GRID_DIRS = {
    "fixed": RESULTS / "bench-cpu-long",  # MALLOC_MMAP_THRESHOLD_ fixed at 1 MiB
    "glibc": RESULTS / "bench-cpu-long-glibc-default",  # glibc's dynamic threshold
}


def memory_section(grid_dir: Path, budget: float) -> tuple[list[str], dict, dict]:
    data = series(grid_dir)
    gib = 2**30
    lines = [
        "| row length | " + " | ".join(f"{n}: peak GiB (s/step)" for n in data) + " |",
        "|---|" + "---|" * len(data),
    ]
    for seq in sorted({p[0] for pts in data.values() for p in pts}):
        cells = []
        for pts in data.values():
            hit = [p for p in pts if p[0] == seq]
            cells.append(f"{hit[0][1] / gib:.2f} ({hit[0][2]:.1f})" if hit else "-")
        lines.append(f"| {seq} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| series | slope (MiB per 1k positions) | ratio to SP=1 | longest measured row "
        f"within {budget:g} GiB per rank | fit's longest row within it |",
        "|---|---|---|---|---|",
    ]
    base, summary = None, {}
    common = set.intersection(*({p[0] for p in pts} for pts in data.values() if pts))
    for name, pts in data.items():
        if len(pts) < 2:
            continue
        b, a = slope([p for p in pts if p[0] in common])  # the same lengths for every series
        base = base or b
        fits = [p[0] for p in pts if p[1] <= budget * gib]
        predicted = int((budget * gib - a) / b) if b > 0 else None
        summary[name] = {
            "bytes_per_position": b,
            "intercept_bytes": a,
            "ratio_to_sp1": b / base,
            "longest_measured_within_budget": max(fits) if fits else None,
            "fit_longest_within_budget": predicted,
        }
        lines.append(
            f"| {name} | {b * 1024 / 2**20:.1f} | {b / base:.2f} | "
            f"{max(fits) if fits else 'none'} | {predicted} |"
        )
    return lines, summary, data


def same_row_section(runs: list[dict]) -> list[str]:
    gib = 2**30
    ok = [{"onednn": "on", **r} for r in runs if "error" not in r]  # older records: oneDNN on
    variants = [v for v in ("on", "off") if any(r["onednn"] == v for r in ok)]
    lines = [
        "",
        "## The same row through the same engine (rank 0; SP=1: the row whole, SP=2: its half)",
        "",
        "The grid's SP=1 runs give each of 2 ranks its own row per step while SP=2 shares one, so "
        "the two series see different rows, and a run's peak depends on its rows (0.98, 1.08 and "
        "1.31 GiB after steps 1-3 of the 32k SP=2 run). Here rank 0 trains row 0 of the same "
        "prepared data in both: small-llama, ZeRO-3, bf16, 2 steps, fixed mmap threshold; with "
        "oneDNN on (PyTorch's default on CPU) and off (`torch.backends.mkldnn.enabled = False`). "
        "With oneDNN on, memory outside PyTorch's allocator that does not shrink with the "
        "rank's slice dilutes the halving (docs/long_context.md, \"Where the excess comes "
        'from").',
        "",
        "| row length | "
        + " | ".join(
            f"oneDNN {v}: SP=1 peak GiB (s/step) | oneDNN {v}: SP=2 peak GiB (s/step)"
            for v in variants
        )
        + " |",
        "|---|" + "---|---|" * len(variants),
    ]

    def pick(seq: int, sp: int, v: str) -> dict | None:
        return next((r for r in ok if (r["seq_len"], r["sp"], r["onednn"]) == (seq, sp, v)), None)

    for seq in sorted({r["seq_len"] for r in ok}):
        cells = []
        for v in variants:
            for sp in (1, 2):
                r = pick(seq, sp, v)
                step = f" ({r['step_s']:.1f})" if r and "step_s" in r else ""
                cells.append(f"{r['peak_rss_bytes'] / gib:.2f}{step}" if r else "-")
        lines.append(f"| {seq} | " + " | ".join(cells) + " |")
    lines.append("")
    for v in variants:
        slopes = {}
        for sp in (1, 2):
            pts = [
                (r["seq_len"], r["peak_rss_bytes"], 0.0)
                for r in ok
                if r["sp"] == sp and r["onednn"] == v
            ]
            if len(pts) >= 2:
                slopes[sp] = slope(pts)[0]
        if len(slopes) == 2:
            lines.append(
                f"- oneDNN {v}: slope per 1k positions SP=1 {slopes[1] * 1024 / 2**20:.1f} MiB, "
                f"SP=2 {slopes[2] * 1024 / 2**20:.1f} MiB (**{slopes[2] / slopes[1]:.2f}x**)."
            )
    return lines


def report(budget: float, attention: list[dict], same_row: list[dict] | None = None) -> str:
    gib = 2**30
    lines = [
        "# Long rows: memory per rank against row length (`benchmarks/long_context.py`)",
        "",
        "`sftscale bench --grid cpu-long --no-baseline`: small-llama (hidden 256, 4 layers, 8 heads, "
        "vocabulary ~4k), 2 CPU ranks, ZeRO-3, bf16 where the CPU has it, gradient checkpointing, "
        "packed rows of the synthetic corpus, micro-batch 1 (SP=1: one row per rank; SP=2: one row "
        "per group of 2), 1 warm-up + 2 measured steps per point. Peak = the worst rank's peak RSS. "
        "Slopes: least squares over the lengths every series has; the fit's row is where that "
        "line meets the budget.",
    ]
    saved = {}
    for key, title in (
        ("fixed", "## Workers with MALLOC_MMAP_THRESHOLD_=1048576 (peak RSS follows live tensors)"),
        ("glibc", "## Workers with glibc's default (dynamic) mmap threshold"),
    ):
        if not GRID_DIRS[key].is_dir():
            continue
        section, summary, data = memory_section(GRID_DIRS[key], budget)
        lines += ["", title, "", *section]
        saved[key] = {"series": data, "summary": summary}
    if same_row:
        lines += same_row_section(same_row)
        saved["same_row"] = same_row
    if attention:
        lines += [
            "",
            "## Per-document attention against transformers' masked sdpa (one packed row)",
            "",
            "Fresh process per run, 1 thread, small-llama, gradient checkpointing, one "
            "forward + backward after a warm-up, documents of 100-1200 tokens filling the row.",
            "",
            "| row length | documents | masked: s | per document: s | speed-up | masked: peak GiB | per document: peak GiB | relative loss difference |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for seq in sorted({r["seq_len"] for r in attention}):
            m = next(r for r in attention if r["seq_len"] == seq and r["attention"] == "masked")
            d = next(
                r for r in attention if r["seq_len"] == seq and r["attention"] == "per_document"
            )
            if "error" in m or "error" in d:
                lines.append(f"| {seq} | failed: {(m.get('error') or d.get('error'))[-120:]!r} |")
                continue
            lines.append(
                f"| {seq} | {d['documents']} | {m['seconds']:.2f} | {d['seconds']:.2f} | "
                f"{m['seconds'] / d['seconds']:.1f}x | {m['peak_rss_bytes'] / gib:.2f} | "
                f"{d['peak_rss_bytes'] / gib:.2f} | {abs(m['loss'] - d['loss']) / abs(m['loss']):.1e} |"
            )
    (RESULTS / "long_context.json").write_text(
        json.dumps({"budget_gib": budget, **saved, "attention": attention}, indent=1) + "\n"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--budget-gib", type=float, default=3.0)
    ap.add_argument("--workdir", default="/tmp/long_bench")
    ap.add_argument("--attention-lengths", type=int, nargs="*", default=[4096, 8192, 16384])
    ap.add_argument(
        "--glibc-default",
        action="store_true",
        help="run the grid with glibc's own mmap threshold (the other table)",
    )
    ap.add_argument("--skip-attention", action="store_true", help="keep the saved attention runs")
    ap.add_argument("--report-only", action="store_true", help="tables from the saved runs")
    ap.add_argument("--same-row-lengths", type=int, nargs="*", default=[8192, 32768, 65536])
    ap.add_argument(
        "--same-row-off-lengths",
        type=int,
        nargs="*",
        default=[8192, 32768],
        help="lengths of the same-row runs with oneDNN off",
    )
    ap.add_argument(
        "--same-row-only",
        action="store_true",
        help="only the same-row runs (on the grid's prepared data in --workdir)",
    )
    args = ap.parse_args()
    saved_path = RESULTS / "long_context.json"
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else {}
    attention, same_row = saved.get("attention", []), saved.get("same_row", [])
    if not args.report_only:
        if not args.same_row_only:
            if not args.skip_attention:
                attention = attention_runs(args.attention_lengths)
            key = "glibc" if args.glibc_default else "fixed"
            run_grid(Path(args.workdir), out=GRID_DIRS[key], glibc_default=args.glibc_default)
        same_row = same_row_runs(
            Path(args.workdir), args.same_row_lengths, args.same_row_off_lengths
        )
    text = report(args.budget_gib, attention, same_row)
    (RESULTS / "long_context.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
