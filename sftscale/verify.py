"""Prepared data checked before any worker starts, wherever it lives: every shard's size
against the manifest (free), its sha256 once per file version (the verification is recorded,
so a second launch does not rehash unchanged files), and the largest token id against the
model's vocabulary. Every failure names the shard and the fix.

A file version is (real path, size, mtime_ns, ctime_ns, inode): rewriting a shard, even with
its old mtime restored (`touch -d`), changes its ctime, so it is hashed again. The records live
in the node's data cache directory (VERIFIED_FILE), one JSON object per line.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from data_tools import schema
from sftscale.config import ConfigError

VERIFIED_FILE = "verified-shards.jsonl"


def _version(path: Path) -> dict:
    st = path.stat()
    return {
        "path": str(path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "inode": st.st_ino,
    }


def _verified(record_file: Path) -> dict[str, dict]:
    found = {}
    if record_file.is_file():
        for line in record_file.read_text().splitlines():
            try:
                r = json.loads(line)
                found[r["path"]] = r
            except (ValueError, KeyError):
                continue
    return found


def check_token_ids(manifest: schema.Manifest, *, field: str, vocab_size: int) -> None:
    """Every shard's largest token id (recorded by prepare) is an id of the tokenizer: an id
    beyond the embedding is an IndexError on CPU and a device assert on CUDA, mid-run."""
    for shard in manifest.shards:
        if shard.max_token_id is not None and shard.max_token_id >= vocab_size:
            raise ConfigError(
                f"{field}: shard {shard.file} holds token id {shard.max_token_id}, beyond the "
                f"{vocab_size} ids of the data's tokenizer; prepare it again with the tokenizer "
                "the model uses"
            )


def verify_data(
    data_dir: Path,
    manifest: schema.Manifest,
    *,
    field: str,
    vocab_size: int,
    record_dir: Path,
    log: Callable[[str], None],
) -> None:
    """Raise ConfigError for a shard that is not what the manifest says."""
    check_token_ids(manifest, field=field, vocab_size=vocab_size)
    record_dir.mkdir(parents=True, exist_ok=True)
    record_file = record_dir / VERIFIED_FILE
    known = _verified(record_file)
    hashed, t0 = 0, time.perf_counter()
    for shard in manifest.shards:
        path = schema.member(data_dir, shard.file)
        where = f"{field}: shard {shard.file} ({path})"
        if not path.is_file():
            raise ConfigError(f"{where} is missing; re-run `sftscale prepare` or restore it")
        size = path.stat().st_size
        if shard.bytes is not None and size != shard.bytes:
            raise ConfigError(
                f"{where} has {size:,} bytes but the manifest says {shard.bytes:,}: it is "
                "truncated or was replaced; re-run `sftscale prepare` (or copy the directory again)"
            )
        if shard.sha256 is None:
            continue
        version = _version(path)
        seen = known.get(version["path"])
        if (
            seen
            and {k: seen.get(k) for k in version} == version
            and seen.get("sha256") == shard.sha256
        ):
            continue
        digest = schema.file_sha256(path)
        hashed += size
        if digest != shard.sha256:
            raise ConfigError(
                f"{where}: sha256 {digest[:16]}... but the manifest says {shard.sha256[:16]}...: "
                "the file is damaged or from another `sftscale prepare`; re-run prepare or copy "
                "the directory again"
            )
        with open(record_file, "a") as f:
            f.write(json.dumps({**version, "sha256": digest}) + "\n")
            f.flush()
            os.fsync(f.fileno())
    if hashed:
        seconds = time.perf_counter() - t0
        log(
            f"{field}: {hashed / 2**30:.2f} GiB of shards hashed and recorded in {record_file} "
            f"({seconds:.1f} s); unchanged files are not hashed again"
        )
