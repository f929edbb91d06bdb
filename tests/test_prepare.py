import json
from pathlib import Path

import pytest

from data_tools import schema
from data_tools.prepare import PrepareError, PrepareOptions, prepare


def test_manifest_and_shards_agree(prepared_dir, corpus_records):
    m = schema.read_manifest(prepared_dir)
    # the file on disk round-trips through the typed Manifest, key for key
    on_disk = json.loads((prepared_dir / schema.MANIFEST_NAME).read_text())
    assert m.to_dict() == on_disk
    assert m.num_documents == len(corpus_records) and m.quarantined_rows == 0
    tables = [schema.open_shard(prepared_dir / s.file) for s in m.shards]
    assert len(tables) > 1  # rows_per_shard=40 splits the corpus
    rows = [r for t in tables for r in t.to_pylist()]
    assert len(rows) == m.num_rows
    assert sum(len(r["input_ids"]) for r in rows) == m.num_tokens
    assert sum(sum(r["loss_mask"]) for r in rows) == m.num_supervised_tokens
    assert sum(len(r["doc_lens"]) for r in rows) == m.num_documents
    for r in rows:
        assert len(r["input_ids"]) == len(r["loss_mask"]) == sum(r["doc_lens"]) <= m.seq_len
    assert m.packing_efficiency == pytest.approx(m.num_tokens / (m.num_rows * m.seq_len))
    for s, t in zip(m.shards, tables, strict=True):
        assert s.num_rows == t.num_rows


def test_shards_load_with_datasets(prepared_dir):
    import datasets

    ds = datasets.load_dataset(
        "arrow", data_files=str(prepared_dir / "shard-*.arrow"), split="train"
    )
    m = schema.read_manifest(prepared_dir)
    assert len(ds) == m.num_rows
    assert set(ds.column_names) == {"input_ids", "loss_mask", "doc_lens"}


def test_bad_lines_are_quarantined_not_dropped(tmp_path, sp_tokenizer_dir):
    good = {
        "messages": [
            {"role": "user", "content": "What is 1 plus 1?"},
            {"role": "assistant", "content": "1 plus 1 is 2."},
        ]
    }
    lines = [
        json.dumps(good).encode(),
        b"{not json",
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(),
        b"\xff\xfe bad utf8",
        json.dumps({"messages": [{"role": "narrator", "content": "x"}]}).encode(),
        b"",
        json.dumps(good).encode(),
    ]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    m = prepare(
        [str(src)],
        tokenizer_path=str(sp_tokenizer_dir),
        out_dir=str(out),
        options=PrepareOptions(seq_len=64),
    )
    assert m.num_records == 6 and m.num_documents == 2 and m.quarantined_rows == 4
    q = [json.loads(line) for line in (out / schema.QUARANTINE_NAME).read_text().splitlines()]
    assert [row["line"] for row in q] == [2, 3, 4, 5]
    assert all(row["source"] == str(src) for row in q)
    reasons = " | ".join(row["reason"] for row in q)
    for expected in ("malformed JSON", "no assistant turn", "invalid UTF-8", "narrator"):
        assert expected in reasons
    with pytest.raises(PrepareError, match="max-bad-fraction"):
        prepare(
            [str(src)],
            tokenizer_path=str(sp_tokenizer_dir),
            out_dir=str(tmp_path / "o2"),
            options=PrepareOptions(seq_len=64, max_bad_fraction=0.5),
        )


def test_overflow_truncate_and_quarantine(tmp_path, sp_tokenizer_dir):
    long = {
        "messages": [
            {"role": "user", "content": "What is the capital of France? " * 20},
            {"role": "assistant", "content": "Paris."},
        ]
    }
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(long) + "\n")
    # truncation cuts the reply away entirely: zero supervised tokens -> quarantined
    with pytest.raises(PrepareError, match="every record was quarantined"):
        prepare(
            [str(src)],
            tokenizer_path=str(sp_tokenizer_dir),
            out_dir=str(tmp_path / "a"),
            options=PrepareOptions(seq_len=32),
        )
    assert not (tmp_path / "a").exists()  # no output, and the bad records beside it
    q = (tmp_path / f"a.{schema.QUARANTINE_NAME}").read_text()
    assert "zero supervised tokens" in q
    with pytest.raises(PrepareError):
        prepare(
            [str(src)],
            tokenizer_path=str(sp_tokenizer_dir),
            out_dir=str(tmp_path / "b"),
            options=PrepareOptions(seq_len=32, overflow="quarantine"),
        )
    assert "too long" in (tmp_path / f"b.{schema.QUARANTINE_NAME}").read_text()


