"""No record crashes `prepare`: whatever a record holds, it is trained on or quarantined with
its source, line (or row) and a reason, and the good records beside it are trained on.

Fuzzed from the bytes up, mixed with good records, in JSONL, JSON and Parquet inputs: invalid
UTF-8, lone surrogates (as JSON escapes and as raw bytes), NUL, numbers / booleans / null /
lists / objects where strings, lists and objects go, empty replies. What hypothesis should not
generate is written out: a 10 MB line, 100000 nested lists, a 5000-digit integer, a Parquet
string column that is not UTF-8, a text the tokenizer rejects in the middle of a batch.
"""

import copy
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_tools import schema
from data_tools.prepare import PrepareError, PrepareOptions, prepare
from sftscale.cli import main

BAD_BYTE = "\ue0ff"  # stands for a byte that is not UTF-8: the writers put b"\xff" in its place
GOOD = {"prompt": "What is 2 plus 2?", "completion": "2 plus 2 is 4."}
DEEP = "[" * 100_000 + "]" * 100_000


def _run(tmp: Path, inputs: list[Path], tokenizer: Path, **kw) -> tuple[dict | None, list[dict]]:
    """prepare() on `inputs`; the manifest (None when every record was bad) and the quarantine."""
    out = tmp / "out"
    seq_len = kw.pop("seq_len", 256)
    options = PrepareOptions(seq_len=seq_len, chat_template="chatml", progress=False, **kw)
    try:
        m = prepare(
            [str(p) for p in inputs],
            tokenizer_path=str(tokenizer),
            out_dir=str(out),
            options=options,
        )
    except PrepareError as e:
        if "every record was quarantined" not in str(e):
            raise
        m = None
    # a prepare that writes no output keeps its bad records beside the output it did not write
    quarantine = out / schema.QUARANTINE_NAME if m else tmp / f"out.{schema.QUARANTINE_NAME}"
    # lines end at "\n" only: a raw U+0085 or U+2028 inside a string is not a line break
    lines = quarantine.read_text(encoding="utf-8").split("\n")[:-1]
    return m, [json.loads(line) for line in lines]


def _encode(record, *, escape: bool) -> bytes:
    """A record as JSON bytes: lone surrogates as \\udXXX escapes (escape) or as the raw bytes
    UTF-8 forbids (not escape); BAD_BYTE as b"\\xff"."""
    if escape:
        return json.dumps(record).encode().replace(b"\\ue0ff", b"\xff")
    text = json.dumps(record, ensure_ascii=False)
    return text.encode("utf-8", "surrogatepass").replace(BAD_BYTE.encode(), b"\xff")


# ---- records: good ones, and good ones broken in one place ------------------------------------

# A good text: a letter, then any characters but surrogates and BAD_BYTE (NUL included).
texts = st.builds(
    str.__add__,
    st.sampled_from("AbQz"),
    st.text(st.characters(codec="utf-8", exclude_characters=[BAD_BYTE]), max_size=8)
    | st.just("\x00 NUL"),
)


