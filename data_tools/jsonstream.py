"""The records of a .json document, read as a stream: memory stays bounded by the largest
record allowed, whatever the size of the file or of one record in it.

    for line, text, error in json_records(binary_file, max_bytes=16 << 20):
        ...  # text: the record's own JSON text; error: why it is bad (None: it is not)

A document is a list of records, or an object holding exactly one list of records (other
members are skipped, at any size or depth). A record is parsed by json's C decoder as soon as
the buffer holds it whole; a record json cannot read (nested deeper than it recurses, a number
of more than 4300 digits) or larger than `max_bytes` is skipped by a scanner that counts
brackets outside strings, so it alone is bad. A file that is not JSON at all raises
JsonDocumentError. Bytes that are not UTF-8 are carried as surrogates (surrogateescape): a
record holding one is refused where its strings are checked, the rest of the file is read.

Imports neither torch, ray nor deepspeed.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from typing import BinaryIO

CHUNK = 1 << 20
_SPACE = re.compile(r"[ \t\n\r]*")
_MEMBER = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"[ \t\n\r]*:[ \t\n\r]*', re.S)  # "key":
_IN_STRING = re.compile(r'[\\"]')  # what ends or escapes inside a string
_OUTSIDE = re.compile(r'["\[\]{}]')  # what opens a string or a level, or closes a level
_SCALAR_END = re.compile(r"[,\]}\s]")


class JsonDocumentError(ValueError):
    """The file is not a JSON document of records (the message says where)."""


class _Reader:
    """Text of a binary file in a buffer that grows by chunks and drops what was read."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.buf, self.at, self.eof = f, "", 0, False
        self.decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.offset = 0  # characters dropped before buf[0]
        self.pin: int | None = None  # an offset (in characters) whose text must stay

    def more(self, size: int = CHUNK) -> bool:
        """Append at least one more chunk; False at the end of the file."""
        if self.eof:
            return False
        data = self.f.read(size)
        self.eof = not data
        text = self.decoder.decode(data, final=self.eof)
        keep = self.at if self.pin is None else min(self.at, self.pin - self.offset)
        if keep > CHUNK:  # drop what was read, seldom enough to be cheap
            self.buf, self.offset, self.at = self.buf[keep:], self.offset + keep, self.at - keep
        self.buf += text
        return bool(data)

    def peek(self) -> str:
        """The next character after blanks ('' at the end of the file)."""
        while True:
            self.at = _SPACE.match(self.buf, self.at).end()
            if self.at < len(self.buf) or not self.more():
                return self.buf[self.at : self.at + 1]

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise self.error(f"expected {char!r}")
        self.at += 1

    def error(self, what: str) -> JsonDocumentError:
        found = self.buf[self.at : self.at + 20]
        return JsonDocumentError(
            f"not a JSON document ({what} at offset {self.offset + self.at}, "
            f"found {found!r}{'' if found else ' (the end of the file)'})"
        )

    def skip_value(self, max_keep: int = 0) -> int:
        """Move past the value at `at`; its length in characters. Its text stays in the buffer
        while `pin` is set and it is no longer than `max_keep`."""
        start = self.offset + self.at
        if self.peek() not in '[{"':  # a number or literal: ends at a separator
            while not (m := _SCALAR_END.search(self.buf, self.at)) and self.more():
                pass
            self.at = m.start() if m else len(self.buf)
            return self.offset + self.at - start
        depth, in_string, escaped = 0, False, False
        while True:
            pos = self.at
            while True:
                if escaped:
                    if pos >= len(self.buf):
                        break
                    pos, escaped = pos + 1, False
                    continue
                m = (_IN_STRING if in_string else _OUTSIDE).search(self.buf, pos)
                if m is None:
                    pos = len(self.buf)
                    break
                pos, char = m.end(), self.buf[m.start()]
                if in_string:
                    escaped, in_string = char == "\\", char == "\\"
                elif char == '"':
                    in_string = True
                else:
                    depth += 1 if char in "[{" else -1
                if depth == 0 and not in_string:
                    self.at = pos
                    return self.offset + self.at - start
            self.at = pos  # all of the buffer is inside the value: let it be dropped
            if self.pin is not None and self.offset + pos - self.pin > max_keep:
                self.pin = None  # too large to keep: it is skipped
            if not self.more():
                raise JsonDocumentError(
                    f"not a JSON document (a value at offset {start} is never closed)"
                )


