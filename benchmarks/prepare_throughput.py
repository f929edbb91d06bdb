"""Data preparation throughput, packing efficiency and peak memory: `sftscale prepare` against
TRL's pipeline (`datasets.map` tokenization with the chat template + `trl.pack_dataset` BFD),
on the same synthetic corpus and tokenizer, in one run, at two corpus sizes.

    .venv/bin/pip install trl   # the baseline only
    .venv/bin/python benchmarks/prepare_throughput.py --sizes 200000 400000 --num-proc 2

Corpus: conversations of 1-4 user/assistant turns (half with a system prompt) whose turn lengths
are lognormal (median ~40 words, sigma 1.0, capped at 1500 words). Tokenizer: a byte-level BPE
trained on a sample of it, with a ChatML template. Peak memory: the largest sum of RSS over
the process tree (main process + workers), sampled every 50 ms.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sftscale.bench.corpus import make_corpus, make_tokenizer

HERE = Path(__file__).resolve().parent
TRL_SCRIPT = r"""
import json, sys
import datasets
from transformers import AutoTokenizer
from trl import pack_dataset
corpus, tok_dir, out, seq_len, num_proc, masked = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1"
tok = AutoTokenizer.from_pretrained(tok_dir)
# assistant_only_loss=True needs {% generation %} markers: ChatML with the reply and its end marked
MARKED = ("{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
          "{% generation %}{{ message['content'] + '<|im_end|>\n' }}{% endgeneration %}{% else %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
def tokenize(ex):  # what SFTTrainer does for conversational data (assistant_only_loss=masked)
    if masked:
        out = tok.apply_chat_template(ex["messages"], chat_template=MARKED, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        return {"input_ids": out["input_ids"], "assistant_masks": out["assistant_masks"]}
    return {"input_ids": tok.apply_chat_template(ex["messages"], tokenize=True, return_dict=True)["input_ids"]}
ds = datasets.load_dataset("json", data_files=corpus, split="train")
ds = ds.map(tokenize, remove_columns=ds.column_names, num_proc=num_proc)
ds = ds.filter(lambda ex: len(ex["input_ids"]) > 0, num_proc=num_proc)
packed = pack_dataset(ds, seq_len, strategy="bfd", map_kwargs={"num_proc": num_proc})
packed.save_to_disk(out)
lengths = [len(x) for x in packed["input_ids"]]
supervised = sum(map(sum, packed["assistant_masks"])) if masked else None
print(json.dumps({"rows": len(lengths), "tokens": sum(lengths), "supervised": supervised}))
"""


MULTILINGUAL_BEGIN, MULTILINGUAL_END = "<!-- multilingual -->", "<!-- /multilingual -->"


def multilingual_section() -> list[str]:
    """The real multilingual rows, from the last run of benchmarks/prepare_multilingual.py
    (results/prepare_multilingual.json), between markers that run rewrites in place."""
    lines = [
        MULTILINGUAL_BEGIN,
        "## Real multilingual and Chinese text",
        "",
        "DeepSeek-V3's byte-level BPE and Mistral v3's SentencePiece against TRL masked; the "
        "details, every run and the corpus: [prepare_multilingual.md](prepare_multilingual.md) "
        "(`benchmarks/prepare_multilingual.py`).",
    ]
    found = HERE / "results" / "prepare_multilingual.json"
    if found.is_file():
        report = json.loads(found.read_text())
        lines += [
            "",
            f"`{report['command']}`, {report['when']}, {report['device']}:",
            "",
            "| tokenizer | x TRL (median) | x TRL paired (median; all) | tokens, supervised "
            "(identical) | rows / bound: sftscale, TRL | peak RSS: sftscale, TRL |",
            "|---|---|---|---|---|---|",
        ]
        for name, row in report["results"].items():
            ours, trl = row["sftscale"], row["trl-masked"]
            lines.append(
                f"| {name} | {row['throughput_ratio']:.2f} | {row['paired_ratio_median']:.2f} "
                f"({', '.join(map(str, row['paired_ratios']))}) | {ours['tokens']:,}, "
                f"{ours['supervised_tokens']:,} ({'yes' if row['identical_counts'] else 'NO'}) | "
                f"{ours['rows_over_bound']:.4f}, {trl['rows_over_bound']:.4f} | "
                f"{ours['peak_rss_bytes'] / 2**20:,.0f} MiB, {trl['peak_rss_bytes'] / 2**20:,.0f} MiB |"
            )
    return [*lines, MULTILINGUAL_END]


def update_multilingual_section() -> None:
    """results/prepare_throughput.md with its multilingual section rewritten from the last
    multilingual run (the rest of the report stays as its own run wrote it)."""
    report = HERE / "results" / "prepare_throughput.md"
    if not report.is_file():
        return
    text = report.read_text()
    begin, end = text.find(MULTILINGUAL_BEGIN), text.find(MULTILINGUAL_END)
    if begin < 0 or end < begin:
        return
    section = "\n".join(multilingual_section())
    report.write_text(text[:begin] + section + text[end + len(MULTILINGUAL_END) :])


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """Wall time, the peak of the process tree's summed RSS, and stdout."""
    import tempfile

    import psutil

    # stderr to a file, not a pipe: progress bars would fill a pipe nobody reads and block the child
    err_file = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (lives as long as the child)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err_file, text=True, env=env)
    peak = 0
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:  # stdout is small (one JSON line)
        try:
            tree = [ps, *ps.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out, _ = proc.communicate()
    if proc.returncode != 0:
        err_file.seek(0)
        raise RuntimeError(f"{cmd[:4]} failed:\n{err_file.read()[-3000:]}")
    return time.perf_counter() - t0, peak, out


def _cpu_seconds(fn, texts: list[str]) -> tuple[float, list]:
    t0 = time.process_time()
    out = fn(texts)
    return time.process_time() - t0, out


def compare_encoders(tok, batches: list[list[str]]) -> dict:
    """CPU seconds of the Hugging Face Rust encoder and of sftscale's (data_tools.encode) on the
    same texts, batch by batch; their ids must be identical."""
    from data_tools.encode import Encoder

    ours = Encoder(tok.backend_tokenizer)
    rust = tok.backend_tokenizer.encode_batch_fast
    cpu_rust = cpu_ours = 0.0
    tokens = texts = ascii_texts = 0
    for batch in batches:
        secs, expected = _cpu_seconds(
            lambda b: [e.ids for e in rust(b, add_special_tokens=False)], batch
        )
        cpu_rust += secs
        secs, got = _cpu_seconds(ours, batch)
        cpu_ours += secs
        if got != expected:
            raise AssertionError("sftscale's encoder disagrees with the Rust encoder")
        tokens += sum(map(len, got))
        texts += len(batch)
        ascii_texts += sum(t.isascii() for t in batch)
    return {
        "texts": texts,
        "tokens": tokens,
        "ascii_fraction": round(ascii_texts / texts, 4),
        "fast_path": ours.fast,
        "ids_identical": True,
        "rust_tokens_per_cpu_second": round(tokens / cpu_rust),
        "sftscale_tokens_per_cpu_second": round(tokens / cpu_ours),
        "speedup": round(cpu_rust / cpu_ours, 2),
    }


def encoders_on_corpus(corpus: Path, tok_dir: Path, *, records: int) -> dict:
    """Both encoders on exactly the segments `sftscale prepare` tokenizes for the first
    `records` conversations (reading and rendering untimed)."""
    import itertools

    from transformers import AutoTokenizer

    from data_tools.chat import Renderer, split_supervised_text
    from data_tools.formats import iter_records, normalize, parse

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    render = Renderer.shared(tok, tok.chat_template)
    it = itertools.islice(iter_records(corpus), records)
    batches = []
    while batch := list(itertools.islice(it, 256)):
        batches.append(
            [
                text
                for rec in batch
                for text, _ in split_supervised_text(tok, render, normalize(parse(rec.record))[1])
            ]
        )
    return {"records": records, **compare_encoders(tok, batches)}


def encoders_on_prose(work: Path, *, megabytes: float = 8.0) -> dict:
    """Both encoders on natural text: the docstrings of the installed transformers package
    (English prose and code, some non-ASCII), with a 32k byte-level BPE trained on the other
    half of them, for the GPT-2 and Llama 3 pre-tokenizers. The benchmark corpus repeats ~100
    words, the best case for the memo; real text has a long tail of rare words."""
    import ast

    import transformers
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from data_tools import encode

    docs: list[str] = []
    size = 0
    for path in sorted(Path(transformers.__file__).parent.rglob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        for node in ast.walk(tree):
            doc = ast.get_docstring(node, clean=False) if isinstance(node, kinds) else None
            if doc and len(doc) > 40:
                docs.append(doc)
                size += len(doc)
        if size > megabytes * 2**20:
            break
    train, test = docs[1::2], docs[0::2]
    pre = {
        "gpt2": pre_tokenizers.ByteLevel(add_prefix_space=False),
        "llama3": pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(encode._LLAMA3), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ),
    }
    out = {
        "source": f"docstrings of transformers {transformers.__version__}",
        "test_megabytes": round(sum(map(len, test)) / 2**20, 1),
    }
    for name, pre_tokenizer in pre.items():
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizer
        bpe.train_from_iterator(
            train,
            trainer=trainers.BpeTrainer(
                vocab_size=32000,
                special_tokens=["<|endoftext|>"],
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                show_progress=False,
            ),
        )
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
        out[name] = compare_encoders(tok, [test[i : i + 256] for i in range(0, len(test), 256)])
        print("prose", name, out[name], flush=True)
    return out


def run_sftscale(corpus: Path, tok: Path, out: Path, *, args, env: dict) -> tuple[float, int, dict]:
    secs, peak, _ = run_measured(
        [
            sys.executable,
            "-m",
            "sftscale",
            "prepare",
            str(corpus),
            "--tokenizer",
            str(tok),
            "--seq-len",
            str(args.seq_len),
            "--out",
            str(out),
            "--num-proc",
            str(args.num_proc),
            "--no-progress",
        ],
        env=env,
    )
    m = json.loads((out / "manifest.json").read_text())
    return (
        secs,
        peak,
        {
            "tokens": m["num_tokens"],
            "rows": m["num_rows"],
            "supervised": m["num_supervised_tokens"],
        },
    )


def run_trl(
    corpus: Path, tok: Path, out: Path, *, args, env: dict, masked: bool = False
) -> tuple[float, int, dict]:
    script, cache = out.parent / "trl_pipeline.py", out.parent / "hf_cache"
    script.write_text(TRL_SCRIPT)
    shutil.rmtree(cache, ignore_errors=True)  # no cached map results from an earlier run
    secs, peak, stdout = run_measured(
        [
            sys.executable,
            str(script),
            str(corpus),
            str(tok),
            str(out),
            str(args.seq_len),
            str(args.num_proc),
            str(int(masked)),
        ],
        env={**env, "HF_DATASETS_CACHE": str(cache)},
    )
    shutil.rmtree(cache, ignore_errors=True)
    return secs, peak, json.loads(stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[200_000, 400_000])
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/sftscale_prepare_bench")
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of each pipeline per size, alternating; the median is reported",
    )
    ap.add_argument(
        "--trl-masked",
        action="store_true",
        help="also run TRL with assistant-only loss masks (assistant_only_loss=True)",
    )
    ap.add_argument(
        "--encoder-records",
        type=int,
        default=50_000,
        help="conversations whose segments both encoders tokenize, timed alone",
    )
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    results, encoders = [], None
    for n in args.sizes:
        corpus = work / f"corpus_{n}.jsonl"
        if not corpus.is_file():
            make_corpus(corpus, n)
        tok = work / "tokenizer"
        if not tok.is_dir():
            make_tokenizer(corpus, tok)
        row = {"conversations": n, "corpus_bytes": corpus.stat().st_size}
        pipelines = {"sftscale": run_sftscale, "trl": run_trl}
        if args.trl_masked:  # TRL doing the same job: assistant-only loss masks
            pipelines["trl-masked"] = functools.partial(run_trl, masked=True)
        runs: dict[str, list] = {name: [] for name in pipelines}
        for _ in range(args.repeats):  # alternating, so drifts of the machine hit all alike
            for name, fn in pipelines.items():
                runs[name].append(fn(corpus, tok, work / f"{name}_{n}", args=args, env=env))
                print(n, name, f"{runs[name][-1][0]:.1f} s", flush=True)
        for name, measured in runs.items():
            seconds = sorted(secs for secs, _, _ in measured)
            secs = seconds[len(seconds) // 2]  # the median; of two runs, the slower
            counts = measured[0][2]
            row[name] = {
                "seconds": round(secs, 1),
                "all_seconds": [round(x, 1) for x in seconds],
                "tokens": counts["tokens"],
                "rows": counts["rows"],
                "supervised_tokens": counts.get("supervised"),
                "tokens_per_s": round(counts["tokens"] / secs),
                "packing_efficiency": counts["tokens"] / (counts["rows"] * args.seq_len),
                "peak_rss_bytes": max(peak for _, peak, _ in measured),
            }
        row["throughput_ratio"] = round(
            row["sftscale"]["tokens_per_s"] / row["trl"]["tokens_per_s"], 2
        )
        if "trl-masked" in row:
            row["throughput_ratio_masked"] = round(
                row["sftscale"]["tokens_per_s"] / row["trl-masked"]["tokens_per_s"], 2
            )
        encoders = encoders or encoders_on_corpus(corpus, tok, records=min(n, args.encoder_records))
        print(n, "encoders", encoders, flush=True)
        results.append(row)

    import datasets
    import transformers
    import trl

    report = {
        "benchmark": "SFT data preparation: tokenize + mask + pack",
        "command": " ".join(
            [".venv/bin/python", "benchmarks/prepare_throughput.py", *sys.argv[1:]]
        ),
        "device": f"CPU only: {os.cpu_count()} cores, {platform.machine()}",
        "versions": {
            "transformers": transformers.__version__,
            "datasets": datasets.__version__,
            "trl": trl.__version__,
            "python": platform.python_version(),
        },
        "seq_len": args.seq_len,
        "num_proc": args.num_proc,
        "results": results,
        "encoders": {"benchmark_corpus": encoders, "prose": encoders_on_prose(work)},
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "prepare_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Data preparation: sftscale vs TRL (seq_len {args.seq_len}, {args.num_proc} processes)",
        "",
        f"`{report['command']}` on {report['device']}; transformers {transformers.__version__}, "
        f"datasets {datasets.__version__}, trl {trl.__version__}.",
        "",
        "| conversations | pipeline | tokens/s | x TRL | packing efficiency | peak RSS (tree) | time (median) | all runs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for name in ("sftscale", "trl", "trl-masked"):
            if name not in r:
                continue
            x = r[name]
            ratio = {
                "sftscale": f"{r['throughput_ratio']:.2f}",
                "trl": "1.00",
                "trl-masked": f"{r['trl']['seconds'] / x['seconds']:.2f}",
            }[name]
            lines.append(
                f"| {r['conversations']:,} | {name} | {x['tokens_per_s']:,} | {ratio} | "
                f"{x['packing_efficiency']:.2%} | {x['peak_rss_bytes'] / 2**20:,.0f} MiB | {x['seconds']} s | "
                f"{', '.join(map(str, x['all_seconds']))} |"
            )
    if any("trl-masked" in r for r in results):
        lines += [
            "",
            "`trl` is TRL's pipeline as SFTTrainer runs it for conversational data by default "
            "(full-sequence loss: no mask computed); `trl-masked` does the job sftscale does, "
            "assistant-only loss masks (`assistant_only_loss=True`: `return_assistant_tokens_mask` "
            "with a ChatML template carrying `{% generation %}` markers). sftscale over `trl-masked`: "
            + ", ".join(
                f"{r['throughput_ratio_masked']:.2f}x ({r['conversations']:,})" for r in results
            )
            + ". The `x TRL` column is against the unmasked `trl`.",
        ]
    enc, prose = report["encoders"]["benchmark_corpus"], report["encoders"]["prose"]
    lines += [
        "",
        *multilingual_section(),
        "",
        "## The encoder alone",
        "",
        "CPU time of the Hugging Face Rust encoder and of sftscale's (`data_tools/encode.py`: exact "
        "for ASCII text with GPT-2 / Llama 3 / Qwen2 byte-level pre-tokenizers, the Rust encoder "
        "for the rest) on the same texts, one process; the ids were compared and are identical. "
        f"Benchmark corpus: the segments of its first {enc['records']:,} conversations (about 100 "
        "distinct words: the best case for sftscale's per-word memo). Prose: "
        f"{prose['test_megabytes']} MB of {prose['source']}, with a 32k BPE trained on other "
        "docstrings (a long tail of rare words, some non-ASCII text).",
        "",
        "| texts | pre-tokenizer | ASCII texts | Rust tokens/CPU-s | sftscale tokens/CPU-s | speedup |",
        "|---|---|---|---|---|---|",
        f"| benchmark corpus | gpt2 | {enc['ascii_fraction']:.1%} | {enc['rust_tokens_per_cpu_second']:,} | "
        f"{enc['sftscale_tokens_per_cpu_second']:,} | {enc['speedup']:.2f}x |",
    ]
    for name in ("gpt2", "llama3"):
        p = prose[name]
        lines.append(
            f"| prose | {name} | {p['ascii_fraction']:.1%} | {p['rust_tokens_per_cpu_second']:,} | "
            f"{p['sftscale_tokens_per_cpu_second']:,} | {p['speedup']:.2f}x |"
        )
    (HERE / "results" / "prepare_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
