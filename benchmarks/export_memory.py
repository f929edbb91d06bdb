"""Peak host memory and time of exporting a ZeRO-3 checkpoint: `sftscale export` (streams one
shard at a time) against DeepSpeed's `zero_to_fp32` consolidation, in the same run.

    .venv/bin/python benchmarks/export_memory.py --workdir /tmp/export_bench --hidden 1536 --layers 18

1. Under torchrun (2 ranks, gloo, CPU), build a Llama-shaped model of ~600M parameters inside
   deepspeed.zero.Init, take one AdamW step, save a ZeRO-3 checkpoint (bf16 weights, fp32 master).
2. Run each exporter as its own process and read that process's peak RSS from the kernel
   (os.wait4 -> ru_maxrss; file pages read through memory maps count too) and its wall time.
3. Write benchmarks/results/export_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def trained_engine(hidden: int, layers: int):
    """On every rank (torchrun): a Llama shape of `hidden` x `layers` (vocabulary 32000) built
    inside deepspeed.zero.Init, ZeRO-3 bf16, after one AdamW step. Returns (engine, model, its
    transformers config)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    deepspeed.init_distributed(dist_backend="gloo")
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": dist.get_world_size(),
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}},
        "zero_optimization": {"stage": 3},
    }
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=max(1, hidden // 512),
        vocab_size=32000,
        tie_word_embeddings=False,
    )
    keep = HfDeepSpeedConfig(ds)  # noqa: F841 (transformers reads it through a weakref)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    ids = torch.randint(0, 32000, (1, 16))
    loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
    engine.backward(loss)
    engine.step()
    return engine, model, cfg


def make_checkpoint(root: Path, hidden: int, layers: int) -> None:
    """Runs on every rank (torchrun)."""
    import torch.distributed as dist

    engine, model, cfg = trained_engine(hidden, layers)
    engine.save_checkpoint(str(root), tag="step_00000001")
    if dist.get_rank() == 0:
        cfg.save_pretrained(str(root / "hf_model"))
        n = sum(int(p.ds_numel) for p in model.parameters())
        (root / "num_params.txt").write_text(str(n))
    dist.barrier()
    dist.destroy_process_group()


def measure(cmd: list[str]) -> dict:
    """Wall time and the peak RSS of the process tree's largest process, from the kernel."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd} failed:\n{proc.stderr.read().decode()[-3000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_bytes": usage.ru_maxrss * 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/sftscale_export_bench")
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--max-shard-mb", type=int, default=500)
    ap.add_argument("--make-checkpoint", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.workdir)
    root = work / "checkpoints"
    if args.make_checkpoint:
        make_checkpoint(root, args.hidden, args.layers)
        return

    if not (root / "num_params.txt").is_file():
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                __file__,
                "--make-checkpoint",
                "--workdir",
                str(work),
                "--hidden",
                str(args.hidden),
                "--layers",
                str(args.layers),
            ],
            check=True,
            env=env,
        )
    n_params = int((root / "num_params.txt").read_text())
    ckpt_bytes = sum(f.stat().st_size for f in (root / "step_00000001").rglob("*") if f.is_file())
    runs = {}
    for name, cmd in {
        "deepspeed zero_to_fp32 (fp32 out, safetensors)": [
            sys.executable,
            "-m",
            "deepspeed.utils.zero_to_fp32",
            str(root),
            str(work / "out_ds"),
            "--tag",
            "step_00000001",
            "--safe_serialization",
        ],
        f"sftscale export (fp32 out, {args.max_shard_mb} MB shards)": [
            sys.executable,
            "-m",
            "sftscale",
            "export",
            str(root),
            "--out",
            str(work / "out_fp32"),
            "--dtype",
            "float32",
            "--max-shard-mb",
            str(args.max_shard_mb),
        ],
        f"sftscale export (bf16 out, {args.max_shard_mb} MB shards)": [
            sys.executable,
            "-m",
            "sftscale",
            "export",
            str(root),
            "--out",
            str(work / "out_bf16"),
            "--max-shard-mb",
            str(args.max_shard_mb),
        ],
    }.items():
        runs[name] = measure(cmd)
        print(name, runs[name], flush=True)
    base = runs["deepspeed zero_to_fp32 (fp32 out, safetensors)"]
    for r in runs.values():
        r["peak_rss_vs_zero_to_fp32"] = round(r["peak_rss_bytes"] / base["peak_rss_bytes"], 3)
        r["time_vs_zero_to_fp32"] = round(r["seconds"] / base["seconds"], 3)

    import deepspeed
    import torch
    import transformers

    result = {
        "benchmark": "export of a ZeRO-3 checkpoint to a Hugging Face directory",
        "command": " ".join([".venv/bin/python", "benchmarks/export_memory.py", *sys.argv[1:]]),
        "device": f"CPU only: {os.cpu_count()} cores, {platform.processor() or platform.machine()}",
        "versions": {
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "model": {
            "params": n_params,
            "hidden": args.hidden,
            "layers": args.layers,
            "zero_stage": 3,
            "ranks": 2,
            "checkpoint_bytes": ckpt_bytes,
        },
        "runs": runs,
    }
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "export_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Export of a {n_params / 1e6:.0f}M-parameter ZeRO-3 checkpoint (2 ranks, {ckpt_bytes / 2**30:.1f} GiB on disk)",
        "",
        f"`{result['command']}` on {result['device']}; torch {torch.__version__}, deepspeed {deepspeed.__version__}.",
        "",
        "| exporter | peak RSS | x zero_to_fp32 | time | x zero_to_fp32 |",
        "|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        lines.append(
            f"| {name} | {r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['peak_rss_vs_zero_to_fp32']:.2f} | "
            f"{r['seconds']:.1f} s | {r['time_vs_zero_to_fp32']:.2f} |"
        )
    (out / "export_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
