"""Token ids for many texts (no special tokens added): exactly the Hugging Face fast
tokenizer's ids, computed faster when we can reproduce its pipeline.

Why: the Rust encoder spends ~1 us per token on bookkeeping `prepare` never reads (offsets,
token strings, alignment maps of every split), and on 2 cores that was 60-76% of the
pipeline's wall time. For byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2/3 and DeepSeek-V3
families) the ids of a text are fixed by three steps, each reproduced exactly here:

1. Added tokens are cut out first, leftmost-longest: those matched on the raw text, then those
   matched on the normalized text.
2. Every piece between them is split by the pre-tokenizer's regexes, in order.
   - ASCII text: its Unicode classes are plain ranges (\\p{L} = A-Za-z, \\p{N} = 0-9,
     \\s = [\\t\\n\\v\\f\\r ]), so Python's `re`, a backtracking engine with the same
     ordered alternation and greedy quantifiers as Oniguruma, finds the same pieces.
   - Any other text: the `regex` module runs the pipeline's own regexes. Its Unicode tables
     may be of another Unicode version than the Rust encoder's Oniguruma, so every character
     is checked once, the first time a text holds it: its membership in each class the
     regexes use (\\p{L}, \\p{N}, \\p{M}, \\p{P}, \\p{S}, \\s) as Oniguruma sees it (a
     `tokenizers` Split of that class alone), as `regex` sees it and as `str.isalpha` and
     `str.isspace` (which place the cuts below) see it.
     A text holding a character on which they differ, an unassigned one, or one whose case
     folds onto an ASCII letter (the pipelines' `(?i:'s|...)`) goes to the Rust encoder. With
     an NFC normalizer, so does a text not already in NFC.
   The text is first cut before each space that follows a non-space and precedes a letter:
   no match of these pipelines crosses such a cut, nor depends on what lies beyond it (each
   alternative that can hold a space starts with it; the only lookahead follows a run of
   whitespace), so each chunk's ids are memoized whole.
3. Each piece, mapped byte by byte to the byte-level alphabet, goes through the tokenizer's
   own BPE model (`model.tokenize`); the result is memoized per piece, which is where the
   speed comes from: natural text repeats its words.

Where tiktoken provably gives the model's ids (`_Ranked`: one merge per token, ids rising
with merge rank, every token its own bytes' encoding; DeepSeek-V3's and Qwen3's vocabularies),
steps 2 and 3 are tiktoken's instead, with the pipeline's regexes as one: it needs no Python
object per token, and on text seen once (Chinese) costs half of the Rust encoder's time.

SentencePiece models as transformers converts them are reproduced too (`_MetaspacePath`).
Anything else -- a tokenizer whose pipeline is not one of these -- goes to the Rust encoder
unchanged. tests/test_encode.py compares both paths exhaustively on ASCII pairs and by fuzzing
on multilingual text, for each supported pipeline and on real tokenizers.

Imports neither torch, ray nor deepspeed.
"""

from __future__ import annotations

import codecs
import copy
import functools
import hashlib
import itertools
import json
import re
import unicodedata
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

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

# DeepSeek-V3's pipeline: digits in threes, CJK runs, then words (tokenizer.json spells the CJK
# ranges as the characters themselves)
_DEEPSEEK_V3 = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    # (with a carriage return and a line feed in its classes, not their escapes)
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
)
# Pipelines (their split regexes, in order) reproduced on any text; see the module docstring.
PIPELINES = {(_GPT2,), (_LLAMA3,), (_QWEN2,), _DEEPSEEK_V3}

# Normalizers the fast path reproduces: none, or NFC on text already in NFC. (On ASCII text,
# which is its own normal form, any Unicode normalization.)
_ASCII_IDENTITY_NORMALIZERS = (None, "NFC", "NFD", "NFKC", "NFKD")
# Post-processors that add nothing when special tokens are not asked for.
_INERT_POST_PROCESSORS = (
    None,
    "ByteLevel",
    "TemplateProcessing",
    "RobertaProcessing",
    "BertProcessing",
)
_WORD_CACHE_SIZE = 1 << 18  # distinct pieces memoized per process
_CHUNK_CACHE_SIZE = 1 << 18  # distinct chunks (a word and its leading space), likewise
# and at most this many characters in all, per memo: long unique pieces (a paragraph of
# Chinese is one chunk for SentencePiece) would otherwise hold hundreds of megabytes
_MEMO_CHARS = 1 << 24
# Below this share of characters in chunks found in the memo (measured over _MEASURED_CHARS),
# text is too new for the memo to pay: on text seen once (chatterbot-corpus's dialogs, People's
# Daily) the Rust encoder was faster
_REPEATED, _MEASURED_CHARS = 0.8, 50_000


