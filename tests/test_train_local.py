"""Local (single-process, no Ray) mode runs the real loop: DeepSpeed ZeRO-3 on CPU, in the
precision `auto` picks (bf16 where the CPU has it natively, else fp32)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import assert_export_matches_checkpoint, assert_sharded_export_loads
from sftscale.cli import main
from sftscale.config import load_config
from sftscale.launch import free_port


def _config(tmp_path, prepared_dir, **train):
    data = {
        "model": {"name_or_path": "tiny-llama"},
        "data": {"path": str(prepared_dir)},
        "optim": {"lr": 5e-3, "warmup_steps": 2},
        "train": {"micro_batch_size": 2, "grad_accum": 2, "max_steps": 12, **train},
        "scale": {"num_workers": 2},
        "logging": {"output_dir": str(tmp_path / "runs"), "run_name": "t", "every_n_steps": 1},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ONEDNN_MAX_CPU_ISA=AVX2 makes any x86 CPU compute as one without native bf16 does: oneDNN
# stops using AVX512-BF16/AMX (bf16 matmuls become ~50x slower than fp32, as on AVX2-only CPUs).
NO_NATIVE_BF16 = {"ONEDNN_MAX_CPU_ISA": "AVX2"}


def _train_subprocess(cfg_path, *args, env=None):
    # in a fresh process, as a user runs it (DeepSpeed keeps process-global state)
    proc = subprocess.run(
        [sys.executable, "-m", "sftscale", "train", str(cfg_path), "--local", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def _ours(stdout: str) -> list[str]:
    """Our lines (DeepSpeed prints its own, e.g. when it builds an op)."""
    return [line for line in stdout.splitlines() if line.startswith("[sftscale]")]


# the driver's lines that come before the workers' when this run is the first to do the work:
# hashing the shards (a test run alone) or measuring the host's runtime memory for this CPU's
# oneDNN ISA (the first run under ONEDNN_MAX_CPU_ISA=AVX2 on a fresh cache)
_FIRST_TIME = ("shards hashed and recorded", "measuring this host's runtime memory")


def _workers(stdout: str) -> list[str]:
    """Our lines from the workers: without the driver's first-time lines (_FIRST_TIME)."""
    return [line for line in _ours(stdout) if not any(s in line for s in _FIRST_TIME)]


def _native_bf16() -> bool:
    from sftscale.precision import cpu_native_bf16

    return cpu_native_bf16()[0]