def test_same_inputs_give_byte_identical_output(tmp_path, corpus_path, sp_tokenizer_dir):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        prepare(
            [str(corpus_path)],
            tokenizer_path=str(sp_tokenizer_dir),
            out_dir=str(out),
            options=PrepareOptions(seq_len=128, rows_per_shard=40),
        )
        outs.append(out)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*") if p.is_file())
    for f in files:
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f


def test_missing_input_and_tokenizer_errors(tmp_path, sp_tokenizer_dir):
    with pytest.raises(PrepareError, match="matches no file"):
        prepare(
            [str(tmp_path / "*.jsonl")],
            tokenizer_path=str(sp_tokenizer_dir),
            out_dir=str(tmp_path / "o"),
            options=PrepareOptions(seq_len=64),
        )
    (tmp_path / "x.jsonl").write_text("{}\n")
    with pytest.raises(PrepareError, match="neither a Hugging Face tokenizer directory"):
        prepare(
            [str(tmp_path / "x.jsonl")],
            tokenizer_path=str(tmp_path / "nope"),
            out_dir=str(tmp_path / "o"),
            options=PrepareOptions(seq_len=64),
        )


def test_packing_none_keeps_one_document_per_row(
    tmp_path, corpus_path, prepared_dir, sp_tokenizer_dir
):
    out = tmp_path / "unpacked"
    m = prepare(
        [str(corpus_path)],
        tokenizer_path=str(sp_tokenizer_dir),
        out_dir=str(out),
        options=PrepareOptions(seq_len=128, rows_per_shard=40, packing="none"),
    )
    packed = schema.read_manifest(prepared_dir)
    assert m.options["packing"] == "none" and packed.options["packing"] == "bfd"
    assert m.num_rows == m.num_documents == packed.num_documents
    for key in ("num_tokens", "num_supervised_tokens"):
        assert getattr(m, key) == getattr(packed, key)
    rows = [r for s in m.shards for r in schema.open_shard(out / s.file).to_pylist()]
    assert all(len(r["doc_lens"]) == 1 for r in rows)
    assert m.packing_efficiency < packed.packing_efficiency
    with pytest.raises(PrepareError, match="--packing"):
        PrepareOptions(seq_len=128, packing="first-fit")


@pytest.mark.parametrize("which", ["sentencepiece", "byte-level-bpe"])
def test_workers_tokenizer_gives_the_main_process_results(
    tmp_path, which, sp_tokenizer_dir, bpe_tokenizer_dir, corpus_records
):
    """Workers load the saved copy as the generic fast class; same template, special tokens,
    vocabulary and processed records as the tokenizer the main process loaded."""
    from data_tools.chat import resolve_template
    from data_tools.prepare import load_tokenizer, process_records, worker_tokenizer

    main = load_tokenizer(sp_tokenizer_dir if which == "sentencepiece" else bpe_tokenizer_dir)
    main.chat_template = resolve_template(main, None)
    main.save_pretrained(str(tmp_path / "tok"))
    worker = worker_tokenizer(tmp_path / "tok")
    assert worker.special_tokens_map == main.special_tokens_map
    assert worker.chat_template == main.chat_template and worker.get_vocab() == main.get_vocab()
    items = [("chat.jsonl", i + 1, json.dumps(r), r) for i, r in enumerate(corpus_records)]
    options = PrepareOptions(seq_len=128)
    ours = process_records(items, worker, worker.chat_template, options)
    theirs = process_records(items, main, main.chat_template, options)
    assert len(ours) == len(theirs) == len(items)
    for a, b in zip(ours, theirs, strict=True):
        assert a.keys() == b.keys() and a["ok"] and b["ok"]
        assert [(i.tolist(), m.tolist()) for i, m in a["pieces"]] == [
            (i.tolist(), m.tolist()) for i, m in b["pieces"]
        ]


def test_tokenizer_fingerprint_is_the_hash_manifests_already_hold(sp_tokenizer_dir):
    """Manifests written before hold the hash of the (token, id) pairs sorted as pairs; the
    faster sort by token must give the same bytes, or a training set and an eval set prepared
    a release apart would be told their tokenizers differ."""
    import hashlib

    from data_tools.prepare import load_tokenizer, tokenizer_fingerprint

    tok = load_tokenizer(sp_tokenizer_dir)
    template = "{{ messages }}"
    before = hashlib.sha256()
    before.update(json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode())
    before.update(template.encode())
    assert tokenizer_fingerprint(tok, template) == before.hexdigest()


