"""A run's own bytes on object storage and on nodes that share no disk: which rank commits on
each disk, the run files a checkpoint carries, checkpoints downloaded to resume from, and what
the run leaves on storage when it ends. (Checkpoint upload itself is Ray Train's: the leader of
each disk reports its committed directory, sftscale.launch.)
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from sftscale.config import DataConfig
from sftscale.storage.cache import local_copy, locked
from sftscale.storage.remote import join, upload

RUN_FILES = "run_files"  # in a checkpoint: the metrics and ledger it carries (object storage)
FROM_STORAGE = "from_storage"  # under <run>/checkpoints: checkpoints downloaded to resume from
# What a run leaves on storage besides its checkpoints: a user can reach these after the
# cluster is gone.
RUN_FILES_ON_STORAGE = (
    "export",
    "metrics.jsonl",
    "tensorboard",
    "ledger",
    "config.yaml",
    "history.jsonl",
    "checkpoints/hf_model",  # what `sftscale export` needs beside the checkpoints there
)


def local_data(data: DataConfig, path: str, *, log: Callable[[str], None] | None) -> Path:
    """`path` itself, or (a URI) this node's checked copy of it; every rank of a node asks, the
    first downloads."""
    return local_copy(
        path,
        cache_dir=Path(data.cache_dir) if data.cache_dir else None,
        max_bytes=int(data.cache_max_gb * 2**30),
        log=log or (lambda _: None),
    )


def claim_directory(out: Path, *, rank: int) -> bool:
    """Collective. True on exactly one rank among those that see the same `out` (the same
    disk): the first to create this attempt's marker file there. Unlike Ray's local rank, this
    does not trust node addresses to tell disks apart."""
    import torch.distributed as dist  # heavy: only workers elect

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


def carry_run_files(files: list[Path], into: Path) -> None:
    """Copy run files (metrics, ledger) into a checkpoint being written, so that a checkpoint
    on object storage restores them too."""
    for src in files:
        dest = into / RUN_FILES / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest, dirs_exist_ok=True)
        elif src.is_file():
            shutil.copy2(src, dest)


def restore_run_files(tag_dir: Path, run_dir: Path) -> None:
    """Put the metrics and ledger a checkpoint carries (RUN_FILES) back into the run directory
    (a node that has never seen this run: the checkpoint came from object storage)."""
    saved = tag_dir / RUN_FILES
    if not saved.is_dir():
        return
    for src in saved.iterdir():
        if src.is_dir():
            shutil.copytree(src, run_dir / src.name, dirs_exist_ok=True)
        else:
            shutil.copy2(src, run_dir / src.name)


def fetch_checkpoint(checkpoint, root: Path, *, complete: str) -> Path:
    """This node's complete copy of a Ray checkpoint on storage (every rank's files: a
    node's own commit holds only its ranks' files, and a resume on another world size reads
    all of them), downloaded once per node: the first worker to get here downloads, the others
    wait on the lock and find it there. `complete`: the file a whole checkpoint holds."""
    name = Path(checkpoint.path).name
    into = root / FROM_STORAGE
    dest = into / name
    into.mkdir(parents=True, exist_ok=True)
    with locked(into / f".{name}.lock"):
        if not (dest / complete).is_file():
            tmp = into / f".download-{name}"
            shutil.rmtree(tmp, ignore_errors=True)
            checkpoint.to_directory(str(tmp))
            shutil.rmtree(dest, ignore_errors=True)
            tmp.replace(dest)
    return dest


def upload_run_files(run_dir: Path, uri: str) -> None:
    """Rank 0, at the end: the export, metrics, TensorBoard events and ledger to storage."""
    for name in RUN_FILES_ON_STORAGE:
        upload(run_dir / name, join(uri, *name.split("/")))