@pytest.mark.distributed
@pytest.mark.parametrize("cpu", ["this-cpu", "no-native-bf16"])
def test_local_mode_trains_evaluates_checkpoints_and_exports(tmp_path, prepared_dir, cpu):
    cfg_path = _config(tmp_path, prepared_dir)
    proc = _train_subprocess(
        cfg_path,
        "optim.weight_decay=0.01",
        f"eval.path={prepared_dir}",
        "eval.every_n_steps=6",
        "eval.max_rows=9",
        env=NO_NATIVE_BF16 if cpu == "no-native-bf16" else {},
    )
    # the workers' first line says what auto chose and why
    first = _workers(proc.stdout)[0]
    expected = "bf16" if cpu == "this-cpu" and _native_bf16() else "fp32"
    assert first.startswith(f"[sftscale] precision {expected} (auto: "), first
    run_dir = tmp_path / "runs" / "t"
    records = [r for r in _records(run_dir) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 13))
    keys = (
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "supervised_tokens_per_s",
        "padding_fraction",
        "mfu",
        "hfu",
        "rank_imbalance",
        "step_time_s",
        "peak_memory_bytes",
    )
    for key in keys:
        assert records[-1][key] is not None, key
    for r in records:  # checkpointing recomputes the forward: HFU = 4/3 MFU
        assert 0 < r["mfu"] < r["hfu"] <= 1, r
        assert r["hfu"] == pytest.approx(r["mfu"] * 4 / 3)
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-3:]) / 3
    assert last < first - 0.5, [r["loss"] for r in records]

    evals = [r for r in _records(run_dir) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[1]["eval_ppl"] == pytest.approx(math.exp(evals[1]["eval_loss"]))
    assert (run_dir / "tensorboard").is_dir()

    saved = load_config(run_dir / "config.yaml")
    assert saved.optim.weight_decay == 0.01  # the resolved config, overrides applied
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000012"
    assert_export_matches_checkpoint(run_dir, tmp_path)
    assert_sharded_export_loads(run_dir, tmp_path)


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_launched_ranks_run_the_local_mode(tmp_path, prepared_dir, launcher):
    """`torchrun ... -m sftscale train` and `deepspeed --module sftscale train` (which passes
    --local_rank before the command): each rank runs the local mode, no Ray and no --local."""
    cfg_path = _config(tmp_path, prepared_dir, max_steps=4)
    args = [str(cfg_path), "checkpoint.export=false"]
    if launcher == "torchrun":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "sftscale",
            "train",
            *args,
        ]
    else:
        cmd = [
            str(Path(sys.executable).parent / "deepspeed"),
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            "--module",
            "sftscale",
            "train",
            *args,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert "2 worker(s)" in proc.stdout and proc.stdout.count("[sftscale] done") == 2
    assert [r["step"] for r in _records(tmp_path / "runs" / "t") if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.distributed
def test_bf16_forced_on_a_cpu_without_it_warns_and_mfu_stays_below_one(tmp_path, prepared_dir):
    """The reported defect: bf16 on an AVX2 CPU gave HFU 122% (a square-matmul peak probe;
    torch's bf16 linear is ~8x faster there than its bf16 matmul). Also the bf16 path on any
    host: its export is the checkpoint's fp32 master weights rounded to bf16."""
    cfg_path = _config(tmp_path, prepared_dir, max_steps=3)
    proc = _train_subprocess(cfg_path, "deepspeed.precision=bf16", env=NO_NATIVE_BF16)
    lines = _workers(proc.stdout)
    assert lines[0] == "[sftscale] precision bf16 (deepspeed.precision=bf16)"
    assert lines[1].startswith("[sftscale] warning: deepspeed.precision=bf16 on a device without")
    records = [r for r in _records(tmp_path / "runs" / "t") if "loss" in r]
    assert len(records) == 3
    for r in records:
        assert 0 < r["mfu"] < r["hfu"] <= 1, r
    run_dir = tmp_path / "runs" / "t"
    assert json.loads((run_dir / "export" / "config.json").read_text())["dtype"] == "bfloat16"
    assert_export_matches_checkpoint(run_dir, tmp_path)


@pytest.mark.distributed
@pytest.mark.builds_ops("cpu_adam")
def test_cpu_optimizer_offload(tmp_path, prepared_dir):
    """ZeRO-3 with the optimizer on the CPU (DeepSpeedCPUAdam) through its ds_configs template."""
    cfg_path = _config(tmp_path, prepared_dir, max_steps=6)
    _train_subprocess(
        cfg_path, "deepspeed.template=zero3_offload_optimizer", "checkpoint.export=false"
    )
    records = [r for r in _records(tmp_path / "runs" / "t") if "loss" in r]
    assert len(records) == 6 and records[-1]["loss"] < records[0]["loss"]


def test_bad_config_fails_before_any_worker(tmp_path, prepared_dir, capsys):
    cfg_path = _config(tmp_path, prepared_dir, micro_batch_size=1000)
    assert main(["train", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert "train.micro_batch_size" in err and "rows" in err
    assert not (tmp_path / "runs").exists()


def test_missing_data_dir_names_the_field(tmp_path, prepared_dir, capsys):
    cfg_path = _config(tmp_path, prepared_dir)
    assert main(["train", str(cfg_path), f"data.path={tmp_path / 'nothing'}"]) == 2
    assert "data.path" in capsys.readouterr().err
