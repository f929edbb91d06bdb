"""The node's data cache: `data.path` may be a URI (s3://, gs://, anything pyarrow.fs reads).
Each node copies the manifest, the tokenizer and the shards to its local disk once,
checks every file against the manifest (size and sha256), and reads the copy memory-mapped as
it reads a local directory, so a row is still one seek.

    local = local_copy("s3://bucket/prepared", cache_dir=Path("/scratch/me"), max_bytes=50 * 2**30)

What the cache owns, and nothing else: its own directory CACHE_SUBDIR inside the cache
directory (also when data.cache_dir names a directory of the user's), and there one copy
per URI, each marked (OWNED) when the cache creates it. Eviction deletes only marked copies.

Locks (flock, released by the kernel when a process dies, however it dies):
- `<copy>.lock` exclusive while a process downloads the copy, shared while a process uses it
  (every process of a run holds its train and eval copies until it exits): a copy in use is
  never evicted;
- eviction only ever *tries* another copy's lock (LOCK_NB): no process holds one lock while it
  waits for another, so two jobs cannot deadlock; the one wait there is (another process is
  downloading the copy this one needs) has a deadline and says whom it waits for.
flock is safe on a node's local disk, which is what the cache is for. On NFS (v4: byte-range
locks the server arbitrates) it works between machines too, but a cache there is shared by
every node: prefer a local disk (data.cache_dir).

Space: before a download, copies nobody uses are evicted (least recently used first) until
the new copy fits under `max_bytes` and the disk's free space; if it cannot fit, the run stops
before downloading, saying how much is needed and what holds the space.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from data_tools import schema
from sftscale.config import redact
from sftscale.storage.remote import (
    is_uri,
    join,
    list_files,
    read_blocks,
    read_remote_manifest,
)

CACHE_SUBDIR = "sftscale-data-cache"  # the cache's own directory inside data.cache_dir
OWNED = ".sftscale-copy"  # in every copy the cache made: only these are ever evicted
COMPLETE = ".complete"
LOCK_WAIT_S = 3600.0  # the longest a process waits for another one's download
_HELD: dict[Path, int] = {}  # copies this process uses: their lock fds stay open until exit


class CacheError(RuntimeError):
    """The cache cannot hold a copy (space, a download that never ends); the message says what
    to change."""


def sftscale_cache() -> Path:
    """Where sftscale keeps what it caches on this host: $SFTSCALE_CACHE, else
    ~/.cache/sftscale (data copies under data/, the runtime probe's results under runtime/)."""
    return Path(os.environ.get("SFTSCALE_CACHE", Path.home() / ".cache" / "sftscale"))


def default_cache_dir() -> Path:
    return sftscale_cache() / "data"


def cache_root(cache_dir: Path | None) -> Path:
    return Path(cache_dir or default_cache_dir()).expanduser() / CACHE_SUBDIR


def local_copy(
    path: str,
    *,
    cache_dir: Path | None = None,
    max_bytes: int = 50 * 2**30,
    log: Callable[[str], None] = lambda _: None,
    wait_s: float = LOCK_WAIT_S,
) -> Path:
    """A local directory holding the prepared data at `path`: `path` itself when it is local,
    else a checked copy in the node's cache (downloaded once per node), held in use (a shared
    lock) by this process until it exits."""
    if not is_uri(path):
        return Path(path.removeprefix("file://"))
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    dest = root / hashlib.sha256(path.rstrip("/").encode()).hexdigest()[:20]
    manifest = read_remote_manifest(path)
    expected = json.dumps(manifest.to_dict(), sort_keys=True)
    if dest not in _HELD:
        _HELD[dest] = os.open(root / f"{dest.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fd = _HELD[dest]
    waiting = f"another process's download of {dest}"
    if _complete(dest, expected):
        _lock(fd, fcntl.LOCK_SH, wait_s=wait_s, what=waiting)  # waits only for a download
        if _complete(dest, expected):
            os.utime(dest / COMPLETE)  # recently used
            return dest
    _lock(fd, fcntl.LOCK_EX, wait_s=wait_s, what=waiting)
    try:
        if not _complete(dest, expected):
            need = sum(s.bytes or 0 for s in manifest.shards)
            _make_room(root, keep=dest, need=need, max_bytes=max_bytes, log=log)
            total = _download(path, manifest, dest, log=log)
            (dest / COMPLETE).write_text(expected)
            log(
                f"data: {redact(path)} copied to {dest} ({total / 2**20:.1f} MiB, every file "
                "checked)"
            )
    finally:
        fcntl.flock(fd, fcntl.LOCK_SH)  # downgrade: in use by this process from now on
    os.utime(dest / COMPLETE)
    return dest


def release(copy: Path) -> None:
    """This process no longer uses `copy` (its lock is dropped; the kernel does it at exit)."""
    fd = _HELD.pop(copy, None)
    if fd is not None:
        os.close(fd)


def _complete(dest: Path, expected: str) -> bool:
    return (dest / COMPLETE).is_file() and (dest / COMPLETE).read_text() == expected


def _lock(fd: int, kind: int, *, wait_s: float, what: str) -> None:
    """flock with a deadline: polls LOCK_NB, says what it waits for once, then gives up."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise CacheError(
                    f"waited {wait_s:.0f} s for {what}; if that process is stuck, end it, or "
                    "point data.cache_dir at another directory"
                ) from None
            time.sleep(0.2)


def _size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file() and not f.is_symlink())


def _make_room(
    root: Path, *, keep: Path, need: int, max_bytes: int, log: Callable[[str], None]
) -> None:
    """Evict copies nobody uses, least recently used first, until `need` more bytes fit under
    `max_bytes` and on the disk; raise CacheError when they cannot."""
    copies = [d for d in root.iterdir() if d.is_dir() and d != keep and (d / OWNED).is_file()]
    used = sum(_size(d) for d in copies)
    for d in sorted(copies, key=_used_at):
        if used + need <= max_bytes and shutil.disk_usage(root).free > need * 1.05:
            break
        fd = os.open(root / f"{d.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # never wait: in use means keep
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            freed = _size(d)
            shutil.rmtree(d, ignore_errors=True)
        finally:
            os.close(fd)
        used -= freed
        log(f"data: evicted {d} from the cache ({freed / 2**20:.1f} MiB)")
    gib = 2**30
    if used + need > max_bytes:
        raise CacheError(
            f"the data cache {root} cannot hold a {need / gib:.2f} GiB copy under "
            f"data.cache_max_gb={max_bytes / gib:g}: {used / gib:.2f} GiB are copies in use by "
            "running jobs; raise data.cache_max_gb or wait for them"
        )
    free = shutil.disk_usage(root).free
    if free <= need * 1.05:
        raise CacheError(
            f"the disk of {root} has {free / gib:.2f} GiB free and the copy needs "
            f"{need / gib:.2f} GiB; free space there or point data.cache_dir at a larger disk"
        )


def _download(
    uri: str, manifest: schema.Manifest, dest: Path, *, log: Callable[[str], None]
) -> int:
    shutil.rmtree(dest, ignore_errors=True)
    (dest / manifest.tokenizer.dir).mkdir(parents=True)
    (dest / OWNED).write_text(redact(uri) + "\n")  # made by the cache: it may evict it
    wanted: list[tuple[str, int | None, str | None]] = [(schema.MANIFEST_NAME, None, None)]
    wanted += [(s.file, s.bytes, s.sha256) for s in manifest.shards]
    tok_files = manifest.tokenizer.files
    if not tok_files:  # an older manifest: whatever the tokenizer directory holds, unchecked
        tok_files = dict.fromkeys(list_files(join(uri, manifest.tokenizer.dir)))
        for name in tok_files:
            if not schema.FILE_NAME.fullmatch(name):
                raise schema.ShardFormatError(f"{redact(uri)}: tokenizer file {name[:120]!r}")
    wanted += [(f"{manifest.tokenizer.dir}/{name}", None, sha) for name, sha in tok_files.items()]
    unchecked = [s.file for s in manifest.shards if s.sha256 is None]
    if unchecked:
        log(
            f"data: {redact(uri)}: the manifest records no hash for {len(unchecked)} shard(s) (written by "
            "an older `sftscale prepare`); they are checked by row count only"
        )
    total = 0
    for rel, size, sha in wanted:
        tmp = dest / f"{rel}.part"
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            for block in read_blocks(join(uri, *rel.split("/"))):
                digest.update(block)
                out.write(block)
        got = tmp.stat().st_size
        if (size is not None and got != size) or (sha is not None and digest.hexdigest() != sha):
            tmp.unlink()
            raise schema.ShardFormatError(
                f"{redact(uri)}/{rel}: {got} bytes, sha256 {digest.hexdigest()[:16]}..., but the manifest "
                f"says {size} bytes, sha256 {(sha or '?')[:16]}...: the upload is incomplete or "
                "from another `sftscale prepare`; upload the prepared directory again"
            )
        tmp.replace(dest / rel)
        total += got
    for s in manifest.shards:
        if s.sha256 is None and schema.open_shard(dest / s.file).num_rows != s.num_rows:
            raise schema.ShardFormatError(
                f"{redact(uri)}/{s.file}: row count differs from the manifest"
            )
    return total


def _used_at(d: Path) -> float:
    marker = d / COMPLETE
    return marker.stat().st_mtime if marker.is_file() else 0.0


class locked:
    """An exclusive lock between processes of this node, waited for up to `wait_s` seconds
    (released when the holder dies)."""

    def __init__(self, path: Path, *, wait_s: float = LOCK_WAIT_S) -> None:
        self.path, self.wait_s = path, wait_s

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            _lock(self.fd, fcntl.LOCK_EX, wait_s=self.wait_s, what=f"the lock {self.path}")
        except BaseException:
            os.close(self.fd)
            raise

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
