"""Token ids for many texts (no special tokens added): exactly the Hugging Face fast
tokenizer's ids, computed faster for ASCII text when we can reproduce its pipeline.

Why: the Rust encoder spends ~1 us per token on bookkeeping `prepare` never reads (offsets,
token strings, alignment maps of every split), and on 2 cores that was 60-76% of the
pipeline's wall time. For byte-level BPE tokenizers (GPT-2 and Llama 3 / Qwen2 families) the
ids of a text are fixed by three steps, each reproduced exactly here for ASCII text:

1. Added tokens are cut out first, leftmost-longest: those matched on the raw text, then those
   matched on the normalized text (with no normalizer, or a Unicode normalization, ASCII text
   is its own normal form).
2. Every piece between them is split by the pre-tokenizer's regex. Restricted to ASCII, its
   Unicode classes are plain ranges (\\p{L} = A-Za-z, \\p{N} = 0-9, \\s = [\\t\\n\\v\\f\\r ]), so
   Python's `re`, a backtracking engine with the same ordered alternation and greedy
   quantifiers as Oniguruma, finds the same pieces; its classes cover every ASCII character,
   so no gap is left between matches.
3. Each piece, mapped byte by byte to the byte-level alphabet, goes through the tokenizer's
   own BPE model (`model.tokenize`); the result is memoized per piece, which is where the
   speed comes from: natural text repeats its words.

Anything else -- a text with a non-ASCII character, a tokenizer whose pipeline is not one of
these -- goes to the Rust encoder unchanged. tests/test_encode.py compares both paths
exhaustively on ASCII pairs and by fuzzing, for each supported pre-tokenizer.

Imports neither torch, ray nor deepspeed.
"""

from __future__ import annotations

import itertools
import json
import re
import weakref
from typing import Any

_WS = r"\t\n\x0b\x0c\r "  # what Oniguruma's \s matches among ASCII characters

# Pre-tokenizer regexes as tokenizer.json spells them -> their ASCII-only equivalents.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
ASCII_PATTERNS = {
    _GPT2: rf"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+",
    _LLAMA3: rf"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]{{1,3}}| ?[^{_WS}A-Za-z0-9]+[\r\n]*|[{_WS}]*[\r\n]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+",
    _QWEN2: rf"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]| ?[^{_WS}A-Za-z0-9]+[\r\n]*|[{_WS}]*[\r\n]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+",
}

# Normalizers that leave ASCII text unchanged.
_ASCII_IDENTITY_NORMALIZERS = (None, "NFC", "NFD", "NFKC", "NFKD")
# Post-processors that add nothing when special tokens are not asked for.
_INERT_POST_PROCESSORS = (
    None,
    "ByteLevel",
    "TemplateProcessing",
    "RobertaProcessing",
    "BertProcessing",
)
_WORD_CACHE_SIZE = 1 << 18  # distinct pieces memoized per process (~40 MB at most)


def ascii_pattern(config: dict) -> str | None:
    """The ASCII pre-tokenizer regex equivalent to a tokenizer.json's pipeline, or None when
    the fast path cannot reproduce it."""
    if config.get("truncation") or config.get("padding"):
        return None
    if (config.get("normalizer") or {}).get("type") not in _ASCII_IDENTITY_NORMALIZERS:
        return None
    post = config.get("post_processor") or {}
    posts = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    if any(p.get("type") not in _INERT_POST_PROCESSORS for p in posts if p):
        return None
    model = config.get("model") or {}
    if model.get("type") != "BPE" or model.get("dropout"):
        return None
    pre = config.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        pattern = _GPT2
    elif pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 2:
        split, pre = pre["pretokenizers"]
        if (
            split.get("type") != "Split"
            or split.get("behavior") != "Isolated"
            or split.get("invert")
        ):
            return None
        if pre.get("type") != "ByteLevel" or pre.get("use_regex", True):
            return None
        pattern = split.get("pattern", {}).get("Regex")
    else:
        return None
    if pre.get("add_prefix_space"):
        return None
    return ASCII_PATTERNS.get(pattern)


