"""`sftscale bench`: training throughput and memory over a grid of configurations, each point
run by sftscale and by the Hugging Face Trainer baseline (sftscale/bench/hf_baseline.py) in the
same invocation, on the same model, data and DeepSpeed template.

    sftscale bench --grid cpu                      # tiny + ~100M presets, 2 ranks, minutes
    sftscale bench --grid gpu                      # Llama-3.2-1B shape at seq 4096, all GPUs
    sftscale bench --grid cpu --set gradient_checkpointing=on,off packing=packed,padded

A grid is a base point plus variations of one setting at a time; `--set key=v1,v2 ...`
replaces the variations by the cartesian product of the given values around the base.
Every run trains for `warmup + steps` optimizer steps from a random init; the figures are
taken over the last `steps` (wall time from the end of the last warm-up step to the end of the
last step, tokens of the batches in between). Each run is a fresh torchrun job with one
process per rank (local launch mode: no Ray, so it also runs where Ray is not installed).

Outputs in --out (default benchmarks/results/bench-<grid>/): one JSON per run (device,
versions, command, point, figures, DeepSpeed's memory estimate), summary.md (the table,
sftscale's supervised tokens/s over the baseline's), tokens_per_s.png and memory.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_tools.console import say
from data_tools.schema import read_manifest

if TYPE_CHECKING:
    from sftscale.config import Config

# The checkout this module lives in, when it is one (git commit of the results).
SOURCE = Path(__file__).resolve().parent.parent.parent


def default_out(grid: str) -> Path:
    """benchmarks/results/bench-<grid> in a checkout of this repository (the working
    directory), else bench-<grid> in the working directory."""
    results = Path("benchmarks") / "results"
    return (results if results.is_dir() else Path(".")) / f"bench-{grid}"


TEMPLATES = {  # (ZeRO stage, offload) -> ds_configs template
    (2, "none"): "zero2",
    (3, "none"): "zero3",
    (3, "optimizer"): "zero3_offload_optimizer",
    (3, "params"): "zero3_offload_params",
}


@dataclass(frozen=True)
class Point:
    preset: str
    seq_len: int
    micro_batch_size: int
    zero_stage: int = 3
    offload: str = "none"  # none | optimizer | params (CPU offload, ZeRO-3)
    gradient_checkpointing: bool = True
    packing: str = "packed"  # packed (BFD rows of seq_len) | padded (one document per row)
    sequence_parallel_size: int = 1  # Ulysses groups of this many ranks split each row
    tiled: bool = False  # train.tiled_logits and train.mlp_tiles (see mlp_tiles)
    # auto: what a user's run on this device gets (bf16 where it is native, else fp32); both
    # sides of a point run the same resolved precision
    precision: str = "auto"

    def __post_init__(self) -> None:
        if (self.zero_stage, self.offload) not in TEMPLATES:
            raise ValueError(
                f"no DeepSpeed template for ZeRO-{self.zero_stage} with offload={self.offload}; "
                f"choose one of {sorted(TEMPLATES)}"
            )
        if self.packing not in ("packed", "padded"):
            raise ValueError(f"packing must be packed or padded, got {self.packing!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")

    @property
    def template(self) -> str:
        return TEMPLATES[(self.zero_stage, self.offload)]

    @property
    def id(self) -> str:
        gc = "gc" if self.gradient_checkpointing else "nogc"
        off = "" if self.offload == "none" else f"-off{self.offload}"
        sp = f"-sp{self.sequence_parallel_size}" if self.sequence_parallel_size > 1 else ""
        tiled = "-tiled" if self.tiled else ""
        precision = "" if self.precision == "auto" else f"-{self.precision}"
        return (
            f"{self.preset}-s{self.seq_len}-m{self.micro_batch_size}-z{self.zero_stage}{off}-"
            f"{gc}-{self.packing}{sp}{tiled}{precision}"
        )

    @property
    def mlp_tiles(self) -> int:
        """Tiles of a tiled MLP: one per 4096 positions a rank holds (at least 2)."""
        return max(2, self.seq_len // self.sequence_parallel_size // 4096) if self.tiled else 0

    @property
    def baseline(self) -> Point:
        """The baseline's point: the Trainer pads documents whatever our packing, and knows
        neither sequence parallelism nor tiling."""
        return dataclasses.replace(self, packing="padded", sequence_parallel_size=1, tiled=False)


@dataclass(frozen=True)
class Grid:
    base: Point
    variations: tuple[dict[str, Any], ...]  # each: settings that differ from the base
    warmup_steps: int
    steps: int
    conversations: int  # corpus size (enough rows for every point)
    description: str

    def points(self) -> list[Point]:
        out = [self.base]
        for v in self.variations:
            p = dataclasses.replace(self.base, **v)
            if p not in out:
                out.append(p)
        return out


GRIDS = {
    "smoke": Grid(  # CI: that the suite runs end to end and writes every output
        base=Point("tiny-llama", seq_len=256, micro_batch_size=2),
        variations=({"packing": "padded"},),
        warmup_steps=1,
        steps=2,
        conversations=400,
        description="packed and padded + baseline, 3 steps; checks the machinery, not performance",
    ),
    "cpu": Grid(
        base=Point("tiny-llama", seq_len=1024, micro_batch_size=2),
        variations=(
            {"packing": "padded"},
            {"gradient_checkpointing": False},
            {"zero_stage": 2},
            {"offload": "optimizer"},
            {"seq_len": 512},
            {"micro_batch_size": 4},
            {"preset": "llama-100m", "seq_len": 512, "micro_batch_size": 1},
            {"preset": "llama-100m", "seq_len": 512, "micro_batch_size": 1, "packing": "padded"},
        ),
        warmup_steps=2,
        steps=8,
        conversations=4000,
        description="tiny-llama and llama-100m on 2 CPU ranks",
    ),
    # Peak memory per rank against row length, without and with sequence parallelism and
    # tiling (benchmarks/long_context.py reads it): micro-batch 1, one row per rank or group.
    "cpu-long": Grid(
        base=Point("small-llama", seq_len=4096, micro_batch_size=1),
        variations=tuple(
            {"seq_len": s, "sequence_parallel_size": sp, "tiled": tiled}
            for sp, tiled, lengths in (
                (1, False, (4096, 8192, 16384, 32768, 65536)),
                (2, False, (4096, 8192, 16384, 32768, 65536, 131072)),
                (2, True, (4096, 8192, 16384, 32768, 65536, 131072)),
            )
            for s in lengths
        ),
        warmup_steps=1,
        steps=2,
        conversations=4000,
        description="small-llama rows of 4k-128k positions on 2 CPU ranks: SP=1, SP=2, SP=2 tiled",
    ),
    "gpu-long": Grid(
        base=Point(
            "llama-3.1-8b", seq_len=32768, micro_batch_size=1, sequence_parallel_size=8, tiled=True
        ),
        variations=(
            {"seq_len": 65536},
            {"seq_len": 131072},
            {"tiled": False},
            {"sequence_parallel_size": 1},
        ),
        warmup_steps=3,
        steps=10,
        conversations=40000,
        description="Llama-3.1-8B shape, rows of 32k-128k positions, Ulysses SP=8 (ALST) on 8 GPUs",
    ),
    "gpu": Grid(
        base=Point("llama-3.2-1b", seq_len=4096, micro_batch_size=1),
        variations=(
            {"packing": "padded"},
            {"gradient_checkpointing": False},
            {"micro_batch_size": 2},
            {"zero_stage": 2},
        ),
        warmup_steps=5,
        steps=20,
        conversations=20000,
        description="Llama-3.2-1B shape at seq 4096 on every visible GPU",
    ),
}


def parse_sets(items: list[str]) -> dict[str, list[Any]]:
    """`key=v1,v2` settings of --set, typed like Point's fields."""
    fields = {f.name: f.type for f in dataclasses.fields(Point)}
    out: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(
                f"--set {item!r}: expected key=v1,v2 with key one of {', '.join(fields)}"
            )
        parsed = []
        for v in values.split(","):
            if fields[key] == "int":
                parsed.append(int(v))
            elif fields[key] == "bool":
                if v not in ("on", "off", "true", "false"):
                    raise ValueError(f"--set {key}: {v!r} is not on/off")
                parsed.append(v in ("on", "true"))
            else:
                parsed.append(v)
        out[key] = parsed
    return out


