"""The per-worker training loop: setup -> train (+ eval) -> checkpoint -> export -> cleanup.

The same function runs in every launch mode; only how the processes start differs:

    sftscale train configs/tiny-cpu.yaml            # Ray Train TorchTrainer, N workers
    sftscale train configs/tiny-cpu.yaml --local    # this process, no Ray (debugger-friendly)
    torchrun --nproc-per-node 8 -m sftscale train configs/x.yaml   # one rank per process (local mode)

Rank and world size come from torch.distributed (never from Ray), so the loop does not know
which launcher started it.

The loss of an optimizer step is the sum of token losses over every supervised token in the
step divided by the number of those tokens, counted across gradient-accumulation micro-steps
and data-parallel ranks. So (micro 4, accum 1, 1 rank), (micro 1, accum 4, 1 rank) and
(micro 1, accum 2, 2 ranks) give the same update for the same global batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sftscale.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    make_adam_resumable,
    read_state,
    save_checkpoint,
    truncate_ledger,
    universal_checkpoint,
)
from sftscale.config import Config, OptimConfig
from sftscale.data import (
    IGNORE_INDEX,
    Batch,
    PackedDataset,
    balance_ranks,
    collate,
    steps_per_epoch,
    stream_rows,
)
from sftscale.ds_config import resolve_ds_config, zero_stage
from sftscale.export import MODEL_META_DIR, export_from_engine, save_model_meta
from sftscale.flops import ModelShape, device_peak_flops, doc_flops, hardware_flops
from sftscale.metrics import (
    MetricsLogger,
    ProgressBar,
    peak_memory_bytes,
    peak_reserved_bytes,
    say,
)
from sftscale.model import (
    enable_gradient_checkpointing,
    fill_new_rows,
    grow_vocabulary,
    load_model,
    model_vocab_size,
    set_special_token_ids,
)
from sftscale.precision import Precision, agree, choose, device_native_bf16


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


def token_loss_sum(
    logits: torch.Tensor, targets: torch.Tensor, *, chunk_tokens: int = 0
) -> torch.Tensor:
    """Summed cross-entropy over supervised positions, in fp32 whatever the logits' dtype.

    With `chunk_tokens`, positions are taken that many at a time and each chunk's fp32 work is
    recomputed in backward instead of kept: the fp32 copy of the logits and the fp32
    log-softmax autograd would save (8 bytes per logit, 4 GiB for one 4096-token row of a
    128k vocabulary) become one chunk's worth. The logits tensor itself stays.
    """
    flat_logits, flat_targets = logits.flatten(0, 1), targets.flatten()
    n = flat_targets.numel()
    if not chunk_tokens or n <= chunk_tokens or not torch.is_grad_enabled():
        return _ce_sum(flat_logits, flat_targets)
    from torch.utils.checkpoint import checkpoint

    parts = [
        checkpoint(_ce_sum, flat_logits[i : i + chunk_tokens], flat_targets[i : i + chunk_tokens],
                   use_reentrant=False)
        for i in range(0, n, chunk_tokens)
    ]  # fmt: skip
    return torch.stack(parts).sum()


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )


def choose_precision(requested: str, *, world: int) -> Precision:
    """`deepspeed.precision` resolved on this device, the same on every rank. Collective."""
    import torch.distributed as dist

    native, why = device_native_bf16(cuda=torch.cuda.is_available())
    chosen = choose(requested, native_bf16=native, why=why)
    if world > 1:
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        flag = torch.tensor([float(native)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # collective: bf16 only if every rank has it
        chosen = agree(chosen, native_everywhere=bool(flag.item()))
    return chosen


def init_distributed() -> tuple[int, int]:
    """Join the process group (Ray Train has already created it; local mode creates it here)."""
    import deepspeed
    import torch.distributed as dist

    if torch.cuda.is_available():
        # Before any CUDA allocation (zero.Init places partitions on the current device): one
        # GPU per rank. A launcher that shows each rank only its own GPU gets device 0.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    else:
        deepspeed.init_distributed()  # wraps the existing group
    return dist.get_rank(), dist.get_world_size()


# Micro-batches are padded to their longest row rounded up to this (packed rows are nearly
# full anyway; unpacked rows would otherwise pay for padding up to seq_len). 64 cost ~9% extra
# compute on single unpacked documents (bench: llama-100m, micro 1); 8 keeps tensor-core shapes.
PAD_MULTIPLE = 8


@dataclass
class StepPlan:
    micro: list[Batch]  # this rank's micro-batches
    model_flops: float  # of the whole global batch
    imbalance: float  # max rank cost / mean rank cost - 1
    epochs: np.ndarray  # epoch of each of the step's global rows
    step_rows: np.ndarray  # the step's global rows, in stream order

    @property
    def rows(self) -> int:
        return len(self.step_rows)


def plan_step(
    position: int,
    dataset: PackedDataset,
    cfg: Config,
    *,
    rank: int,
    world: int,
    shape: ModelShape,
    pad_id: int,
) -> StepPlan:
    """This rank's micro-batches for the step that starts at stream `position`.

    A pure function of its arguments: every rank computes the whole step's assignment.
    """
    t = cfg.train
    epochs, step_rows = stream_rows(
        position,
        cfg.global_batch_rows(world),
        num_rows=len(dataset),
        seed=cfg.data.seed,
        shuffle=cfg.data.shuffle,
    )
    costs = np.array([doc_flops(dataset.doc_lens(int(i)), shape) for i in step_rows])
    if t.balance_ranks:
        per_rank, imbalance = balance_ranks(
            step_rows,
            costs,
            world_size=world,
            micro_batch_size=t.micro_batch_size,
            grad_accum=t.grad_accum,
        )
    else:  # positional: micro-step a on rank r takes slice (a * world + r)
        m = t.micro_batch_size
        slots = [
            [np.arange((a * world + r) * m, (a * world + r + 1) * m) for a in range(t.grad_accum)]
            for r in range(world)
        ]
        per_rank = [[step_rows[i] for i in rank_slots] for rank_slots in slots]
        loads = [float(costs[np.concatenate(rank_slots)].sum()) for rank_slots in slots]
        imbalance = max(loads) / (sum(loads) / world) - 1 if sum(loads) else 0.0
    micro = [
        collate(
            [dataset.row(int(i)) for i in rows],
            seq_len=dataset.seq_len,
            pad_id=pad_id,
            pad_to_multiple_of=PAD_MULTIPLE,
        )
        for rows in per_rank[rank]
    ]
    return StepPlan(
        micro=micro,
        model_flops=float(costs.sum()),
        imbalance=imbalance,
        epochs=epochs,
        step_rows=step_rows,
    )


def evaluate(
    engine, eval_set: PackedDataset, cfg: Config, *, rank: int, world: int, pad_id: int
) -> dict:
    """Held-out loss and perplexity over the eval set (or its first eval.max_rows rows).

    Collective. Under ZeRO-3 every forward gathers parameters from all ranks, so every rank
    runs the same number of forwards: a rank out of rows runs one on row 0 and counts nothing.
    """
    import torch.distributed as dist

    n = len(eval_set) if not cfg.eval.max_rows else min(cfg.eval.max_rows, len(eval_set))
    mine = list(range(rank, n, world))
    m = cfg.eval.micro_batch_size
    n_batches = math.ceil(math.ceil(n / world) / m)
    # On the engine's device: NCCL (the GPU backend) reduces only CUDA tensors.
    sums = torch.zeros(2, dtype=torch.float64, device=engine.device)  # loss sum, supervised tokens
    engine.eval()
    with torch.no_grad():
        for b in range(n_batches):
            rows = mine[b * m : (b + 1) * m]
            batch = collate(
                [eval_set.row(i) for i in (rows or [0])],
                seq_len=eval_set.seq_len,
                pad_id=pad_id,
                pad_to_multiple_of=PAD_MULTIPLE,
            )
            batch = batch.to(engine.device)
            logits = engine(
                input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
            ).logits
            if rows:
                sums[0] += token_loss_sum(logits, batch.targets).double()
                sums[1] += batch.num_supervised
    engine.train()
    dist.all_reduce(sums)  # collective
    loss = (sums[0] / sums[1].clamp(min=1)).item()
    return {
        "eval_loss": loss,
        "eval_ppl": math.exp(min(loss, 50.0)),
        "eval_tokens": int(sums[1].item()),
    }


def train_worker(
    cfg: Config,
    run_dir: str,
    *,
    resume_from: str | None = None,
    on_checkpoint: Callable[[Path, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run training on this worker; returns a summary (meaningful on every rank).

    resume_from: a checkpoint directory to continue from (Ray passes its latest); without it
        the run continues from <run>/checkpoints/latest when checkpoint.resume is set.
    on_checkpoint: called on every rank after each committed checkpoint (Ray reports it).
    """
    # DeepSpeed picks its accelerator at import time.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    # DeepSpeed calls torch.distributed collectives that torch has renamed; the warning is
    # DeepSpeed's to fix and would repeat on every step.
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*")

    # ---- setup -------------------------------------------------------------------------------
    rank, world = init_distributed()
    out = Path(run_dir)
    ckpt_root = out / "checkpoints"
    ledger_dir = out / "ledger"
    torch.manual_seed(cfg.train.seed)
    dataset = PackedDataset(cfg.data.path)
    eval_set = PackedDataset(cfg.eval.path) if cfg.eval.path else None
    tokenizer = AutoTokenizer.from_pretrained(str(dataset.tokenizer_dir))
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    precision = choose_precision(cfg.deepspeed.precision, world=world)
    if rank == 0:  # the run's first line: what it computes in, and why
        say(f"precision {precision.name} ({precision.reason})")
        if precision.warning:
            say(f"warning: {precision.warning}")
    ds_config = resolve_ds_config(cfg, world_size=world, precision=precision.name)
    dtype = precision.dtype
    data_id = data_fingerprint(dataset.manifest)

    resume_dir = Path(resume_from) if resume_from else None
    if resume_dir is None and cfg.checkpoint.resume:
        resume_dir = latest_checkpoint(ckpt_root)
    load_dir = resume_dir
    if resume_dir is not None:
        saved = read_state(resume_dir)
        if saved["data_fingerprint"] != data_id:
            raise RuntimeError(
                f"checkpoint {resume_dir} was trained on other data than data.path={cfg.data.path}; "
                "point data.path at the same prepared directory or start a new run (logging.run_name)"
            )
        if saved["world_size"] != world:
            # Elastic resume: ZeRO partitions depend on the world size, so the checkpoint is
            # converted to DeepSpeed's universal (world-size-free) format first.
            load_dir = universal_checkpoint(resume_dir, rank=rank)
            ds_config["checkpoint"] = {"load_universal": True}

    # While this object lives, transformers builds/loads the model inside deepspeed.zero.Init:
    # each rank materializes only its partition of every parameter.
    hf_ds = HfDeepSpeedConfig(ds_config) if zero_stage(ds_config) == 3 else None
    model = load_model(
        cfg.model.name_or_path,
        vocab_size=len(tokenizer),
        dtype=dtype,
        attn_implementation=cfg.model.attn_implementation,
    )
    if model_vocab_size(model) < len(tokenizer):  # tokens prepare added (template markers)
        old_rows = model_vocab_size(model)
        weights = grow_vocabulary(model, len(tokenizer))
        # Collective under ZeRO-3: gathers the partitions; rank 0's rows are kept.
        gathered = (deepspeed.zero.GatheredParameters(weights, modifier_rank=0)
                    if hf_ds is not None else contextlib.nullcontext())  # fmt: skip
        with gathered:
            fill_new_rows(weights, old_rows=old_rows)
        if rank == 0:
            say(f"model vocabulary grown from {old_rows} to {len(tokenizer)} tokens for the "
                "tokenizer's added tokens (new rows: the mean of the old ones)")  # fmt: skip
    tok_info = dataset.manifest["tokenizer"]
    set_special_token_ids(
        model,
        bos=tokenizer.bos_token_id,
        eos=tok_info.get("eos_token_ids") or [tokenizer.eos_token_id],
        pad=pad_id,
    )
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    shape = ModelShape.of(model)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=ds_config
    )
    del hf_ds
    make_adam_resumable(optimizer)  # DeepSpeed's CPU Adam kernels: bitwise-exact resume
    device = engine.device
    # Measured once per run, on this model's GEMMs with this rank's rows, dtype and threads.
    peak_flops, peak_source = device_peak_flops(
        shape, rows=cfg.train.micro_batch_size * dataset.seq_len, dtype=dtype
    )

    t = cfg.train
    rows_per_step = cfg.global_batch_rows(world)
    start_step, position = 0, 0  # optimizer steps done; stream position of the next step
    if load_dir is not None:
        state = load_checkpoint(engine, load_dir, rank=rank)
        start_step, position = state["step"], state["position"]
        if rank == 0:
            truncate_ledger(ledger_dir, step=start_step)
            say(
                f"resumed from {resume_dir} at step {start_step} (position {position}; "
                f"saved by {state['world_size']} worker(s), now {world})"
            )
    metrics = MetricsLogger(
        out,
        enabled=rank == 0,
        resume_step=start_step,
        tensorboard=cfg.logging.tensorboard,
        wandb=cfg.logging.wandb,
        mlflow=cfg.logging.mlflow,
        project=cfg.logging.wandb_project,
        run_name=cfg.logging.run_name,
        config=cfg.to_dict(),
    )
    if rank == 0:
        say(
            f"{world} worker(s), ZeRO-{zero_stage(ds_config)} {precision.name}, "
            f"{shape.matmul_params / 1e6:.1f}M matmul params, {len(dataset)} rows of {dataset.seq_len}, "
            f"{rows_per_step} rows/step ({steps_per_epoch(len(dataset), rows_per_step):.1f} steps/epoch), "
            f"{t.max_steps} steps; peak {peak_flops / 1e12:.3f} TFLOP/s per device ({peak_source})"
        )
    progress = ProgressBar(t.max_steps - start_step, enabled=rank == 0 and cfg.logging.progress_bar)
    preemption = _PreemptionFlag(stop_file=out / STOP_FILE if rank == 0 else None)

    def checkpoint(step: int) -> None:
        """Collective: commit a checkpoint of the state after `step` steps."""
        nonlocal ledger
        state = {
            "step": step,
            "position": position,
            "world_size": world,
            "rows_per_step": rows_per_step,
            "data_fingerprint": data_id,
        }
        tag_dir = save_checkpoint(
            engine, ckpt_root, state=state, ledger=np.array(ledger, dtype=np.int64).reshape(-1, 3),
            ledger_dir=ledger_dir, rank=rank, keep_last=cfg.checkpoint.keep_last,
        )  # fmt: skip
        ledger = []
        if rank == 0 and not (ckpt_root / MODEL_META_DIR).is_dir():  # rank-0-only effect
            save_model_meta(engine.module, dataset.tokenizer_dir, ckpt_root / MODEL_META_DIR)
        if on_checkpoint is not None:
            on_checkpoint(tag_dir, {"step": step, **({"loss": losses[-1]} if losses else {})})

    # ---- train -------------------------------------------------------------------------------
    engine.train()
    window = _Window()
    losses: list[float] = []
    ledger: list[tuple[int, int, int]] = []  # (step, epoch, row) since the last checkpoint
    step = start_step
    preempted = False
    while step < t.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.optim, t.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        plan = plan_step(position, dataset, cfg, rank=rank, world=world, shape=shape, pad_id=pad_id)
        # Collective: every rank needs the step's global supervised-token count before its
        # first backward; a preemption signal on any rank rides along.
        counts = torch.tensor(
            [
                sum(b.num_supervised for b in plan.micro),
                sum(b.num_tokens for b in plan.micro),
                float(preemption.requested()),
            ],
            dtype=torch.float64,
            device=device,  # NCCL reduces only CUDA tensors
        )
        dist.all_reduce(counts)
        counts = counts.tolist()  # one device-to-host copy
        global_supervised = max(counts[0], 1.0)
        # DeepSpeed divides each micro-step's gradient by grad_accum and averages over ranks;
        # scaling by (grad_accum * world) undoes both so gradients are sum / global_supervised.
        scale = t.grad_accum * world / global_supervised
        step_loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for batch in plan.micro:
            batch = batch.to(device)
            # use_cache=False is load-bearing: with a KV cache, transformers does not detect
            # the packed rows from position_ids and attention would cross document boundaries.
            logits = engine(
                input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
            ).logits
            loss_sum = token_loss_sum(logits, batch.targets, chunk_tokens=t.loss_chunk_tokens)
            engine.backward(loss_sum * scale)
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            step_loss_sum += loss_sum.detach().double()  # stays on the device: no sync here
        step += 1
        position += plan.rows
        ledger.extend(
            (step, int(e), int(r)) for e, r in zip(plan.epochs, plan.step_rows, strict=True)
        )
        window.add(
            loss_sum=step_loss_sum.item(),  # CPU-GPU sync point, once per step
            supervised=counts[0],
            tokens=counts[1],
            capacity=plan.rows * dataset.seq_len,
            flops=plan.model_flops,
            imbalance=plan.imbalance,
            seconds=time.perf_counter() - t0,
        )

        if step % cfg.logging.every_n_steps == 0 or step == t.max_steps:
            loss_sum_global = torch.tensor([window.loss_sum], dtype=torch.float64, device=device)
            dist.all_reduce(loss_sum_global)  # collective
            loss = loss_sum_global.item() / max(window.supervised, 1.0)
            losses.append(loss)
            flops_per_s = window.flops / window.seconds
            hw_per_device = hardware_flops(
                flops_per_s, gradient_checkpointing=cfg.model.gradient_checkpointing
            ) / world  # fmt: skip
            if hw_per_device > peak_flops:  # the probe ran slow (a noisy moment): HFU stays <= 1
                if rank == 0:
                    say(f"peak raised from {peak_flops / 1e12:.4f} to {hw_per_device / 1e12:.4f} "
                        f"TFLOP/s per device: step {step} ran faster than the probe measured")  # fmt: skip
                peak_flops = hw_per_device
                peak_source += f"; raised at step {step} to the rate the step reached"
            memory = torch.tensor(
                [peak_memory_bytes(), peak_reserved_bytes()], dtype=torch.float64, device=device
            )
            dist.all_reduce(memory, op=dist.ReduceOp.MAX)  # collective: the worst rank
            record = {
                "step": step,
                "epoch": int(plan.epochs[-1]),
                "loss": loss,
                "lr": lr,
                "grad_norm": _grad_norm(engine),
                "tokens_per_s": window.tokens / window.seconds,
                "supervised_tokens_per_s": window.supervised / window.seconds,
                "padding_fraction": 1.0 - window.tokens / window.capacity,
                "mfu": flops_per_s / (world * peak_flops),
                "hfu": hw_per_device / peak_flops,
                "peak_flops_per_device": peak_flops,
                "rank_imbalance": window.max_imbalance,
                "step_time_s": window.seconds / window.steps,
                "peak_memory_bytes": int(memory[0].item()),
                "peak_reserved_bytes": int(memory[1].item()),
            }
            metrics.log(record)
            if rank == 0:
                say(
                    f"step {step:>5}/{t.max_steps}  loss {loss:.4f}  lr {lr:.2e}  "
                    f"{record['tokens_per_s']:.0f} tok/s  MFU {record['mfu']:.1%}  "
                    f"{record['step_time_s']:.2f} s/step"
                )
            window = _Window()
        progress.update(loss=f"{losses[-1]:.4f}" if losses else "-")

        last = step == t.max_steps
        if eval_set is not None and (
            (cfg.eval.every_n_steps and step % cfg.eval.every_n_steps == 0) or last
        ):
            result = evaluate(engine, eval_set, cfg, rank=rank, world=world, pad_id=pad_id)
            metrics.log({"step": step, **result}, prefix="eval")
            if rank == 0:
                say(
                    f"step {step:>5}  eval loss {result['eval_loss']:.4f}  ppl {result['eval_ppl']:.2f}"
                )
        if counts[2] > 0:  # a rank was asked to stop (SIGTERM or STOP): save and leave
            checkpoint(step)
            preempted = True
            if rank == 0:
                (out / STOP_FILE).unlink(missing_ok=True)  # the request is served; a rerun resumes
                say(f"preempted: checkpoint at step {step} saved; run the same command to resume")
            break
        if (last and cfg.checkpoint.at_end) or (
            cfg.checkpoint.every_n_steps and step % cfg.checkpoint.every_n_steps == 0
        ):
            checkpoint(step)
    progress.close()
    preemption.restore()

    # ---- export --------------------------------------------------------------------------------
    if cfg.checkpoint.export and not preempted:
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
    return {"rank": rank, "world_size": world, "losses": losses, "run_dir": str(out), "preempted": preempted,
            "step": step}  # fmt: skip


