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

Whatever a record holds (bytes that are not UTF-8, lone surrogates, nesting deeper than json
reads, wrong types, an empty reply), it is a BadRecord whose message is the quarantine reason,
never an exception that ends the job; only a file that cannot be read at all (a .json file that
is not JSON, a Parquet file pyarrow refuses) is an InputError naming it.
Imports neither torch, ray nor deepspeed.
"""

from __future__ import annotations

import glob
import json
import re
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
                yield SourceRecord(
                    str(path),
                    lineno,
                    raw.decode("utf-8", "replace").rstrip("\n"),
                    BadRecord(f"invalid UTF-8: {e}"),
                )
                continue
            if not text.strip():
                continue
            text = text.rstrip("\n")
            record: Any = RawJSON(text)
            yield SourceRecord(str(path), lineno, text, record)


def _iter_json(path: Path) -> Iterator[SourceRecord]:
    # surrogateescape: an undecodable byte inside a string spoils only the record holding it
    # (normalize rejects the string); outside a string it is not JSON, and the file is refused.
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(
            f"{path}: not a JSON document ({e}); for one record per line name it .jsonl"
        ) from e
    except (RecursionError, ValueError):  # one record json cannot read: it alone is bad
        yield from _iter_json_by_record(path, text)
        return
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise InputError(f"{path}: a JSON object must hold exactly one list of records")
        data = lists[0]
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list of records")
    for i, record in enumerate(data, start=1):
        yield _json_record(path, i, record)


def _json_record(path: Path, line: int, value: Any, *, text: str = "") -> SourceRecord:
    """A record of a .json document, shipped to the workers as its JSON text as a JSONL line
    is: a string pickles cheaply and at any depth (pickle fails on lists ~500 deep). `text`,
    its source text, stands in for it in the quarantine when json cannot write it back."""
    try:
        raw = json.dumps(value, ensure_ascii=False)
    except RecursionError as e:
        return SourceRecord(str(path), line, text, _unreadable_json(e))
    return SourceRecord(str(path), line, raw, RawJSON(raw))


_SPACE = re.compile(r"[ \t\n\r]*")
_MEMBER = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"[ \t\n\r]*:[ \t\n\r]*', re.S)  # "key":
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.S)  # a string, or a bracket
_SCALAR = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[^,\]}\s]*', re.S)  # a string, number or literal


def _iter_json_by_record(path: Path, text: str) -> Iterator[SourceRecord]:
    """The records of a .json document that json.loads cannot read whole (a record nested too
    deeply, a number of more than 4300 digits), parsed one by one: only that record is bad."""
    decoder = json.JSONDecoder()
    at, line = _skip_space(text, _records_list_at(path, text) + 1), 0
    while not text.startswith("]", at):
        line += 1
        try:
            value, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not a JSON document ({e})") from e
        except (RecursionError, ValueError) as e:
            end = _value_end(path, text, at)
            yield SourceRecord(str(path), line, text[at:end], _unreadable_json(e))
        else:
            yield _json_record(path, line, value, text=text[at:end])
        at = _skip_space(text, end)
        if text.startswith(",", at):
            at = _skip_space(text, at + 1)
        elif not text.startswith("]", at):
            raise InputError(f"{path}: not a JSON document (expected ',' or ']' at offset {at})")


def _records_list_at(path: Path, text: str) -> int:
    """Offset of the list of records: the document, or the one list an object holds."""
    at = _skip_space(text, 0)
    if text.startswith("[", at):
        return at
    if not text.startswith("{", at):
        raise InputError(f"{path}: expected a list of records")
    lists, at = [], _skip_space(text, at + 1)
    while not text.startswith("}", at):
        member = _MEMBER.match(text, at)
        if member is None:
            raise InputError(f"{path}: not a JSON document (expected a key at offset {at})")
        if text.startswith("[", member.end()):
            lists.append(member.end())
        at = _skip_space(text, _value_end(path, text, member.end()))
        if text.startswith(",", at):
            at = _skip_space(text, at + 1)
    if len(lists) != 1:
        raise InputError(f"{path}: a JSON object must hold exactly one list of records")
    return lists[0]


def _value_end(path: Path, text: str, at: int) -> int:
    """Where the JSON value at `at` ends, found by counting brackets (no recursion, so at any
    depth); strings are skipped whole, so brackets inside them do not count."""
    if not text.startswith(("[", "{"), at):
        return _SCALAR.match(text, at).end()
    depth = 0
    for token in _TOKEN.finditer(text, at):
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(text[token.start()], 0)
        if depth == 0:
            return token.end()
    raise InputError(f"{path}: not a JSON document (a bracket at offset {at} is never closed)")


def _skip_space(text: str, at: int) -> int:
    return _SPACE.match(text, at).end()


def _iter_parquet(path: Path) -> Iterator[SourceRecord]:
    # heavy (pyarrow): loaded only on the path that uses it
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:  # Parquet nests at most ~50 lists deep: a deeper schema is refused here, file and all
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
        for batch in batches:
            for record, bad in _parquet_rows(batch):
                row += 1
                raw = json.dumps(record, ensure_ascii=False, default=str)
                yield SourceRecord(str(path), row, raw, bad or record)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path}: cannot read Parquet ({row} rows read): {e}") from e


def _parquet_rows(batch: Any) -> Iterator[tuple[dict, BadRecord | None]]:
    """A batch's rows, each with the reason it is bad (None: it is not). Arrow does not check
    that a string column written by another tool holds UTF-8; one that does not makes its row
    bad, and only its row."""
    try:
        rows = batch.to_pylist()
    except UnicodeDecodeError:
        rows = None
    if rows is not None:
        yield from ((r, None) for r in rows)
        return
    for i in range(batch.num_rows):  # find the rows: field by field
        row, bad = {}, []
        for name, column in zip(batch.schema.names, batch.columns, strict=True):
            try:
                row[name] = column[i].as_py()
            except UnicodeDecodeError:
                row[name] = "<not UTF-8>"
                bad.append(name)
        reason = f"invalid UTF-8: bytes that are not UTF-8 in {', '.join(bad)}"
        yield row, BadRecord(reason) if bad else None


def _iter_hf_dataset(path: Path) -> Iterator[SourceRecord]:
    # heavy (datasets): loaded only on the path that uses it
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
    raise BadRecord(
        f"unknown format: no messages/conversations/instruction+output/prompt+completion/text "
        f"field (fields: {sorted(keys)[:8]})"
    )


def _string(record: dict, key: str, *, required: bool = True) -> str:
    if key not in record or record[key] is None:
        if required:
            raise BadRecord(f"missing field {key!r}")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise BadRecord(f"field {key!r} is a {type(value).__name__}, expected a string")
    return _utf8(value, key)


def _utf8(text: str, where: str) -> str:
    """`text`, when UTF-8 can encode it. A lone surrogate (a JSON escape such as \\ud800, or a
    byte of a .json file that is not UTF-8) cannot be, and the tokenizer would reject the whole
    batch holding it."""
    if not text.isascii():  # isascii is O(1); encoding copies, so only non-ASCII text pays
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRecord(
                f"invalid UTF-8: lone surrogate (a \\udXXX escape or a non-UTF-8 byte) in {where}"
            ) from None
    return text


def _shown(value: Any) -> str:
    """A short form of a value for a reason (a container may be huge, or too deep to repr)."""
    if isinstance(value, str):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    return f"a {type(value).__name__}"


def parse(record: Any) -> Any:
    """The record itself; a RawJSON line parsed (BadRecord when it is not JSON)."""
    if isinstance(record, RawJSON):
        try:
            return json.loads(record)
        except json.JSONDecodeError as e:
            raise BadRecord(f"malformed JSON: {e}") from None
        except (RecursionError, ValueError) as e:
            raise _unreadable_json(e) from None
    return record


def _unreadable_json(e: Exception) -> BadRecord:
    """The reason for valid JSON that json cannot read (or write back)."""
    if isinstance(e, RecursionError):
        return BadRecord("nested too deeply: more levels of lists/objects than json can read")
    return BadRecord(f"unreadable JSON: {e}")  # e.g. an integer of more than 4300 digits


def normalize(
    record: Any, fmt: str | None = None, *, keep_empty_replies: bool = False
) -> tuple[str, Any]:
    """("messages", messages) or ("text", text) for a record of `fmt` (detected when None).
    An assistant turn that is empty or whitespace only is bad unless `keep_empty_replies`."""
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
        messages = _messages(
            record["conversations"],
            "conversations",
            role_key="from",
            content_key="value",
            roles=SHAREGPT_ROLES,
        )
    elif fmt == "prompt":
        messages = [
            {"role": "user", "content": _string(record, "prompt")},
            {"role": "assistant", "content": _string(record, "completion")},
        ]
    elif fmt == "alpaca":
        instruction, extra = (
            _string(record, "instruction"),
            _string(record, "input", required=False),
        )
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _string(record, "output")},
        ]
    else:
        raise ValueError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    _check_conversation(messages, keep_empty_replies=keep_empty_replies)
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
            raise BadRecord(
                f"{field}[{i}].{role_key} {_shown(m.get(role_key))} is not a known role"
            )
        if not isinstance(content, str):
            raise BadRecord(
                f"{field}[{i}].{content_key} is a {type(content).__name__}, expected a string"
            )
        out.append({"role": role, "content": _utf8(content, f"{field}[{i}].{content_key}")})
    return out


def _check_conversation(messages: list[dict], *, keep_empty_replies: bool) -> None:
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
    if keep_empty_replies:
        return
    for i, m in enumerate(messages):
        # An empty reply trains only the end-of-turn token: the model learns to say nothing.
        if m["role"] == "assistant" and not m["content"].strip():
            what = "whitespace only" if m["content"] else "empty"
            raise BadRecord(
                f"empty assistant turn: message {i} is {what} "
                "(--keep-empty-replies keeps such records)"
            )
