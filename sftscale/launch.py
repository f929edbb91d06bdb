"""Starting workers: Ray Train (cluster or a local Ray) or this process (local debug mode).

Both call the same `sftscale.train.train_worker`; nothing about training is decided here.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from data_tools.console import say
from sftscale.checkpoint import STATE_FILE, latest_checkpoint, read_state
from sftscale.config import Config, ConfigError, save_config
from sftscale.heartbeat import StallReporter
from sftscale.jit_locks import OpBuildError, ensure_ops, required_ops
from sftscale.resolve import ResolvedRun
from sftscale.rundir import own_run_dir, record_history
from sftscale.storage import fetch_checkpoint, is_uri, join, upload_run_files
from sftscale.validate import validate_run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job_env_keys() -> set[str]:
    """Environment variables a `ray job submit` runtime env already sets: Ray refuses a driver
    that sets one of them again (even to the same value), and the job's setting should win."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return set()
    runtime_env = json.loads(raw).get("runtime_env") or {}
    return set(runtime_env.get("env_vars") or {})


# Object storage settings the workers need as the driver has them (pyarrow reads these).
STORAGE_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
)


def _worker_env(cfg: Config, *, exclude: set[str] = frozenset()) -> dict[str, str]:
    """Environment every worker needs before torch/deepspeed import. Object-storage credentials
    travel only when a URI of the run needs them: Ray keeps a job's runtime env where its
    dashboard, job API and agent logs show it."""
    env = {"OMP_NUM_THREADS": str(cfg.scale.cpus_per_worker)}
    if not cfg.scale.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    uses_storage = any(is_uri(p) for p in (cfg.data.path, cfg.eval.path, cfg.checkpoint.storage))
    for key in ("TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", "HF_HUB_OFFLINE", "SFTSCALE_CACHE"):
        if key in os.environ:
            env.setdefault(key, os.environ[key])
    for key in STORAGE_ENV if uses_storage else ():
        if key in os.environ:
            env.setdefault(key, os.environ[key])
    return {k: v for k, v in env.items() if k not in exclude}


