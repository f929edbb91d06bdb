"""`sftscale prepare`: chat JSONL -> tokenized, loss-masked, packed Arrow shards + manifest.

    sftscale prepare data/*.jsonl --tokenizer TOKDIR --seq-len 2048 --out prepared/

Pipeline: read records (line by line, remembering file and line) -> validate -> render the chat
template -> tokenize + loss mask (data_tools.chat) -> handle over-long documents -> pack
(best-fit decreasing) -> write shards + manifest. Bad records go to quarantine.jsonl with their
source, line and reason; nothing is dropped silently.

Imports neither torch, ray nor deepspeed (transformers only for the tokenizer).
"""

from __future__ import annotations

import glob
import hashlib
import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_tools import schema
from data_tools.chat import BadRecord, resolve_template, tokenize_conversation, validate_messages
from data_tools.pack import pack_best_fit_decreasing

OVERFLOW_MODES = ("truncate", "quarantine")


class PrepareError(RuntimeError):
    """The job as a whole cannot go on (bad arguments, too many bad rows)."""


@dataclass
class PrepareOptions:
    seq_len: int
    chat_template: str | None = None
    overflow: str = "truncate"
    rows_per_shard: int = 10_000
    max_bad_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise PrepareError(f"--seq-len must be >= 2, got {self.seq_len}")
        if self.overflow not in OVERFLOW_MODES:
            raise PrepareError(f"--overflow must be one of {', '.join(OVERFLOW_MODES)}")
        if self.rows_per_shard < 1:
            raise PrepareError("--rows-per-shard must be >= 1")
        if not 0 <= self.max_bad_fraction <= 1:
            raise PrepareError("--max-bad-fraction must be in [0, 1]")


@dataclass
class _Quarantine:
    rows: list[dict[str, Any]] = field(default_factory=list)
    reasons: Counter = field(default_factory=Counter)

    def add(self, *, source: str, line: int, reason: str, raw: str) -> None:
        self.rows.append({"source": source, "line": line, "reason": reason, "raw": raw})
        self.reasons[reason.split(":")[0]] += 1


def expand_inputs(inputs: list[str]) -> list[Path]:
    paths: list[Path] = []
    for item in inputs:
        matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
        if not matches:
            raise PrepareError(f"input {item!r} matches no file")
        for m in matches:
            p = Path(m)
            if not p.is_file():
                raise PrepareError(f"input {m} is not a file")
            paths.append(p)
    return paths


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise PrepareError(
            f"--tokenizer {path} is not a directory holding a Hugging Face tokenizer"
        )
    return AutoTokenizer.from_pretrained(str(path))


def tokenizer_fingerprint(tokenizer: Any, template: str) -> str:
    """Hash of vocabulary (token -> id, added tokens included) and chat template."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    h.update(template.encode())
    return h.hexdigest()


def _read_records(path: Path):
    """Yield (line number, raw text, parsed record or BadRecord) for each non-blank line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield (
                    lineno,
                    raw.decode("utf-8", errors="replace"),
                    BadRecord(f"invalid UTF-8: {e}"),
                )
                continue
            if not text.strip():
                continue
            try:
                yield lineno, text.rstrip("\n"), json.loads(text)
            except json.JSONDecodeError as e:
                yield lineno, text.rstrip("\n"), BadRecord(f"malformed JSON: {e}")


