"""A worker's run: what `setup` builds before the first step (process group, precision, data,
the resolved run checked against the driver's, the model under ZeRO-3, the engine, the resume)
and the state the loop advances (`Run`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data_tools.console import say
from sftscale.checkpoint import (
    check_expert_layout,
    latest_checkpoint,
    load_checkpoint,
    read_state,
    truncate_ledger,
    universal_checkpoint,
)
from sftscale.config import Config, ConfigError
from sftscale.data import PackedDataset, data_fingerprint, pad_token_id, steps_per_epoch
from sftscale.ds_config import zero_stage
from sftscale.engine import build_engine, choose_precision, init_distributed
from sftscale.flops import device_peak_flops
from sftscale.heartbeat import Heartbeat
from sftscale.identity import describe_changes, identity_changes, run_identity
from sftscale.metrics import Peak
from sftscale.moe import RouterTap
from sftscale.resolve import check_same, resolve_run
from sftscale.shape import ModelShape
from sftscale.storage import claim_directory, local_data, restore_run_files


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
    peak: Peak  # FLOP/s of one device for this model's step, and where the figure comes from
    heartbeat: Heartbeat
    leader: bool = True  # commits checkpoints in `out` (see setup)
    precision: str = "fp32"  # what the run computes in (bf16 | fp32)
    identity: dict[str, Any] = field(default_factory=dict)  # sftscale.identity, in checkpoints
    vocab_grown: bool = False
    router: RouterTap | None = None  # a mixture of experts' routers (sftscale.moe)
    hf_names: dict[int, str] | None = None  # export names of parameters AutoEP moved
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


def setup(
    cfg: Config,
    out: Path,
    *,
    resume_from: str | None,
    expected: dict[int, dict[str, str]] | None = None,
) -> Run:
    """Process group, precision, data, model under ZeRO-3, engine, resume. Collective."""
    from transformers import AutoTokenizer  # heavy: workers only

    rank, world = init_distributed(timeout_s=cfg.scale.collective_timeout_s)
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
    # The driver's resolution, again from the same inputs on this device; the same or an error.
    resolved = resolve_run(
        cfg,
        world=world,
        seq_len=dataset.seq_len,
        vocab_size=len(tokenizer),
        precision=precision,
        device=None,
    )
    check_same(resolved, (expected or {}).get(world))
    cfg = resolved.config  # elastic: the same global batch on however many workers run
    ds_config = copy.deepcopy(resolved.ds_config)

    identity = run_identity(
        resolved,
        data_id=data_fingerprint(dataset.manifest),
        tokenizer_id=dataset.manifest.tokenizer.fingerprint,
    )
    resume_dir, load_dir, leader = resume_point(
        cfg, out, rank=rank, world=world, given=resume_from, identity=identity
    )
    if load_dir is not None and load_dir != resume_dir:  # elastic: a universal checkpoint
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
        peak=Peak(peak_flops, peak_source),
        heartbeat=heartbeat,
        vocab_grown=built.vocab_grown,
        router=built.router,
        hf_names=built.hf_names,
        leader=leader,
        precision=precision.name,
        identity=identity,
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
        say(describe(run, zero_stage(ds_config)))
    return run


def describe(run: Run, stage: int) -> str:
    """The run's second line: its layout, model, data and the device peak MFU divides by."""
    cfg, world, dataset = run.cfg, run.world, run.dataset
    sp = cfg.scale.sequence_parallel_size
    groups = f" in groups of {sp} splitting each row" if sp > 1 else ""
    epoch = steps_per_epoch(len(dataset), run.rows_per_step)
    return (
        f"{world} worker(s){groups}, ZeRO-{stage} {run.precision}, "
        f"{run.shape.matmul_params / 1e6:.1f}M matmul params, {len(dataset)} rows of "
        f"{dataset.seq_len}, {run.rows_per_step} rows/step ({epoch:.1f} steps/epoch), "
        f"{cfg.train.max_steps} steps; peak {run.peak.flops / 1e12:.3f} TFLOP/s per device "
        f"({run.peak.source})"
    )


def resume_point(
    cfg: Config, out: Path, *, rank: int, world: int, given: str | None, identity: dict
) -> tuple[Path | None, Path | None, bool]:
    """(the checkpoint to resume from, the directory to load it from, whether this rank commits
    checkpoints in `out`). A checkpoint of another run (sftscale.identity) is refused here too:
    every resume path (the CLI's, SLURM's requeue, Ray's restart) passes. Collective where
    nodes share no disk."""
    resume_dir = Path(given) if given else None
    if resume_dir is None and cfg.checkpoint.resume != "never":
        resume_dir = latest_checkpoint(out / "checkpoints")
    if resume_dir is not None:
        saved = read_state(resume_dir).get("identity")
        changes = identity_changes(saved, identity) if saved is not None else []
        if changes and cfg.checkpoint.resume != "force":
            raise ConfigError(describe_changes(changes, checkpoint=str(resume_dir)))
    # Who commits checkpoints in `out`: rank 0 of a run directory every rank shares; where
    # nodes share no disk (checkpoint.storage), one rank per disk.
    leader = claim_directory(out, rank=rank) if cfg.checkpoint.storage else rank == 0
    if resume_dir is not None and rank == 0 and cfg.checkpoint.storage:
        restore_run_files(resume_dir, out)  # metrics and ledger, from the downloaded checkpoint
    load_dir = resume_dir
    if resume_dir is not None:
        state = read_state(resume_dir)
        other_experts = check_expert_layout(state, cfg, world=world, checkpoint=resume_dir)
        if state["world_size"] != world or other_experts:
            # Elastic resume (or another expert-parallel size): ZeRO partitions depend on the
            # world, so the checkpoint is converted to DeepSpeed's universal format first.
            load_dir = universal_checkpoint(resume_dir, leader=leader)
    return resume_dir, load_dir, leader
