"""The `sftscale` command line.

sftscale prepare data/*.jsonl --tokenizer TOKDIR --seq-len 2048 --out prepared/
sftscale inspect prepared/
sftscale train configs/tiny-cpu.yaml [section.key=value ...] [--local] [--output-dir D] [--max-steps N]
sftscale plan configs/tiny-cpu.yaml [section.key=value ...] [--devices 8xH100]   # will it fit?
sftscale export runs/x/checkpoints --out runs/x/hf
sftscale status runs/x                       # last step, its age, each rank's phase: slow or stuck?
sftscale build-ops [--all|NAME...]           # DeepSpeed's JIT ops ahead of time (runs build on first use)
sftscale bench --grid cpu [--set gradient_checkpointing=on,off ...]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

# Heavy imports (torch, transformers, deepspeed, ray) happen inside the commands, so
# `sftscale --help` is instant.


def _cmd_prepare(args: argparse.Namespace) -> int:
    # each command imports its own modules (torch, deepspeed, ray behind them): `sftscale --help` stays instant
    from data_tools.mixture import MixtureError, read_mixture_file
    from data_tools.prepare import PrepareError, PrepareOptions, prepare, summary_line

    inputs, seed = list(args.inputs), None
    if args.mixture:
        try:
            listed, seed = read_mixture_file(args.mixture)
        except MixtureError as e:
            raise PrepareError(str(e)) from None
        inputs += listed
    if not inputs:
        raise PrepareError("no inputs: name files, directories or globs, or --mixture FILE")
    options = PrepareOptions(
        seq_len=args.seq_len,
        chat_template=args.chat_template,
        format=None if args.format == "auto" else args.format,
        mask=args.mask,
        overflow=args.overflow,
        rows_per_shard=args.rows_per_shard,
        max_bad_fraction=args.max_bad_fraction,
        keep_empty_replies=args.keep_empty_replies,
        num_proc=args.num_proc,
        engine=args.engine,
        window=args.window,
        packing=args.packing,
        max_record_bytes=args.max_record_bytes,
        max_turns=args.max_turns,
        max_doc_tokens=args.max_doc_tokens,
        reasoning=args.reasoning,
        train_tool_results=args.train_tool_results,
        seed=args.seed if args.seed is not None else (seed or 0),
        progress=not args.no_progress,
    )
    manifest = prepare(inputs, tokenizer_path=args.tokenizer, out_dir=args.out, options=options)
    print(summary_line(manifest))
    print(f"wrote {args.out}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    # each command imports its own modules (torch, deepspeed, ray behind them): `sftscale --help` stays instant
    from data_tools.inspect import inspect

    print(inspect(args.dir, samples=args.samples))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    # each command imports its own modules (torch, deepspeed, ray behind them): `sftscale --help` stays instant
    from data_tools.console import say
    from sftscale.config import load_config

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"logging.output_dir={args.output_dir}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    cfg = load_config(args.config, overrides)

    # each command imports its own modules (torch, deepspeed, ray behind them): `sftscale --help` stays instant
    from sftscale.launch import run

    launched = started_by_launcher(os.environ, args.local_rank)
    summary = run(cfg, local=args.local or launched)
    if summary.get("preempted"):
        say(
            f"stopped at step {summary['step']} (SIGTERM or STOP file), checkpoint saved: rerun to resume"
        )
        code = 143  # 128 + SIGTERM, what a scheduler expects of a preempted job
    else:
        say(f"done: {summary['run_dir']}")
        code = 0
    if launched:
        # Everything is written and the process group is gone. Leave without the interpreter's
        # teardown: on the CPU/gloo backend about one run in seven had a rank abort there
        # ("terminate called without an active exception": a C++ thread still joinable at
        # exit), and torchrun then reports a finished run as failed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def started_by_launcher(env, local_rank: int | None) -> bool:
    """Whether this process is one rank of a job that a launcher started: torchrun (it sets
    TORCHELASTIC_RUN_ID) or the deepspeed launcher (it passes --local_rank). Such a process runs
    the local mode, never a Ray driver. (torchrun's own parser would take a `--local` after
    `-m sftscale train` as an abbreviation of one of its options, so it cannot be passed.)"""
    return "TORCHELASTIC_RUN_ID" in env or local_rank is not None


def _cmd_status(args: argparse.Namespace) -> int:

    # each command imports its own modules (torch, deepspeed, ray behind them): `sftscale --help` stays instant
    from sftscale.heartbeat import status

    print(status(Path(args.run_dir)))
    return 0


def _cmd_build_ops(args: argparse.Namespace) -> int:
    # heavy (torch): loaded only on the path that uses it
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    # each command imports its own modules (torch, deepspeed, ray behind them): `sftscale --help` stays instant
    from data_tools.console import say
    from sftscale.jit_locks import OFFLOAD_OPS, RUN_OPS, op_builder_name, prebuild_ops

    if args.all:
        names = RUN_OPS
    elif args.ops:
        try:
            names = tuple(op_builder_name(n) for n in args.ops)
        except ValueError as e:
            say(f"error: {e}")
            return 2
    else:
        names = OFFLOAD_OPS
    return 1 if prebuild_ops(log=say, names=names) else 0


def _cmd_export(args: argparse.Namespace) -> int:
    # heavy (torch): loaded only on the path that uses it
    import torch

    from sftscale.export import export_from_checkpoint

    dtype = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    out = export_from_checkpoint(
        args.checkpoint,
        out_dir=args.out,
        dtype=dtype,
        max_shard_bytes=args.max_shard_mb * 1024 * 1024,
    )
    print(f"wrote {out}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    # each command imports its own modules (torch, deepspeed, ray behind them): `sftscale --help` stays instant
    from sftscale.config import load_config
    from sftscale.fit import plan_for_cli

    cfg = load_config(args.config, list(args.overrides))
    plan = plan_for_cli(cfg, devices=args.devices, seq_len=args.seq_len, vocab_size=args.vocab_size)
    print(plan.table())
    return 0 if plan.fits else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    # each command imports its own modules (torch, deepspeed, ray behind them): `sftscale --help` stays instant
    from sftscale.bench.suite import main as bench

    return bench(args, args.argv)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; given the `command` about to run, other commands' arguments
    that cost imports (bench's) are left out."""
    # No abbreviations here: `train ... --local` must not read as a prefix of --local_rank.
    parser = argparse.ArgumentParser(
        prog="sftscale", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    # The deepspeed launcher puts it right after the module name (`-m sftscale --local_rank=N
    # train ...`); the rank itself comes from LOCAL_RANK, which it sets too.
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_prepare(sub)
    p = sub.add_parser("inspect", help="summarize a prepared directory and show what is supervised")
    p.add_argument("dir")
    p.add_argument("--samples", type=int, default=2, help="rows to decode")
    p.set_defaults(func=_cmd_inspect)

    _add_train_and_plan(sub)
    p = sub.add_parser("status", help="a run's last step, its age and each rank's state")
    p.add_argument("run_dir", help="the run directory (<logging.output_dir>/<logging.run_name>)")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser(
        "build-ops",
        help="build DeepSpeed's JIT ops ahead of time (cluster images); runs build what they "
        "need on first use",
    )
    p.add_argument(
        "ops",
        nargs="*",
        help="ops to build: cpu_adam, async_io, fused_adam, shm_comm (default: cpu_adam and "
        "async_io, what the offload templates load)",
    )
    p.add_argument("--all", action="store_true", help="every op a run can load")
    p.set_defaults(func=_cmd_build_ops)

    p = sub.add_parser("export", help="write a Hugging Face model directory from a checkpoint")
    p.add_argument("checkpoint", help="<run>/checkpoints (latest) or <run>/checkpoints/<tag>")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="auto: the dtype the run trained in",
    )
    p.add_argument("--max-shard-mb", type=int, default=2000)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "bench", help="training throughput and memory over a grid, against the HF Trainer"
    )
    if command not in ("prepare", "inspect", "train", "plan", "export", "status", "build-ops"):
        # each command imports its own modules (torch, deepspeed, ray behind them): `sftscale --help` stays instant
        from sftscale.bench.suite import add_arguments

        add_arguments(p)
    p.set_defaults(func=_cmd_bench)
    return parser