def test_the_fingerprint_computed_aside_is_the_one_computed_inline(
    tmp_path, corpus_path, sp_tokenizer_dir, monkeypatch
):
    """The manifest's tokenizer fingerprint comes from a forked child (Linux, no thread of the
    caller's); with a thread running it is computed inline; and when the child sends nothing,
    inline too. The same hash every way, and no child is left behind."""
    import contextlib
    import os
    import threading

    import psutil

    from data_tools import prepare as prepare_module
    from data_tools.prepare import load_tokenizer, tokenizer_fingerprint

    def fingerprint_of(name: str) -> str:
        out = tmp_path / name
        prepare(
            [str(corpus_path)],
            tokenizer_path=str(sp_tokenizer_dir),
            out_dir=str(out),
            options=PrepareOptions(seq_len=128),
        )
        return schema.read_manifest(out).tokenizer.fingerprint

    forks: list[int] = []  # the children prepare forked (a zombie an earlier test left is not ours)
    fork = prepare_module.os.fork

    def recorded_fork() -> int:
        pid = fork()
        if pid:
            forks.append(pid)
        return pid

    def left_behind() -> list[int]:
        def ours(pid: int) -> bool:
            with contextlib.suppress(psutil.NoSuchProcess):
                return psutil.Process(pid).ppid() == os.getpid()
            return False

        return [pid for pid in forks if ours(pid)]

    monkeypatch.setattr(prepare_module.os, "fork", recorded_fork)
    with monkeypatch.context() as m:  # a thread an earlier test left must not hide the fork
        m.setattr(prepare_module.threading, "active_count", lambda: 1)
        forked = fingerprint_of("forked")
    assert forks  # the child was forked, and none is left
    assert not left_behind()
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        inline = fingerprint_of("inline")
    finally:
        stop.set()
        thread.join()
    reap = prepare_module._Aside._reap  # reaped, but as if the child sent nothing
    monkeypatch.setattr(prepare_module._Aside, "_reap", lambda self: reap(self) and b"")
    with monkeypatch.context() as m:
        m.setattr(prepare_module.threading, "active_count", lambda: 1)
        forks.clear()
        fallback = fingerprint_of("fallback")
    assert forks
    assert not left_behind()
    tok = load_tokenizer(tmp_path / "forked" / schema.TOKENIZER_DIR)
    assert forked == inline == fallback == tokenizer_fingerprint(tok, tok.chat_template)


def test_a_child_that_never_answers_is_ended_and_the_value_computed_here(
    sp_tokenizer_dir, monkeypatch
):
    """A child stuck (say, on a lock another thread held when it was forked) must not hold
    prepare's end: after WAIT it is killed, reaped, and the value is computed inline."""
    import os
    import time

    import psutil

    from data_tools import prepare as prepare_module
    from data_tools.prepare import load_tokenizer, tokenizer_fingerprint

    tok = load_tokenizer(sp_tokenizer_dir)
    parent = os.getpid()

    def stuck_in_a_child(tokenizer, template):
        if os.getpid() != parent:
            time.sleep(3600)
        return tokenizer_fingerprint(tokenizer, template)

    monkeypatch.setattr(prepare_module._Aside, "WAIT", 0.5)
    monkeypatch.setattr(prepare_module.threading, "active_count", lambda: 1)
    with prepare_module._Aside(stuck_in_a_child, tok, "t") as fingerprint:
        child = fingerprint.pid
        assert child > 0
        assert fingerprint.result() == tokenizer_fingerprint(tok, "t")
    assert not psutil.pid_exists(child) or psutil.Process(child).ppid() != os.getpid()


def _in_a_child_only(fn):
    """fn in the process that makes this, a failure in any other (a forked child)."""
    import os

    parent = os.getpid()

    def run(*args):
        if os.getpid() != parent:
            raise RuntimeError("failed in the child")
        return fn(*args)

    return run


