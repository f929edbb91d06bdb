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

import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_tools.console import ProgressBar, say
from sftscale.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    read_state,
    restore_run_files,
    save_checkpoint,
    truncate_ledger,
    universal_checkpoint,
)
from sftscale.config import Config, DataConfig
from sftscale.data import (
    Batch,
    PackedDataset,
    assign_ranks,
    collate,
    data_fingerprint,
    pad_token_id,
    steps_per_epoch,
    stream_rows,
)
from sftscale.ds_config import resolve_ds_config, zero_stage
from sftscale.engine import build_engine, choose_precision, init_distributed
from sftscale.export import MODEL_META_DIR, export_from_engine, save_model_meta
from sftscale.flops import ModelShape, device_peak_flops, doc_flops
from sftscale.heartbeat import Heartbeat, awaited
from sftscale.jit_locks import use_environment_ninja, watch_build_locks
from sftscale.lora import ADAPTER_NAME
from sftscale.loss import tiled_head_loss_sum, token_loss_sum
from sftscale.metrics import (
    MetricsLogger,
    Window,
    peak_memory_bytes,
    peak_reserved_bytes,
    throughput,
)
from sftscale.model import is_preset, model_config
from sftscale.optim import lr_at
from sftscale.plan import largest_weight, with_vocabulary
from sftscale.preemption import STOP_FILE, PreemptionFlag
from sftscale.validate import lora_state

# Micro-batches are padded to their longest row rounded up to this (packed rows are nearly
# full anyway; unpacked rows would otherwise pay for padding up to seq_len). 64 cost ~9% extra
# compute on single unpacked documents (bench: llama-100m, micro 1); 8 keeps tensor-core shapes.
PAD_MULTIPLE = 8


def row_multiple(cfg: Config) -> int:
    """Micro-batches are padded to a multiple of this many positions: PAD_MULTIPLE, and whole
    equal slices for each rank of a sequence-parallel group and each tile of a tiled MLP."""
    return math.lcm(PAD_MULTIPLE, cfg.scale.sequence_parallel_size * max(cfg.train.mlp_tiles, 1))


