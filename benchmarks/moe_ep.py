"""A mixture of experts on 2 CPU ranks: ZeRO-3 alone against ZeRO-3 + expert parallelism
(DeepSpeed AutoEP), same model, data and seed, in one invocation: step time, peak RSS of the
worst rank, and the bytes each kind of collective moved per step (DeepSpeed's comms logger).

    .venv/bin/python benchmarks/moe_ep.py --out benchmarks/results/moe_ep.md

Each layout runs under torchrun (2 ranks, gloo, fp32, OMP_NUM_THREADS=1): `warmup + steps`
optimizer steps on packed rows of random tokens, the SFT loss plus the routers' balance loss
(sftscale.moe), the DeepSpeed config sftscale resolves for the run (zero3 template), the MoE
blocks marked as ZeRO-3 leaves. Layouts alternate with --repeats (this host's speed drifts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    num_experts=16,
    num_experts_per_tok=2,
    vocab_size=4000,
    norm_topk_prob=True,
    router_aux_loss_coef=0.01,
)
SEQ_LEN, ROWS = 1024, 2  # per rank and micro-step


def worker(ep: int, steps: int, warmup: int, out: Path) -> None:
    """One rank of one layout (under torchrun)."""
    import resource

    import deepspeed
    import numpy as np
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    from sftscale.config import load_config
    from sftscale.data import collate
    from sftscale.ds_config import resolve_ds_config
    from sftscale.loss import token_loss_sum
    from sftscale.moe import (
        RouterTap,
        autoep_compatible_transformers,
        mark_zero3_leaves,
        routing_of,
    )
    from sftscale.optim import param_groups

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    cfg = load_config(
        None,
        [
            "data.path=/unused",
            "deepspeed.precision=fp32",
            f"train.micro_batch_size={ROWS}",
            "scale.num_workers=2",
            f"scale.expert_parallel_size={ep}",
            "optim.lr=1e-4",
        ],
    )
    ds = resolve_ds_config(cfg, world_size=2, precision="fp32")
    ds["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **SHAPE))
    model.config.use_cache = False
    mark_zero3_leaves(model)
    with autoep_compatible_transformers():
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, 0.0), config=ds
        )
    tap = RouterTap(routing_of(model.config, None)).attach(engine.module)
    rng = np.random.default_rng(rank)
    times = []
    for step in range(warmup + steps):
        if step == warmup:
            deepspeed.comm.comms_logger.comms_dict.clear()  # count the timed steps only
        rows = []
        for _ in range(ROWS):
            lens = rng.integers(64, 512, size=8)
            lens = lens[np.cumsum(lens) <= SEQ_LEN]
            ids = rng.integers(0, SHAPE["vocab_size"], size=int(lens.sum()))
            rows.append((ids, np.ones(len(ids), np.int8), lens))
        batch = collate(rows, seq_len=SEQ_LEN, pad_id=0)
        t0 = time.perf_counter()
        with tap.recording():
            logits = engine(
                input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
            ).logits
        loss = token_loss_sum(logits, batch.targets) / max(batch.num_supervised, 1)
        balance, _ = tap.balance(batch)
        engine.backward(loss + tap.routing.coef * balance / batch.num_tokens)
        engine.step()
        times.append(time.perf_counter() - t0)
    sent = {}
    for op, sizes in deepspeed.comm.comms_logger.comms_dict.items():
        sent[op] = sum(size * record[0] for size, record in sizes.items()) / steps
    result = {
        "ep": ep,
        "rank": rank,
        "step_s": statistics.median(times[warmup:]),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "bytes_per_step": sent,
    }
    (out / f"ep{ep}-rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def run_layout(ep: int, args, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(29500 + ep),
        __file__,
        "--worker",
        str(ep),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--work",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-5000:])
    ranks = [json.loads((out / f"ep{ep}-rank{r}.json").read_text()) for r in (0, 1)]
    return {
        "step_s": max(r["step_s"] for r in ranks),
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ranks),
        "bytes_per_step": ranks[0]["bytes_per_step"],  # rank 0's sends and receives
    }


def report(results: dict[int, list[dict]]) -> str:
    lines = [
        "# A mixture of experts on 2 CPU ranks: ZeRO-3 vs ZeRO-3 + expert parallelism",
        "",
        "`.venv/bin/python benchmarks/moe_ep.py` (Qwen3-MoE class, hidden 256, 4 layers, "
        f"{SHAPE['num_experts']} experts of 256, top-{SHAPE['num_experts_per_tok']}, vocabulary "
        f"{SHAPE['vocab_size']}; {ROWS} packed rows of {SEQ_LEN} per rank and step; fp32, "
        "ZeRO-3, gloo, 1 thread per rank). Step time: median over the timed steps, worst rank, "
        "median over repeats. Bytes: rank 0's collectives per step as DeepSpeed's comms "
        "logger sizes each call (an all-gather by the rank's partition, a reduce-scatter by "
        "the whole bucket, an all-to-all by what the rank sends).",
        "",
        "| layout | s/step | vs ZeRO-3 | peak RSS (worst rank) | all_gather | "
        "reduce_scatter | all_to_all | all_reduce | total per step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = statistics.median(r["step_s"] for r in results[1])
    for ep, runs in results.items():
        step = statistics.median(r["step_s"] for r in runs)
        sent = runs[-1]["bytes_per_step"]

        def mb(prefix: str, sent=sent) -> str:
            return f"{sum(v for k, v in sent.items() if k.startswith(prefix)) / 2**20:.1f} MiB"

        name = "ZeRO-3" if ep == 1 else f"ZeRO-3 + EP={ep}"
        rss = max(r["peak_rss_bytes"] for r in runs) / 2**20
        lines.append(
            f"| {name} | {step:.3f} | {step / base:.2f}x | {rss:.0f} MiB | {mb('all_gather')} | "
            f"{mb('reduce_scatter')} | {mb('all_to_all')} | {mb('all_reduce')} | "
            f"{sum(sent.values()) / 2**20:.1f} MiB |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--work", default="/tmp/moe_ep_bench")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.worker is not None:
        worker(args.worker, args.steps, args.warmup, work)
        return
    results: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for ep in results:
            results[ep].append(run_layout(ep, args, work))
            print(ep, results[ep][-1], flush=True)
    text = report(results)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