class _Pieces(dict):
    """piece of text -> its ids under the BPE model, memoized (bounded: once full, further
    pieces are computed each time)."""

    def __init__(self, model: Any) -> None:
        # GPT-2's byte -> printable character table, which ByteLevel applies to every piece
        # (transformers' copy; imported by every fast tokenizer already)
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        super().__init__()
        self.model = model
        self.byte_char = bytes_to_unicode()

    def to_bytes_alphabet(self, piece: str) -> str:
        return "".join(map(self.byte_char.__getitem__, piece.encode()))

    def __missing__(self, piece: str) -> tuple[int, ...]:
        ids = tuple(t.id for t in self.model.tokenize(self.to_bytes_alphabet(piece)))
        if len(self) < _WORD_CACHE_SIZE:
            self[piece] = ids
        return ids


class _AsciiPath:
    def __init__(self, backend: Any, pattern: str, added: dict[int, Any]) -> None:
        self.added = {t.content: i for i, t in added.items()}
        raw = [t.content for t in added.values() if not t.normalized]
        normalized = [t.content for t in added.values() if t.normalized]
        # one split regex per pass, longest first: the leftmost match is the longest there
        self.passes = [
            re.compile("(" + "|".join(map(re.escape, sorted(group, key=len, reverse=True))) + ")")
            for group in (raw, normalized)
            if group
        ]
        self.split = re.compile(pattern).findall
        self.pieces = _Pieces(backend.model)

    @classmethod
    def build(cls, backend: Any) -> _AsciiPath | None:
        if getattr(backend, "encode_special_tokens", False):
            return None
        pattern = ascii_pattern(json.loads(backend.to_str()))
        if pattern is None:
            return None
        added = backend.get_added_tokens_decoder()
        if any(t.lstrip or t.rstrip or t.single_word or not t.content for t in added.values()):
            return None
        return cls(backend, pattern, added)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        self._encode(text, 0, ids)
        return ids

    def _encode(self, text: str, npass: int, ids: list[int]) -> None:
        if npass == len(self.passes):
            ids.extend(
                itertools.chain.from_iterable(map(self.pieces.__getitem__, self.split(text)))
            )
            return
        for k, part in enumerate(self.passes[npass].split(text)):
            if k % 2:  # the split regex captures the added tokens: they sit at odd positions
                ids.append(self.added[part])
            elif part:
                self._encode(part, npass + 1, ids)


class Encoder:
    """Texts -> ids, as `backend.encode_batch(texts, add_special_tokens=False)` gives them
    with no padding and no truncation (what transformers' tokenizer call gives)."""

    _of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, backend: Any) -> None:
        if backend.padding or backend.truncation:
            # transformers switches these off per call unless asked; called directly, the
            # backend would pad or cut every segment. Work on a copy without them.
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(backend.to_str())
            backend.no_padding()
            backend.no_truncation()
        self.backend = backend
        self.ascii = _AsciiPath.build(backend)
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets we do not use
        self._rust = getattr(backend, "encode_batch_fast", backend.encode_batch)

    @classmethod
    def of(cls, tokenizer: Any) -> Encoder:
        """One encoder (and so one memo) per tokenizer object."""
        if tokenizer not in cls._of:
            cls._of[tokenizer] = cls(tokenizer.backend_tokenizer)
        return cls._of[tokenizer]

    @property
    def fast(self) -> bool:
        return self.ascii is not None

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if self.ascii is None:
            return [e.ids for e in self._rust(texts, add_special_tokens=False)]
        encode = self.ascii.encode
        out: list[list[int] | None] = [encode(t) if t.isascii() else None for t in texts]
        rest = [i for i, ids in enumerate(out) if ids is None]
        if rest:
            for i, e in zip(
                rest, self._rust([texts[i] for i in rest], add_special_tokens=False), strict=True
            ):
                out[i] = e.ids
        return out  # type: ignore[return-value]