def forward_loss_sum(engine, batch: Batch, cfg: Config, *, rows: int, seq_len: int) -> torch.Tensor:
    """The summed token loss of this rank's part of `batch` (forward only).

    With train.tiled_logits the model returns its last hidden states and the LM head runs tile
    by tile inside the loss. The tile count follows from the largest micro-batch any rank can
    hold (`rows` rows of `seq_len`, this rank's slice of them), so it is the same on every rank.
    """
    # use_cache=False is load-bearing: with a KV cache, transformers does not detect the
    # packed rows from position_ids and attention would cross document boundaries.
    inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "use_cache": False}
    t = cfg.train
    if not t.tiled_logits:
        logits = engine(**inputs).logits
        return token_loss_sum(logits, batch.targets, chunk_tokens=t.loss_chunk_tokens)
    # logits_to_keep: an empty index, so the model's own head computes nothing
    out = engine(
        **inputs, output_hidden_states=True, logits_to_keep=torch.zeros(0, dtype=torch.long)
    )
    tiles = math.ceil(rows * seq_len / cfg.scale.sequence_parallel_size / t.loss_chunk_tokens)
    return tiled_head_loss_sum(
        out.hidden_states[-1], engine.module.get_output_embeddings(), batch.targets, tiles=tiles
    )


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

    A pure function of its arguments: every rank computes the whole step's assignment. Rows go
    to data-parallel ranks; under sequence parallelism each rank of a group then takes its
    slice of the sequence of its group's rows.
    """
    t, sp = cfg.train, cfg.scale.sequence_parallel_size
    epochs, step_rows = stream_rows(
        position,
        cfg.global_batch_rows(world),
        num_rows=len(dataset),
        seed=cfg.data.seed,
        shuffle=cfg.data.shuffle,
    )
    costs = np.array([doc_flops(dataset.doc_lens(int(i)), shape) for i in step_rows])
    per_rank, imbalance = assign_ranks(
        step_rows,
        costs,
        world_size=cfg.data_parallel_size(world),
        by_cost=t.balance_ranks,
        micro_batch_size=t.micro_batch_size,
        grad_accum=t.grad_accum,
    )
    micro = [
        collate(
            [dataset.row(int(i)) for i in rows],
            seq_len=dataset.seq_len,
            pad_id=pad_id,
            pad_to_multiple_of=row_multiple(cfg),
        ).shard(rank % sp, sp)
        for rows in per_rank[rank // sp]
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
    Rows go to data-parallel ranks; a sequence-parallel group shares them, each rank its slice.
    """
    import torch.distributed as dist

    sp, dp = cfg.scale.sequence_parallel_size, cfg.data_parallel_size(world)
    n = len(eval_set) if not cfg.eval.max_rows else min(cfg.eval.max_rows, len(eval_set))
    mine = list(range(rank // sp, n, dp))
    m = cfg.eval.micro_batch_size
    n_batches = math.ceil(math.ceil(n / dp) / m)
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
                pad_to_multiple_of=row_multiple(cfg),
            )
            batch = batch.shard(rank % sp, sp).to(engine.device)
            loss = forward_loss_sum(engine, batch, cfg, rows=m, seq_len=eval_set.seq_len)
            if rows:
                sums[0] += loss.double()
                sums[1] += batch.num_supervised
    engine.train()
    dist.all_reduce(sums)  # collective
    loss = (sums[0] / sums[1].clamp(min=1)).item()
    return {
        "eval_loss": loss,
        "eval_ppl": math.exp(min(loss, 50.0)),
        "eval_tokens": int(sums[1].item()),
    }


@dataclass
class Run:
    """What setup() builds and the loop uses; `step` and `position` advance with training."""

    cfg: Config
    out: Path
    rank: int
    world: int
    engine: Any  # deepspeed.DeepSpeedEngine
    optimizer: Any
    dataset: PackedDataset
    eval_set: PackedDataset | None
    pad_id: int
    shape: ModelShape
    data_id: str
    peak_flops: float
    peak_source: str
    heartbeat: Heartbeat
    leader: bool = True  # commits checkpoints in `out` (see setup)
    vocab_grown: bool = False
    step: int = 0  # optimizer steps done
    position: int = 0  # stream position of the next step's first row
    ledger: list[tuple[int, int, int]] = field(default_factory=list)  # (step, epoch, row)

    @property
    def rows_per_step(self) -> int:
        return self.cfg.global_batch_rows(self.world)

    @property
    def where(self) -> dict[str, Any]:
        """Who waits where, for `heartbeat.awaited`."""
        return {
            "run_dir": self.out,
            "rank": self.rank,
            "step": self.step,
            "world": self.world,
            "timeout_s": self.cfg.scale.collective_timeout_s,
        }


def setup(cfg: Config, out: Path, *, resume_from: str | None) -> Run:
    """Process group, precision, data, model under ZeRO-3, engine, resume. Collective."""
    from transformers import AutoTokenizer

    rank, world = init_distributed(timeout_s=cfg.scale.collective_timeout_s)
    cfg = cfg.for_world(world)  # elastic: the same global batch on however many workers run
    heartbeat = Heartbeat(out, rank=rank, stall_timeout_s=cfg.scale.stall_timeout_s)
    heartbeat.beat(step=0, phase="setup")
    torch.manual_seed(cfg.train.seed)
    dataset = PackedDataset(local_data(cfg.data, cfg.data.path, log=say if rank == 0 else None))
    eval_set = (
        PackedDataset(local_data(cfg.data, cfg.eval.path, log=say if rank == 0 else None))
        if cfg.eval.path
        else None
    )
    tokenizer = AutoTokenizer.from_pretrained(str(dataset.tokenizer_dir))
    precision = choose_precision(cfg.deepspeed.precision, world=world)  # collective
    if rank == 0:  # the run's first line: what it computes in, and why
        say(f"precision {precision.name} ({precision.reason})")
        if precision.warning:
            say(f"warning: {precision.warning}")
    trained = with_vocabulary(
        model_config(cfg.model.name_or_path, vocab_size=len(tokenizer)), len(tokenizer)
    )  # the shape after build_engine grows the vocabulary
    ds_config = resolve_ds_config(
        cfg, world_size=world, precision=precision.name, largest_weight=largest_weight(trained)
    )

    resume_dir = Path(resume_from) if resume_from else None
    if resume_dir is None and cfg.checkpoint.resume:
        resume_dir = latest_checkpoint(out / "checkpoints")
    # Who commits checkpoints in `out`: rank 0 of a run directory every rank shares; where
    # nodes share no disk (checkpoint.storage), one rank per disk.
    leader = claim_directory(out, rank=rank) if cfg.checkpoint.storage else rank == 0
    if resume_dir is not None and rank == 0 and cfg.checkpoint.storage:
        restore_run_files(resume_dir, out)  # metrics and ledger, from the downloaded checkpoint
    load_dir = resume_dir
    if resume_dir is not None and read_state(resume_dir)["world_size"] != world:
        # Elastic resume: ZeRO partitions depend on the world size, so the checkpoint is
        # converted to DeepSpeed's universal (world-size-free) format first.
        load_dir = universal_checkpoint(resume_dir, leader=leader)
        ds_config["checkpoint"] = {"load_universal": True}

    pad_id = pad_token_id(tokenizer)
    eos_ids = dataset.manifest.tokenizer.eos_token_ids or [tokenizer.eos_token_id]
    built = build_engine(
        cfg,
        ds_config=ds_config,
        dtype=precision.dtype,
        tokenizer=tokenizer,
        eos_ids=eos_ids,
        pad_id=pad_id,
        log=say if rank == 0 else lambda _: None,
    )
    # Measured once per run, on this model's GEMMs with this rank's rows, dtype and threads.
    peak_flops, peak_source = device_peak_flops(
        built.shape,
        rows=cfg.train.micro_batch_size * dataset.seq_len // cfg.scale.sequence_parallel_size,
        dtype=precision.dtype,
    )
    run = Run(
        cfg=cfg,
        out=out,
        rank=rank,
        world=world,
        engine=built.engine,
        optimizer=built.optimizer,
        dataset=dataset,
        eval_set=eval_set,
        pad_id=pad_id,
        shape=built.shape,
        data_id=data_fingerprint(dataset.manifest),
        peak_flops=peak_flops,
        peak_source=peak_source,
        heartbeat=heartbeat,
        vocab_grown=built.vocab_grown,
        leader=leader,
    )
    if load_dir is not None:
        state = load_checkpoint(run.engine, load_dir, rank=rank)
        run.step, run.position = state["step"], state["position"]
        if rank == 0:
            truncate_ledger(out / "ledger", step=run.step)
            say(
                f"resumed from {resume_dir} at step {run.step} (position {run.position}; "
                f"saved by {state['world_size']} worker(s), now {world})"
            )
    if rank == 0:
        t = cfg.train
        sp = cfg.scale.sequence_parallel_size
        say(
            f"{world} worker(s){f' in groups of {sp} splitting each row' if sp > 1 else ''}, "
            f"ZeRO-{zero_stage(ds_config)} {precision.name}, "
            f"{run.shape.matmul_params / 1e6:.1f}M matmul params, {len(dataset)} rows of {dataset.seq_len}, "
            f"{run.rows_per_step} rows/step ({steps_per_epoch(len(dataset), run.rows_per_step):.1f} steps/epoch), "
            f"{t.max_steps} steps; peak {peak_flops / 1e12:.3f} TFLOP/s per device ({peak_source})"
        )
    return run


@dataclass
class StepResult:
    plan: StepPlan
    lr: float
    loss_sum: float  # this rank's summed token loss
    supervised: float  # the step's supervised tokens, all ranks
    tokens: float  # the step's non-pad tokens, all ranks
    stop_requested: bool  # some rank was asked to checkpoint and stop
    seconds: float


def claim_directory(out: Path, *, rank: int) -> bool:
    """Collective. True on exactly one rank among those that see the same `out` (the same
    disk): the first to create this attempt's marker file there. Unlike Ray's local rank, this
    does not trust node addresses to tell disks apart."""
    import secrets

    import torch.distributed as dist

    token = [secrets.token_hex(8) if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)  # collective: this attempt's name
    marker = out / f".leader-{token[0]}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        claimed = True
    except FileExistsError:
        claimed = False
    dist.barrier()  # collective: every rank has tried
    if claimed:
        for old in out.glob(".leader-*"):
            if old != marker:
                old.unlink(missing_ok=True)
    return claimed


def local_data(data: DataConfig, path: str, *, log: Callable | None) -> Path:
    """`path` itself, or (a URI) this node's checked copy of it; every rank of a node asks, the
    first downloads."""
    from sftscale.storage import local_copy

    return local_copy(
        path,
        cache_dir=Path(data.cache_dir) if data.cache_dir else None,
        max_bytes=int(data.cache_max_gb * 2**30),
        log=log or (lambda _: None),
    )


def train_step(run: Run, *, preemption: PreemptionFlag, last_seconds: float = 0.0) -> StepResult:
    """One optimizer step over the global batch at `run.position`; advances step and position."""
    import torch.distributed as dist

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
    )
    # Collective: every rank needs the step's global supervised-token count before its first
    # backward; a preemption request on any rank rides along.
    counts = torch.tensor(
        [
            sum(b.num_supervised for b in plan.micro),
            sum(b.num_tokens for b in plan.micro),
            float(preemption.requested()),
        ],
        dtype=torch.float64,
        device=device,  # NCCL reduces only CUDA tensors
    )
    with awaited("the all-reduce of the step's token counts", **run.where):
        dist.all_reduce(counts)
    supervised, tokens, stop_votes = counts.tolist()  # one device-to-host copy
    # DeepSpeed divides each micro-step's gradient by grad_accum and averages over ranks (all
    # of them: under sequence parallelism each rank's loss is its slice's share);
    # scaling by (grad_accum * world) undoes both so gradients are sum / global supervised.
    scale = t.grad_accum * run.world / max(supervised, 1.0)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    with awaited(
        "the step's forward/backward collectives (ZeRO parameter gathers, gradient reductions)",
        **run.where,
    ):
        for batch in plan.micro:
            loss_sum += micro_step(run, batch.to(device), scale=scale)  # on device: no sync
    run.step += 1
    run.position += plan.rows
    run.ledger.extend(
        (run.step, int(e), int(r)) for e, r in zip(plan.epochs, plan.step_rows, strict=True)
    )
    return StepResult(
        plan=plan,
        lr=lr,
        loss_sum=loss_sum.item(),  # CPU-GPU sync, once a step
        supervised=supervised,
        tokens=tokens,
        stop_requested=stop_votes > 0,
        seconds=time.perf_counter() - t0,
    )


