"""A prepared directory is replaced whole, by one writer at a time.

    with new_output(out) as staged:      # an empty directory beside `out`
        ... write shards, tokenizer, quarantine, manifest into `staged` ...
    # on a normal exit `staged` has taken the place of `out` in one rename (the old version is
    # then deleted); on any exception, Ctrl-C included, `staged` is deleted and `out` is as it was

The claim is a directory beside the output, `.<name>.prepare/`, made complete (holding an
`.owner` record under an exclusive flock) before it is renamed into place, so a second prepare
into the same output sees it and is refused with the holder named. A claim whose flock is free
was left by a prepare that was killed (SIGKILL, a node lost): the next prepare deletes it,
saying so. flock is as safe as the filesystem makes it: see sftscale/rundir.py.

An existing `out` is replaced only when it holds nothing but what prepare writes (a manifest,
shards, the tokenizer copy, the quarantine file): a directory of the user's own files is
refused, never swapped away.

Imports neither torch, ray nor deepspeed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from data_tools import schema
from data_tools.durable import fsync_dir, swap_in

OWNER = ".owner"
_OURS = re.compile(
    rf"({re.escape(schema.MANIFEST_NAME)}|{re.escape(schema.QUARANTINE_NAME)}|"
    rf"{re.escape(schema.TOKENIZER_DIR)}|{schema.SHARD_NAME.pattern})"
)


class OutputError(RuntimeError):
    """The output directory cannot be written (not ours, or held by another prepare)."""


def claim_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.prepare")


@contextlib.contextmanager
def new_output(out: Path, *, log: Callable[[str], None] = print) -> Iterator[Path]:
    """An empty directory to write the new version of `out` into; swapped in on success."""
    out = _target(out)
    _check_replaceable(out)
    with _claimed(out, log) as claim:
        staged = claim / "new"
        staged.mkdir()
        yield staged
        _check_replaceable(out)  # the user may have put files there meanwhile
        swap_in(staged, out, old=claim / "old")
        _delete_old(claim / "old", out, log)


def _target(out: Path) -> Path:
    """The real directory: a symlinked --out is replaced where it points, the link kept."""
    if out.is_symlink():
        out = out.resolve()
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.absolute()


def _check_replaceable(out: Path) -> None:
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if not _OURS.fullmatch(p.name))
    if foreign:
        shown = ", ".join(foreign[:5]) + (
            f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        )
        raise OutputError(
            f"--out {out} holds files prepare did not write ({shown}); prepare replaces its "
            "output directory whole, so it writes only into a new directory, an empty one, or "
            "one that holds a previous prepare's output. Choose another --out"
        )


@contextlib.contextmanager
def _claimed(out: Path, log: Callable[[str], None]) -> Iterator[Path]:
    """Make `.<name>.prepare` ours, atomically, for the time of the `with`; then delete it."""
    claim = claim_path(out)
    for _ in range(3):
        mine = out.with_name(f".{out.name}.prepare.{os.getpid()}.{time.monotonic_ns()}")
        mine.mkdir()
        with open(mine / OWNER, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else has it
            me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
            lock.write(json.dumps(me) + "\n")
            lock.flush()
            try:  # rename never replaces a directory that is not empty: a claim is never empty
                mine.rename(claim)
            except OSError:
                pass
            else:
                try:
                    yield claim
                finally:
                    done = claim.with_name(f"{claim.name}.done.{os.getpid()}")
                    claim.rename(done)  # the name is free at once; deleting may take a while
                    shutil.rmtree(done, ignore_errors=True)
                    fsync_dir(out.parent)
                return
        shutil.rmtree(mine)
        _remove_stale(claim, out, log)
    raise OutputError(f"cannot claim {claim} for --out {out}: it keeps reappearing")


def _remove_stale(claim: Path, out: Path, log: Callable[[str], None]) -> None:
    """Delete a claim whose owner is gone; OutputError naming the owner when it is alive."""
    try:
        with open(claim / OWNER) as held:
            try:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputError(
                    f"another prepare is writing --out {out}: {_holder(held.read())}. Wait "
                    "for it to finish, stop it, or choose another --out"
                ) from None
            log(f"removing {claim}, left by a prepare that did not finish ({_holder(held.read())})")
            trash = claim.with_name(f"{claim.name}.stale.{os.getpid()}")
            claim.rename(trash)
    except FileNotFoundError:  # gone meanwhile (try again), or a claim half deleted
        if not claim.is_dir():
            return
        trash = claim.with_name(f"{claim.name}.stale.{os.getpid()}")
        claim.rename(trash)  # a live claim always holds its owner file
    shutil.rmtree(trash)


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
    except ValueError:
        return "a process that left no record"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"pid {info.get('pid')} on host {info.get('host')}, since {since}"


def _delete_old(old: Path, out: Path, log: Callable[[str], None]) -> None:
    """Delete the previous version: only what prepare writes. Anything else is kept, beside
    `out`, and named."""
    if not old.is_dir():
        return
    for p in old.iterdir():
        if _OURS.fullmatch(p.name):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    with contextlib.suppress(OSError):
        old.rmdir()
    if old.exists():
        kept = out.with_name(f"{out.name}.kept-{time.strftime('%Y%m%d-%H%M%S')}")
        old.rename(kept)
        log(f"files added to {out} while prepare ran are kept in {kept}")