def grid_with_sets(grid: Grid, sets: dict[str, list[Any]]) -> Grid:
    if not sets:
        return grid
    keys = list(sets)
    variations = tuple(
        dict(zip(keys, combo, strict=True)) for combo in itertools.product(*sets.values())
    )
    base = dataclasses.replace(grid.base, **variations[0])
    return dataclasses.replace(grid, base=base, variations=variations[1:])


# ---- environment -------------------------------------------------------------------------------


def device_info() -> dict[str, Any]:
    # heavy (torch): loaded only on the path that uses it
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {
            "kind": "gpu",
            "name": props.name,
            "count": torch.cuda.device_count(),
            "memory_bytes": props.total_memory,
        }
    name = platform.processor() or "cpu"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return {
        "kind": "cpu",
        "name": name,
        "count": len(os.sched_getaffinity(0)),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
    }


def versions() -> dict[str, str]:

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "deepspeed", "accelerate", "sftscale"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=SOURCE,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=SOURCE,
            capture_output=True,
            text=True,
        ).stdout.strip()
        out["sftscale_commit"] = commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        out["sftscale_commit"] = "unknown"
    return out


def ds_memory_estimate(point: Point, *, vocab_size: int, world: int) -> dict[str, Any]:
    """DeepSpeed's estimate of model-state memory (weights, gradients, optimizer) per device
    and on the host, for this point's model, stage, offload and world size."""
    # heavy (torch): loaded only on the path that uses it
    import torch
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    from transformers import AutoModelForCausalLM

    from sftscale.model import model_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(point.preset, vocab_size=vocab_size))
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    if point.zero_stage == 3:
        host, device, _ = estimate_zero3_model_states_mem_needs(
            total,
            largest,
            num_gpus_per_node=world,
            num_nodes=1,
            cpu_offload=point.offload != "none",
            cpu_offload_params=point.offload == "params",
        )
    else:
        host, device = estimate_zero2_model_states_mem_needs(
            total, num_gpus_per_node=world, num_nodes=1, cpu_offload=point.offload != "none"
        )
    return {
        "params": total,
        "largest_layer_params": largest,
        "device_bytes": int(device),
        "host_bytes": int(host),
    }