def micro_step(run: Run, batch: Batch, *, scale: float) -> torch.Tensor:
    """Forward + backward of one micro-batch; returns its summed token loss (detached)."""
    total = forward_loss_sum(
        run.engine, batch, run.cfg, rows=run.cfg.train.micro_batch_size, seq_len=run.dataset.seq_len
    )
    run.engine.backward(total * scale)
    run.engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
    return total.detach().double()


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
        "lora": lora_state(run.cfg),
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
        save_model_meta(run.engine.module, run.dataset.tokenizer_dir, ckpt_root / MODEL_META_DIR)
        if run.cfg.model.lora is not None:  # `sftscale export` writes the adapter from this
            run.engine.module.peft_config[ADAPTER_NAME].save_pretrained(
                str(ckpt_root / MODEL_META_DIR)
            )
    if on_checkpoint is not None:  # the leader's directory holds this disk's ranks' files
        metrics = {"step": run.step, **({"loss": last_loss} if last_loss is not None else {})}
        on_checkpoint(tag_dir, metrics, run.leader)


def export(run: Run) -> None:
    """Collective: <run>/export, the trained model; for a LoRA run the adapter in peft's format
    (export/adapter), the base it applies to when that is not model.name_or_path as is (a
    preset, or a vocabulary grown for added tokens: export/base) and, with
    checkpoint.export_merged, the merged model (export/merged)."""
    from sftscale.lora import (
        ADAPTER_DIR,
        BASE_DIR,
        MERGED_DIR,
        export_adapter,
        export_base_and_merged,
    )

    cfg, out = run.cfg, run.out / "export"
    common = {"tokenizer_dir": run.dataset.tokenizer_dir, "rank": run.rank}
    shard_bytes = cfg.checkpoint.export_max_shard_mb * 2**20
    if cfg.model.lora is None:
        export_from_engine(run.engine.module, out_dir=out, max_shard_bytes=shard_bytes, **common)
        return
    own_base = is_preset(cfg.model.name_or_path) or run.vocab_grown
    base = out / BASE_DIR if own_base else Path(cfg.model.name_or_path).resolve()
    export_adapter(run.engine.module, out_dir=out / ADAPTER_DIR, base_dir=str(base), **common)
    if own_base or cfg.checkpoint.export_merged:
        export_base_and_merged(
            run.engine.module,
            base_out=base if own_base else None,
            merged_out=out / MERGED_DIR if cfg.checkpoint.export_merged else None,
            max_shard_bytes=shard_bytes,
            **common,
        )


