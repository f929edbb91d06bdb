"""data_tools.encode gives exactly the Rust encoder's ids: exhaustively on short ASCII strings,
by fuzzing, for every pre-tokenizer it reproduces; everything else falls back to Rust."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

from data_tools import encode
from data_tools.encode import Encoder

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Added tokens matched on the normalized text, some overlapping the specials: HF cuts the raw
# ones out first, so "d<|im_end|>" is "d" + "<|im_end|>" although "d<|im" starts further left.
NORMALIZED_ADDED = ["<tool>", "d<|im", "im_end"]
TRICKY = " \t\n\r\x0b\x0c\x1c\x1f\x00\x7f'sStTrReEvVmMlLdDaZ09!.-<|>_"
ASCII_FRAGMENTS = [
    *map(chr, range(128)),
    *SPECIALS,
    *NORMALIZED_ADDED,
    "'ll",
    "'S",
    "'Re",
    "123456",
    "   ",
    "\n\n",
    " \n ",
    "\r\n",
]
FRAGMENTS = [*ASCII_FRAGMENTS, "é", "日本", "\u00a0", "\u2028", "🙂", "x\u0301"]


def _training_text(n: int = 3000) -> list[str]:
    rng = random.Random(0)
    words = [
        "the",
        "of",
        "and",
        "I'll",
        "you're",
        "DON'T",
        "it's",
        "we've",
        "12",
        "2024",
        "3.14",
        "hello!",
        "(x)",
        "a_b",
        "--",
        "...",
        "\tindent",
        "line\n",
        "\n\n",
        "  ",
        "<tag>",
        "Mixed",
    ]
    return [" ".join(rng.choices(words, k=rng.randint(1, 30))) for _ in range(n)]


def _build(pre_tokenizer, normalizer=None) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    tok.add_tokens([AddedToken(t, normalized=True, special=False) for t in NORMALIZED_ADDED])
    return tok


def _split_then_bytes(pattern: str):
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


SUPPORTED = {
    "gpt2": lambda: _build(pre_tokenizers.ByteLevel(add_prefix_space=False)),
    "llama3": lambda: _build(_split_then_bytes(encode._LLAMA3)),
    "qwen2": lambda: _build(_split_then_bytes(encode._QWEN2), normalizers.NFC()),
}


@pytest.fixture(scope="module", params=sorted(SUPPORTED))
def tokenizer(request) -> Tokenizer:
    return SUPPORTED[request.param]()


def _rust(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def test_fast_path_is_taken(tokenizer):
    assert Encoder(tokenizer).fast


def test_every_ascii_string_of_one_and_two_characters(tokenizer):
    chars = list(map(chr, range(128)))
    texts = chars + ["".join(p) for p in itertools.product(chars, repeat=2)]
    assert Encoder(tokenizer)(texts) == _rust(tokenizer, texts)


def test_every_string_of_three_tricky_characters(tokenizer):
    texts = ["".join(p) for p in itertools.product(TRICKY, repeat=3)]
    assert Encoder(tokenizer)(texts) == _rust(tokenizer, texts)


def _rust_pieces(tok: Tokenizer, text: str) -> list[str]:
    normalized = tok.normalizer.normalize_str(text) if tok.normalizer else text
    return [piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str(normalized)]


def _our_pieces(tok: Tokenizer, text: str, path=None) -> list[str]:
    path = path or Encoder(tok).ascii
    return [path.pieces.to_bytes_alphabet(p) for p in path.split(text)]


def test_pre_tokenization_is_the_same(tokenizer):
    """The pieces themselves, not only the ids (a vocabulary can hide a wrong split)."""
    chars = list(map(chr, range(128)))
    texts = chars + ["".join(p) for p in itertools.product(chars, repeat=2)]
    texts += ["".join(p) for p in itertools.product(TRICKY, repeat=3)]
    texts += ["1234567", "'Sam's", "I'LL", "x  \n\n  y", "a \r\n\r\n b", " !!\n\nz", "  1"]
    path = Encoder(tokenizer).ascii  # built once: its construction, not the split, is costly
    ours = [_our_pieces(tokenizer, t, path) for t in texts]
    assert ours == [_rust_pieces(tokenizer, t) for t in texts]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from([*map(chr, range(128)), "'ll", "'S", "123456", "   ", "\r\n"]), max_size=60
    ).map("".join)
)
def test_fuzz_pre_tokenization(tokenizer, text):
    assert _our_pieces(tokenizer, text) == _rust_pieces(tokenizer, text)


def test_added_tokens(tokenizer):
    texts = [
        "d<|im_end|>",
        "xd<|im_start|>y",
        "<|im_end|>d<|im",
        "im_end|>",
        "<|im<|im_end|>",
        "<tool><tool>",
        "<|endoftext|><|im_start|>",
        " <|im_end|>\n",
        "d<|imd<|im_start|>",
    ]
    assert Encoder(tokenizer)(texts) == _rust(tokenizer, texts)


def test_long_texts(tokenizer):
    """Mostly ASCII (the fast path) and some not (those go to Rust), in one batch."""
    rng = random.Random(1)
    texts = ["".join(rng.choices(ASCII_FRAGMENTS, k=rng.randint(0, 400))) for _ in range(500)]
    texts += ["".join(rng.choices(FRAGMENTS, k=rng.randint(0, 100))) for _ in range(100)]
    texts += _training_text(200)
    assert sum(t.isascii() for t in texts) > 700 and any(not t.isascii() for t in texts)
    assert Encoder(tokenizer)(texts) == _rust(tokenizer, texts)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join), max_size=8))
def test_fuzz(tokenizer, texts):
    assert Encoder(tokenizer)(texts) == _rust(tokenizer, texts)


def test_memo_is_bounded(tokenizer, monkeypatch):
    monkeypatch.setattr(encode, "_WORD_CACHE_SIZE", 5)
    enc = Encoder(tokenizer)
    texts = _training_text(50)
    assert enc(texts) == _rust(tokenizer, texts)
    assert len(enc.ascii.pieces) == 5


def test_padding_and_truncation_of_the_tokenizer_file_are_ignored():
    """A tokenizer.json may enable them; transformers turns them off per call, and so do we
    (on a copy: the caller's tokenizer is left as it was)."""
    plain = SUPPORTED["gpt2"]()
    tok = SUPPORTED["gpt2"]()
    tok.enable_padding(pad_id=0)
    tok.enable_truncation(4)
    texts = _training_text(20)
    enc = Encoder(tok)
    assert enc.fast
    assert enc(texts) == _rust(plain, texts)
    assert max(map(len, enc(texts))) > 4
    assert tok.padding and tok.truncation


def _with(tok: Tokenizer, change) -> Tokenizer:
    change(tok)
    return tok


UNSUPPORTED = {
    "prefix-space": lambda: _build(pre_tokenizers.ByteLevel(add_prefix_space=True)),
    "unknown-regex": lambda: _build(_split_then_bytes(r"\p{L}+|\s+|[^\s\p{L}]+")),
    "metaspace": lambda: _build(pre_tokenizers.Metaspace()),
    "lowercase": lambda: _build(
        pre_tokenizers.ByteLevel(add_prefix_space=False), normalizers.Lowercase()
    ),
    "lstrip-token": lambda: _with(
        SUPPORTED["gpt2"](), lambda t: t.add_special_tokens([AddedToken("<mask>", lstrip=True)])
    ),
    "special-tokens-as-text": lambda: _with(
        SUPPORTED["gpt2"](), lambda t: setattr(t, "encode_special_tokens", True)
    ),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_other_pipelines_fall_back_to_rust(name):
    tok = UNSUPPORTED[name]()
    enc = Encoder(tok)
    assert not enc.fast
    rng = random.Random(2)
    texts = ["".join(rng.choices(FRAGMENTS, k=rng.randint(0, 100))) for _ in range(100)]
    assert enc(texts) == _rust(tok, texts)
