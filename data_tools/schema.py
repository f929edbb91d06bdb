"""The packed-shard format, defined once: `data_tools` writes it, `sftscale.data` reads it.

A prepared directory holds:

    manifest.json            counts, fingerprints, per-shard stats (the Manifest dataclass)
    shard-00000.arrow ...    Arrow IPC *file* format, one row per packed training row
    quarantine.jsonl         records that could not be used, with source, line and reason
    tokenizer/               the tokenizer (with its chat template) the ids were made with

Each row holds up to `seq_len` tokens (the reader pads to `seq_len`):

    input_ids  list<int32>   token ids of the documents in the row, concatenated
    loss_mask  list<int8>    1 where the token is supervised (predicted by the previous position)
    doc_lens   list<int32>   length of each document in the row, in order; sums to len(input_ids)

Load with `datasets` (no custom code):

    datasets.load_dataset("arrow", data_files="DIR/shard-*.arrow", split="train")

Only pyarrow here: this module must stay importable without torch, ray or deepspeed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
QUARANTINE_NAME = "quarantine.jsonl"
TOKENIZER_DIR = "tokenizer"

SHARD_SCHEMA = pa.schema(
    [
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("loss_mask", pa.list_(pa.int8()), nullable=False),
        pa.field("doc_lens", pa.list_(pa.int32()), nullable=False),
    ],
    metadata={"sftscale_schema_version": str(SCHEMA_VERSION)},
)


@dataclass(frozen=True)
class ShardInfo:
    file: str  # e.g. shard-00000.arrow, relative to the prepared directory
    num_rows: int
    num_tokens: int
    num_supervised_tokens: int
    # The file's size and sha256: what a node that downloads the shard checks it against.
    # None in manifests written before they were recorded.
    bytes: int | None = None
    sha256: str | None = None
    max_token_id: int | None = None  # checked against the model's vocabulary before launch
    # the longest document of the shard (tokens): a CPU plan counts the attention kernels
    # of the document lengths the data can give; None in older manifests
    max_doc_tokens: int | None = None


@dataclass(frozen=True)
class TokenizerInfo:
    fingerprint: str  # sha256 of the vocabulary (added tokens included) and the chat template
    vocab_size: int  # len(tokenizer): the ids the shards may hold
    dir: str  # the tokenizer saved beside the shards (TOKENIZER_DIR)
    source: str  # what --tokenizer named
    base_vocab_size: int | None = None  # without added tokens; None in older manifests
    added_tokens: list[str] = field(default_factory=list)  # added by prepare (template markers)
    end_of_turn_id: int | None = None  # the token an assistant turn ends with
    eos_token_ids: list[int] = field(default_factory=list)  # where generation stops, in order
    files: dict[str, str] = field(default_factory=dict)  # file in `dir` -> its sha256


@dataclass(frozen=True)
class Manifest:
    """manifest.json, typed: what `sftscale prepare` wrote and every reader reads."""

    schema_version: int
    seq_len: int
    num_rows: int
    num_documents: int
    num_tokens: int
    num_supervised_tokens: int
    packing_efficiency: float  # non-pad fraction of the rows' capacity
    quarantined_rows: int  # records sent to quarantine.jsonl
    tokenizer: TokenizerInfo
    sources: dict[str, Any]  # {"sha256": of all inputs, "files": [{"path", "sha256"}, ...]}
    shards: list[ShardInfo]
    num_records: int = 0
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    formats: dict[str, int] = field(default_factory=dict)  # records per input format
    overflow: dict[str, int] = field(default_factory=dict)  # truncated / split documents
    options: dict[str, Any] = field(default_factory=dict)  # the prepare options that shape rows
    mixture: dict[str, Any] | None = None  # a weighted mixture: per source, as read and as mixed

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        known = {f.name for f in dataclasses.fields(cls)}
        tok_known = {f.name for f in dataclasses.fields(TokenizerInfo)}
        return cls(
            **{
                **{k: v for k, v in d.items() if k in known},
                "tokenizer": TokenizerInfo(
                    **{k: v for k, v in d["tokenizer"].items() if k in tok_known}
                ),
                "shards": [ShardInfo(**s) for s in d["shards"]],
            }
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def longest_document(self) -> int | None:
        """The longest document of any shard (tokens); None when a shard does not say."""
        found = [s.max_doc_tokens for s in self.shards]
        if not found or any(not isinstance(n, int) or n < 0 for n in found):
            return None
        return max(found)

    @property
    def packed(self) -> bool:
        """Rows packed with several documents (else `prepare --packing none`: one a row)."""
        return self.options.get("packing") != "none"


class ShardFormatError(ValueError):
    """A prepared directory that this version cannot read; the message says what to do."""


# What `prepare` writes, and so all a manifest may name: shard files and tokenizer files are
# single path components, the tokenizer directory is TOKENIZER_DIR. A manifest is data, never a
# path: anything else (`../x`, `/etc/x`, `a/b`) is refused before a byte is read or written.
SHARD_NAME = re.compile(r"shard-\d{5,}\.arrow")
FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")


def check_names(m: Manifest, *, where: str) -> None:
    for s in m.shards:
        if not isinstance(s.file, str) or not SHARD_NAME.fullmatch(s.file):
            raise ShardFormatError(
                f"{where}: the manifest names a shard {str(s.file)[:120]!r}, which is not a shard "
                "file name (shard-NNNNN.arrow); re-run `sftscale prepare` or fix the manifest"
            )
    if m.tokenizer.dir != TOKENIZER_DIR:
        raise ShardFormatError(
            f"{where}: the manifest names the tokenizer directory {str(m.tokenizer.dir)[:120]!r}; "
            f"`sftscale prepare` writes {TOKENIZER_DIR!r}"
        )
    for name in m.tokenizer.files:
        if not FILE_NAME.fullmatch(str(name)) or set(str(name)) <= {"."}:
            raise ShardFormatError(
                f"{where}: the manifest names a tokenizer file {str(name)[:120]!r}, which is not "
                "a plain file name; re-run `sftscale prepare` or fix the manifest"
            )


def member(root: Path, name: str) -> Path:
    """`root / name` for a name a manifest gave, refused if it resolves outside `root` (a
    symlink that leads out of the prepared directory)."""
    path = root / name
    real, base = path.resolve(), root.resolve()
    if base not in real.parents:
        raise ShardFormatError(
            f"{path} resolves to {real}, outside the prepared directory {base} (a symlink?); "
            "the data must be the prepared directory's own files"
        )
    return path


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def _list_array(values: list, value_type: pa.DataType) -> pa.Array:
    """A list<value_type> array from a list of sequences (numpy arrays or lists), built from one
    flat buffer and offsets rather than element by element."""
    # heavy (numpy): loaded only on the path that uses it
    import numpy as np

    lengths = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([np.asarray(v) for v in values]) if values else np.zeros(0)
    return pa.ListArray.from_arrays(_array(offsets, pa.int32()), _array(flat, value_type))


def _array(values: Any, value_type: pa.DataType) -> pa.Array:
    """A numpy array as an Arrow one, over the same bytes. (`pa.array` would import pandas to
    ask whether it was given a pandas object: 0.6 s of every prepare.)"""
    # heavy (numpy): loaded only on the path that uses it
    import numpy as np

    values = np.ascontiguousarray(values, dtype=value_type.to_pandas_dtype())
    return pa.Array.from_buffers(value_type, len(values), [None, pa.py_buffer(values)])


def write_shard(path: Path, rows: dict[str, list]) -> None:
    """Write one shard atomically (temp file, then rename) so a crash never leaves half a shard."""
    arrays = [_list_array(rows[f.name], f.type.value_type) for f in SHARD_SCHEMA]
    table = pa.Table.from_arrays(arrays, schema=SHARD_SCHEMA)
    tmp = path.with_suffix(".arrow.tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, SHARD_SCHEMA) as writer:
        writer.write_table(table, max_chunksize=1024)
    tmp.replace(path)


def open_shard(path: Path) -> pa.Table:
    """Memory-map a shard: rows are read from the page cache on demand, not loaded up front."""
    source = pa.memory_map(str(path), "r")
    table = pa.ipc.open_file(source).read_all()
    if not table.schema.equals(SHARD_SCHEMA, check_metadata=False):
        raise ShardFormatError(f"{path}: schema {table.schema} is not the sftscale shard schema")
    return table


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(out_dir: Path, manifest: Manifest) -> None:
    tmp = out_dir / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
    tmp.replace(out_dir / MANIFEST_NAME)


def read_manifest(data_dir: str | Path) -> Manifest:
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST_NAME
    if not path.is_file():
        raise ShardFormatError(
            f"{data_dir} has no {MANIFEST_NAME}: point data.path at a directory written by `sftscale prepare`"
        )
    raw = json.loads(path.read_text())
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ShardFormatError(
            f"{path}: schema_version {version} but this sftscale reads {SCHEMA_VERSION}; "
            "re-run `sftscale prepare` with this version"
        )
    try:
        manifest = Manifest.from_dict(raw)
    except (KeyError, TypeError) as e:
        raise ShardFormatError(
            f"{path}: not a complete sftscale manifest ({e}); re-run `sftscale prepare`"
        ) from e
    check_names(manifest, where=str(data_dir))
    for shard in manifest.shards:
        if not member(data_dir, shard.file).is_file():
            raise ShardFormatError(
                f"{data_dir}: shard {shard.file} listed in the manifest is missing"
            )
    return manifest
