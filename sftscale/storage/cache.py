"""The node's data cache: `data.path` may be a URI (s3://, gs://, anything pyarrow.fs reads).
Each node copies the manifest, the tokenizer and the shards to its local disk once,
checks every file against the manifest (size and sha256), and reads the copy memory-mapped as
it reads a local directory, so a row is still one seek.

    local = local_copy("s3://bucket/prepared", cache_dir=Path("~/.cache/sftscale/data"),
                       max_bytes=50 * 2**30)

The cache holds one directory per URI; a complete copy carries a `.complete` marker and is
reused while the manifest on storage is unchanged. Copies of other URIs are evicted, least
recently used first, while the cache exceeds `max_bytes`. Processes on one node share a copy:
the first takes a file lock and downloads, the others wait on the lock and find it complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
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

COMPLETE = ".complete"


def default_cache_dir() -> Path:
    return Path(os.environ.get("SFTSCALE_CACHE", Path.home() / ".cache" / "sftscale")) / "data"


def local_copy(
    path: str,
    *,
    cache_dir: Path | None = None,
    max_bytes: int = 50 * 2**30,
    log: Callable[[str], None] = lambda _: None,
) -> Path:
    """A local directory holding the prepared data at `path`: `path` itself when it is local,
    else a checked copy in the node's cache (downloaded once per node)."""
    if not is_uri(path):
        return Path(path.removeprefix("file://"))
    cache = Path(cache_dir or default_cache_dir()).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / hashlib.sha256(path.rstrip("/").encode()).hexdigest()[:20]
    manifest = read_remote_manifest(path)
    expected = json.dumps(manifest.to_dict(), sort_keys=True)
    with locked(cache / f"{dest.name}.lock"):
        if (dest / COMPLETE).is_file() and (dest / COMPLETE).read_text() == expected:
            os.utime(dest / COMPLETE)  # recently used
            return dest
        total = _download(path, manifest, dest, log=log)
        (dest / COMPLETE).write_text(expected)
        log(f"data: {redact(path)} copied to {dest} ({total / 2**20:.1f} MiB, every file checked)")
        _evict(cache, keep=dest, max_bytes=max_bytes, log=log)
    return dest


def _download(
    uri: str, manifest: schema.Manifest, dest: Path, *, log: Callable[[str], None]
) -> int:
    shutil.rmtree(dest, ignore_errors=True)
    (dest / manifest.tokenizer.dir).mkdir(parents=True)
    wanted: list[tuple[str, int | None, str | None]] = [(schema.MANIFEST_NAME, None, None)]
    wanted += [(s.file, s.bytes, s.sha256) for s in manifest.shards]
    tok_files = manifest.tokenizer.files
    if not tok_files:  # an older manifest: whatever the tokenizer directory holds, unchecked
        tok_files = dict.fromkeys(list_files(join(uri, manifest.tokenizer.dir)))
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


def _evict(cache: Path, *, keep: Path, max_bytes: int, log: Callable[[str], None]) -> None:
    copies = [d for d in cache.iterdir() if d.is_dir() and d != keep]

    def size(d: Path) -> int:
        return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())

    used = size(keep) + sum(size(d) for d in copies)
    for d in sorted(copies, key=lambda d: _used_at(d)):  # least recently used first
        if used <= max_bytes:
            break
        with locked(cache / f"{d.name}.lock"):
            freed = size(d)
            shutil.rmtree(d, ignore_errors=True)
        used -= freed
        log(
            f"data: evicted {d} from the cache ({freed / 2**20:.1f} MiB; limit "
            f"{max_bytes / 2**30:.1f} GiB)"
        )


def _used_at(d: Path) -> float:
    marker = d / COMPLETE
    return marker.stat().st_mtime if marker.is_file() else 0.0


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock between processes of this node (released when the holder dies)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
