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

from benchmarks.corpus import make_corpus, make_tokenizer

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


def encode_floor(corpus: Path, tok_dir: Path, *, records: int) -> dict:
    """CPU seconds that the Hugging Face Rust encoder alone spends on exactly the text segments
    `sftscale prepare` tokenizes for the first `records` conversations (reading, rendering and
    everything else untimed). Any pipeline that tokenizes with this tokenizer pays at least this
    much, so TRL's time over (this / processes) bounds the ratio any such pipeline can reach."""
    import itertools

    from transformers import AutoTokenizer

    from data_tools.chat import Renderer, split_supervised_text
    from data_tools.formats import iter_records, normalize, parse

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    render = Renderer.shared(tok, tok.chat_template)
    encode = tok.backend_tokenizer.encode_batch_fast
    cpu, tokens = 0.0, 0
    it = itertools.islice(iter_records(corpus), records)
    while batch := list(itertools.islice(it, 256)):
        texts = [text for rec in batch
                 for text, _ in split_supervised_text(tok, render, normalize(parse(rec.record))[1])]  # fmt: skip
        t0 = time.process_time()
        encoded = encode(texts, add_special_tokens=False)
        cpu += time.process_time() - t0
        tokens += sum(len(e) for e in encoded)
    return {"records": records, "tokens": tokens, "encode_cpu_seconds": round(cpu, 1),
            "tokens_per_cpu_second": round(tokens / cpu)}  # fmt: skip


def run_sftscale(corpus: Path, tok: Path, out: Path, *, args, env: dict) -> tuple[float, int, dict]:
    secs, peak, _ = run_measured(
        [sys.executable, "-m", "sftscale", "prepare", str(corpus), "--tokenizer", str(tok),
         "--seq-len", str(args.seq_len), "--out", str(out), "--num-proc", str(args.num_proc),
         "--no-progress"], env=env)  # fmt: skip
    m = json.loads((out / "manifest.json").read_text())
    return secs, peak, {"tokens": m["num_tokens"], "rows": m["num_rows"],
                        "supervised": m["num_supervised_tokens"]}  # fmt: skip


def run_trl(
    corpus: Path, tok: Path, out: Path, *, args, env: dict, masked: bool = False
) -> tuple[float, int, dict]:
    script, cache = out.parent / "trl_pipeline.py", out.parent / "hf_cache"
    script.write_text(TRL_SCRIPT)
    shutil.rmtree(cache, ignore_errors=True)  # no cached map results from an earlier run
    secs, peak, stdout = run_measured(
        [sys.executable, str(script), str(corpus), str(tok), str(out), str(args.seq_len),
         str(args.num_proc), str(int(masked))], env={**env, "HF_DATASETS_CACHE": str(cache)})  # fmt: skip
    shutil.rmtree(cache, ignore_errors=True)
    return secs, peak, json.loads(stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[200_000, 400_000])
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/sftscale_prepare_bench")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each pipeline per size, alternating; the median is reported")  # fmt: skip
    ap.add_argument("--trl-masked", action="store_true",
                    help="also run TRL with assistant-only loss masks (assistant_only_loss=True)")  # fmt: skip
    ap.add_argument("--floor-records", type=int, default=50_000,
                    help="conversations whose Rust encode time is measured alone")  # fmt: skip
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    results, floor = [], None
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
            row[name] = {"seconds": round(secs, 1), "all_seconds": [round(x, 1) for x in seconds],
                         "tokens": counts["tokens"], "rows": counts["rows"],
                         "supervised_tokens": counts.get("supervised"),
                         "tokens_per_s": round(counts["tokens"] / secs),
                         "packing_efficiency": counts["tokens"] / (counts["rows"] * args.seq_len),
                         "peak_rss_bytes": max(peak for _, peak, _ in measured)}  # fmt: skip
        row["throughput_ratio"] = round(
            row["sftscale"]["tokens_per_s"] / row["trl"]["tokens_per_s"], 2
        )
        if "trl-masked" in row:
            row["throughput_ratio_masked"] = round(
                row["sftscale"]["tokens_per_s"] / row["trl-masked"]["tokens_per_s"], 2
            )
        floor = floor or encode_floor(corpus, tok, records=min(n, args.floor_records))
        floor_seconds = row["sftscale"]["tokens"] / floor["tokens_per_cpu_second"] / args.num_proc
        row["encode_floor"] = {**floor, "seconds_at_num_proc": round(floor_seconds, 1),
                               "max_ratio": round(row["trl"]["seconds"] / floor_seconds, 2)}  # fmt: skip
        print(n, "encode floor", row["encode_floor"], flush=True)
        results.append(row)

    import datasets
    import transformers
    import trl

    report = {
        "benchmark": "SFT data preparation: tokenize + mask + pack",
        "command": " ".join([".venv/bin/python", "benchmarks/prepare_throughput.py", *sys.argv[1:]]),
        "device": f"CPU only: {os.cpu_count()} cores, {platform.machine()}",
        "versions": {"transformers": transformers.__version__, "datasets": datasets.__version__,
                     "trl": trl.__version__, "python": platform.python_version()},
        "seq_len": args.seq_len, "num_proc": args.num_proc, "results": results,
    }  # fmt: skip
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
            ratio = {"sftscale": f"{r['throughput_ratio']:.2f}", "trl": "1.00",
                     "trl-masked": f"{r['trl']['seconds'] / x['seconds']:.2f}"}[name]  # fmt: skip
            lines.append(f"| {r['conversations']:,} | {name} | {x['tokens_per_s']:,} | {ratio} | "
                         f"{x['packing_efficiency']:.2%} | {x['peak_rss_bytes'] / 2**20:,.0f} MiB | {x['seconds']} s | "
                         f"{', '.join(map(str, x['all_seconds']))} |")  # fmt: skip
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
    lines += [
        "",
        "Encode floor: the CPU time of the Hugging Face Rust encoder alone on exactly the segments "
        "sftscale tokenizes (first `--floor-records` conversations, rendering untimed), scaled to the "
        "corpus and divided by the processes. Every pipeline that tokenizes with this tokenizer pays "
        "it, so TRL's time over it is the largest ratio any such pipeline can reach.",
        "",
        "| conversations | encode tokens/CPU-s | floor | TRL | largest possible x TRL |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        f = r["encode_floor"]
        lines.append(f"| {r['conversations']:,} | {f['tokens_per_cpu_second']:,} | {f['seconds_at_num_proc']} s | "
                     f"{r['trl']['seconds']} s | {f['max_ratio']:.2f} |")  # fmt: skip
    (HERE / "results" / "prepare_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
