"""summary.md and the PNG plots of a `sftscale bench` run, from its per-run records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

GIB = 2**30


def mem(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


def _fig(rec: dict | None, key: str, fmt: str) -> str:
    if rec is None:
        return "-"
    f = rec["figures"]
    if "error" in f:
        return "failed"
    return mem(f[key]) if fmt == "mem" else format(f[key], fmt)


def pairs(records: list[dict]) -> list[tuple[dict, dict | None]]:
    """(sftscale record, the baseline record of its point or None), in grid order."""
    base = {r["point"]["id"]: r for r in records if r["runner"] == "hf_trainer"}
    out = []
    for r in records:
        if r["runner"] == "sftscale":
            out.append((r, base.get(r["point"]["baseline_id"])))
    return out


def ratio(ours: dict, theirs: dict | None) -> float | None:
    if theirs is None or "error" in ours["figures"] or "error" in theirs["figures"]:
        return None
    return ours["figures"]["supervised_tokens_per_s"] / theirs["figures"]["supervised_tokens_per_s"]


def _precision(ours: dict, theirs: dict | None) -> str:
    """The precision both runs of a point trained in (they resolve it alike)."""
    sides = {r["point"].get("resolved_precision", "?") for r in (ours, theirs) if r is not None}
    return " / ".join(sorted(sides))


def write_report(records: list[dict], out: Path, *, grid: Any, device: dict, command: str) -> None:
    rows = pairs(records)
    first = records[0]
    lines = [
        f"# sftscale bench: {device['name']} x {first['grid']['world_size']}",
        "",
        f"Command: `{command}`  ",
        f"Grid: {grid.description}; {grid.warmup_steps} warm-up + {grid.steps} measured steps per run.  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in first["versions"].items()) + ".",
        "",
        "Baseline: Hugging Face `Trainer` with the same DeepSpeed template, model, micro-batch and",
        "documents (one per row, its default padding collator `DataCollatorForSeq2Seq`). The ratio",
        "is sftscale's supervised tokens/s over the baseline's. Memory: peak allocated per device on",
        "GPU, peak RSS per rank process on CPU (largest rank); DeepSpeed's estimate covers model",
        "states only (weights, gradients, optimizer), per device, host per node in parentheses.",
        "",
        "| point | precision (both sides) | tok/s | supervised tok/s | MFU | HFU | s/step | padding | peak mem | DS estimate | HF supervised tok/s | HF peak mem | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ours, theirs in rows:
        est = ours["ds_memory_estimate"]
        r = ratio(ours, theirs)
        lines.append(
            f"| `{ours['point']['id']}` | {_precision(ours, theirs)} | {_fig(ours, 'tokens_per_s', '.0f')} "
            f"| {_fig(ours, 'supervised_tokens_per_s', '.0f')} | {_fig(ours, 'mfu', '.1%')} "
            f"| {_fig(ours, 'hfu', '.1%')} | {_fig(ours, 'step_time_s', '.3f')} "
            f"| {_fig(ours, 'padding_fraction', '.1%')} "
            f"| {_fig(ours, 'peak_memory_bytes', 'mem')} "
            f"| {mem(est['device_bytes'])} ({mem(est['host_bytes'])}) "
            f"| {_fig(theirs, 'supervised_tokens_per_s', '.0f')} "
            f"| {_fig(theirs, 'peak_memory_bytes', 'mem')} "
            f"| {'-' if r is None else f'{r:.2f}x'} |"
        )
    failed = [r for r in records if "error" in r["figures"]]
    if failed:
        lines += ["", "## Failed runs", ""]
        for r in failed:
            last = r["figures"]["error"].strip().splitlines()[-1:] or [""]
            lines.append(f"- `{r['point']['id']}` ({r['runner']}): `{last[0][:300]}`")
    lines += [
        "",
        "Per-run JSON (device, versions, command, point, figures, estimate): `<point>.<runner>.json`.",
        "Plots: `tokens_per_s.png`, `memory.png`.",
    ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    plot(rows, out)


def plot(rows: list[tuple[dict, dict | None]], out: Path) -> None:
    # heavy (matplotlib): loaded only on the path that uses it
    import matplotlib

    matplotlib.use("Agg")
    # heavy (matplotlib): loaded only on the path that uses it
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [o["point"]["id"] for o, _ in rows]
    x = np.arange(len(labels))

    def values(recs, key, scale=1.0):
        return [
            (r["figures"][key] / scale) if r is not None and "error" not in r["figures"] else 0.0
            for r in recs
        ]

    ours = [o for o, _ in rows]
    theirs = [t for _, t in rows]
    width = 0.38

    def bars(key, scale, names, ylabel, title, file, extra=None):
        """sftscale's and the Trainer's `key` side by side per grid point, saved as `file`."""
        fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(labels) + 3), 5))
        ax.bar(x - width / 2, values(ours, key, scale), width, label=names[0])
        ax.bar(x + width / 2, values(theirs, key, scale), width, label=names[1])
        if extra is not None:
            extra(ax)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_xticks(x, labels, rotation=35, ha="right", fontsize=8)
        ax.legend(fontsize=8, framealpha=0.9)
        fig.tight_layout()
        fig.savefig(out / file, dpi=110)
        plt.close(fig)

    def estimate(ax):
        est = [o["ds_memory_estimate"]["device_bytes"] / GIB for o in ours]
        ax.scatter(
            x,
            est,
            marker="_",
            s=400,
            color="black",
            zorder=3,
            label="DeepSpeed estimate (model states)",
        )

    bars(
        "supervised_tokens_per_s",
        1.0,
        ("sftscale", "HF Trainer"),
        "supervised tokens / s (all ranks)",
        "Training throughput by configuration",
        "tokens_per_s.png",
    )
    bars(
        "peak_memory_bytes",
        GIB,
        ("sftscale peak", "HF Trainer peak"),
        "GiB per device (peak RSS per rank on CPU)",
        "Peak memory by configuration",
        "memory.png",
        extra=estimate,
    )