def _messages(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


good_records = st.one_of(
    st.builds(lambda q, a: {"messages": _messages(q, a)}, texts, texts),
    st.builds(lambda q, a: {"prompt": q, "completion": a}, texts, texts),
    st.builds(lambda q, a: {"instruction": q, "input": "", "output": a}, texts, texts),
    st.builds(
        lambda s, q, a: {
            "conversations": [
                {"from": "system", "value": s},
                {"from": "human", "value": q},
                {"from": "gpt", "value": a},
            ]
        },
        texts,
        texts,
        texts,
    ),
    st.builds(lambda t: {"text": t}, texts),
)
REPLY = {  # a record's first field -> where its (last) reply is
    "messages": ("messages", 1, "content"),
    "prompt": ("completion",),
    "instruction": ("output",),
    "conversations": ("conversations", 2, "value"),
    "text": ("text",),
}
wrong_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _paths(value, path=()):
    """Every place in a record: (path, value there)."""
    yield path, value
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        items = ()
    for k, v in items:
        yield from _paths(v, (*path, k))


def _set(record, path, value):
    if not path:
        return value
    record = copy.deepcopy(record)
    at = record
    for k in path[:-1]:
        at = at[k]
    at[path[-1]] = value
    return record


@st.composite
def bad_records(draw) -> tuple[object, str]:
    """(a good record broken in one place, the start of the reason expected; "" for any)."""
    record = draw(good_records)
    reply = REPLY[next(iter(record))]
    places = list(_paths(record))
    contents = [
        (p, v) for p, v in places if isinstance(v, str) and p[-1] not in ("role", "from", "input")
    ]
    how = draw(st.sampled_from(["surrogate", "bad byte", "wrong type", "empty reply"]))
    if how in ("surrogate", "bad byte"):  # in a string the record is trained on
        path, text = draw(st.sampled_from(contents))
        at = draw(st.integers(0, len(text)))
        odd = BAD_BYTE if how == "bad byte" else chr(draw(st.integers(0xD800, 0xDFFF)))
        return _set(record, path, text[:at] + odd + text[at:]), "invalid UTF-8"
    if how == "empty reply":
        # whitespace is a text, but no reply
        empty = "" if reply == ("text",) else draw(st.sampled_from(["", " ", "\n\t "]))
        return _set(record, reply, empty), "empty"
    # anything that is not what goes there: the record itself, a list, a message, a string
    path, old = draw(st.sampled_from([(p, v) for p, v in places if p[-1:] != ("input",)]))
    new = draw(wrong_values.filter(lambda v: type(v) is not type(old)))
    return _set(record, path, new), ""


def _not_blank(line: bytes) -> bool:
    try:
        return bool(line.decode("utf-8").strip())
    except UnicodeDecodeError:
        return True  # quarantined as invalid UTF-8, blank or not


# JSONL only: lines that are not JSON at all (blank lines are no records, so none is blank).
garbage_lines = st.one_of(
    st.binary(min_size=1, max_size=30).filter(lambda b: b"\n" not in b and _not_blank(b)),
    st.sampled_from([b"\x00", b'{"prompt": "a\x00", "completion": "b"}', b"\xff\xfe", b"["]),
)


entries = st.lists(good_records.map(lambda r: (r, None)) | bad_records(), min_size=1, max_size=8)
jsonl_entries = st.lists(
    good_records.map(lambda r: (r, None)) | bad_records() | garbage_lines.map(lambda b: (b, "")),
    min_size=1,
    max_size=10,
)  # (record, None): good; (record, reason): bad, quarantined with a reason that starts so


def _write_parquet(tmp: Path, records: list) -> list[tuple[Path, list]]:
    """Parquet files of the records Arrow can hold, one file per run of records of one schema
    (a column has one type); the files and the entries each holds, in order."""
    runs: list[tuple[pa.Schema, list]] = []
    for entry in records:
        try:
            kind = pa.Table.from_pylist([entry[0]]).schema
        except Exception:  # not a table row: a list, a surrogate Arrow will not encode, ...
            continue
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(entry)
        else:
            runs.append((kind, [entry]))
    files = []
    for k, (_, run) in enumerate(runs):
        path = tmp / f"part-{k:03d}.parquet"
        try:
            pq.write_table(pa.Table.from_pylist([e[0] for e in run]), path)
        except Exception:  # e.g. a struct without fields: Parquet cannot store it
            continue
        files.append((path, run))
    return files


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    jsonl=jsonl_entries,
    json_records=entries,
    parquet_records=entries,
    escape=st.booleans(),
    wrapped=st.booleans(),
    tokenizer=st.sampled_from(["sentencepiece", "byte-level-bpe"]),
)
def test_fuzzed_records_are_trained_or_quarantined_never_crash(
    tmp_path_factory,
    sp_tokenizer_dir,
    bpe_tokenizer_dir,
    jsonl,
    json_records,
    parquet_records,
    escape,
    wrapped,
    tokenizer,
):
    tmp = tmp_path_factory.mktemp("fuzz")
    jsonl = [*jsonl, (GOOD, None)]  # one good record, so that the run writes shards
    files = [(tmp / "a.jsonl", jsonl), (tmp / "b.json", json_records)]
    lines = [e[0] if isinstance(e[0], bytes) else _encode(e[0], escape=escape) for e in jsonl]
    files[0][0].write_bytes(b"\n".join(lines) + b"\n")
    body = b"[" + b",\n".join(_encode(e[0], escape=escape) for e in json_records) + b"]"
    files[1][0].write_bytes(b'{"meta": {"n": [1]}, "records": ' + body + b"}" if wrapped else body)
    files += _write_parquet(
        tmp, [e for e in parquet_records if BAD_BYTE not in json.dumps(e[0], ensure_ascii=False)]
    )
    tok = sp_tokenizer_dir if tokenizer == "sentencepiece" else bpe_tokenizer_dir

    m, q = _run(tmp, [path for path, _ in files], tok)

    expected = [
        (str(path), i) for path, es in files for i, (_, bad) in enumerate(es, 1) if bad is not None
    ]
    assert [(r["source"], r["line"]) for r in q] == expected  # every bad record, in input order
    reasons = {(str(path), i): bad for path, es in files for i, (_, bad) in enumerate(es, 1)}
    for r in q:
        assert r["reason"] and r["reason"].startswith(reasons[r["source"], r["line"]]), r["reason"]
    records = sum(len(es) for _, es in files)
    assert m.num_records == records and m.quarantined_rows == len(q)
    assert m.num_documents == records - len(q)  # each good record is one document