def _normalizer(config: dict) -> str | None:
    """The normalizer's type; an empty Sequence (DeepSeek-V3's) is no normalizer."""
    norm = config.get("normalizer") or {}
    if norm.get("type") == "Sequence" and not norm.get("normalizers"):
        return None
    return norm.get("type")


def _plain_bpe(config: dict) -> bool:
    """What both fast roads need of a tokenizer.json beyond its pre-tokenizer: no truncation or
    padding, post-processing that adds nothing without special tokens, a BPE model without
    dropout."""
    if config.get("truncation") or config.get("padding"):
        return False
    post = config.get("post_processor") or {}
    posts = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    if any(p.get("type") not in _INERT_POST_PROCESSORS for p in posts if p):
        return False
    model = config.get("model") or {}
    return model.get("type") == "BPE" and not model.get("dropout")


def split_patterns(config: dict) -> tuple[str, ...] | None:
    """The pre-tokenizer's split regexes, in order, when the rest of a tokenizer.json's
    pipeline is one the fast path reproduces (byte-level BPE, inert post-processing), else
    None. The normalizer is the caller's to check."""
    if not _plain_bpe(config):
        return None
    pre = config.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        patterns: tuple[str, ...] = (_GPT2,)
    elif pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) >= 2:
        *splits, pre = pre["pretokenizers"]
        if any(
            p.get("type") != "Split" or p.get("behavior") != "Isolated" or p.get("invert")
            for p in splits
        ):
            return None
        if pre.get("type") != "ByteLevel" or pre.get("use_regex", True):
            return None
        patterns = tuple(p.get("pattern", {}).get("Regex") for p in splits)
    else:
        return None
    if pre.get("add_prefix_space"):
        return None
    return patterns


def ascii_pattern(config: dict) -> str | None:
    """The ASCII pre-tokenizer regex equivalent to a tokenizer.json's pipeline, or None when
    the ASCII path cannot reproduce it."""
    if _normalizer(config) not in _ASCII_IDENTITY_NORMALIZERS:
        return None
    patterns = split_patterns(config)
    return ASCII_PATTERNS.get(patterns[0]) if patterns and len(patterns) == 1 else None


def unicode_patterns(config: dict) -> tuple[str, ...] | None:
    """The split regexes the Unicode path runs for a tokenizer.json, or None."""
    if _normalizer(config) not in (None, "NFC"):
        return None
    patterns = split_patterns(config)
    return patterns if patterns in PIPELINES else None


class Characters:
    """The characters a text may hold for the Unicode path: those on which Oniguruma (the Rust
    encoder's regex engine), the `regex` module and `str` agree for every class the pipelines
    use, checked the first time a batch holds them (see the module docstring)."""

    CLASSES = (r"\p{L}", r"\p{N}", r"\p{M}", r"\p{P}", r"\p{S}", r"\s")
    _CASE_FOLDED = set("sStTrReEvVmMlLdD")  # the letters of the pipelines' (?i:'s|'t|...)

    def __init__(self, engine: Any = None) -> None:
        self.safe: set[str] = set()
        self.unsafe: set[str] = set()
        # the same, per code point, for a batch's look: its texts as one UTF-32 array indexed
        # into these (8x faster than a set of its characters, which made a str per character)
        self.seen = np.zeros(0x110000, dtype=bool)
        self.bad = np.zeros(0x110000, dtype=bool)
        # another regex engine the path runs (tiktoken's): (class, probe) -> the characters of
        # probe it matches; held to the same agreement
        self.engine = engine

    def allow(self, text: str) -> bool:
        if self.safe.issuperset(text):
            return True
        chars = set(text)
        new = chars - self.safe - self.unsafe
        if new:
            self._check(new)
        return not chars & self.unsafe

    def learn(self, texts: list[str]) -> bool:
        """Checks at once the characters of `texts` not seen before (one check per batch);
        whether none of their characters is unsafe."""
        points = np.frombuffer("".join(texts).encode("utf-32-le"), np.uint32)
        new = np.unique(points[~self.seen[points]])
        if len(new):
            self._check(set(map(chr, new.tolist())))
        return not self.bad[points].any()

    def _check(self, chars: set[str]) -> None:
        # light (tokenizers, regex): imported with every fast tokenizer already
        import regex
        from tokenizers import Regex, pre_tokenizers

        probe = "".join(sorted(chars))
        bad = {c for c in chars if unicodedata.category(c) in ("Cn", "Cs")}
        bad |= {  # e.g. U+017F, long s: its upper case is S
            c
            for c in chars
            if not c.isascii() and self._CASE_FOLDED & {c.lower(), c.upper(), c.casefold()}
        }
        for cls in self.CLASSES:
            split = pre_tokenizers.Split(Regex(cls), behavior="removed")
            kept = "".join(piece for piece, _ in split.pre_tokenize_str(probe))
            onig = chars - set(kept)
            bad |= onig ^ set(regex.findall(cls, probe))
            if self.engine is not None:
                bad |= onig ^ self.engine(cls, probe)
            if cls == r"\p{L}":
                bad |= onig ^ {c for c in chars if c.isalpha()}
            elif cls == r"\s":
                bad |= onig ^ {c for c in chars if c.isspace()}
        self.unsafe |= bad
        self.safe |= chars - bad
        self.seen[list(map(ord, chars))] = True
        self.bad[list(map(ord, bad))] = True


