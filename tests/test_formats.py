"""Every input type and record format through the whole pipeline; bad records fuzzed;
overflow modes; determinism across workers and engines."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_tools import schema
from data_tools.prepare import PrepareOptions, prepare

Q, A = "What is the capital of Peru?", "The capital of Peru is Lima."
RECORDS = {
    "messages": {"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]},
    "prompt": {"prompt": Q, "completion": A},
    "alpaca": {"instruction": Q, "input": "", "output": A},
    "sharegpt": {"conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": A}]},
}


def _rows(out):
    m = schema.read_manifest(out)
    return m, [r for s in m.shards for r in schema.open_shard(out / s.file).to_pylist()]


def _supervised_text(tokenizer, row):
    return tokenizer.decode(
        [t for t, m in zip(row["input_ids"], row["loss_mask"], strict=True) if m]
    )


def _opts(**kw):
    return PrepareOptions(seq_len=kw.pop("seq_len", 128), progress=False, **kw)


@pytest.mark.parametrize("fmt", sorted(RECORDS))
def test_chat_formats_become_the_same_conversation(tmp_path, sp_tokenizer_dir, sp_tokenizer, fmt):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(RECORDS[fmt]) + "\n")
    for forced in (None, fmt):  # auto-detected and forced give the same
        m, rows = _rows_of(tmp_path / f"o-{forced}", src, sp_tokenizer_dir, format=forced)
        assert m.formats == {fmt: 1} and m.num_documents == 1
        assert _supervised_text(sp_tokenizer, rows[0]) == A + "<|im_end|>\n"
        assert Q in sp_tokenizer.decode(rows[0]["input_ids"])


def _rows_of(out, src, tok, **kw):
    prepare([str(src)], tokenizer_path=str(tok), out_dir=str(out), options=_opts(**kw))
    return _rows(out)


def test_alpaca_input_and_sharegpt_system(tmp_path, sp_tokenizer_dir, sp_tokenizer):
    src = tmp_path / "in.jsonl"
    src.write_text(
        json.dumps({"instruction": "Add.", "input": "2 and 5", "output": "7"})
        + "\n"
        + json.dumps(
            {
                "conversations": [
                    {"from": "system", "value": "Be brief."},
                    {"from": "human", "value": "Hi"},
                    {"from": "gpt", "value": "Hello"},
                ]
            }
        )
        + "\n"
    )
    _, rows = _rows_of(tmp_path / "o", src, sp_tokenizer_dir)
    text = "".join(sp_tokenizer.decode(r["input_ids"]) for r in rows)
    assert "Add.\n\n2 and 5" in text and "<|im_start|>system\nBe brief." in text


def test_text_format_supervises_every_token(tmp_path, sp_tokenizer_dir, sp_tokenizer):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "The sky is blue. The grass is green."}) + "\n")
    m, rows = _rows_of(tmp_path / "o", src, sp_tokenizer_dir)
    assert m.formats == {"text": 1}
    assert all(rows[0]["loss_mask"]) and rows[0]["input_ids"][-1] == sp_tokenizer.eos_token_id


def test_json_parquet_and_dataset_directory_inputs(tmp_path, sp_tokenizer_dir):
    import datasets

    records = [RECORDS["prompt"], RECORDS["alpaca"]]
    (tmp_path / "a.json").write_text(json.dumps({"data": records}))
    pq.write_table(pa.Table.from_pylist([RECORDS["prompt"]] * 3), tmp_path / "b.parquet")
    datasets.Dataset.from_list([RECORDS["prompt"]] * 2).save_to_disk(str(tmp_path / "hf"))
    out = tmp_path / "o"
    m = prepare(
        [str(tmp_path / "a.json"), str(tmp_path / "*.parquet"), str(tmp_path / "hf")],
        tokenizer_path=str(sp_tokenizer_dir),
        out_dir=str(out),
        options=_opts(),
    )
    assert m.num_records == 7 and m.num_documents == 7 and m.quarantined_rows == 0
    assert [f["path"] for f in m.sources["files"]] == [
        str(tmp_path / p) for p in ("a.json", "b.parquet", "hf")
    ]


def test_sentencepiece_model_file_as_tokenizer(tmp_path, sp_tokenizer_dir, sp_tokenizer):
    """A bare .model has no template: --chat-template is required, and the ids are the same."""
    from data_tools.prepare import PrepareError

    model = sp_tokenizer_dir.with_name(sp_tokenizer_dir.name + ".spm") / "sp.model"
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(RECORDS["messages"]) + "\n")
    with pytest.raises(PrepareError, match="--chat-template"):
        prepare([str(src)], tokenizer_path=str(model), out_dir=str(tmp_path / "x"), options=_opts())
    _, rows = _rows_of(tmp_path / "o", src, model, chat_template="chatml")
    _, expected = _rows_of(tmp_path / "e", src, sp_tokenizer_dir)
    assert rows == expected


def test_overflow_split_keeps_every_supervised_piece(tmp_path, sp_tokenizer_dir):
    long = {
        "messages": [
            {"role": "user", "content": Q},
            {"role": "assistant", "content": " ".join([A] * 12)},
        ]
    }
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(long) + "\n")
    m, rows = _rows_of(tmp_path / "o", src, sp_tokenizer_dir, seq_len=32, overflow="split")
    whole, _ = _rows_of(tmp_path / "w", src, sp_tokenizer_dir, seq_len=4096)
    assert m.overflow["split"] == 1 and m.num_documents > 3
    assert all(n <= 32 for r in rows for n in r["doc_lens"])
    assert m.num_supervised_tokens == whole.num_supervised_tokens  # nothing supervised lost


def test_small_window_and_many_workers_give_identical_output(
    tmp_path, corpus_path, sp_tokenizer_dir
):
    ref = tmp_path / "ref"
    prepare(
        [str(corpus_path)], tokenizer_path=str(sp_tokenizer_dir), out_dir=str(ref), options=_opts()
    )
    par = tmp_path / "par"
    prepare(
        [str(corpus_path)],
        tokenizer_path=str(sp_tokenizer_dir),
        out_dir=str(par),
        options=_opts(num_proc=2),
    )
    for f in sorted(p.name for p in ref.iterdir() if p.is_file()):
        assert (ref / f).read_bytes() == (par / f).read_bytes(), f
    small = tmp_path / "small"
    m = prepare(
        [str(corpus_path)],
        tokenizer_path=str(sp_tokenizer_dir),
        out_dir=str(small),
        options=_opts(window=7),
    )
    assert m.num_documents == schema.read_manifest(ref).num_documents
    assert m.num_tokens == schema.read_manifest(ref).num_tokens


def test_spawned_workers_give_the_forked_workers_output(
    tmp_path, corpus_path, sp_tokenizer_dir, monkeypatch
):
    """On Linux, with no Python thread but the main one, the workers are forked holding the
    main process's copy of the saved tokenizer; elsewhere, or when the caller runs threads of
    its own, they are spawned and load it themselves: the same bytes each way, and no
    tokenizer is left behind in the main process for a later prepare to pick up."""
    from data_tools import prepare as prepare_module

    started = []
    get_context = prepare_module.mp.get_context

    def recording(method):
        started.append(method)
        return get_context(method)

    monkeypatch.setattr(prepare_module.mp, "get_context", recording)
    outs = {}
    for case, platform, threads in (
        ("forked", "linux", 1),
        ("threaded caller", "linux", 2),
        ("not linux", "darwin", 1),
    ):
        monkeypatch.setattr(prepare_module.sys, "platform", platform)
        monkeypatch.setattr(prepare_module.threading, "active_count", lambda n=threads: n)
        outs[case] = tmp_path / case.replace(" ", "_")
        prepare(
            [str(corpus_path)],
            tokenizer_path=str(sp_tokenizer_dir),
            out_dir=str(outs[case]),
            options=_opts(num_proc=2),
        )
        assert not prepare_module._WORKER
        # every worker ended and reaped: a spawned pool starts its second worker at the second
        # task, which a copy of the pool's table taken at the first missed (left running)
        assert not prepare_module.mp.active_children(), case
    assert started == ["fork", "spawn", "spawn"]
    forked = outs["forked"]
    for case in ("threaded caller", "not linux"):
        for f in sorted(p.name for p in forked.iterdir() if p.is_file()):
            assert (forked / f).read_bytes() == (outs[case] / f).read_bytes(), (case, f)


@pytest.mark.distributed
def test_ray_data_engine_gives_identical_output(tmp_path, corpus_path, sp_tokenizer_dir):
    ref, ray_out = tmp_path / "ref", tmp_path / "ray"
    prepare(
        [str(corpus_path)], tokenizer_path=str(sp_tokenizer_dir), out_dir=str(ref), options=_opts()
    )
    prepare(
        [str(corpus_path)],
        tokenizer_path=str(sp_tokenizer_dir),
        out_dir=str(ray_out),
        options=_opts(engine="ray", num_proc=2),
    )
    for f in sorted(p.name for p in ref.iterdir() if p.is_file()):
        assert (ref / f).read_bytes() == (ray_out / f).read_bytes(), f


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
bad_messages = st.fixed_dictionaries(
    {
        "messages": st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.sampled_from(["user", "assistant", "system", "robot", 3]),
                    "content": st.one_of(st.text(max_size=30), st.integers(), st.none()),
                }
            ),
            max_size=4,
        )
    }
)
lines = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    bad_messages.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=40).filter(lambda b: b"\n" not in b),
    st.just(json.dumps(RECORDS["prompt"]).encode()),
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(lines, min_size=1, max_size=15))
def test_fuzzed_records_are_packed_or_quarantined_never_crash(
    tmp_path_factory, sp_tokenizer_dir, body
):
    from data_tools.prepare import PrepareError

    tmp = tmp_path_factory.mktemp("fuzz")
    src = tmp / "in.jsonl"
    src.write_bytes(b"\n".join(body) + b"\n")
    nonblank = [i + 1 for i, b in enumerate(body) if b.decode("utf-8", "replace").strip()]
    try:
        m = prepare(
            [str(src)],
            tokenizer_path=str(sp_tokenizer_dir),
            out_dir=str(tmp / "o"),
            options=_opts(),
        )
        good, quarantine = m.num_records - m.quarantined_rows, tmp / "o" / schema.QUARANTINE_NAME
    except PrepareError as e:  # every record bad (or none): a clear error, no output written
        assert ("quarantined" in str(e)) if nonblank else ("no records" in str(e))
        assert not (tmp / "o").exists()
        good, quarantine = 0, tmp / f"o.{schema.QUARANTINE_NAME}"  # kept beside it
    q = [json.loads(x) for x in quarantine.read_text().splitlines()] if nonblank else []
    assert all(r["reason"] and r["source"] == str(src) for r in q)
    assert good + len(q) == len(nonblank)  # each record either trained on or quarantined
    assert {r["line"] for r in q} <= set(nonblank)