def _add_prepare(sub) -> None:
    """`sftscale prepare`'s arguments."""
    p = sub.add_parser("prepare", help="tokenize, mask and pack chat JSONL into Arrow shards")
    p.add_argument(
        "inputs",
        nargs="*",
        help="JSONL / JSON / Parquet files or globs, or dataset directories (save_to_disk); "
        "PATH:0.7 gives a source a share of the tokens, PATH:2x a number of epochs "
        "(a weighted mixture: docs/data.md)",
    )
    p.add_argument(
        "--mixture", help="a YAML file listing sources with a weight or epochs (docs/data.md)"
    )
    p.add_argument("--seed", type=int, help="a mixture's sampling seed (default 0)")
    p.add_argument(
        "--tokenizer",
        required=True,
        help="Hugging Face tokenizer directory or SentencePiece .model",
    )
    p.add_argument("--seq-len", type=int, required=True, help="tokens per packed row")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "messages", "prompt", "alpaca", "sharegpt", "text"],
        help="record format (auto: detected per record from its fields)",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        choices=["chatml", "llama3", "mistral"],
        help="built-in template, for tokenizers without one (overrides the tokenizer's)",
    )
    p.add_argument(
        "--mask",
        default="assistant",
        choices=["assistant", "last", "all"],
        help="supervised tokens: every assistant turn, the last one only, or everything",
    )
    p.add_argument(
        "--overflow",
        default="truncate",
        choices=["truncate", "split", "quarantine"],
        help="what to do with a document longer than --seq-len",
    )
    p.add_argument("--rows-per-shard", type=int, default=10_000)
    p.add_argument(
        "--max-bad-fraction",
        type=float,
        default=1.0,
        help="fail when more than this fraction of records is quarantined",
    )
    p.add_argument(
        "--keep-empty-replies",
        action="store_true",
        help="train on records with an empty or whitespace-only assistant turn "
        "(default: quarantined; such a turn teaches only the end-of-turn token)",
    )
    p.add_argument(
        "--num-proc", type=int, default=1, help="tokenizing processes (or Ray Data actors)"
    )
    p.add_argument(
        "--engine", default="local", choices=["local", "ray"], help="local processes or Ray Data"
    )
    p.add_argument(
        "--window", type=int, default=50_000, help="documents packed together (bounds memory)"
    )
    p.add_argument(
        "--packing",
        default="bfd",
        choices=["bfd", "none"],
        help="bfd: best-fit decreasing into rows of --seq-len; none: one document per row",
    )
    _add_prepare_bounds(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare)