def _alternation(tokens: list[str]) -> str:
    """A capturing regex matching the longest of `tokens` at a position, as a trie: at each
    character one alternative per next character, the longer match tried first (`?` is
    greedy), so a match costs the token's length, not the number of tokens (DeepSeek-V3 has
    1,285 added tokens; an alternation of them cost 10x the time)."""
    trie: dict = {}
    for t in tokens:
        node = trie
        for ch in t:
            node = node.setdefault(ch, {})
        node[""] = {}  # a token ends here

    def emit(node: dict) -> str:
        branches = [re.escape(ch) + emit(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return "(" + emit(trie) + ")"


def chunks(text: str) -> list[str]:
    """`text` cut before each space that follows a non-space and precedes a letter (see the
    module docstring: no piece of the supported pipelines crosses such a cut)."""
    words = text.split(" ")
    out = [words[0]]
    for word in words[1:]:
        if word[:1].isalpha() and out[-1] and not out[-1][-1].isspace():
            out.append(" " + word)
        else:
            out[-1] += " " + word
    return out if out[0] else out[1:]


class _Memo(dict):
    """A memo bounded twice: at most `size` entries and `_MEMO_CHARS` characters of keys."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.room = _MEMO_CHARS  # characters the memo may still take

    def keep(self, key: str, value: list[int]) -> None:
        if len(self) < self.size and len(key) <= self.room:
            self[key] = value
            self.room -= len(key)


@functools.cache
def _byte_alphabet() -> str:
    """GPT-2's byte -> printable character table, which ByteLevel applies to every piece, as
    the 256 characters in byte order: a printable byte (! to ~, ¡ to ¬, ® to ÿ) is its own
    character, the others take U+0100 onwards in byte order. Written here, not imported from
    transformers.convert_slow_tokenizer: that import cost the plan's child (which loads
    nothing of transformers) 1.2 s. tests/test_encode.py holds it to transformers' table."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    others = iter(range(0x100, 0x200))
    return "".join(chr(b) if b in printable else chr(next(others)) for b in range(256))


class _Pieces(_Memo):
    """piece of text -> its ids under the BPE model, memoized (bounded: once full, further
    pieces are computed each time). Byte-level: the piece is first mapped byte by byte to
    GPT-2's printable alphabet, as ByteLevel does."""

    def __init__(self, model: Any, *, byte_level: bool = True) -> None:
        super().__init__(_WORD_CACHE_SIZE)
        self.model = model
        self.missed = 0  # characters of the pieces not found in it
        # the UTF-8 bytes decoded with the byte alphabet as a charmap (one C call)
        self.byte_chars = _byte_alphabet() if byte_level else None

    def to_bytes_alphabet(self, piece: str) -> str:
        if self.byte_chars is None:
            return piece
        return codecs.charmap_decode(piece.encode(), "strict", self.byte_chars)[0]

    def __missing__(self, piece: str) -> list[int]:
        self.missed += len(piece)
        ids = [t.id for t in self.model.tokenize(self.to_bytes_alphabet(piece))]
        self.keep(piece, ids)
        return ids


class _Path:
    """Added tokens cut out first, leftmost-longest (those matched on the raw text, then those
    matched on the normalized text); each part between them goes to `_part`, told whether it
    starts the text."""

    def __init__(self, backend: Any) -> None:
        added = backend.get_added_tokens_decoder()
        self.added = {t.content: i for i, t in added.items()}
        raw = [t.content for t in added.values() if not t.normalized]
        normalized = [t.content for t in added.values() if t.normalized]
        # One pass per group: (the characters its tokens begin with, its split regex). A text
        # holding none of those characters skips the pass (a scan in C per character instead of
        # a regex split). The regex tries one alternation per first character, each longest
        # first: the match at the leftmost position is the longest there.
        self.passes = [
            (sorted({t[0] for t in group}), re.compile(_alternation(group)))
            for group in (raw, normalized)
            if group
        ]
        # characters of non-ASCII text found in the memo / looked up; while such text rarely
        # repeats (too few found), the Rust encoder is faster for it: its batches go there,
        # every 8th still here to measure
        self.found = self.looked_up = self.batches = 0
        self.bypass = False

    def _measure(self) -> None:
        """Decides, at each batch, whether its non-ASCII texts go to the Rust encoder."""
        self.batches += 1
        measuring = self.batches % 8 == 0
        if self.looked_up >= _MEASURED_CHARS or measuring:
            if self.looked_up:
                self.bypass = self.found < _REPEATED * self.looked_up
            self.found = self.looked_up = 0
        if measuring:
            self.bypass = False

    @staticmethod
    def added_tokens_supported(backend: Any) -> bool:
        if getattr(backend, "encode_special_tokens", False):
            return False
        added = backend.get_added_tokens_decoder().values()
        return not any(t.lstrip or t.rstrip or t.single_word or not t.content for t in added)

    def encode(self, text: str, *, continued: bool = False) -> list[int]:
        ids: list[int] = []
        if text:
            self._encode(text, 0, ids, "continued" if continued else "start")
        return ids

    def _encode(self, text: str, npass: int, ids: list[int], where: str) -> None:
        """`where` the part begins: "start" (of a text), "continued" (of a text that continues
        another, see Encoder), "after" (an added token)."""
        passes = self.passes
        while npass < len(passes) and not any(c in text for c in passes[npass][0]):
            npass += 1
        if npass == len(passes):
            self._part(text, ids, where)
            return
        for k, part in enumerate(passes[npass][1].split(text)):
            if k % 2:  # the split regex captures the added tokens: they sit at odd positions
                ids.append(self.added[part])
            elif part:
                self._encode(part, npass + 1, ids, where if k == 0 else "after")

    def _part(self, text: str, ids: list[int], where: str) -> None:
        raise NotImplementedError

    def takes(self, text: str) -> bool:
        """Whether this path gives `text` the Rust encoder's ids (else Rust must encode it)."""
        return True

    def learn(self, texts: list[str]) -> None:
        """Sees a batch before its texts are asked about (`takes`)."""

    def takes_all(self, texts: list[str]) -> list[bool]:
        """`takes` for each text of the batch `learn` saw last."""
        return list(map(self.takes, texts))


class _MetaspacePath(_Path):
    """SentencePiece models as transformers converts them (Llama 2, Mistral, Gemma shapes): no
    normalizer, a Metaspace pre-tokenizer that does not split (spaces become U+2581, one is
    prepended to the text's first part or to every part), then BPE over the whole part. When
    no vocabulary token holds U+2581 after another character, no merge can join a piece ending
    in another character to one starting with U+2581, so the part is cut before every run of
    U+2581 and each chunk's ids are memoized."""

    def __init__(self, backend: Any, prepend: str) -> None:
        super().__init__(backend)
        self.prepend = prepend
        self.chunk = re.compile("\u2581*[^\u2581]+|\u2581+").findall
        self.pieces = _Pieces(backend.model, byte_level=False)

    @classmethod
    def build(cls, backend: Any, config: dict) -> _MetaspacePath | None:
        pre = config.get("pre_tokenizer") or {}
        if (
            not _plain_bpe(config)
            or (config.get("model") or {}).get("ignore_merges")
            or _normalizer(config) is not None
            or pre.get("type") != "Metaspace"
            or pre.get("split", True)
            or pre.get("replacement") != "\u2581"
            or pre.get("prepend_scheme") not in ("first", "always", "never")
            or not cls.added_tokens_supported(backend)
            or any(re.search("[^\u2581]\u2581", t) for t in backend.get_vocab())
        ):
            return None
        return cls(backend, pre["prepend_scheme"])

    def learn(self, texts: list[str]) -> None:
        self._measure()

    def takes(self, text: str) -> bool:
        return not self.bypass or text.isascii()

    def _part(self, text: str, ids: list[int], where: str) -> None:
        text = text.replace(" ", "\u2581")
        prepend = where == "start" if self.prepend == "first" else where != "continued"
        if self.prepend != "never" and prepend and not text.startswith("\u2581"):
            text = "\u2581" + text
        measured, missed = not text.isascii(), self.pieces.missed
        ids.extend(itertools.chain.from_iterable(map(self.pieces.__getitem__, self.chunk(text))))
        if measured:  # a paragraph of Chinese is one unique chunk: Rust is faster for it
            self.looked_up += len(text)
            self.found += len(text) - (self.pieces.missed - missed)


class _FastPath(_Path):
    """Byte-level BPE: see the module docstring."""

    def __init__(
        self,
        backend: Any,
        patterns: tuple[str, ...] | None,
        ascii: str | None,
        nfc: bool,
        config: dict,
        plan: RankedPlan | None = None,
    ) -> None:
        super().__init__(backend)
        self.ascii_split = re.compile(ascii).findall if ascii else None
        self.splits = []
        if patterns:
            # light (regex): transformers' own dependency
            import regex

            self.splits = [regex.compile(p).finditer for p in patterns]
        self.nfc = nfc
        self.batch: list[str] | None = None  # the batch `learn` saw last (held: its identity)
        self.batch_clean = False
        self.ranked = _Ranked.build(backend, config, patterns, plan) if patterns else None
        self.characters = Characters(_tiktoken_classes if self.ranked else None)
        self.pieces = _Pieces(backend.model)
        self.chunks = _Memo(_CHUNK_CACHE_SIZE)

    @classmethod
    def build(cls, backend: Any, config: dict, plan: RankedPlan | None = None) -> _FastPath | None:
        ascii, patterns = ascii_pattern(config), unicode_patterns(config)
        if (ascii is None and patterns is None) or not cls.added_tokens_supported(backend):
            return None
        return cls(backend, patterns, ascii, _normalizer(config) == "NFC", config, plan)

    def learn(self, texts: list[str]) -> None:
        self._measure()
        self.batch, self.batch_clean = texts, False
        if self.splits and (not self.bypass or self.ranked):
            checked = [t for t in texts if not (t.isascii() and self.ascii_split is not None)]
            self.batch_clean = self.characters.learn(checked)

    def takes_all(self, texts: list[str]) -> list[bool]:
        # no character of the batch is unsafe: no text needs its own look
        vetted = texts is self.batch and self.batch_clean
        return [self.takes(t, vetted=vetted) for t in texts]

    def takes(self, text: str, *, vetted: bool = False) -> bool:
        """Whether this path gives `text` the Rust encoder's ids (else Rust must encode it);
        `vetted`: its characters are known to be safe."""
        if text.isascii() and self.ascii_split is not None:
            return True
        if not self.splits or (self.bypass and not self.ranked):
            return False
        if self.nfc and not unicodedata.is_normalized("NFC", text):
            return False
        return vetted or self.characters.allow(text)

    def _part(self, text: str, ids: list[int], where: str) -> None:
        if self.ascii_split is not None and text.isascii():
            pieces = self.ascii_split(text)
            ids.extend(itertools.chain.from_iterable(map(self.pieces.__getitem__, pieces)))
            return
        if self.ranked is not None:
            ranked = self.ranked.encode(text)
            if ranked is not None:
                ids.extend(ranked)
                return
        self._chunked(text, ids)

    def _chunked(self, text: str, ids: list[int]) -> None:
        self.looked_up += len(text)
        for chunk in chunks(text):
            found = self.chunks.get(chunk)
            if found is not None:
                self.found += len(chunk)
            else:
                found = list(
                    itertools.chain.from_iterable(map(self.pieces.__getitem__, self.split(chunk)))
                )
                self.chunks.keep(chunk, found)
            ids.extend(found)

    def split(self, text: str) -> list[str]:
        """The pre-tokenizer's pieces of `text`: each split regex in turn, on each piece the
        previous one left, its matches and the text between them kept (Isolated)."""
        pieces = [text]
        for finditer in self.splits:
            out = []
            for piece in pieces:
                at = 0
                for m in finditer(piece):
                    start, end = m.span()
                    if start > at:
                        out.append(piece[at:start])
                    out.append(piece[start:end])
                    at = end
                if at < len(piece):
                    out.append(piece[at:])
            pieces = out
        return pieces


# DeepSeek-V3's three regexes as one, in the syntax of Rust's `regex` crate (tiktoken's engine)
# and of the `regex` module's version 1. Run in turn, the three leave every digit in a group of
# at most three (\p{N}{1,3} takes them all first); every run of CJK and kana, split as the
# third regex splits that run alone; and the third regex's split of each stretch between
# them. So here the third regex runs twice, its classes cut to each region (CJK and kana;
# neither that nor a digit): no match crosses a region's end, and there its lookahead (?!\S)
# sees what it sees at a piece's end. What lies between matches is grouped per region, as each
# piece keeps its own. tests/test_encode.py holds it to the Rust encoder's three passes.
def _deepseek_v3_one() -> str:
    third = _DEEPSEEK_V3[2]
    punct = third[1 : third.index("][A-Za-z]")]  # its ASCII punctuation
    cjk = _DEEPSEEK_V3[1][1:-2]
    regions = [f"[{cjk}]", f"[^\\p{{N}}{cjk}]"]
    thirds = []
    for region in regions:

        def c(cls: str, region: str = region) -> str:
            return f"[[{cls}]&&{region}]"

        ws, crlf, space, non_ws = c(r"\s"), c("\r\n"), c(" "), c(r"\S")
        letters, marks_after = c(r"^\r\n\p{L}\p{P}\p{S}"), c(r"\p{L}\p{M}")
        punct_sym = c(r"\p{P}\p{S}")
        thirds.append(
            f"{c(punct)}{c('A-Za-z')}+|{letters}?{marks_after}+"
            f"|{space}?{punct_sym}+{crlf}*|{ws}*{crlf}+|{ws}+(?!{non_ws})|{ws}+"
        )
    match = "|".join([r"\p{N}{1,3}", *thirds])
    return "|".join([match, *(f"(?:(?!{match}){region})+" for region in regions)])


def one_regex(patterns: tuple[str, ...]) -> str | None:
    """A pipeline's split regexes as one regex giving the same pieces, or None."""
    if len(patterns) == 1:
        return patterns[0]
    return _deepseek_v3_one() if patterns == _DEEPSEEK_V3 else None


_PROBES: dict[str, Any] = {}  # class -> a tiktoken encoding whose regex is that class alone


def _tiktoken_classes(cls: str, probe: str) -> set[str]:
    """The characters of `probe` that tiktoken's regex engine matches with `cls`: an encoding
    whose regex is that class alone encodes only what it matches, byte by byte."""
    if cls not in _PROBES:
        # light (tiktoken): imported once a tokenizer takes its road
        import tiktoken

        ranks = {bytes([b]): b for b in range(256)}
        _PROBES[cls] = tiktoken.Encoding(
            "probe", pat_str=cls, mergeable_ranks=ranks, special_tokens={}
        )
    return set(bytes(_PROBES[cls].encode_ordinary(probe)).decode("utf-8"))


class _Ranked:
    """Byte-level BPE by tiktoken, which gives ids without a Python object per token (2.7x the
    Rust encoder's speed on DeepSeek-V3 and Chinese text), where its ids are provably the
    model's.

    tiktoken joins the adjacent pair whose concatenation ranks lowest; the model, the adjacent
    pair whose merge ranks lowest. With the model checked when this is built (no dropout,
    ignore_merges, affixes or byte fallback; every byte a token; one merge per token; ids
    rising with merge rank) the two choose alike at every step, until tiktoken joins two tokens
    x, y whose concatenation z is a token but not their merge. No token ever crossed the ends of
    z's bytes until then (tokens only grow, and x, y end there), so those bytes evolved as they
    do alone: the model encodes z's own bytes as [x, y], not as [z]. So every token is checked
    once, when this is built: does the model encode its bytes as itself? If all do, tiktoken's
    ids are the model's for every text. Otherwise a text whose ids hold a token with one of the
    others inside it takes the exact road (`encode` gives None)."""

    def __init__(self, plan: RankedPlan) -> None:
        # light (tiktoken): a dependency of its own, imported once a tokenizer qualifies
        import tiktoken

        assert plan.ranks is not None
        self.encoding = tiktoken.Encoding(
            "sftscale", pat_str=plan.pattern, mergeable_ranks=plan.ranks, special_tokens={}
        )
        self.ranks, self.bytes_of = plan.ranks, {i: b for b, i in plan.ranks.items()}
        self.not_own = set(plan.not_own)
        self.clean: dict[int, bool] = {}  # token -> no token inside it is in not_own

    @classmethod
    def build(
        cls, backend: Any, config: dict, patterns: tuple[str, ...], plan: RankedPlan | None
    ) -> _Ranked | None:
        """The road for `backend`, from `plan` when it was made for this backend's model,
        added tokens and regex (made elsewhere, say from the same tokenizer.json), else from a
        plan made here."""
        inputs = cls.inputs(backend, config, patterns)
        if inputs is None:
            return None
        if plan is None or plan.key != _plan_key(*inputs):
            plan = cls.plan(backend, *inputs)
        return None if plan is None or plan.ranks is None else cls(plan)

    @staticmethod
    def inputs(
        backend: Any, config: dict, patterns: tuple[str, ...] | None
    ) -> tuple[bytes, set[str], str] | None:
        """What a plan is made from and keyed by (the model's state, the added tokens, the one
        regex), or None where the road does not apply."""
        pattern = one_regex(patterns) if patterns else None
        if pattern is None or (config.get("model") or {}).get("ignore_merges"):
            return None
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        return backend.model.__getstate__(), added, pattern

    @staticmethod
    def plan(backend: Any, state: bytes, added: set[str], pattern: str) -> RankedPlan | None:
        """The ranks tiktoken works with and the tokens not their own encoding, or a plan
        without ranks when the model does not meet the conditions (None without tiktoken)."""
        try:
            import tiktoken  # noqa: F401  (light: checked here, used in __init__)
        except ImportError:
            return None
        key = _plan_key(state, added, pattern)
        closed = RankedPlan(key, pattern, None, frozenset())
        model = json.loads(state)
        if any(
            model.get(k)
            for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback")
        ):
            return closed
        vocab: dict[str, int] = model["vocab"]
        added = added & vocab.keys()
        alphabet = set(_byte_alphabet())
        merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
        made = [vocab.get(a + b) for a, b in merges]  # the byte alphabet maps byte by byte
        if (
            not alphabet <= vocab.keys()
            or not alphabet.issuperset("".join(t for t in vocab if t not in added))
            or None in made
            or {vocab[t] for t in added} & set(made)  # tiktoken could never make that one
            or any(x >= y for x, y in itertools.pairwise(made))  # rising: one merge per token
        ):
            return closed
        to_latin1 = {ord(c): b for b, c in enumerate(_byte_alphabet())}
        tokens = [t for t in vocab if t not in added]
        # one translate for all (a character of the alphabet is one byte), then cut
        joined = "".join(tokens).translate(to_latin1).encode("latin-1")
        ends = list(itertools.accumulate(map(len, tokens)))
        ranks = {joined[a:b]: vocab[t] for t, a, b in zip(tokens, [0, *ends], ends, strict=False)}
        # the tokens the model does not encode as themselves (their own bytes, alone)
        tokenize = backend.model.tokenize
        not_own = frozenset(
            vocab[t] for t in tokens if len(t) > 1 and [x.id for x in tokenize(t)] != [vocab[t]]
        )
        return RankedPlan(key, pattern, ranks, not_own)

    def _clean(self, token: int) -> bool:
        if token not in self.clean:
            b = self.bytes_of[token]
            self.clean[token] = not any(
                self.ranks.get(b[i:j]) in self.not_own
                for i in range(len(b))
                for j in range(i + 2, len(b) + 1)
            )
        return self.clean[token]

    def encode(self, text: str) -> list[int] | None:
        ids = self.encoding.encode_ordinary(text)
        if self.not_own and not all(map(self._clean, ids)):
            return None
        return ids


@dataclass(frozen=True)
class RankedPlan:
    """What tiktoken's road is built from, and what building it spends its time on (~1 s for
    DeepSeek-V3's 128,000 tokens, most of it the check of every token): made from one backend,
    in another process if need be (from the same tokenizer.json, say), and used for a backend
    only when its key is that backend's."""

    key: str  # the model's state, the added tokens and the regex, hashed
    pattern: str
    ranks: dict[bytes, int] | None  # None: the model does not meet the conditions
    not_own: frozenset[int]


def _plan_key(state: bytes, added: set[str], pattern: str) -> str:
    h = hashlib.sha256(state)
    h.update(json.dumps([sorted(added), pattern]).encode())
    return h.hexdigest()


def ranked_plan(backend: Any) -> RankedPlan | None:
    """The plan of tiktoken's road for `backend` (None where the road does not apply)."""
    config = pipeline_config(backend)
    inputs = _Ranked.inputs(backend, config, unicode_patterns(config))
    return None if inputs is None else _Ranked.plan(backend, *inputs)


class Encoder:
    """Texts -> ids, as `backend.encode_batch(texts, add_special_tokens=False)` gives them
    with no padding and no truncation (what transformers' tokenizer call gives)."""

    _of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, backend: Any, plan: RankedPlan | None = None) -> None:
        if backend.padding or backend.truncation:
            # transformers switches these off per call unless asked; called directly, the
            # backend would pad or cut every segment. Work on a copy without them.
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(backend.to_str())
            backend.no_padding()
            backend.no_truncation()
        self.backend = backend
        self.config = pipeline_config(backend)
        self.path: _Path | None = _FastPath.build(
            backend, self.config, plan
        ) or _MetaspacePath.build(backend, self.config)
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets we do not use
        self._rust = getattr(backend, "encode_batch_fast", backend.encode_batch)
        self._continued: Any = None  # the Rust encoder for continued texts, built when needed

    @classmethod
    def of(cls, tokenizer: Any, plan: RankedPlan | None = None) -> Encoder:
        """One encoder (and so one memo) per tokenizer object; `plan` (see RankedPlan) is used
        when it is built here and the plan fits."""
        if tokenizer not in cls._of:
            cls._of[tokenizer] = cls(tokenizer.backend_tokenizer, plan)
        return cls._of[tokenizer]

    @classmethod
    def forget(cls, tokenizer: Any) -> None:
        """The encoder of `tokenizer` (its memo, tiktoken's tables) dropped from this process."""
        cls._of.pop(tokenizer, None)

    @property
    def fast(self) -> bool:
        return self.path is not None

    def __call__(self, texts: list[str], continued: list[bool] | None = None) -> list[list[int]]:
        """`continued[i]`: text i continues the one before it (a later segment of a document):
        it gets the ids it has inside the whole text, so without the prefix some tokenizers put
        at a text's start (SentencePiece's U+2581, a byte-level prefix space)."""
        continued = continued or [False] * len(texts)
        out: list[list[int] | None] = [None] * len(texts)
        if self.path is not None:
            encode = self.path.encode
            self.path.learn(texts)
            taken = self.path.takes_all(texts)
            for i, (text, cont) in enumerate(zip(texts, continued, strict=True)):
                if taken[i]:
                    out[i] = encode(text, continued=cont)
        for cont in (False, True):
            rest = [i for i, ids in enumerate(out) if ids is None and continued[i] == cont]
            if rest:
                rust = self._rust_continued() if cont else self._rust
                for i, e in zip(
                    rest, rust([texts[i] for i in rest], add_special_tokens=False), strict=True
                ):
                    out[i] = e.ids
        return out  # type: ignore[return-value]

    def _rust_continued(self) -> Any:
        """The Rust encoder without a text-start prefix: a copy of the tokenizer whose Metaspace
        prepends nothing, whose ByteLevel adds no prefix space and whose normalizer prepends
        nothing (the legacy Llama form); the tokenizer itself when it has none of these."""
        if self._continued is None:
            config = copy.deepcopy(self.config)  # the pipeline's parts only: small
            if _drop_start_prefix(config):
                # light (tokenizers): imported with every fast tokenizer already
                from tokenizers import Tokenizer

                whole = json.loads(self.backend.to_str())  # the vocabulary too: megabytes
                whole.update(normalizer=config["normalizer"], pre_tokenizer=config["pre_tokenizer"])
                backend = Tokenizer.from_str(json.dumps(whole))
                self._continued = getattr(backend, "encode_batch_fast", backend.encode_batch)
            else:
                self._continued = self._rust
        return self._continued


