"""Every record is bounded: its size as read (JSONL, .json, Parquet), its messages and its
tokens. A record over a bound is quarantined with the bound named, without being read whole;
the records around it are trained on."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools import schema
from data_tools.formats import iter_records
from data_tools.jsonstream import json_records
from data_tools.prepare import PrepareOptions, prepare

REPO = Path(__file__).resolve().parents[1]
GOOD = {"prompt": "What is 2 plus 2?", "completion": "2 plus 2 is 4."}
MB100 = 100 << 20


def _write_100mb(path: Path) -> None:
    """GOOD, a 100 MB record, GOOD: as JSONL lines or as a .json list, written in pieces."""
    head = b'{"prompt": "big", "completion": "'
    with open(path, "wb") as f:
        f.write(b"[" if path.suffix == ".json" else b"")
        f.write(json.dumps(GOOD).encode() + (b"," if path.suffix == ".json" else b"\n"))
        f.write(head)
        for _ in range(MB100 >> 20):
            f.write(b"x" * (1 << 20))
        f.write(b'"}' + (b"," if path.suffix == ".json" else b"\n"))
        f.write(json.dumps(GOOD).encode() + (b"]" if path.suffix == ".json" else b"\n"))


# Prepare in a child, whose peak RSS is its own: the 100 MB record must not be held in memory.
PEAK = textwrap.dedent(
    """
    import json, resource, sys
    from data_tools.prepare import PrepareOptions, prepare
    m = prepare([sys.argv[1]], tokenizer_path=sys.argv[2], out_dir=sys.argv[3],
                options=PrepareOptions(seq_len=64, chat_template="chatml", progress=False))
    print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "documents": m.num_documents, "quarantined": m.quarantined_rows}))
    """
)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_100mb_record_is_quarantined_without_being_read_whole(tmp_path, sp_tokenizer_dir, suffix):
    small, big = tmp_path / f"small{suffix}", tmp_path / f"big{suffix}"
    small.write_text(
        json.dumps([GOOD, GOOD, GOOD]) if suffix == ".json" else (json.dumps(GOOD) + "\n") * 3
    )
    _write_100mb(big)
    peaks = {}
    for src in (small, big):
        out = tmp_path / f"out-{src.stem}"
        child = subprocess.run(
            [sys.executable, "-c", PEAK, str(src), str(sp_tokenizer_dir), str(out)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert child.returncode == 0, child.stderr[-3000:]
        peaks[src.stem] = json.loads(child.stdout.splitlines()[-1])
    assert peaks["big"]["documents"] == 2 and peaks["big"]["quarantined"] == 1
    # the default bound (16 MiB) is read at most, never the 100 MB
    assert peaks["big"]["peak_mib"] - peaks["small"]["peak_mib"] < 80, peaks
    q = json.loads((tmp_path / "out-big" / schema.QUARANTINE_NAME).read_text())
    assert q["line"] == 2 and q["reason"].startswith("too large:"), q["reason"]
    assert "--max-record-bytes 16777216" in q["reason"]
    assert q["raw"].startswith('{"prompt": "big", "completion": "xxx') and len(q["raw"]) < 1000


def test_a_large_record_under_the_bound_is_read_whole(tmp_path):
    """The stream reads a record across many chunks, and a record at the bound is kept."""
    record = {"prompt": "p" * 3_000_000, "completion": "c"}
    text = json.dumps(record)
    path = tmp_path / "a.json"
    path.write_text(f'{{"meta": {{"x": [1, "]"]}}, "rows": [{text}, {json.dumps(GOOD)}]}}')
    with open(path, "rb") as f:
        got = list(json_records(f, max_bytes=len(text)))
    assert got == [(1, text, None), (2, json.dumps(GOOD), None)]
    with open(path, "rb") as f:
        (line, preview, reason), second = list(json_records(f, max_bytes=len(text) - 1))
    assert line == 1 and reason.startswith("too large") and len(preview) < 1000
    assert second == (2, json.dumps(GOOD), None)


def test_a_parquet_row_over_the_bound_is_quarantined_not_converted(tmp_path):
    rows = [GOOD, {"prompt": "q" * 2_000_000, "completion": "a"}, GOOD]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    got = list(iter_records(tmp_path / "a.parquet", max_bytes=1 << 20))
    assert [r.line for r in got] == [1, 2, 3]
    assert got[0].record == GOOD and got[2].record == GOOD
    assert str(got[1].record).startswith("too large: 2000") and "columns prompt" in got[1].raw


def test_a_10000_turn_record_is_quarantined_and_1000_turns_are_masked_exactly(
    tmp_path, sp_tokenizer_dir
):
    def conversation(turns: int) -> dict:
        return {
            "messages": [
                {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"}
                for i in range(turns)
            ]
        }

    m, q = _prepare(
        tmp_path,
        sp_tokenizer_dir,
        [conversation(10_000), conversation(1000)],
        seq_len=16384,
        chat_template="chatml",
    )
    assert [(r["line"], r["reason"]) for r in q] == [
        (1, "too many turns: 10000 messages > --max-turns 1024")
    ]
    assert m.num_documents == 1

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "o" / schema.TOKENIZER_DIR)
    row = schema.open_shard(tmp_path / "o" / m.shards[0].file).to_pylist()[0]
    ids, mask = np.array(row["input_ids"]), np.array(row["loss_mask"], dtype=bool)
    runs = np.split(ids, np.flatnonzero(np.diff(mask.astype(int))) + 1)
    starts = np.r_[0, np.flatnonzero(np.diff(mask.astype(int))) + 1]
    supervised = [tok.decode(r) for r, at in zip(runs, starts, strict=True) if mask[at]]
    assert supervised == [f"turn {i}<|im_end|>\n" for i in range(1, 1000, 2)]


def _prepare(tmp: Path, tok: Path, records: list[dict], **options) -> tuple[object, list[dict]]:
    src = tmp / "a.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    m = prepare(
        [str(src)],
        tokenizer_path=str(tok),
        out_dir=str(tmp / "o"),
        options=PrepareOptions(progress=False, **options),
    )
    lines = (tmp / "o" / schema.QUARANTINE_NAME).read_text().splitlines()
    return m, [json.loads(line) for line in lines]


def test_a_document_over_the_token_bound_is_quarantined(tmp_path, sp_tokenizer_dir):
    records = [{"text": "word " * 500}, {"text": "hi"}]
    m, q = _prepare(
        tmp_path, sp_tokenizer_dir, records, seq_len=64, overflow="split", max_doc_tokens=200
    )
    assert len(q) == 1 and q[0]["line"] == 1
    assert (
        q[0]["reason"].startswith("too many tokens:") and "--max-doc-tokens 200" in q[0]["reason"]
    )
    assert m.num_documents == 1