def test_a_value_computed_aside_comes_back_whole_or_is_computed_here(monkeypatch):
    """Larger than a pipe holds, it comes back whole; a child that fails, or one never asked
    for, leaves nothing behind; without a fork (threads running) it is computed here."""
    import os

    import psutil

    from data_tools import prepare as prepare_module

    def ours(pid: int) -> bool:
        return psutil.pid_exists(pid) and psutil.Process(pid).ppid() == os.getpid()

    monkeypatch.setattr(prepare_module.threading, "active_count", lambda: 1)
    big = set(range(0, 2_000_000, 7))  # a pickle of ~1.5 MB
    aside = prepare_module._Aside(lambda n: {i for i in big if i % n}, 3)
    assert aside.pid > 0 and aside() == {i for i in big if i % 3}
    assert not ours(aside.pid) and aside() is aside.result()
    failed = prepare_module._Aside(_in_a_child_only(lambda: "here"))
    child = failed.pid
    assert child > 0 and failed.result() == "here" and not ours(child)
    forgotten = prepare_module._Aside(sorted, [3, 1, 2])
    child = forgotten.pid
    del forgotten
    assert not ours(child)
    monkeypatch.setattr(prepare_module.threading, "active_count", lambda: 2)
    here = prepare_module._Aside(sorted, [3, 1, 2])
    assert here.pid == 0 and here() == [1, 2, 3]


def test_the_encoder_plan_made_aside_is_used_and_changes_nothing(
    tmp_path, corpus_path, bpe_tokenizer_dir, monkeypatch
):
    """With a byte-level BPE tokenizer the plan of tiktoken's road is made in a child from the
    tokenizer's own file while the main process loads it; it fits the saved copy, so the main
    process does not make it again; the shards are those of a run that made it itself."""
    from data_tools import encode
    from data_tools import prepare as prepare_module
    from data_tools.prepare import load_tokenizer, worker_tokenizer

    assert encode.Encoder(load_tokenizer(bpe_tokenizer_dir).backend_tokenizer).path.ranked

    def run(name: str, num_proc: int) -> Path:
        prepare(
            [str(corpus_path)],
            tokenizer_path=str(bpe_tokenizer_dir),
            out_dir=str(tmp_path / name),
            options=PrepareOptions(seq_len=128, num_proc=num_proc),
        )
        return tmp_path / name

    made_here = []
    plan = encode._Ranked.plan
    monkeypatch.setattr(
        encode._Ranked, "plan", staticmethod(lambda *a: made_here.append(1) or plan(*a))
    )
    with monkeypatch.context() as m:
        m.setattr(prepare_module.threading, "active_count", lambda: 1)
        aside = run("aside", 2)
    assert not made_here  # the child's plan fitted (the child's own calls are not counted here)
    with monkeypatch.context() as m:
        m.setattr(prepare_module.threading, "active_count", lambda: 2)  # no fork: made here
        here = run("here", 1)
    assert made_here
    assert (aside / "shard-00000.arrow").read_bytes() == (here / "shard-00000.arrow").read_bytes()
    assert encode.ranked_plan(worker_tokenizer(aside / "tokenizer").backend_tokenizer).key == (
        encode.ranked_plan(load_tokenizer(bpe_tokenizer_dir).backend_tokenizer).key
    )


def test_a_worker_that_dies_fails_the_run_instead_of_hanging(
    tmp_path, corpus_records, sp_tokenizer_dir, monkeypatch
):
    """A worker killed mid-run (the out-of-memory killer, say): multiprocessing.Pool waited
    for its task for ever; now the run fails at once, naming where, writes nothing and leaves
    no process behind."""
    import contextlib
    import os
    import signal

    import psutil

    from data_tools import prepare as prepare_module

    records = [*corpus_records] * 4
    records[700] = {**records[700], "die": True}
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    process_batch = prepare_module._process_batch

    def dies_on_the_marked_record(items):
        if any('"die"' in raw for _, _, raw, _ in items):
            os.kill(os.getpid(), signal.SIGKILL)
        return process_batch(items)

    monkeypatch.setattr(prepare_module, "_process_batch", dies_on_the_marked_record)
    monkeypatch.setattr(prepare_module.threading, "active_count", lambda: 1)  # forked workers
    # direct children: the background op build (a child from before) may start compilers
    before = {p.pid for p in psutil.Process().children()}

    def hung(*_):  # what this run did before: wait for the dead worker's task for ever
        raise TimeoutError("prepare still waits for a dead worker")

    with (
        pytest.raises(PrepareError, match=r"worker process ended abruptly .* from \S+ line \d+;"),
        contextlib.ExitStack() as stack,
    ):
        stack.callback(signal.signal, signal.SIGALRM, signal.signal(signal.SIGALRM, hung))
        stack.callback(signal.alarm, 0)
        signal.alarm(300)
        prepare(
            [str(path)],
            tokenizer_path=str(sp_tokenizer_dir),
            out_dir=str(tmp_path / "out"),
            options=PrepareOptions(seq_len=128, num_proc=2),
        )
    assert not (tmp_path / "out").exists()
    assert not [p.pid for p in psutil.Process().children() if p.pid not in before]