def _nested(depth: int, inner: str = "[]") -> str:
    return "[" * depth + inner + "]" * depth


def test_huge_and_deep_records_in_jsonl_and_json(tmp_path, sp_tokenizer_dir):
    big = "x" * 10_000_000
    jsonl = [  # (line, start of the reason; None: trained on)
        (json.dumps(GOOD), None),
        (json.dumps({"messages": big}), "'messages' is a str"),  # a 10 MB line
        ('{"prompt": "' + big, "malformed JSON"),  # a 10 MB line never closed
        (DEEP, "nested too deeply"),
        ('{"messages": [{"role": "user", "content": ' + DEEP + "}]}", "nested too deeply"),
        ("1" * 5000, "unreadable JSON"),
        ('{"prompt": "a", "completion": ' + "7" * 5000 + "}", "unreadable JSON"),
        (
            '{"messages": [{"role": "user", "content": "\\ud800 x"}, {"role":"assistant","content":"hi"}]}',
            "invalid UTF-8",
        ),
        (json.dumps({"prompt": "NUL \u0000 inside", "completion": "fine"}), None),
        ("\x00", "malformed JSON"),
        (json.dumps(GOOD), None),
    ]
    (tmp_path / "a.jsonl").write_text("".join(line + "\n" for line, _ in jsonl))
    records = [  # .json records as text (a byte that is not UTF-8 written as \ue0ff)
        (json.dumps(GOOD), None),
        (DEEP, "nested too deeply"),
        ('{"prompt": "a", "completion": ' + _nested(3000) + "}", "nested too deeply"),
        (_nested(600), "record is a list"),  # json reads it; pickle would not (workers)
        (f'{{"id": "x{BAD_BYTE}", "prompt": "Hi", "completion": "Hello."}}', None),  # not read
        (f'{{"prompt": "a{BAD_BYTE}", "completion": "b"}}', "invalid UTF-8"),
        ("-" + "1" * 5000, "unreadable JSON"),
        (json.dumps({"messages": big}), "'messages' is a str"),
        (json.dumps(GOOD), None),
    ]
    body = ("[" + ",\n".join(text for text, _ in records) + "]").encode()
    (tmp_path / "b.json").write_bytes(body.replace(BAD_BYTE.encode(), b"\xff"))
    deep_meta = '{"a": ' * 100_000 + "1" + "}" * 100_000  # deep, but no record is
    wrapped = b'{"meta": ' + deep_meta.encode() + b', "records": ' + body + b', "n": 9}'
    (tmp_path / "c.json").write_bytes(wrapped.replace(BAD_BYTE.encode(), b"\xff"))
    files = [("a.jsonl", jsonl), ("b.json", records), ("c.json", records)]

    m, q = _run(tmp_path, [tmp_path / f for f, _ in files], sp_tokenizer_dir)

    expected = [
        (str(tmp_path / f), i, bad) for f, es in files for i, (_, bad) in enumerate(es, 1) if bad
    ]
    assert [(r["source"], r["line"]) for r in q] == [e[:2] for e in expected]
    for r, (_, _, reason) in zip(q, expected, strict=True):
        assert r["reason"].startswith(reason), r["reason"]
    assert q[0]["raw"] == json.dumps({"messages": big})  # the quarantine holds the record itself
    assert m.num_documents == m.num_records - len(q) == 3 + 3 + 3


