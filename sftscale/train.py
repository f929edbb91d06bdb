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
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_tools.console import ProgressBar, say
from sftscale.checkpoint import lora_state, save_checkpoint
from sftscale.config import Config, redacted
from sftscale.data import Batch
from sftscale.devices import pin_mmap_threshold
from sftscale.evaluate import evaluate
from sftscale.export import MODEL_META_DIR
from sftscale.export_run import export_trained, save_export_meta
from sftscale.forward import StepPlan, forward_loss_sum, plan_step
from sftscale.heartbeat import awaited
from sftscale.jit_locks import use_environment_ninja, watch_build_locks
from sftscale.metrics import MetricsLogger, Window, window_record
from sftscale.optim import lr_at
from sftscale.preemption import STOP_FILE, PreemptionFlag
from sftscale.worker import Run, setup


@dataclass
class StepResult:
    plan: StepPlan
    lr: float
    loss_sum: float  # this rank's summed token loss
    supervised: float  # the step's supervised tokens, all ranks
    tokens: float  # the step's non-pad tokens, all ranks
    stop_requested: bool  # some rank was asked to checkpoint and stop
    seconds: float
    balance_sum: float = 0.0  # MoE: this rank's documents' tokens x balance loss (sftscale.moe)
    expert_tokens: torch.Tensor | None = None  # MoE: this rank's tokens per expert per layer