def prepare(
    inputs: list[str], *, tokenizer_path: str, out_dir: str, options: PrepareOptions
) -> dict:
    """Run the pipeline; return the manifest. Same inputs and options -> byte-identical output."""
    paths = expand_inputs(inputs)
    tokenizer = load_tokenizer(tokenizer_path)
    try:
        template = resolve_template(tokenizer, options.chat_template)
    except ValueError as e:
        raise PrepareError(str(e)) from e

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    quarantine = _Quarantine()
    docs_ids: list[list[int]] = []
    docs_mask: list[list[int]] = []
    num_records = 0
    truncated = 0
    source_hash = hashlib.sha256()
    sources = []
    for path in paths:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        source_hash.update(digest.encode())
        sources.append({"path": str(path), "sha256": digest})
        for lineno, raw, record in _read_records(path):
            num_records += 1
            try:
                if isinstance(record, BadRecord):
                    raise record
                messages = validate_messages(record)
                doc = tokenize_conversation(tokenizer, template, messages)
                if len(doc.input_ids) > options.seq_len:
                    if options.overflow == "quarantine":
                        raise BadRecord(
                            f"too long: {len(doc.input_ids)} tokens > seq_len {options.seq_len}"
                        )
                    doc.input_ids = doc.input_ids[: options.seq_len]
                    doc.loss_mask = doc.loss_mask[: options.seq_len]
                    truncated += 1
                if doc.num_supervised == 0:
                    raise BadRecord("zero supervised tokens (after truncation to seq_len)")
            except BadRecord as e:
                quarantine.add(source=str(path), line=lineno, reason=str(e), raw=raw)
                continue
            docs_ids.append(doc.input_ids)
            docs_mask.append(doc.loss_mask)

    bad = len(quarantine.rows)
    if num_records == 0:
        raise PrepareError(f"no records in {', '.join(map(str, paths))}")
    if bad / num_records > options.max_bad_fraction:
        _write_quarantine(out, quarantine)
        raise PrepareError(
            f"{bad} of {num_records} records are bad ({bad / num_records:.1%} > --max-bad-fraction "
            f"{options.max_bad_fraction:.1%}); see {out / schema.QUARANTINE_NAME}"
        )
    if not docs_ids:
        _write_quarantine(out, quarantine)
        raise PrepareError(f"every record was quarantined; see {out / schema.QUARANTINE_NAME}")

    bins = pack_best_fit_decreasing([len(d) for d in docs_ids], options.seq_len)
    shards = []
    for shard_index, start in enumerate(range(0, len(bins), options.rows_per_shard)):
        rows: dict[str, list] = {"input_ids": [], "loss_mask": [], "doc_lens": []}
        for b in bins[start : start + options.rows_per_shard]:
            rows["input_ids"].append([t for d in b for t in docs_ids[d]])
            rows["loss_mask"].append([m for d in b for m in docs_mask[d]])
            rows["doc_lens"].append([len(docs_ids[d]) for d in b])
        name = schema.shard_name(shard_index)
        schema.write_shard(out / name, rows)
        shards.append(
            {
                "file": name,
                "num_rows": len(rows["input_ids"]),
                "num_tokens": sum(map(len, rows["input_ids"])),
                "num_supervised_tokens": sum(map(sum, rows["loss_mask"])),
            }
        )
    _write_quarantine(out, quarantine)

    # The tokenizer travels with the shards, template included, so training and export use
    # exactly the ids the data was made with.
    tok_dir = out / schema.TOKENIZER_DIR
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(str(tok_dir))

    num_tokens = sum(s["num_tokens"] for s in shards)
    manifest = {
        "schema_version": schema.SCHEMA_VERSION,
        "seq_len": options.seq_len,
        "num_rows": len(bins),
        "num_documents": len(docs_ids),
        "num_tokens": num_tokens,
        "num_supervised_tokens": sum(s["num_supervised_tokens"] for s in shards),
        "packing_efficiency": num_tokens / (len(bins) * options.seq_len),
        "num_records": num_records,
        "quarantined_rows": bad,
        "quarantine_reasons": dict(sorted(quarantine.reasons.items())),
        "truncated_documents": truncated,
        "tokenizer": {
            "fingerprint": tokenizer_fingerprint(tokenizer, template),
            "vocab_size": len(tokenizer),
            "dir": schema.TOKENIZER_DIR,
            "source": str(tokenizer_path),
        },
        "sources": {"sha256": source_hash.hexdigest(), "files": sources},
        "options": {
            "overflow": options.overflow,
            "chat_template": options.chat_template,
            "rows_per_shard": options.rows_per_shard,
        },
        "shards": shards,
    }
    schema.write_manifest(out, manifest)
    return manifest


def _write_quarantine(out: Path, quarantine: _Quarantine) -> None:
    with open(out / schema.QUARANTINE_NAME, "w", encoding="utf-8") as f:
        for row in quarantine.rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def summary_line(manifest: dict) -> str:
    return (
        f"{manifest['num_documents']} documents -> {manifest['num_rows']} rows of {manifest['seq_len']} "
        f"({manifest['num_tokens']} tokens, {manifest['num_supervised_tokens']} supervised, "
        f"packing efficiency {manifest['packing_efficiency']:.1%}); "
        f"quarantined {manifest['quarantined_rows']} of {manifest['num_records']} records"
        + (f" {manifest['quarantine_reasons']}" if manifest["quarantined_rows"] else "")
    )
