"""Reading raw records and normalizing every supported format to one shape.

Inputs: JSONL, JSON (a list of records, or an object holding one list), Parquet, and local
Hugging Face dataset directories (`Dataset.save_to_disk`). Each record is yielded with its
source and line (or row) number so a bad one can be quarantined with its origin.

Formats, auto-detected per record from its keys (or forced with --format):

    messages   {"messages": [{"role": "system|user|assistant", "content": str}, ...]}
    prompt     {"prompt": str, "completion": str}
    alpaca     {"instruction": str, "input": str (optional), "output": str}
    sharegpt   {"conversations": [{"from": "system|human|gpt", "value": str}, ...]}
    text       {"text": str}   (continued pretraining: every token supervised)

Normalized: ("messages", [{"role", "content"}, ...]) or ("text", str).
Imports neither torch, ray nor deepspeed.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMATS = ("messages", "prompt", "alpaca", "sharegpt", "text")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


class BadRecord(ValueError):
    """A record that cannot be trained on; the message is the quarantine reason."""


class InputError(ValueError):
    """An input path that cannot be read at all."""


class RawJSON(str):
    """A JSONL line not parsed yet: the worker that processes it parses it (cheaper to ship)."""


@dataclass
class SourceRecord:
    source: str
    line: int  # 1-based line (JSONL) or row (JSON list, Parquet, dataset directory)
    raw: str  # the record as text, for the quarantine file
    record: Any  # parsed record, or a BadRecord


def expand_inputs(inputs: list[str]) -> list[Path]:
    paths: list[Path] = []
    for item in inputs:
        matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
        if not matches:
            raise InputError(f"input {item!r} matches no file")
        for m in matches:
            p = Path(m)
            if p.is_dir() and not (p / "dataset_info.json").is_file():
                raise InputError(
                    f"input {m} is a directory but not a Hugging Face dataset (save_to_disk)"
                )
            if not p.exists():
                raise InputError(f"input {m} is not a file")
            paths.append(p)
    return paths


def iter_records(path: Path) -> Iterator[SourceRecord]:
    if path.is_dir():
        yield from _iter_hf_dataset(path)
    elif path.suffix == ".parquet":
        yield from _iter_parquet(path)
    elif path.suffix == ".json":
        yield from _iter_json(path)
    else:  # .jsonl and anything else: one JSON value per line
        yield from _iter_jsonl(path)


def _iter_jsonl(path: Path) -> Iterator[SourceRecord]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield SourceRecord(str(path), lineno, raw.decode("utf-8", "replace").rstrip("\n"),
                                   BadRecord(f"invalid UTF-8: {e}"))  # fmt: skip
                continue
            if not text.strip():
                continue
            text = text.rstrip("\n")
            record: Any = RawJSON(text)
            yield SourceRecord(str(path), lineno, text, record)


def _iter_json(path: Path) -> Iterator[SourceRecord]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(
            f"{path}: not a JSON document ({e}); for one record per line name it .jsonl"
        ) from e
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise InputError(f"{path}: a JSON object must hold exactly one list of records")
        data = lists[0]
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list of records")
    for i, record in enumerate(data, start=1):
        yield SourceRecord(str(path), i, json.dumps(record, ensure_ascii=False), record)


def _iter_parquet(path: Path) -> Iterator[SourceRecord]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            yield SourceRecord(
                str(path), row, json.dumps(record, ensure_ascii=False, default=str), record
            )


def _iter_hf_dataset(path: Path) -> Iterator[SourceRecord]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise InputError(f"{path}: a DatasetDict without a 'train' split")
        ds = ds["train"]
    for i, record in enumerate(ds.iter(batch_size=1), start=1):
        record = {k: v[0] for k, v in record.items()}
        yield SourceRecord(
            str(path), i, json.dumps(record, ensure_ascii=False, default=str), record
        )


def detect_format(record: dict) -> str:
    keys = set(record)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt"
    if "text" in keys:
        return "text"
    raise BadRecord(f"unknown format: no messages/conversations/instruction+output/prompt+completion/text "
                    f"field (fields: {sorted(keys)[:8]})")  # fmt: skip


def _string(record: dict, key: str, *, required: bool = True) -> str:
    if key not in record or record[key] is None:
        if required:
            raise BadRecord(f"missing field {key!r}")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise BadRecord(f"field {key!r} is a {type(value).__name__}, expected a string")
    return value


def parse(record: Any) -> Any:
    """The record itself; a RawJSON line parsed (BadRecord when it is not JSON)."""
    if isinstance(record, RawJSON):
        try:
            return json.loads(record)
        except json.JSONDecodeError as e:
            raise BadRecord(f"malformed JSON: {e}") from None
    return record


def normalize(record: Any, fmt: str | None = None) -> tuple[str, Any]:
    """("messages", messages) or ("text", text) for a record of `fmt` (detected when None)."""
    if not isinstance(record, dict):
        raise BadRecord(f"record is a {type(record).__name__}, expected a JSON object")
    fmt = fmt or detect_format(record)
    if fmt == "text":
        text = _string(record, "text")
        if not text:
            raise BadRecord("empty text")
        return "text", text
    if fmt == "messages":
        if "messages" not in record:
            raise BadRecord(f"no 'messages' field (fields: {sorted(record)[:8]})")
        messages = _messages(
            record["messages"], "messages", role_key="role", content_key="content", roles=None
        )
    elif fmt == "sharegpt":
        if "conversations" not in record:
            raise BadRecord(f"no 'conversations' field (fields: {sorted(record)[:8]})")
        messages = _messages(record["conversations"], "conversations", role_key="from", content_key="value",
                             roles=SHAREGPT_ROLES)  # fmt: skip
    elif fmt == "prompt":
        messages = [{"role": "user", "content": _string(record, "prompt")},
                    {"role": "assistant", "content": _string(record, "completion")}]  # fmt: skip
    elif fmt == "alpaca":
        instruction, extra = (
            _string(record, "instruction"),
            _string(record, "input", required=False),
        )
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": _string(record, "output")}]  # fmt: skip
    else:
        raise ValueError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    _check_conversation(messages)
    return "messages", messages


def _messages(
    items: Any, field: str, *, role_key: str, content_key: str, roles: dict | None
) -> list[dict]:
    if not isinstance(items, list):
        raise BadRecord(f"'{field}' is a {type(items).__name__}, expected a list")
    out = []
    for i, m in enumerate(items):
        if not isinstance(m, dict):
            raise BadRecord(f"{field}[{i}] is a {type(m).__name__}, expected an object")
        role, content = m.get(role_key), m.get(content_key)
        if roles is not None:
            role = roles.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise BadRecord(f"{field}[{i}].{role_key} {m.get(role_key)!r} is not a known role")
        if not isinstance(content, str):
            raise BadRecord(
                f"{field}[{i}].{content_key} is a {type(content).__name__}, expected a string"
            )
        out.append({"role": role, "content": content})
    return out


def _check_conversation(messages: list[dict]) -> None:
    if not messages:
        raise BadRecord("empty conversation")
    for i, m in enumerate(messages):
        if m["role"] == "system" and i != 0:
            raise BadRecord(f"message {i} is a system message; only the first message may be one")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant turn: nothing to learn from")
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if not any(m["role"] == "user" for m in messages[:first]):
        raise BadRecord("the first assistant turn answers no user message")