def train_step(run: Run, *, preemption: PreemptionFlag, last_seconds: float = 0.0) -> StepResult:
    """One optimizer step over the global batch at `run.position`; advances step and position."""
    t, device = run.cfg.train, run.engine.device
    t0 = time.perf_counter()
    run.heartbeat.beat(step=run.step, phase="train", step_time_s=last_seconds)
    lr = lr_at(run.step, run.cfg.optim, t.max_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    plan = plan_step(
        run.position,
        run.dataset,
        run.cfg,
        rank=run.rank,
        world=run.world,
        shape=run.shape,
        pad_id=run.pad_id,
        few_lengths=device.type == "cpu",
    )
    # Collective: every rank needs the step's global supervised-token count before its first
    # backward.
    counts = torch.tensor(
        [sum(b.num_supervised for b in plan.micro), sum(b.num_tokens for b in plan.micro)],
        dtype=torch.float64,
        device=device,  # NCCL reduces only CUDA tensors
    )
    with awaited("the all-reduce of the step's token counts", **run.where):
        dist.all_reduce(counts)
    supervised, tokens = counts.tolist()  # one device-to-host copy
    # DeepSpeed divides each micro-step's gradient by grad_accum and averages over ranks (all
    # of them: under sequence parallelism each rank's loss is its slice's share);
    # scaling by (grad_accum * world) undoes both so gradients are sum / global supervised.
    scale = t.grad_accum * run.world / max(supervised, 1.0)
    # A MoE's balance loss is a sum over documents of tokens x loss, over the step's tokens
    balance_scale = t.grad_accum * run.world / max(tokens, 1.0)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # SFT loss, balance loss
    expert_tokens = None
    with awaited(
        "the step's forward/backward collectives (ZeRO parameter gathers, gradient reductions)",
        **run.where,
    ):
        for batch in plan.micro:
            m = micro_step(run, batch.to(device), scale=scale, balance_scale=balance_scale)
            sums += m.sums  # on device: no sync
            if m.expert_tokens is not None:
                expert_tokens = m.expert_tokens + (0 if expert_tokens is None else expert_tokens)
    # Collective: a stop requested on any rank while this step ran is served after it (a
    # scheduler's grace period then has to cover one step, not two)
    stop_votes = torch.tensor([float(preemption.requested())], device=device)
    with awaited("the all-reduce of the stop requests", **run.where):
        dist.all_reduce(stop_votes)
    run.step += 1
    run.position += plan.rows
    run.ledger.extend(
        (run.step, int(e), int(r)) for e, r in zip(plan.epochs, plan.step_rows, strict=True)
    )
    loss_sum, balance_sum = sums.tolist()  # CPU-GPU sync, once a step
    return StepResult(
        plan=plan,
        lr=lr,
        loss_sum=loss_sum,
        supervised=supervised,
        tokens=tokens,
        stop_requested=stop_votes.item() > 0,
        seconds=time.perf_counter() - t0,
        balance_sum=balance_sum,
        expert_tokens=expert_tokens,
    )


@dataclass
class MicroResult:
    sums: torch.Tensor  # (summed token loss, documents' tokens x balance loss), detached
    expert_tokens: torch.Tensor | None  # MoE: tokens per expert per layer


def micro_step(run: Run, batch: Batch, *, scale: float, balance_scale: float) -> MicroResult:
    """Forward + backward of one micro-batch. `scale` turns its summed token loss into its
    share of the step's loss; `balance_scale` does the same for a MoE's balance loss."""
    router = run.router
    with router.recording() if router is not None else contextlib.nullcontext():
        total = forward_loss_sum(
            run.engine,
            batch,
            run.cfg,
            rows=run.cfg.train.micro_batch_size,
            seq_len=run.dataset.seq_len,
        )
    loss, balance, expert_tokens = total * scale, total.new_zeros(()), None
    if router is not None:
        balance, expert_tokens = router.balance(batch)
        if router.routing.coef:
            loss = loss + router.routing.coef * balance_scale * balance
    run.engine.backward(loss)
    run.engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
    sums = torch.stack([total.detach(), balance.detach()]).double()
    return MicroResult(sums=sums, expert_tokens=expert_tokens)


def save(run: Run, on_checkpoint: Callable | None, *, last_loss: float | None) -> None:
    """Collective: commit a checkpoint of the state after `run.step` steps."""
    run.heartbeat.beat(step=run.step, phase="checkpoint")
    state = {
        "step": run.step,
        "position": run.position,
        "world_size": run.world,
        "rows_per_step": run.rows_per_step,
        "data_fingerprint": run.data_id,
        "sequence_parallel_size": run.cfg.scale.sequence_parallel_size,
        "expert_parallel_size": run.cfg.scale.expert_parallel_size,
        "lora": lora_state(run.cfg),
        "identity": run.identity,
    }
    ckpt_root = run.out / "checkpoints"
    tag_dir = save_checkpoint(
        run.engine,
        ckpt_root,
        state=state,
        ledger=np.array(run.ledger, dtype=np.int64).reshape(-1, 3),
        ledger_dir=run.out / "ledger",
        rank=run.rank,
        keep_last=run.cfg.checkpoint.keep_last,
        leader=run.leader,
        run_files=[run.out / "metrics.jsonl", run.out / "ledger"]
        if run.cfg.checkpoint.storage
        else [],
    )
    run.ledger = []
    if run.rank == 0 and not (ckpt_root / MODEL_META_DIR).is_dir():  # rank-0-only effect
        save_export_meta(run.engine.module, run.dataset.tokenizer_dir, ckpt_root / MODEL_META_DIR)
    if on_checkpoint is not None:  # the leader's directory holds this disk's ranks' files
        metrics = {"step": run.step, **({"loss": last_loss} if last_loss is not None else {})}
        on_checkpoint(tag_dir, metrics, run.leader)


def train_worker(
    cfg: Config,
    run_dir: str,
    *,
    resume_from: str | None = None,
    on_checkpoint: Callable[[Path, dict[str, Any], bool], None] | None = None,
    expected: dict[int, dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Run training on this worker; returns a summary (meaningful on every rank).

    resume_from: a checkpoint directory to continue from (Ray passes its latest); without it
        the run continues from <run>/checkpoints/latest when checkpoint.resume is set.
    on_checkpoint: called on every rank after each committed checkpoint (Ray reports it).
    expected: the driver's resolution of the run by world size (sftscale.resolve.check_same).
    """
    # DeepSpeed picks its accelerator at import time.
    cuda = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    if not cuda:  # tensors in host RAM: RSS as sftscale plan counts it
        pin_mmap_threshold(cfg.train.cpu_mmap_threshold)

    # DeepSpeed calls torch.distributed collectives that torch has renamed; the warning is
    # DeepSpeed's to fix and would repeat on every step.
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*")

    use_environment_ninja()  # the ninja `sftscale build-ops` used: no rebuild
    with watch_build_locks(log=say):  # DeepSpeed builds or loads its JIT ops during setup
        run = setup(cfg, Path(run_dir), resume_from=resume_from, expected=expected)
    rank0, t = run.rank == 0, cfg.train
    metrics = MetricsLogger(
        run.out,
        enabled=rank0,
        resume_step=run.step,
        config=redacted(cfg.to_dict()),  # no credentials to W&B / MLflow
        **cfg.logging.sinks(),
    )
    progress = ProgressBar(
        desc="train",
        unit="step",
        total=t.max_steps - run.step,
        enabled=rank0 and cfg.logging.progress_bar,
    )
    preemption = PreemptionFlag(stop_file=run.out / STOP_FILE if rank0 else None)
    run.engine.train()
    window, losses, preempted, seconds = Window(), [], False, 0.0
    while run.step < t.max_steps:
        r = train_step(run, preemption=preemption, last_seconds=seconds)
        seconds = r.seconds
        add_step(window, r, seq_len=run.dataset.seq_len)
        last = run.step == t.max_steps
        if run.step % cfg.logging.every_n_steps == 0 or last:
            losses.append(log_window(run, window, r, metrics))  # collective
            window = Window()
        progress.update(loss=f"{losses[-1]:.4f}" if losses else "-")
        if run.eval_set is not None and (
            last or (cfg.eval.every_n_steps and run.step % cfg.eval.every_n_steps == 0)
        ):
            log_eval(run, metrics)  # collective
        if r.stop_requested:  # a rank was asked to stop (SIGTERM or STOP): save and leave
            save(run, on_checkpoint, last_loss=losses[-1] if losses else None)
            preempted = True
            if rank0:
                preemption.served()  # a rerun resumes
                say(
                    f"preempted: checkpoint at step {run.step} saved; run the same command to resume"
                )
            break
        every = cfg.checkpoint.every_n_steps
        if (last and cfg.checkpoint.at_end) or (every and run.step % every == 0):
            save(run, on_checkpoint, last_loss=losses[-1] if losses else None)
    progress.close()
    preemption.restore()

    if cfg.checkpoint.export and not preempted:  # collective
        run.heartbeat.beat(step=run.step, phase="export")
        export_trained(
            run.engine.module,
            run.cfg,
            out=run.out / "export",
            tokenizer_dir=run.dataset.tokenizer_dir,
            rank=run.rank,
            vocab_grown=run.vocab_grown,
            hf_names=run.hf_names,
        )
    metrics.close()
    dist.barrier()  # collective: no rank leaves while another still writes
    run.heartbeat.beat(step=run.step, phase="done")
    return {
        "rank": run.rank,
        "world_size": run.world,
        "losses": losses,
        "run_dir": str(run.out),
        "preempted": preempted,
        "step": run.step,
    }


def add_step(window: Window, r: StepResult, *, seq_len: int) -> None:
    window.add(
        loss_sum=r.loss_sum,
        supervised=r.supervised,
        tokens=r.tokens,
        capacity=r.plan.rows * seq_len,
        flops=r.plan.model_flops,
        imbalance=r.plan.imbalance,
        seconds=r.seconds,
        balance_sum=r.balance_sum,
        expert_tokens=r.expert_tokens,
    )


def log_window(run: Run, window: Window, r: StepResult, metrics: MetricsLogger) -> float:
    """Log the steps in `window` (metrics.jsonl, the console); returns their loss. Collective."""
    record = window_record(
        window,
        engine=run.engine,
        step=run.step,
        epoch=int(r.plan.epochs[-1]),
        lr=r.lr,
        world=run.world,
        rank=run.rank,
        peak=run.peak,
        gradient_checkpointing=run.cfg.model.gradient_checkpointing,
        log=say,
    )
    metrics.log(record)
    if run.rank == 0:
        say(
            f"step {run.step:>5}/{run.cfg.train.max_steps}  loss {record['loss']:.4f}  "
            f"lr {r.lr:.2e}  {record['tokens_per_s']:.0f} tok/s  MFU {record['mfu']:.1%}  "
            f"{record['step_time_s']:.2f} s/step"
        )
    return record["loss"]


def log_eval(run: Run, metrics: MetricsLogger) -> None:
    """Evaluate on the held-out set and log it. Collective."""
    result = evaluate(
        run.engine, run.eval_set, run.cfg, rank=run.rank, world=run.world, pad_id=run.pad_id
    )
    metrics.log({"step": run.step, **result}, prefix="eval")
    if run.rank == 0:
        say(
            f"step {run.step:>5}  eval loss {result['eval_loss']:.4f}  ppl {result['eval_ppl']:.2f}"
        )
