"""Weighted mixtures: token shares as asked, epochs exactly, the same seed byte for byte, and
an account per source (as read, as mixed, quarantine) in the manifest and in `inspect`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_tools import schema
from data_tools.inspect import inspect
from data_tools.mixture import MixtureError, parse_inputs
from data_tools.prepare import PrepareError, PrepareOptions, prepare
from data_tools.synthetic import make_conversations, write_jsonl
from sftscale.cli import main


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("mix")
    a = write_jsonl(make_conversations(1500, seed=11), d / "a.jsonl")
    b_records = make_conversations(1500, seed=12)
    b = write_jsonl(b_records, d / "b.jsonl")
    with open(b, "a") as f:
        f.write('{"messages": []}\n')  # one bad record, quarantined in b's account
    return a, b


def _prepare(inputs: list[str], tok: Path, out: Path, seed: int = 0) -> schema.Manifest:
    options = PrepareOptions(seq_len=512, rows_per_shard=200, seed=seed, progress=False)
    return prepare(inputs, tokenizer_path=str(tok), out_dir=str(out), options=options)


def _shard_tokens(out: Path, m: schema.Manifest) -> tuple[int, int]:
    """(documents, tokens) in the shards themselves."""
    docs = tokens = 0
    for s in m.shards:
        for lens in schema.open_shard(out / s.file).column("doc_lens").to_pylist():
            docs, tokens = docs + len(lens), tokens + sum(lens)
    return docs, tokens


def test_weights_give_those_token_shares(two_sources, sp_tokenizer_dir, tmp_path):
    a, b = two_sources
    m = _prepare([f"{a}:0.7", f"{b}:0.3"], sp_tokenizer_dir, tmp_path / "o")
    sa, sb = m.mixture["sources"]
    assert sa["mixed"]["share"] == pytest.approx(0.7, abs=0.01)
    assert sb["mixed"]["share"] == pytest.approx(0.3, abs=0.01)
    # the scarcer source (for its weight) is used once, whole; the other is sampled
    limiting = min((sa, sb), key=lambda s: s["read"]["tokens"] / s["weight"])
    assert limiting["mixed"]["tokens"] == limiting["read"]["tokens"]
    assert _shard_tokens(tmp_path / "o", m) == (
        sa["mixed"]["documents"] + sb["mixed"]["documents"],
        sa["mixed"]["tokens"] + sb["mixed"]["tokens"],
    )
    assert m.num_tokens == sa["mixed"]["tokens"] + sb["mixed"]["tokens"]
    assert (sa["read"]["quarantined"], sb["read"]["quarantined"]) == (0, 1)
    assert sb["read"]["quarantine_reasons"] == {"empty conversation": 1}


def test_the_same_seed_gives_byte_identical_shards(two_sources, sp_tokenizer_dir, tmp_path):
    a, b = two_sources
    runs = {}
    for name, seed in (("x", 3), ("y", 3), ("z", 4)):
        m = _prepare([f"{a}:0.7", f"{b}:0.3"], sp_tokenizer_dir, tmp_path / name, seed=seed)
        runs[name] = [(tmp_path / name / s.file).read_bytes() for s in m.shards]
    assert runs["x"] == runs["y"]
    assert runs["x"] != runs["z"]


def test_epochs_repeat_a_source_exactly(two_sources, sp_tokenizer_dir, tmp_path):
    a, b = two_sources
    m = _prepare([f"{a}:1x", f"{b}:2x"], sp_tokenizer_dir, tmp_path / "o")
    sa, sb = m.mixture["sources"]
    assert sa["mixed"]["tokens"] == sa["read"]["tokens"]
    assert sb["mixed"]["tokens"] == 2 * sb["read"]["tokens"]
    assert sb["mixed"]["documents"] == 2 * sb["read"]["documents"]
    half = _prepare([f"{a}:0.5x", f"{b}:1x"], sp_tokenizer_dir, tmp_path / "h")
    ha = half.mixture["sources"][0]
    assert ha["mixed"]["tokens"] == pytest.approx(ha["read"]["tokens"] / 2, rel=0.01)


@pytest.mark.parametrize(
    "inputs, message",
    [
        (["{a}:0.7", "{b}"], "for every source"),
        (["{a}:0.7", "{b}:2x"], "not both"),
        (["{a}:0", "{b}:1"], "must be > 0"),
    ],
)
def test_a_mixture_that_cannot_be_made_says_why(two_sources, tmp_path, inputs, message):
    a, b = two_sources
    with pytest.raises(MixtureError, match=message):
        parse_inputs([i.format(a=a, b=b) for i in inputs])


def test_a_file_whose_name_looks_like_a_weight_is_a_file(tmp_path):
    odd = tmp_path / "data:2"
    odd.write_text("{}\n")
    assert [(s.input, s.weight) for s in parse_inputs([str(odd)])] == [(str(odd), None)]


def test_a_mixture_file_and_inspect(two_sources, sp_tokenizer_dir, tmp_path, capsys):
    a, b = two_sources
    mix = tmp_path / "mix.yaml"
    mix.write_text(
        f"seed: 5\nsources:\n  - {{path: {a}, weight: 0.6}}\n  - {{path: {b}, weight: 0.4}}\n"
    )
    out = tmp_path / "o"
    args = ["prepare", "--mixture", str(mix), "--tokenizer", str(sp_tokenizer_dir)]
    assert main([*args, "--seq-len", "512", "--out", str(out), "--no-progress"]) == 0
    m = schema.read_manifest(out)
    assert m.mixture["seed"] == 5 and [s["weight"] for s in m.mixture["sources"]] == [0.6, 0.4]
    text = inspect(str(out), samples=0)
    assert "mixture (seed 5)" in text and "weight 0.6" in text and "empty conversation" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"sources": [{"path": str(a), "weight": 1, "epochs": 2}]}))
    args = ["prepare", "--mixture", str(bad), "--tokenizer", str(sp_tokenizer_dir)]
    assert main([*args, "--seq-len", "512", "--out", str(tmp_path / "q")]) != 0
    assert "{path, weight} or {path, epochs}" in capsys.readouterr().err


def test_without_weights_nothing_changes(two_sources, sp_tokenizer_dir, tmp_path):
    a, b = two_sources
    m = _prepare([str(a), str(b)], sp_tokenizer_dir, tmp_path / "o")
    assert m.mixture is None and m.num_records == 3001
    with pytest.raises(PrepareError, match="matches no file"):
        _prepare([f"{tmp_path}/nothing*.jsonl:0.5", f"{a}:0.5"], sp_tokenizer_dir, tmp_path / "p")
