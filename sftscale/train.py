"""The per-worker training loop: setup -> train -> checkpoint -> export -> cleanup.

The same function runs in every launch mode; only how the processes start differs:

    sftscale train configs/tiny-cpu.yaml            # Ray Train TorchTrainer, N workers
    sftscale train configs/tiny-cpu.yaml --local    # this process, no Ray (debugger-friendly)

Rank and world size come from torch.distributed (never from Ray), so the loop does not know
which launcher started it.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from sftscale.config import Config, OptimConfig
from sftscale.data import (
    IGNORE_INDEX,
    PackedDataset,
    collate,
    rank_micro_batches,
    rows_for_step,
    steps_per_epoch,
)
from sftscale.ds_config import resolve_ds_config, zero_stage
from sftscale.export import MODEL_META_DIR, export_from_engine, save_model_meta
from sftscale.metrics import MetricsLogger, peak_memory_bytes, say
from sftscale.model import enable_gradient_checkpointing, load_model


def lr_at(step: int, o: OptimConfig, max_steps: int) -> float:
    """Linear warmup to `o.lr`, then cosine/linear decay to `o.lr * o.min_lr_ratio` at the end."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    span = max(1, max_steps - o.warmup_steps - 1)
    progress = min(1.0, (step - o.warmup_steps) / span)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1 - progress
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * decay)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms and biases (1-D tensors). ZeRO-3 keeps the real shape in ds_shape."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def init_distributed() -> tuple[int, int]:
    """Join the process group (Ray Train has already created it; local mode creates it here)."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    else:
        deepspeed.init_distributed()  # wraps the existing group
    return dist.get_rank(), dist.get_world_size()


def train_worker(cfg: Config, run_dir: str) -> dict[str, Any]:
    """Run training on this worker; returns a summary (meaningful on every rank)."""
    # DeepSpeed picks its accelerator at import time.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    # ---- setup -------------------------------------------------------------------------------
    rank, world = init_distributed()
    out = Path(run_dir)
    torch.manual_seed(cfg.train.seed)
    dataset = PackedDataset(cfg.data.path)
    tokenizer = AutoTokenizer.from_pretrained(str(dataset.tokenizer_dir))
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    ds_config = resolve_ds_config(cfg, world_size=world)
    dtype = torch.bfloat16 if cfg.deepspeed.precision == "bf16" else torch.float32

    # While this object lives, transformers builds/loads the model inside deepspeed.zero.Init:
    # each rank materializes only its partition of every parameter.
    hf_ds = HfDeepSpeedConfig(ds_config) if zero_stage(ds_config) == 3 else None
    model = load_model(
        cfg.model.name_or_path,
        vocab_size=len(tokenizer),
        dtype=dtype,
        attn_implementation=cfg.model.attn_implementation,
    )
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=ds_config
    )
    del hf_ds
    device = engine.device

    t = cfg.train
    rows_per_step = cfg.global_batch_rows(world)
    metrics = MetricsLogger(out, enabled=rank == 0, tensorboard=cfg.logging.tensorboard)
    if rank == 0:
        say(
            f"{world} worker(s), ZeRO-{zero_stage(ds_config)} {cfg.deepspeed.precision}, "
            f"{len(dataset)} rows of {dataset.seq_len}, {rows_per_step} rows/step, "
            f"{steps_per_epoch(len(dataset), rows_per_step)} steps/epoch, {t.max_steps} steps"
        )

    # ---- train -------------------------------------------------------------------------------
    engine.train()
    window = {"loss_sum": 0.0, "supervised": 0, "tokens": 0, "time": 0.0, "steps": 0}
    losses: list[float] = []
    for step in range(t.max_steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.optim, t.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_rows = rows_for_step(
            step,
            num_rows=len(dataset),
            rows_per_step=rows_per_step,
            seed=cfg.data.seed,
            shuffle=cfg.data.shuffle,
        )
        micro = [
            collate([dataset.row(int(i)) for i in rows], seq_len=dataset.seq_len, pad_id=pad_id)
            for rows in rank_micro_batches(
                step_rows,
                rank=rank,
                world_size=world,
                micro_batch_size=t.micro_batch_size,
                grad_accum=t.grad_accum,
            )
        ]
        # Collective: the loss of a step is the sum of token losses over the global number of
        # supervised tokens in it, across micro-steps and ranks; every rank needs that count
        # before its first backward.
        counts = torch.tensor(
            [sum(b.num_supervised for b in micro), sum(b.num_tokens for b in micro)],
            dtype=torch.float64,
        )
        dist.all_reduce(counts)
        global_supervised = max(counts[0].item(), 1.0)
        # DeepSpeed divides each micro-step's gradient by grad_accum and averages over ranks;
        # scaling by (grad_accum * world) undoes both so gradients are sum / global_supervised.
        scale = t.grad_accum * world / global_supervised
        step_loss_sum = torch.zeros((), dtype=torch.float64)
        for batch in micro:
            batch = batch.to(device)
            # use_cache=False is load-bearing: with a KV cache, transformers does not detect
            # the packed rows from position_ids and attention would cross document boundaries.
            logits = engine(
                input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
            ).logits
            loss_sum = torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1),
                batch.targets.flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            engine.backward(loss_sum * scale)
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            step_loss_sum += loss_sum.detach().to("cpu", torch.float64)
        dt = time.perf_counter() - t0
        window["loss_sum"] += step_loss_sum.item()  # CPU-GPU sync point, once per step
        window["supervised"] += counts[0].item()
        window["tokens"] += counts[1].item()
        window["time"] += dt
        window["steps"] += 1

        if (step + 1) % cfg.logging.every_n_steps == 0 or step + 1 == t.max_steps:
            loss_sum_global = torch.tensor([window["loss_sum"]], dtype=torch.float64)
            dist.all_reduce(loss_sum_global)  # collective
            loss = loss_sum_global.item() / max(window["supervised"], 1.0)
            losses.append(loss)
            record = {
                "step": step + 1,
                "epoch": step // max(steps_per_epoch(len(dataset), rows_per_step), 1),
                "loss": loss,
                "lr": lr,
                "grad_norm": _grad_norm(engine),
                "tokens_per_s": window["tokens"] / window["time"],
                "supervised_tokens_per_s": window["supervised"] / window["time"],
                "step_time_s": window["time"] / window["steps"],
                "peak_memory_bytes": peak_memory_bytes(),
            }
            metrics.log(record)
            if rank == 0:
                say(
                    f"step {step + 1:>5}/{t.max_steps}  loss {loss:.4f}  lr {lr:.2e}  "
                    f"{record['tokens_per_s']:.0f} tok/s  {record['step_time_s']:.2f} s/step"
                )
            window = {k: 0 for k in window}
        if cfg.checkpoint.every_n_steps and (step + 1) % cfg.checkpoint.every_n_steps == 0:
            save_checkpoint(
                engine, out, step=step + 1, tokenizer_dir=dataset.tokenizer_dir, rank=rank
            )

    # ---- checkpoint + export -------------------------------------------------------------------
    if not (cfg.checkpoint.every_n_steps and t.max_steps % cfg.checkpoint.every_n_steps == 0):
        save_checkpoint(
            engine, out, step=t.max_steps, tokenizer_dir=dataset.tokenizer_dir, rank=rank
        )
    if cfg.checkpoint.export:
        export_from_engine(
            engine.module,
            out_dir=out / "export",
            tokenizer_dir=dataset.tokenizer_dir,
            max_shard_bytes=cfg.checkpoint.export_max_shard_mb * 1024 * 1024,
            rank=rank,
        )

    # ---- cleanup -------------------------------------------------------------------------------
    metrics.close()
    dist.barrier()  # collective: no rank leaves while another still writes
    return {"rank": rank, "world_size": world, "losses": losses, "run_dir": str(out)}


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


def save_checkpoint(engine, run_dir: Path, *, step: int, tokenizer_dir: Path, rank: int) -> None:
    """Collective: every rank writes its partition; DeepSpeed updates `latest` after the write."""
    root = run_dir / "checkpoints"
    engine.save_checkpoint(str(root), tag=f"step_{step:08d}", client_state={"step": step})
    if rank == 0 and not (root / MODEL_META_DIR).is_dir():  # rank-0-only effect
        save_model_meta(engine.module, tokenizer_dir, root / MODEL_META_DIR)