def test_json_records_nested_deep_reach_worker_processes(tmp_path, sp_tokenizer_dir):
    """Records travel to workers as text: pickle fails on lists nested ~500 deep."""
    deep_reply = '{"prompt": "Hi", "completion": ' + _nested(700, '"x"') + "}"
    (tmp_path / "a.json").write_text(f"[{json.dumps(GOOD)}, {_nested(700)}, {deep_reply}]")
    m, q = _run(tmp_path, [tmp_path / "a.json"], sp_tokenizer_dir, num_proc=2)
    assert [(r["line"], r["reason"].split(":")[0]) for r in q] == [
        (2, "record is a list, expected a JSON object"),
        (3, "field 'completion' is a list, expected a string"),
    ]
    assert m.num_documents == 1


def test_parquet_strings_that_are_not_utf8_and_nested_lists(tmp_path, sp_tokenizer_dir):
    """Arrow does not check the UTF-8 of a string column another tool wrote: the rows holding
    bad bytes are quarantined, the rest of their batch is trained on. Lists nest in Parquet up
    to its schema depth limit; a deeper file cannot be read at all, and the error names it."""
    prompts = [b"What is 2 plus 2?", b"\xff\xfe", b"ok \xed\xa0\x80", b"Hi"]
    table = pa.table(
        {
            "prompt": pa.array(prompts, pa.binary()).view(pa.string()),
            "completion": ["4.", "x", "y", "Hello."],
        }
    )
    pq.write_table(table, tmp_path / "a.parquet")
    deep = "x"
    for _ in range(40):
        deep = [deep]
    pq.write_table(pa.Table.from_pylist([{"messages": deep}] * 2), tmp_path / "b.parquet")

    m, q = _run(tmp_path, [tmp_path / "a.parquet", tmp_path / "b.parquet"], sp_tokenizer_dir)

    assert [(Path(r["source"]).name, r["line"], r["reason"]) for r in q] == [
        ("a.parquet", 2, "invalid UTF-8: bytes that are not UTF-8 in prompt"),
        ("a.parquet", 3, "invalid UTF-8: bytes that are not UTF-8 in prompt"),
        ("b.parquet", 1, "messages[0] is a list, expected an object"),
        ("b.parquet", 2, "messages[0] is a list, expected an object"),
    ]
    assert json.loads(q[0]["raw"]) == {"prompt": "<not UTF-8>", "completion": "x"}
    assert m.num_documents == 2
    for _ in range(20):
        deep = [deep]
    pq.write_table(pa.Table.from_pylist([{"messages": deep}]), tmp_path / "c.parquet")
    with pytest.raises(PrepareError, match=r"c\.parquet: cannot read Parquet"):
        _run(tmp_path, [tmp_path / "a.parquet", tmp_path / "c.parquet"], sp_tokenizer_dir)