def json_records(f: BinaryIO, *, max_bytes: int) -> Iterator[tuple[int, str, str | None]]:
    """(record number from 1, the record's JSON text, why it is bad or None) per record."""
    r = _Reader(f)
    first = r.peek()
    if first == "[":
        yield from _records(r, max_bytes)
    elif first == "{":
        yield from _members(r, max_bytes)
    else:
        raise r.error("expected a list of records")
    if r.peek() != "":
        raise r.error("expected the end of the document")


def _members(r: _Reader, max_bytes: int) -> Iterator[tuple[int, str, str | None]]:
    """The records of the one list an object holds; every other member skipped."""
    r.expect("{")
    lists = 0
    while r.peek() != "}":
        while not (m := _MEMBER.match(r.buf, r.at)) and len(r.buf) - r.at < max_bytes:
            if not r.more():
                break
        if m is None:
            raise r.error("expected a key")
        r.at = m.end()
        if r.peek() == "[":
            lists += 1
            if lists > 1:
                raise JsonDocumentError("a JSON object must hold exactly one list of records")
            yield from _records(r, max_bytes)
        else:
            r.skip_value()
        if r.peek() == ",":
            r.at += 1
        elif r.peek() != "}":
            raise r.error("expected ',' or '}'")
    r.at += 1
    if lists != 1:
        raise JsonDocumentError("a JSON object must hold exactly one list of records")


def _records(r: _Reader, max_bytes: int) -> Iterator[tuple[int, str, str | None]]:
    r.expect("[")
    decoder, line = json.JSONDecoder(), 0
    while r.peek() != "]":
        line += 1
        yield (line, *_record(r, decoder, max_bytes))
        if r.peek() == ",":
            r.at += 1
        elif r.peek() != "]":
            raise r.error("expected ',' or ']'")
    r.at += 1


def _record(r: _Reader, decoder: json.JSONDecoder, max_bytes: int) -> tuple[str, str | None]:
    """The record at `at` as text, and why it is bad; `at` moves past it."""
    while True:
        start = r.at
        try:
            _, end = decoder.raw_decode(r.buf, start)
        except json.JSONDecodeError as e:
            if not _cut_short(e, r):
                r.at = max(e.pos, start)
                raise r.error(e.msg) from None
            end = None
        except (RecursionError, ValueError) as e:  # valid JSON json cannot read
            return _skipped(r, max_bytes, unreadable_reason(e))
        complete = end is not None and (end < len(r.buf) or r.eof)
        if complete and (end - start <= max_bytes // 4 or _size(r.buf[start:end]) <= max_bytes):
            r.at = end
            return r.buf[start:end], None
        if complete or len(r.buf) - start > max_bytes:
            return _skipped(r, max_bytes, f"too large: over --max-record-bytes {max_bytes}")
        r.more(max(CHUNK, len(r.buf) - start))  # grows geometrically: few retries


def _cut_short(e: json.JSONDecodeError, r: _Reader) -> bool:
    """Whether the decoder failed only because the buffer ends inside the record."""
    if r.eof:
        return False
    return e.pos >= len(r.buf) - 1 or e.msg.startswith("Unterminated string")


def _skipped(r: _Reader, max_bytes: int, reason: str) -> tuple[str, str]:
    """A bad record skipped: its text when it is small enough to keep, else a preview."""
    r.pin = r.offset + r.at
    preview = r.buf[r.at : r.at + 200]
    size = r.skip_value(max_keep=max_bytes)
    kept, r.pin = r.pin is not None and size <= max_bytes, None
    if kept and not reason.startswith("too large"):
        return r.buf[r.at - size : r.at], reason
    if not reason.startswith("too large"):
        reason = f"too large: over --max-record-bytes {max_bytes} ({reason})"
    return f"{preview}... ({size} characters in all)", reason


def _size(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def unreadable_reason(e: Exception) -> str:
    """Why valid JSON is unreadable: too deep for json's recursion, or a number too long."""
    if isinstance(e, RecursionError):
        return "nested too deeply: more levels of lists/objects than json can read"
    return f"unreadable JSON: {e}"  # e.g. an integer of more than 4300 digits
