"""Reading raw records and normalizing every supported format to one shape.

Inputs: JSONL, JSON (a list of records, or an object holding one list), Parquet, and local
Hugging Face dataset directories (`Dataset.save_to_disk`). Each record is yielded with its
source and line (or row) number so a bad one can be quarantined with its origin.

Formats, auto-detected per record from its keys (or forced with --format):

    messages   {"messages": [{"role": "system|user|assistant|tool", "content": str}, ...],
                "tools": [...] (optional)}; an assistant message may carry "tool_calls"
                (OpenAI / Hugging Face form) and "reasoning_content"; a tool message may carry
                "tool_call_id" and "name"
    prompt     {"prompt": str, "completion": str}
    alpaca     {"instruction": str, "input": str (optional), "output": str}
    sharegpt   {"conversations": [{"from": "system|human|gpt|function_call|observation",
                "value": str}, ...]} (function_call: a JSON tool call; observation: its result)
    text       {"text": str}   (continued pretraining: every token supervised)

Normalized: ("messages", [{"role", "content", and the optional keys above}, ...]) or
("text", str); a record's tools list is read by `tools_of`.

Whatever a record holds (bytes that are not UTF-8, lone surrogates, nesting deeper than json
reads, wrong types, an empty reply), it is a BadRecord whose message is the quarantine reason,
never an exception that ends the job; only a file that cannot be read at all (a .json file that
is not JSON, a Parquet file pyarrow refuses) is an InputError naming it.
Imports neither torch, ray nor deepspeed.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_tools.jsonstream import JsonDocumentError, json_records, unreadable_reason

FORMATS = ("messages", "prompt", "alpaca", "sharegpt", "text")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",  # its value is the tool call, as JSON
    "observation": "tool",
    "tool": "tool",
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


MAX_RECORD_BYTES = 16 << 20  # a record larger than this is quarantined, not read


def iter_records(path: Path, max_bytes: int = MAX_RECORD_BYTES) -> Iterator[SourceRecord]:
    """The records of one input, each read with bounded memory: a record over `max_bytes` is
    a BadRecord ("too large") with a preview of its start; its source and line find it whole."""
    if path.is_dir():
        yield from _iter_hf_dataset(path, max_bytes)
    elif path.suffix == ".parquet":
        yield from _iter_parquet(path, max_bytes)
    elif path.suffix == ".json":
        yield from _iter_json(path, max_bytes)
    else:  # .jsonl and anything else: one JSON value per line
        yield from _iter_jsonl(path, max_bytes)


def _too_large(size: int, max_bytes: int) -> BadRecord:
    return BadRecord(f"too large: {size} bytes > --max-record-bytes {max_bytes}")


def _preview(text: str, size: int) -> str:
    return f"{text[:200]}... ({size} bytes in all)"


def _iter_jsonl(path: Path, max_bytes: int) -> Iterator[SourceRecord]:
    with open(path, "rb") as f:
        lineno = 0
        while raw := f.readline(max_bytes + 1):
            lineno += 1
            if len(raw) > max_bytes and not raw.endswith(b"\n"):  # longer: skip the rest
                head, size = raw[:200].decode("utf-8", "replace"), len(raw)
                while rest := f.readline(1 << 20):
                    size += len(rest.rstrip(b"\n"))
                    if rest.endswith(b"\n"):
                        break
                yield SourceRecord(
                    str(path), lineno, _preview(head, size), _too_large(size, max_bytes)
                )
                continue
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
            yield SourceRecord(str(path), lineno, text, RawJSON(text))


def _iter_json(path: Path, max_bytes: int) -> Iterator[SourceRecord]:
    """The records of a .json document, streamed (data_tools.jsonstream): each travels to the
    workers as its own JSON text, as a JSONL line does (a string pickles cheaply and at any
    depth; pickle fails on lists ~500 deep)."""
    with open(path, "rb") as f:
        try:
            for line, text, bad in json_records(f, max_bytes=max_bytes):
                yield SourceRecord(str(path), line, text, BadRecord(bad) if bad else RawJSON(text))
        except JsonDocumentError as e:
            raise InputError(f"{path}: {e}; for one record per line name it .jsonl") from None


def _iter_parquet(path: Path, max_bytes: int) -> Iterator[SourceRecord]:
    # heavy (pyarrow): loaded only on the path that uses it
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:  # Parquet nests at most ~50 lists deep: a deeper schema is refused here, file and all
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        for batch in batches:
            for record, bad in _parquet_rows(batch, max_bytes):
                row += 1
                yield _row_record(path, row, record, bad)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path}: cannot read Parquet ({row} rows read): {e}") from e


def _row_record(path: Path, row: int, record: Any, bad: BadRecord | None) -> SourceRecord:
    """A table row as a record; one too large to convert is its description."""
    if isinstance(record, str):
        return SourceRecord(str(path), row, record, bad)
    raw = json.dumps(record, ensure_ascii=False, default=str)
    return SourceRecord(str(path), row, raw, bad or record)


def _parquet_rows(batch: Any, max_bytes: int) -> Iterator[tuple[Any, BadRecord | None]]:
    """A batch's rows, each with the reason it is bad (None: it is not). A row over
    `max_bytes` (Arrow's own size of its values) is not converted: a preview of its first
    column stands for it. Arrow does not check that a string column written by another tool
    holds UTF-8; one that does not makes its row bad, and only its row."""
    if batch.nbytes > max_bytes:  # some row may be too large: convert the batch row by row
        for i in range(batch.num_rows):
            one = batch.slice(i, 1)
            if one.nbytes > max_bytes:  # not converted: a description stands for it
                what = f"<a row of {one.nbytes} bytes; columns {', '.join(one.schema.names)}>"
                yield what, _too_large(one.nbytes, max_bytes)
            else:
                yield from _parquet_rows(one, max_bytes)
        return
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


def _iter_hf_dataset(path: Path, max_bytes: int) -> Iterator[SourceRecord]:
    # heavy (datasets): loaded only on the path that uses it
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise InputError(f"{path}: a DatasetDict without a 'train' split")
        ds = ds["train"]
    table = ds.with_format("arrow")
    for start in range(0, len(ds), 1024):  # rows as Parquet rows are read: sized before use
        batch = table[start : start + 1024].combine_chunks().to_batches()
        rows = (r for b in batch for r in _parquet_rows(b, max_bytes))
        for i, (record, bad) in enumerate(rows, start=start + 1):
            yield _row_record(path, i, record, bad)


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
    return BadRecord(unreadable_reason(e))


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
        given, content = m.get(role_key), m.get(content_key)
        role = roles.get(given, given) if roles is not None and isinstance(given, str) else given
        if role not in ROLES:
            raise BadRecord(f"{field}[{i}].{role_key} {_shown(given)} is not a known role")
        if given == "function_call":  # sharegpt: the value is the call itself
            message = {
                "role": "assistant",
                "content": "",
                "tool_calls": [_call_of(content, field, i)],
            }
        elif content is None and role == "assistant" and m.get("tool_calls"):
            message = {"role": role, "content": ""}  # a reply that only calls tools
        elif not isinstance(content, str):
            raise BadRecord(
                f"{field}[{i}].{content_key} is a {type(content).__name__}, expected a string"
            )
        else:
            message = {"role": role, "content": _utf8(content, f"{field}[{i}].{content_key}")}
        if len(m) > 2:  # only role and content: nothing more to read (the common case)
            message.update(_extras(m, role, f"{field}[{i}]"))
        out.append(message)
    return out


def _extras(m: dict, role: str, where: str) -> dict:
    """The optional keys of a message: tool calls and reasoning (assistant), the call a tool
    result answers (tool)."""
    extra: dict = {}
    if role == "assistant" and m.get("tool_calls") is not None:
        calls = m["tool_calls"]
        if not isinstance(calls, list) or not calls:
            raise BadRecord(f"{where}.tool_calls must be a non-empty list")
        extra["tool_calls"] = [_call_of(c, where, k) for k, c in enumerate(calls)]
    for key in ("reasoning_content", "reasoning"):
        if role == "assistant" and m.get(key) is not None:
            if not isinstance(m[key], str):
                raise BadRecord(f"{where}.{key} is a {type(m[key]).__name__}, expected a string")
            extra["reasoning_content"] = _utf8(m[key], f"{where}.{key}")
            break
    for key in ("tool_call_id", "name"):
        if role == "tool" and isinstance(m.get(key), str):
            extra[key] = _utf8(m[key], f"{where}.{key}")
    return extra


def _call_of(call: Any, where: str, k: int) -> dict:
    """A tool call in the Hugging Face form {"type": "function", "function": {"name",
    "arguments"}} (plus its "id"), from that form, the flat {"name", "arguments"} one, or JSON
    text of either. Arguments given as JSON text become an object."""
    if isinstance(call, str):
        try:
            call = json.loads(call)
        except ValueError:
            raise BadRecord(f"{where}: tool call {k} is text that is not JSON") from None
    if not isinstance(call, dict):
        raise BadRecord(f"{where}: tool call {k} is a {type(call).__name__}, expected an object")
    fn = call.get("function", call)
    name, args = (fn.get("name"), fn.get("arguments", {})) if isinstance(fn, dict) else (None, None)
    if not isinstance(name, str) or not name:
        raise BadRecord(f"{where}: tool call {k} has no function name")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise BadRecord(
                f"{where}: tool call {k} ({name}) has arguments that are not JSON"
            ) from None
    if not isinstance(args, dict):
        raise BadRecord(
            f"{where}: tool call {k} ({name}) arguments are a {type(args).__name__}, expected an object"
        )
    _utf8(json.dumps(args, ensure_ascii=False), f"{where}: tool call {k} arguments")
    out = {
        "type": "function",
        "function": {"name": _utf8(name, f"{where}: tool call {k} name"), "arguments": args},
    }
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def tools_of(record: Any) -> list[dict] | None:
    """The tools (function schemas) a messages record offers, or None."""
    tools = record.get("tools") if isinstance(record, dict) else None
    if tools is None:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError:
            raise BadRecord("'tools' is text that is not JSON") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise BadRecord("'tools' must be a list of objects (function schemas)")
    _utf8(json.dumps(tools, ensure_ascii=False), "tools")
    return tools or None


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
    for i, m in enumerate(messages):
        if m["role"] == "tool" and not any("tool_calls" in p for p in messages[:i]):
            raise BadRecord(
                f"message {i} is a tool result, but no assistant turn before it calls a tool"
            )
    if keep_empty_replies:
        return
    for i, m in enumerate(messages):
        # An empty reply trains only the end-of-turn token: the model learns to say nothing.
        if m["role"] == "assistant" and not (m["content"].strip() or m.get("tool_calls")):
            what = "whitespace only" if m["content"] else "empty"
            raise BadRecord(
                f"empty assistant turn: message {i} is {what} "
                "(--keep-empty-replies keeps such records)"
            )