def prepare_run_dir(cfg: Config, *, write: bool = True) -> Path:
    """The run directory, with the resolved config (URIs redacted) saved in it."""
    run_dir = cfg.run_dir.resolve()
    if cfg.checkpoint.resume == "never" and (run_dir / "checkpoints" / "latest").exists():
        raise ConfigError(
            f"checkpoint.resume is never but {run_dir} already holds a run; "
            "choose another logging.run_name or remove that directory"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    if write:
        save_config(cfg, run_dir / "config.yaml")  # the resolved config, overrides applied
    return run_dir


def run(cfg: Config, *, local: bool) -> dict[str, Any]:
    world = 1 if local else cfg.scale.num_workers
    if local and "WORLD_SIZE" in os.environ:  # started by torchrun: one process per rank
        world = int(os.environ["WORLD_SIZE"])
    checked = validate_run(cfg, world_size=world)
    build_required_ops(checked.run)
    if local and os.environ.get("RANK", "0") != "0":  # a launched rank: rank 0 owns the dir
        return run_local(cfg, prepare_run_dir(cfg, write=False), expected=checked.expected)
    with own_run_dir(cfg.run_dir.resolve(), log=say):  # one launch at a time
        run_dir = prepare_run_dir(cfg)
        if checked.changes:  # checkpoint.resume=force: what changed, for the record
            changes = [{"key": k, "was": old, "now": new} for k, old, new in checked.changes]
            record_history(run_dir, {"event": "resume forced", "changes": changes})
            say(f"resuming with changed settings (recorded in {run_dir / 'history.jsonl'})")
        if local:
            return run_local(cfg, run_dir, expected=checked.expected)
        return run_ray(cfg, run_dir, expected=checked.expected)


def build_required_ops(run: ResolvedRun) -> None:
    """The JIT ops this run's template loads (none on the default path), built or loaded here,
    in the driver, before any worker starts: workers on this host then only load them. A driver
    without the workers' GPUs leaves CUDA ops to the workers (each builds on first use)."""
    # heavy (torch): loaded only on the path that uses it
    import torch

    if run.config.scale.use_gpu and not torch.cuda.is_available():
        return
    try:
        ensure_ops(required_ops(run.ds_config, run.config.deepspeed.template), log=say)
    except OpBuildError as e:
        raise ConfigError(str(e)) from e


def run_local(
    cfg: Config, run_dir: Path, *, expected: dict[int, dict[str, str]] | None = None
) -> dict[str, Any]:
    """One process, no Ray: the debug mode. Also works as one rank under torchrun."""
    for key, value in {
        **_worker_env(cfg),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }.items():
        os.environ.setdefault(key, value)
    # heavy (torch): loaded only on the path that uses it
    import torch.distributed as dist

    from sftscale.train import train_worker

    try:
        return train_worker(cfg, str(run_dir), expected=expected)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()  # gloo may abort at interpreter exit otherwise


def _ray_train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's entry on every worker: resume from Ray's latest checkpoint (after a worker
    failure Ray restarts the whole group) and report each committed checkpoint to Ray."""
    # heavy (ray): loaded only on the path that uses it
    import ray.train
    from ray.train import Checkpoint
    from ray.train.v2.api.report_config import CheckpointUploadMode

    from sftscale.train import train_worker

    cfg: Config = config["cfg"]
    run_dir = Path(config["run_dir"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    remote = bool(cfg.checkpoint.storage)
    latest = ray.train.get_checkpoint()
    resume_from = None
    if latest is not None:  # on storage: each node downloads it once
        resume_from = (
            fetch_checkpoint(latest, run_dir / "checkpoints", complete=STATE_FILE)
            if remote
            else latest.path
        )

    def report(tag_dir: Path, metrics: dict[str, Any], leader: bool) -> None:
        # Every worker must call report (it is a barrier). Without storage the checkpoint is
        # already in the run directory, Ray's experiment directory: rank 0 (the leader) names
        # it, nothing is uploaded. With storage, the leader of each disk uploads the files of
        # the ranks that share it (every rank's file names differ); Ray merges them into one
        # checkpoint directory.
        if remote:
            ray.train.report(
                metrics,
                checkpoint=Checkpoint.from_directory(str(tag_dir)) if leader else None,
                checkpoint_dir_name=tag_dir.name,
                checkpoint_upload_mode=CheckpointUploadMode.SYNC,
                delete_local_checkpoint_after_upload=False,
            )
        else:
            ray.train.report(
                metrics,
                checkpoint=Checkpoint.from_directory(str(tag_dir)) if leader else None,
                checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD,
            )

    result = train_worker(
        cfg,
        str(run_dir),
        resume_from=resume_from,
        on_checkpoint=report,
        expected=config.get("expected"),
    )
    if remote and rank == 0:
        upload_run_files(run_dir, join(cfg.checkpoint.storage, run_dir.name))
    return result


def run_ray(
    cfg: Config, run_dir: Path, *, expected: dict[int, dict[str, str]] | None = None
) -> dict[str, Any]:
    """Ray Train (V2) TorchTrainer with `scale.num_workers` workers."""
    if not (cfg.scale.ray_address or os.environ.get("RAY_ADDRESS")):
        # A local instance: its node address (and so GCS, raylet, object manager) on loopback,
        # whatever the environment says; Ray >= 2.59 adds token authentication by default.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    # heavy (ray): loaded only on the path that uses it
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # A local Ray instance (no address) starts its dashboard on 127.0.0.1; Ray Train's
    # controller queries actor state through it.
    ray.init(
        address=cfg.scale.ray_address or None,
        runtime_env={"env_vars": _worker_env(cfg, exclude=_job_env_keys())},
        log_to_driver=True,
    )
    try:
        trainer = TorchTrainer(
            _ray_train_loop,
            torch_config=TorchConfig(timeout_s=cfg.scale.collective_timeout_s),
            train_loop_config={"cfg": cfg, "run_dir": str(run_dir), "expected": expected},
            scaling_config=ScalingConfig(
                num_workers=(
                    (cfg.scale.min_workers, cfg.scale.num_workers)
                    if cfg.scale.min_workers
                    else cfg.scale.num_workers
                ),
                use_gpu=cfg.scale.use_gpu,
                resources_per_worker={"CPU": cfg.scale.cpus_per_worker},
            ),
            # The run directory is Ray's experiment directory, so the checkpoints the workers
            # write there are Ray checkpoints without a copy.
            run_config=RunConfig(
                storage_path=cfg.checkpoint.storage or str(run_dir.parent),
                name=run_dir.name,
                failure_config=FailureConfig(max_failures=cfg.scale.max_failures),
                # On storage Ray deletes older checkpoints; locally sftscale prunes its own.
                checkpoint_config=CheckpointConfig(
                    num_to_keep=cfg.checkpoint.keep_last if cfg.checkpoint.storage else None
                ),
            ),
        )
        with StallReporter(run_dir, log=say):  # the driver sees the run directory
            result = trainer.fit()
        if result.error is not None:
            raise result.error
        # A run stopped early (STOP file) ends at its last checkpoint before max_steps.
        if cfg.checkpoint.storage:
            step = int((result.metrics or {}).get("step", 0))
        else:
            latest = latest_checkpoint(run_dir / "checkpoints")
            step = read_state(latest)["step"] if latest else 0
        return {"run_dir": str(run_dir), "preempted": step < cfg.train.max_steps, "step": step}
    finally:
        ray.shutdown()
