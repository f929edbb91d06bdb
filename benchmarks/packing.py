"""Rows against the bound ceil(tokens / seq_len): `sftscale prepare`'s packing (best-fit
decreasing, then the refill of data_tools/pack.py, windows carrying their open rows) against
best-fit decreasing alone, on real corpora and on two synthetic length distributions.

    .venv/bin/python benchmarks/packing.py

Real corpora: the documents `sftscale prepare --packing none` makes (their lengths, at each
seq_len) from the multilingual corpus of benchmarks/prepare_multilingual.py with DeepSeek-V3's
and Mistral's tokenizers, and from the ASCII benchmark corpus of prepare_throughput.py (50,000
conversations); then `sftscale prepare` with its packing, whose rows are counted. Synthetic:
lengths uniform in [0.2, 0.6] of a row (hard for best fit: 1.7% over) and lognormal (median a
quarter of a row). The BFD column packs the same lengths in one window.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from data_tools import schema  # noqa: E402
from data_tools.pack import pack, pack_best_fit_decreasing  # noqa: E402

SEQ_LENS = (2048, 4096, 8192)


def _prepare(corpus: Path, tok: Path, out: Path, seq_len: int, *extra: str) -> dict:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "sftscale",
            "prepare",
            str(corpus),
            "--tokenizer",
            str(tok),
            "--seq-len",
            str(seq_len),
            "--out",
            str(out),
            "--num-proc",
            "2",
            "--no-progress",
            *extra,
        ],
        check=True,
        capture_output=True,
    )
    return json.loads((out / "manifest.json").read_text())


def document_lengths(out: Path) -> list[int]:
    import pyarrow as pa

    lengths: list[int] = []
    for shard in sorted(out.glob("shard-*.arrow")):
        with pa.memory_map(str(shard)) as f:
            table = pa.ipc.open_file(f).read_all()
        lengths += [int(x) for row in table.column("doc_lens").to_pylist() for x in row]
    return lengths


def row(name: str, lengths: list[int], seq_len: int, prepared_rows: int | None) -> dict:
    bound = -(-sum(lengths) // seq_len)
    t = time.process_time()
    bfd = len(pack_best_fit_decreasing(lengths, seq_len))
    t_bfd = time.process_time() - t
    t = time.process_time()
    ours = len(pack(lengths, seq_len))
    t_ours = time.process_time() - t
    return {
        "corpus": name,
        "seq_len": seq_len,
        "documents": len(lengths),
        "tokens": sum(lengths),
        "bound": bound,
        "bfd_rows": bfd,
        "pack_rows": ours,
        "prepare_rows": prepared_rows,
        "bfd_over_bound": round(bfd / bound, 4),
        "pack_over_bound": round(ours / bound, 4),
        "prepare_over_bound": round(prepared_rows / bound, 4) if prepared_rows else None,
        "bfd_cpu_s": round(t_bfd, 2),
        "pack_cpu_s": round(t_ours, 2),
    }


def main() -> None:
    import prepare_multilingual
    from prepare_throughput import make_corpus, make_tokenizer

    work = Path(os.environ.get("SFTSCALE_PACKING_BENCH", "/tmp/sftscale_packing_bench"))
    work.mkdir(parents=True, exist_ok=True)
    ml_work = work / "multilingual"
    ml_work.mkdir(exist_ok=True)
    ml_corpus, _ = prepare_multilingual.build_corpus(ml_work)
    toks = prepare_multilingual.tokenizers(ml_work)
    ascii_corpus = work / "ascii_50000.jsonl"
    if not ascii_corpus.is_file():
        make_corpus(ascii_corpus, 50_000)
    ascii_tok = work / "ascii_tokenizer"
    if not ascii_tok.is_dir():
        make_tokenizer(ascii_corpus, ascii_tok)
    corpora = [(f"multilingual, {name}", ml_corpus, tok) for name, tok in toks.items()] + [
        ("benchmark corpus (ASCII), 50,000 conversations", ascii_corpus, ascii_tok)
    ]
    rows = []
    for name, corpus, tok in corpora:
        for seq_len in SEQ_LENS:
            docs = _prepare(corpus, tok, work / "docs", seq_len, "--packing", "none")
            lengths = document_lengths(work / "docs")
            packed = _prepare(corpus, tok, work / "packed", seq_len)
            assert packed["num_tokens"] == docs["num_tokens"] == sum(lengths)
            rows.append(row(name, lengths, seq_len, packed["num_rows"]))
            print(json.dumps(rows[-1]), flush=True)
    rng = random.Random(0)
    for seq_len in SEQ_LENS:
        uniform = [rng.randint(int(0.2 * seq_len), int(0.6 * seq_len)) for _ in range(50_000)]
        rows.append(row("synthetic: uniform 0.2-0.6 of a row", uniform, seq_len, None))
        logn = [
            min(seq_len, max(1, int(rng.lognormvariate(math.log(seq_len / 4), 0.8))))
            for _ in range(50_000)
        ]
        rows.append(row("synthetic: lognormal, median a quarter row", logn, seq_len, None))
        print(json.dumps(rows[-2]), json.dumps(rows[-1]), flush=True)
    (HERE / "results" / "packing.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "# Packing: rows against the bound ceil(tokens / seq_len)",
        "",
        "`.venv/bin/python benchmarks/packing.py`. BFD: best-fit decreasing alone on all of a "
        "corpus's documents at once; pack: data_tools/pack.py (BFD, then the refill) on the same; "
        "prepare: the rows `sftscale prepare` wrote (windows of 50,000 documents carrying their "
        f"open rows; schema {schema.SCHEMA_VERSION}). CPU seconds for one packing of all the lengths.",
        "",
        "| corpus | seq_len | documents | tokens | bound | BFD rows | pack rows | prepare rows | BFD / bound | pack / bound | prepare / bound | BFD CPU s | pack CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['corpus']} | {r['seq_len']} | {r['documents']:,} | {r['tokens']:,} | {r['bound']:,} | "
            f"{r['bfd_rows']:,} | {r['pack_rows']:,} | {r['prepare_rows'] or '-'} | {r['bfd_over_bound']:.4f} | "
            f"{r['pack_over_bound']:.4f} | {r['prepare_over_bound'] or '-'} | {r['bfd_cpu_s']} | {r['pack_cpu_s']} |"
        )
    (HERE / "results" / "packing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