def _add_prepare_bounds(p) -> None:
    """`sftscale prepare`'s bounds per record, reasoning and tool results."""
    p.add_argument(
        "--max-record-bytes",
        type=int,
        default=16 << 20,
        help="a larger record is quarantined without being read whole (default 16 MiB)",
    )
    p.add_argument(
        "--max-turns", type=int, default=1024, help="a record with more messages is quarantined"
    )
    p.add_argument(
        "--max-doc-tokens",
        type=int,
        default=1 << 20,
        help="a document of more tokens (before --overflow) is quarantined",
    )
    p.add_argument(
        "--reasoning",
        default="train",
        choices=["train", "mask", "drop"],
        help="reasoning (reasoning_content, <think> blocks): trained, kept but not supervised, "
        "or removed",
    )
    p.add_argument(
        "--train-tool-results",
        action="store_true",
        help="supervise tool results too (default: only assistant text and tool calls)",
    )


def _add_train_and_plan(sub) -> None:
    """`sftscale train` and `sftscale plan`'s arguments."""
    p = sub.add_parser("train", help="fine-tune (Ray Train + DeepSpeed; --local for one process)")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=3e-4")
    p.add_argument(
        "--local", action="store_true", help="run in this process without Ray (debug mode)"
    )
    p.add_argument("--output-dir", default=None, help="sets logging.output_dir")
    p.add_argument("--max-steps", type=int, default=None, help="sets train.max_steps")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "plan", help="memory per rank, broken down: will this run fit? (no worker starts)"
    )
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="section.key=value, as for train")
    p.add_argument(
        "--devices",
        default=None,
        help="COUNTxNAME: 8xH100, 64xH100, 2xcpu (ranks sharing this host's memory); "
        "default: scale.num_workers of this host's GPU or CPU",
    )
    p.add_argument(
        "--seq-len", type=int, default=None, help="row length (default: the data's seq_len)"
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="tokenizer size for presets without a vocabulary (default: the data's)",
    )
    p.set_defaults(func=_cmd_plan)


def _user_errors() -> tuple[type[Exception], ...]:
    """The errors that are the user's to fix (reported, exit 2). A module the command did not
    import raised none of its own, so none is imported here (60-90 ms of every prepare)."""
    found: list[type[Exception]] = [FileNotFoundError]
    for module, name in (
        ("sftscale.config", "ConfigError"),
        ("data_tools.prepare", "PrepareError"),
        ("data_tools.schema", "ShardFormatError"),  # e.g. inspect of a directory not prepared
    ):
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


def _command(argv: list[str]) -> str | None:
    """The command argv names (its first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def run() -> NoReturn:
    """The program (`sftscale`, `python -m sftscale`): main(), then exit. A local prepare
    that succeeded ends without the interpreter's teardown: by then its files are written and
    closed and its children reaped, and freeing the tokenizers, the encoder and every module's
    objects cost 0.2-0.3 s of a 7 s run. Anything else exits as usual (train, say, has
    Ray and torch.distributed to shut down)."""
    argv = sys.argv[1:]
    code = main(argv)
    if code == 0 and _command(argv) == "prepare":
        args, _ = build_parser("prepare").parse_known_args(argv)
        if args.engine == "local":
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command(argv))
    # Overrides may come after options (`train c.yaml --local optim.lr=1e-3`), which argparse
    # does not collect into a positional list once an option has been seen.
    args, extra = parser.parse_known_args(argv)
    args.argv = argv[1:]  # after the command name
    if extra:
        if args.command != "train" or not all("=" in e and not e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except Exception as e:
        if not isinstance(e, _user_errors()):
            raise
        print(f"sftscale {args.command}: error: {e}", file=sys.stderr)
        return 2
