"""Writes that survive a crash: a file or directory is the previous version or the new one,
never a mix, and what was committed is on disk (fsync of files and of the directories that
name them).

    atomic_write(path, text)        # write beside, fsync, rename, fsync the directory
    swap_in(staged_dir, dest_dir)   # exchange two directories in one rename (Linux renameat2)
"""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file under `path` and every directory of it to disk."""
    for f in sorted(path.rglob("*")):
        if f.is_file() and not f.is_symlink():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in sorted((p for p in path.rglob("*") if p.is_dir()), reverse=True):
        fsync_dir(d)
    fsync_dir(path)


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)


def staging_dir(dest: Path) -> Path:
    """Where a new version of the directory `dest` is written before `swap_in`."""
    return dest.with_name(f".{dest.name}.tmp")


def swap_in(staged: Path, dest: Path, *, old: Path | None = None) -> None:
    """Replace the directory `dest` by `staged` (written and complete) so that at every instant
    `dest` is the whole old version or the whole new one. The old version is then deleted, or
    moved to `old` when given (the caller deletes what it knows). Nothing of the old version
    survives in the new one (a stale shard of another layout, say)."""
    fsync_tree(staged)
    if dest.exists() and _exchange(staged, dest):
        fsync_dir(dest.parent)
        _retire(staged, old)  # `staged` now names the old version
        return
    if dest.exists():  # no renameat2 (not Linux, old kernel, some filesystems): two renames
        aside = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(aside, ignore_errors=True)
        dest.rename(aside)
        staged.rename(dest)
        fsync_dir(dest.parent)
        _retire(aside, old)
        return
    staged.rename(dest)
    fsync_dir(dest.parent)


def _retire(previous: Path, old: Path | None) -> None:
    if old is None:
        shutil.rmtree(previous)
    else:
        previous.rename(old)


def _exchange(a: Path, b: Path) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    done = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return done == 0