def pipeline_config(backend: Any) -> dict:
    """The parts of a tokenizer.json the fast paths read, in its own form, each serialized
    alone: the whole file would serialize and parse the vocabulary and merges too (megabytes
    for a large vocabulary: a second per process for DeepSeek-V3's, measured)."""

    def state(part: Any) -> Any:
        return None if part is None else json.loads(part.__getstate__())

    model = backend.model
    return {
        "normalizer": state(backend.normalizer),
        "pre_tokenizer": state(backend.pre_tokenizer),
        "post_processor": state(backend.post_processor),
        "truncation": backend.truncation,
        "padding": backend.padding,
        "model": {
            "type": type(model).__name__,
            # BPE's settings the paths check (the model object exposes them; absent: None)
            "dropout": getattr(model, "dropout", None),
            "ignore_merges": getattr(model, "ignore_merges", None),
        },
    }


def _drop_start_prefix(config: dict) -> bool:
    """Removes from a tokenizer.json's pipeline what adds a prefix at a text's start; whether
    there was any."""
    changed = False
    pre = config.get("pre_tokenizer") or {}
    for p in [pre, *pre.get("pretokenizers", [])]:
        if p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never":
            p["prepend_scheme"], changed = "never", True
        if p.get("type") == "ByteLevel" and p.get("add_prefix_space"):
            p["add_prefix_space"], changed = False, True
    norm = config.get("normalizer") or {}
    if norm.get("type") == "Prepend":
        config["normalizer"], changed = None, True
    elif norm.get("type") == "Sequence":
        kept = [n for n in norm.get("normalizers", []) if n.get("type") != "Prepend"]
        changed = changed or len(kept) != len(norm.get("normalizers", []))
        norm["normalizers"] = kept
    return changed