def test_a_text_the_tokenizer_rejects_costs_only_its_record(tmp_path, sp_tokenizer):
    """The batch is tokenized in one call; when that call fails, record by record. A template
    that writes a lone surrogate for '@' makes the tokenizer reject a text after rendering
    (normalize rejects surrogates in the records themselves, before)."""
    from data_tools.chat import BUILTIN_TEMPLATES

    tok = copy.deepcopy(sp_tokenizer)
    chatml = BUILTIN_TEMPLATES["chatml"]
    tok.chat_template = chatml.replace(
        "message['content']", "(message['content'] | replace('@', '\\ud800'))"
    )
    tok.save_pretrained(str(tmp_path / "tok"))
    good = [
        {"prompt": f"What is {i} plus 1?", "completion": f"{i} plus 1 is {i + 1}."}
        for i in range(6)
    ]
    bad = {"prompt": "@", "completion": "b"}
    for name, records in (("a", [*good[:3], bad, *good[3:]]), ("ref", good)):
        src = tmp_path / f"{name}.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in records))
        opts = PrepareOptions(seq_len=64, progress=False)
        prepare(
            [str(src)],
            tokenizer_path=str(tmp_path / "tok"),
            out_dir=str(tmp_path / name),
            options=opts,
        )

    q = [json.loads(x) for x in (tmp_path / "a" / schema.QUARANTINE_NAME).open()]
    assert [(r["line"], r["reason"].split(":")[0]) for r in q] == [(4, "cannot tokenize")]
    # the Rust encoder's TypeError, or the fast path's (a SentencePiece model here) clearer
    # "surrogates not allowed"
    assert "TypeError" in q[0]["reason"] or "surrogates not allowed" in q[0]["reason"]
    m = schema.read_manifest(tmp_path / "a")
    assert m.num_documents == 6
    for shard in m.shards:  # the other records' ids are the batched call's, to the byte
        a, ref = (tmp_path / name / shard.file for name in ("a", "ref"))
        assert a.read_bytes() == ref.read_bytes()


def test_quarantine_line_with_a_lone_surrogate_reads_back(tmp_path, sp_tokenizer_dir):
    """A .json record holding a lone surrogate cannot be written to a UTF-8 file as it is: its
    quarantine line is written with JSON escapes, which read back to the same record."""
    record = {"prompt": "a\ud800", "completion": "b"}
    (tmp_path / "a.json").write_text(json.dumps([GOOD, record]))  # \ud800 as an escape
    _, q = _run(tmp_path, [tmp_path / "a.json"], sp_tokenizer_dir)
    assert json.loads(q[0]["raw"]) == record and q[0]["line"] == 2
    assert (
        q[0]["reason"]
        == "invalid UTF-8: lone surrogate (a \\udXXX escape or a non-UTF-8 byte) in prompt"
    )


EMPTY_REPLIES = [
    {"prompt": "", "completion": ""},
    {"prompt": "Say nothing.", "completion": " \n"},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
    {
        "conversations": [
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello."},
            {"from": "human", "value": "And?"},
            {"from": "gpt", "value": "\t"},
        ]
    },
    {"instruction": "Stay silent.", "output": ""},
]


def test_empty_replies_are_quarantined_unless_kept(tmp_path, sp_tokenizer_dir):
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [GOOD, *EMPTY_REPLIES]))
    m, q = _run(tmp_path / "default", [src], sp_tokenizer_dir)
    assert [r["line"] for r in q] == [2, 3, 4, 5, 6]
    assert {r["reason"].split(":")[0] for r in q} == {"empty assistant turn"}
    assert (
        "message 3 is whitespace only" in q[3]["reason"]
        and "--keep-empty-replies" in q[0]["reason"]
    )
    assert m.quarantine_reasons == {"empty assistant turn": 5} and m.num_documents == 1

    m, q = _run(tmp_path / "kept", [src], sp_tokenizer_dir, keep_empty_replies=True)
    assert q == [] and m.num_documents == 6 and m.options["keep_empty_replies"] is True
    # from the command line
    out = tmp_path / "cli"
    argv = [
        "prepare",
        str(src),
        "--tokenizer",
        str(sp_tokenizer_dir),
        "--seq-len",
        "64",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0 and schema.read_manifest(out).num_documents == 1
    assert main([*argv, "--keep-empty-replies"]) == 0
    assert schema.read_manifest(out).num_documents == 6