def log_window(run: Run, window: Window, *, lr: float, epoch: int) -> dict[str, Any]:
    """The metrics record of the steps in `window`. Collective (loss sum, memory)."""
    import torch.distributed as dist

    device = run.engine.device
    loss_sum = torch.tensor([window.loss_sum], dtype=torch.float64, device=device)
    dist.all_reduce(loss_sum)  # collective
    memory = torch.tensor(
        [peak_memory_bytes(), peak_reserved_bytes()], dtype=torch.float64, device=device
    )
    dist.all_reduce(memory, op=dist.ReduceOp.MAX)  # collective: the worst rank
    rates = _throughput(run, window)
    if rates["hfu"] > 1:  # the probe ran slow (a noisy moment): raise the peak, HFU stays <= 1
        raised = rates["hfu"] * run.peak_flops
        if run.rank == 0:
            say(
                f"peak raised from {run.peak_flops / 1e12:.4f} to {raised / 1e12:.4f} TFLOP/s "
                f"per device: step {run.step} ran faster than the probe measured"
            )
        run.peak_flops = raised
        run.peak_source += f"; raised at step {run.step} to the rate the step reached"
        rates = _throughput(run, window)
    return {
        "step": run.step,
        "epoch": epoch,
        "loss": loss_sum.item() / max(window.supervised, 1.0),
        "lr": lr,
        "grad_norm": _grad_norm(run.engine),
        **rates,
        "padding_fraction": 1.0 - window.tokens / window.capacity,
        "rank_imbalance": window.max_imbalance,
        "step_time_s": window.seconds / window.steps,
        "peak_memory_bytes": int(memory[0].item()),
        "peak_reserved_bytes": int(memory[1].item()),
    }


