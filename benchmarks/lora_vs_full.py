"""Full fine-tuning against LoRA, same model, data, ranks and template, in one invocation:
step time, peak memory of the worst rank (RSS on CPU), checkpoint bytes on disk.

    .venv/bin/python benchmarks/lora_vs_full.py --preset llama-100m --workdir /tmp/lora_bench

Each run is `sftscale train` under torchrun (2 ranks, ZeRO-3), `warmup + steps` optimizer steps
from the same random init, a checkpoint at the end. Step time is the mean over the steps after
the warm-up; the checkpoint is the last one's directory. Runs alternate (full, LoRA, full, ...)
with --repeats, since this machine's speed drifts within minutes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from sftscale.bench.suite import Bench, Grid, Point, default_out, device_info, versions
from sftscale.config import LORA_TARGETS, save_config


def run_one(bench: Bench, point: Point, *, lora: bool, precision: str, tag: str) -> dict:
    import shutil

    run_dir = bench.work / "runs" / f"{point.id}-{tag}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    cfg = bench.run_config(point, run_dir)
    cfg.deepspeed.precision = precision
    cfg.checkpoint.at_end = True
    if lora:
        from sftscale.config import LoraConfig

        cfg.model.lora = LoraConfig(r=16, alpha=32, target_modules=list(LORA_TARGETS))
    path = run_dir.parent / f"{run_dir.name}.yaml"
    save_config(cfg, path)
    (bench.work / "logs").mkdir(exist_ok=True)
    log = bench.work / "logs" / f"{run_dir.name}.log"
    rc, wall = bench.torchrun(["-m", "sftscale", "train", str(path)], log)
    if rc != 0:
        raise SystemExit(f"{tag} failed; see {log}")
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_time_s" in r and r["step"] > bench.grid.warmup_steps]
    ckpt = max((run_dir / "checkpoints").glob("step_*"))
    return {
        "mode": "LoRA r=16 (attention + MLP)" if lora else "full",
        "step_time_s": statistics.mean(r["step_time_s"] for r in steps),
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in steps),
        "checkpoint_bytes": sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()),
        "final_loss": steps[-1]["loss"],
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="llama-100m")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lora_bench"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    point = Point(args.preset, seq_len=args.seq_len, micro_batch_size=1)
    grid = Grid(
        base=point,
        variations=(),
        warmup_steps=args.warmup,
        steps=args.steps,
        conversations=4000,
        description="LoRA vs full",
    )
    args.workdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(
        grid,
        out=args.workdir,
        workdir=args.workdir,
        nproc=args.nproc,
        baseline=False,
        command=" ".join(sys.argv),
    )
    runs = []
    for r in range(args.repeats):
        for lora in (False, True):
            tag = f"{'lora' if lora else 'full'}{r}"
            runs.append(run_one(bench, point, lora=lora, precision=args.precision, tag=tag))
            print(json.dumps(runs[-1]), flush=True)
    out = args.out or default_out("lora-vs-full").with_name("lora_vs_full")
    record = {
        "command": " ".join(["python", *sys.argv]),
        "device": device_info(),
        "versions": versions(),
        "point": point.__dict__,
        "nproc": args.nproc,
        "steps": args.steps,
        "warmup": args.warmup,
        "runs": runs,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    full = [x for x in runs if x["mode"] == "full"]
    lora = [x for x in runs if x["mode"] != "full"]

    def med(rows: list[dict], key: str) -> float:
        return statistics.median(x[key] for x in rows)

    lines = [
        f"# Full fine-tuning vs LoRA: {args.preset}, seq {args.seq_len}, {args.nproc} ranks, ZeRO-3",
        "",
        f"`{record['command']}` on {record['device'].get('name', 'this machine')}; "
        f"{args.steps} measured steps after {args.warmup} warm-up, {args.repeats} repeat(s), medians.",
        "",
        "| | step time (s) | peak memory, worst rank (GiB) | checkpoint on disk (MiB) | final loss |",
        "|---|---|---|---|---|",
    ]
    for name, rows in (("full", full), ("LoRA r=16", lora)):
        lines.append(
            f"| {name} | {med(rows, 'step_time_s'):.2f} | {med(rows, 'peak_memory_bytes') / 2**30:.2f} | "
            f"{med(rows, 'checkpoint_bytes') / 2**20:.1f} | {med(rows, 'final_loss'):.3f} |"
        )
    lines.append(
        f"| LoRA / full | {med(lora, 'step_time_s') / med(full, 'step_time_s'):.2f} | "
        f"{med(lora, 'peak_memory_bytes') / med(full, 'peak_memory_bytes'):.2f} | "
        f"{med(lora, 'checkpoint_bytes') / med(full, 'checkpoint_bytes'):.3f} | |"
    )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