# ---- running -----------------------------------------------------------------------------------


class Bench:
    def __init__(
        self, grid: Grid, *, out: Path, workdir: Path, nproc: int, baseline: bool, command: str
    ) -> None:
        self.grid, self.out, self.work, self.nproc = grid, out, workdir, nproc
        self.baseline, self.command = baseline, command
        self.device, self.versions = device_info(), versions()
        self.env = dict(os.environ)
        if self.device["kind"] == "cpu":
            self.env["DS_ACCELERATOR"] = "cpu"
            self.env["OMP_NUM_THREADS"] = str(max(1, self.device["count"] // nproc))

    # data ----------------------------------------------------------------------------------------
    def data_dir(self, seq_len: int, packing: str) -> Path:
        """A prepared directory of the shared corpus: packed rows, or one document per row."""
        # heavy (torch, transformers behind it): only the bench step that needs it
        from data_tools.prepare import PrepareOptions, prepare
        from sftscale.bench.corpus import make_corpus, make_tokenizer

        corpus = self.work / f"corpus-{self.grid.conversations}.jsonl"
        tok = self.work / "tokenizer"
        if not corpus.is_file():
            make_corpus(corpus.with_suffix(".tmp"), self.grid.conversations)
            corpus.with_suffix(".tmp").rename(corpus)
        if not (tok / "tokenizer_config.json").is_file():
            make_tokenizer(corpus, tok)
        out = self.work / f"data-{corpus.stem}-s{seq_len}-{packing}"
        if not (out / "manifest.json").is_file():
            prepare(
                [str(corpus)],
                tokenizer_path=str(tok),
                out_dir=str(out),
                options=PrepareOptions(
                    seq_len=seq_len,
                    packing="bfd" if packing == "packed" else "none",
                    progress=False,
                ),
            )
        return out

    # runs ----------------------------------------------------------------------------------------
    def torchrun(self, args: list[str], log: Path) -> tuple[int, float]:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={self.nproc}",
            *args,
        ]
        t0 = time.perf_counter()
        with open(log, "w") as f:
            f.write(shlex.join(cmd) + "\n")
            f.flush()
            rc = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=self.work
            ).returncode
        return rc, time.perf_counter() - t0

    def run_config(self, point: Point, run_dir: Path) -> Config:
        # heavy (torch, transformers behind it): only the bench step that needs it
        from sftscale.config import Config, from_dict

        cfg = from_dict(
            Config,
            {
                "model": {
                    "name_or_path": point.preset,
                    "gradient_checkpointing": point.gradient_checkpointing,
                    "attn_implementation": "sdpa",
                },
                "data": {"path": str(self.data_dir(point.seq_len, point.packing)), "seed": 0},
                "optim": {"lr": 3e-4, "warmup_steps": 0, "schedule": "constant"},
                "train": {
                    "micro_batch_size": point.micro_batch_size,
                    "grad_accum": 1,
                    "max_steps": self.grid.warmup_steps + self.grid.steps,
                    "seed": 0,
                    "tiled_logits": point.tiled,
                    "mlp_tiles": point.mlp_tiles,
                },
                "deepspeed": {"template": point.template, "precision": self.precision(point)},
                # use_gpu false: local mode pins DeepSpeed to CPU
                "scale": {
                    "use_gpu": self.device["kind"] == "gpu",
                    "num_workers": self.nproc,
                    "sequence_parallel_size": point.sequence_parallel_size,
                },
                "checkpoint": {"at_end": False, "export": False, "resume": False},
                "logging": {
                    "output_dir": str(run_dir.parent),
                    "run_name": run_dir.name,
                    "every_n_steps": 1,
                    "tensorboard": False,
                    "progress_bar": False,
                },
            },
        )
        return cfg

    def precision(self, point: Point) -> str:
        """The point's precision, `auto` resolved as a training run on this device resolves
        it (sftscale.precision), so both sides run what a user's run would."""
        # heavy (torch): only the bench step that needs it
        from sftscale.precision import choose, device_native_bf16

        native, why = device_native_bf16(cuda=self.device["kind"] == "gpu")
        return choose(point.precision, native_bf16=native, why=why).name

    def run_sftscale(self, point: Point) -> dict[str, Any]:
        # heavy (torch, transformers behind it): only the bench step that needs it
        from sftscale.config import save_config

        run_dir = self.work / "runs" / point.id
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        cfg = self.run_config(point, run_dir)
        config_path = run_dir.parent / f"{point.id}.yaml"
        save_config(cfg, config_path)
        log = self.work / "logs" / f"{point.id}.sftscale.log"
        rc, wall = self.torchrun(["-m", "sftscale", "train", str(config_path)], log)
        if rc != 0:
            return {"error": _tail(log)}
        records = [
            json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        ]
        steps = [r for r in records if "tokens_per_s" in r and r["step"] > self.grid.warmup_steps]
        seconds = sum(r["step_time_s"] for r in steps)

        def total(key: str) -> float:  # a per-step rate times that step's seconds, summed
            return sum(r[key] * r["step_time_s"] for r in steps)

        return {
            "tokens_per_s": total("tokens_per_s") / seconds,
            "supervised_tokens_per_s": total("supervised_tokens_per_s") / seconds,
            "step_time_s": seconds / len(steps),
            "mfu": total("mfu") / seconds,
            "hfu": total("hfu") / seconds,
            "padding_fraction": total("padding_fraction") / seconds,
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in steps),
            "peak_reserved_bytes": max(r["peak_reserved_bytes"] for r in steps),
            "measured_steps": len(steps),
            "tokens": round(total("tokens_per_s")),
            "supervised_tokens": round(total("supervised_tokens_per_s")),
            "final_loss": steps[-1]["loss"],
            "wall_s": wall,
        }

    def run_baseline(self, point: Point) -> dict[str, Any]:
        # heavy (torch, transformers behind it): only the bench step that needs it
        from sftscale.ds_config import load_template, with_adam_kernel

        cfg = self.run_config(point, self.work / "runs" / f"{point.id}.hf")
        o = cfg.optim
        spec = {
            "preset": point.preset,
            "data_dir": str(self.data_dir(point.seq_len, "padded")),
            # the optimizer sftscale's side steps with (optim.kernel), "auto"s for Trainer
            "ds_template": with_adam_kernel(load_template(point.template), cfg),
            "micro_batch_size": point.micro_batch_size,
            "gradient_checkpointing": point.gradient_checkpointing,
            "attn_implementation": cfg.model.attn_implementation,
            "precision": cfg.deepspeed.precision,
            "warmup_steps": self.grid.warmup_steps,
            "steps": self.grid.steps,
            "seed": cfg.train.seed,
            "data_seed": cfg.data.seed,
            "shuffle": cfg.data.shuffle,
            "lr": o.lr,
            "weight_decay": o.weight_decay,
            "betas": list(o.betas),
            "eps": o.eps,
            "max_grad_norm": o.max_grad_norm,
            "out_dir": str(self.work / "runs" / f"{point.id}.hf"),
            "result": str(self.work / "runs" / f"{point.id}.hf.json"),
        }
        spec_path = self.work / "runs" / f"{point.id}.hf.spec.json"
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(json.dumps(spec, indent=2))
        Path(spec["result"]).unlink(missing_ok=True)
        log = self.work / "logs" / f"{point.id}.hf_trainer.log"
        rc, wall = self.torchrun(["-m", "sftscale.bench.hf_baseline", str(spec_path)], log)
        if rc != 0 or not Path(spec["result"]).is_file():
            return {"error": _tail(log)}
        return {**json.loads(Path(spec["result"]).read_text()), "wall_s": wall}

    def record(self, runner: str, point: Point, figures: dict[str, Any], estimate: dict) -> dict:
        rec = {
            "runner": runner,
            "point": {
                "id": point.id,
                **dataclasses.asdict(point),
                "template": point.template,
                "baseline_id": point.baseline.id,
                "resolved_precision": self.precision(point),
            },
            "grid": {
                "warmup_steps": self.grid.warmup_steps,
                "steps": self.grid.steps,
                "world_size": self.nproc,
            },
            "device": self.device,
            "versions": self.versions,
            "command": self.command,
            # what the memory planner reads from the data (plan_validation.py plans the point)
            "data": {
                "packed": point.packing == "packed",
                "longest_document": read_manifest(
                    self.data_dir(point.seq_len, point.packing)
                ).longest_document,
            },
            "figures": figures,
            "ds_memory_estimate": estimate,
        }
        (self.out / f"{point.id}.{runner}.json").write_text(json.dumps(rec, indent=2) + "\n")
        return rec

    def run(self) -> list[dict]:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        for stale in self.out.glob("*.json"):  # a previous grid's runs must not mix with ours
            stale.unlink()
        points = self.grid.points()
        done: dict[Point, dict] = {}
        records = []
        vocab = None
        for i, point in enumerate(points, 1):
            if vocab is None:
                from transformers import AutoTokenizer

                tok_dir = self.data_dir(point.seq_len, point.packing) / "tokenizer"
                vocab = len(AutoTokenizer.from_pretrained(str(tok_dir)))
            estimate = ds_memory_estimate(point, vocab_size=vocab, world=self.nproc)
            _say(f"[{i}/{len(points)}] {point.id}: sftscale")
            ours = self.run_sftscale(point)
            records.append(self.record("sftscale", point, ours, estimate))
            _say("    " + _brief(ours))
            base = point.baseline
            if self.baseline and base not in done:
                _say(f"[{i}/{len(points)}] {base.id}: hf_trainer")
                done[base] = self.run_baseline(base)
                records.append(self.record("hf_trainer", base, done[base], estimate))
                _say("    " + _brief(done[base]))
        # heavy (torch, transformers behind it): only the bench step that needs it
        from sftscale.bench.report import write_report

        write_report(records, self.out, grid=self.grid, device=self.device, command=self.command)
        return records


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _brief(fig: dict) -> str:
    if "error" in fig:
        return "FAILED: " + fig["error"].splitlines()[-1][:200]
    return (
        f"{fig['supervised_tokens_per_s']:.0f} supervised tok/s, {fig['tokens_per_s']:.0f} tok/s, "
        f"MFU {fig['mfu']:.1%}, peak {fig['peak_memory_bytes'] / 2**30:.2f} GiB, "
        f"{fig['step_time_s']:.3f} s/step"
    )