def _throughput(run: Run, window: Window) -> dict[str, float]:
    return throughput(
        tokens=window.tokens,
        supervised=window.supervised,
        model_flops=window.flops,
        seconds=window.seconds,
        world=run.world,
        peak_flops=run.peak_flops,
        gradient_checkpointing=run.cfg.model.gradient_checkpointing,
    )


def train_worker(
    cfg: Config,
    run_dir: str,
    *,
    resume_from: str | None = None,
    on_checkpoint: Callable[[Path, dict[str, Any], bool], None] | None = None,
) -> dict[str, Any]:
    """Run training on this worker; returns a summary (meaningful on every rank).

    resume_from: a checkpoint directory to continue from (Ray passes its latest); without it
        the run continues from <run>/checkpoints/latest when checkpoint.resume is set.
    on_checkpoint: called on every rank after each committed checkpoint (Ray reports it).
    """
    # DeepSpeed picks its accelerator at import time.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import torch.distributed as dist

    # DeepSpeed calls torch.distributed collectives that torch has renamed; the warning is
    # DeepSpeed's to fix and would repeat on every step.
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*")

    use_environment_ninja()  # the ninja `sftscale build-ops` used: no rebuild
    with watch_build_locks(log=say):  # DeepSpeed builds or loads its JIT ops during setup
        run = setup(cfg, Path(run_dir), resume_from=resume_from)
    rank0, t = run.rank == 0, cfg.train
    metrics = MetricsLogger(
        run.out,
        enabled=rank0,
        resume_step=run.step,
        tensorboard=cfg.logging.tensorboard,
        wandb=cfg.logging.wandb,
        mlflow=cfg.logging.mlflow,
        project=cfg.logging.wandb_project,
        run_name=cfg.logging.run_name,
        config=cfg.to_dict(),
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
        window.add(
            loss_sum=r.loss_sum,
            supervised=r.supervised,
            tokens=r.tokens,
            capacity=r.plan.rows * run.dataset.seq_len,
            flops=r.plan.model_flops,
            imbalance=r.plan.imbalance,
            seconds=r.seconds,
        )
        last = run.step == t.max_steps
        if run.step % cfg.logging.every_n_steps == 0 or last:
            record = log_window(run, window, lr=r.lr, epoch=int(r.plan.epochs[-1]))  # collective
            losses.append(record["loss"])
            metrics.log(record)
            if rank0:
                say(
                    f"step {run.step:>5}/{t.max_steps}  loss {record['loss']:.4f}  lr {r.lr:.2e}  "
                    f"{record['tokens_per_s']:.0f} tok/s  MFU {record['mfu']:.1%}  "
                    f"{record['step_time_s']:.2f} s/step"
                )
            window = Window()
        progress.update(loss=f"{losses[-1]:.4f}" if losses else "-")
        if run.eval_set is not None and (
            last or (cfg.eval.every_n_steps and run.step % cfg.eval.every_n_steps == 0)
        ):
            result = evaluate(
                run.engine, run.eval_set, cfg, rank=run.rank, world=run.world, pad_id=run.pad_id
            )  # collective
            metrics.log({"step": run.step, **result}, prefix="eval")
            if rank0:
                say(
                    f"step {run.step:>5}  eval loss {result['eval_loss']:.4f}  ppl {result['eval_ppl']:.2f}"
                )
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
        export(run)
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


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)