def data_fingerprint(manifest: dict[str, Any]) -> str:
    """What a checkpoint's stream positions refer to: the rows of this prepared directory."""
    key = [manifest["sources"]["sha256"], manifest["tokenizer"]["fingerprint"], manifest["num_rows"],
           manifest["seq_len"], [s["num_tokens"] for s in manifest["shards"]]]  # fmt: skip
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


STOP_FILE = (
    "STOP"  # `touch <run>/STOP`: checkpoint at the next step and stop (SLURM's trap uses it)
)


class _PreemptionFlag:
    """A request to checkpoint and stop at the next step boundary: SIGTERM, or the run
    directory's STOP file (polled by rank 0). Every rank learns of it through the step's first
    all-reduce. Signal handlers can only be installed from the main thread; Ray Train runs the
    loop in another thread, so there the STOP file is the way in (launchers/slurm uses it)."""

    def __init__(self, *, stop_file: Path | None) -> None:
        self._signalled = False
        self._stop_file = stop_file
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self._signalled = True

    def requested(self) -> bool:
        return self._signalled or (self._stop_file is not None and self._stop_file.exists())

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@dataclass
class _Window:
    """Sums over the steps since the last log line."""

    loss_sum: float = 0.0
    supervised: float = 0.0
    tokens: float = 0.0
    capacity: float = 0.0
    flops: float = 0.0
    max_imbalance: float = 0.0
    seconds: float = 0.0
    steps: int = 0

    def add(self, *, loss_sum, supervised, tokens, capacity, flops, imbalance, seconds) -> None:
        self.loss_sum += loss_sum
        self.supervised += supervised
        self.tokens += tokens
        self.capacity += capacity
        self.flops += flops
        self.max_imbalance = max(self.max_imbalance, imbalance)
        self.seconds += seconds
        self.steps += 1


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)