def _say(msg: str) -> None:
    say(msg, prefix="bench")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--grid",
        default="cpu",
        choices=sorted(GRIDS),
        help="which grid (see sftscale/bench/suite.py)",
    )
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=V1,V2",
        help="cartesian product over these settings instead of the grid's variations",
    )
    p.add_argument("--warmup-steps", type=int, default=None, help="steps not measured")
    p.add_argument("--steps", type=int, default=None, help="measured steps")
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="ranks per run (default: 2 on CPU, every GPU on GPU)",
    )
    p.add_argument(
        "--out", default=None, help="results directory (default benchmarks/results/bench-<grid>)"
    )
    p.add_argument(
        "--workdir",
        default=None,
        help="corpus, prepared data, runs and logs (default /tmp/sftscale-bench)",
    )
    p.add_argument("--no-baseline", action="store_true", help="skip the Hugging Face Trainer runs")


def main(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(
            "sftscale bench: error: the plots need matplotlib: pip install 'sftscale[bench]'",
            file=sys.stderr,
        )
        return 2
    # heavy (torch): loaded only on the path that uses it
    import torch

    grid = GRIDS[args.grid]
    try:
        grid = grid_with_sets(grid, parse_sets(args.set))
    except ValueError as e:
        print(f"sftscale bench: error: {e}", file=sys.stderr)
        return 2
    if args.warmup_steps is not None or args.steps is not None:
        grid = dataclasses.replace(
            grid,
            warmup_steps=args.warmup_steps if args.warmup_steps is not None else grid.warmup_steps,
            steps=args.steps or grid.steps,
        )
    if grid.warmup_steps < 1 or grid.steps < 1:
        print("sftscale bench: error: --warmup-steps and --steps must be >= 1", file=sys.stderr)
        return 2
    nproc = args.nproc or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    bench = Bench(
        grid,
        out=Path(args.out) if args.out else default_out(args.grid),
        workdir=Path(args.workdir or "/tmp/sftscale-bench").resolve(),
        nproc=nproc,
        baseline=not args.no_baseline,
        command=shlex.join(["sftscale", "bench", *argv]),
    )
    records = bench.run()
    failed = [
        r["point"]["id"] + " (" + r["runner"] + ")" for r in records if "error" in r["figures"]
    ]
    _say(f"wrote {bench.out}/summary.md, tokens_per_s.png, memory.png and {len(records)} run JSONs")
    if failed:
        _say(f"{len(failed)} run(s) failed: {', '.join(failed)} (logs in {bench.work / 'logs'})")
        return 1
    return 0
