"""A JIT build lock left by a killed run never makes a later run wait silently."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sftscale.jit_locks import BuildLockWatch, processes_in

ROOT = Path(__file__).resolve().parent.parent


def _plant(root: Path, op: str, *, age_s: float) -> Path:
    lock = root / op / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_stale_lock_is_removed_and_a_live_build_is_waited_for(tmp_path):
    messages = []
    watch = BuildLockWatch(tmp_path, log=messages.append, notify_after_s=5, stale_after_s=60)
    stale = _plant(tmp_path, "fused_adam", age_s=3600)
    fresh = _plant(tmp_path, "cpu_adam", age_s=1)  # just taken by a process starting a build
    young = _plant(tmp_path, "shm_comm", age_s=20)  # held, nobody building yet: reported
    building = _plant(tmp_path, "other_op", age_s=3600)
    ninja = subprocess.Popen(["sleep", "60"], cwd=building.parent)  # a build in progress
    try:
        assert processes_in(building.parent) == [ninja.pid]
        assert watch.scan() == [stale]
        assert not stale.exists() and fresh.exists() and young.exists() and building.exists()
        assert any(f"removed a stale JIT build lock {stale}" in m for m in messages)
        assert any(f"{building}, held since" in m and f"pid(s) {ninja.pid}" in m for m in messages)
        assert any(
            f"{young}, held since" in m and "removed if none starts within" in m for m in messages
        )
        n = len(messages)
        watch.scan()  # each held lock is reported once
        assert len(messages) == n
    finally:
        ninja.kill()
        ninja.wait()
    assert watch.scan() == [building]  # its builder is gone: stale


def _train(tmp_path, prepared_dir, cache: Path, *overrides: str):
    cfg = {
        "model": {"name_or_path": "tiny-llama"},
        "data": {"path": str(prepared_dir)},
        "train": {"micro_batch_size": 1, "max_steps": 2},
        "checkpoint": {"at_end": False, "export": False},
        "logging": {"output_dir": str(tmp_path / "runs"), "run_name": "t"},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "sftscale",
            "train",
            str(tmp_path / "cfg.yaml"),
            "--local",
            *overrides,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "TORCH_EXTENSIONS_DIR": str(cache)},
    )


@pytest.mark.distributed
def test_the_default_path_compiles_nothing(tmp_path, prepared_dir):
    """A run with the default template on an empty extensions directory trains without building
    any DeepSpeed op (torch's AdamW, gloo without the shared-memory op); a lock a killed run left
    there is still removed, and said."""
    cache = tmp_path / "torch_extensions"
    lock = _plant(cache, "fused_adam", age_s=3600)
    proc = _train(tmp_path, prepared_dir, cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step     2/2" in proc.stdout
    assert f"removed a stale JIT build lock {lock}" in proc.stdout
    assert list(cache.rglob("*.so")) == [] and "building DeepSpeed" not in proc.stdout


@pytest.mark.distributed
@pytest.mark.builds_ops("cpu_adam")
def test_an_offload_template_builds_cpu_adam_in_the_driver_past_a_stale_lock(
    tmp_path, prepared_dir
):
    """zero3_offload_optimizer loads DeepSpeed's CPU Adam: the driver builds it on first use
    (or loads it) before any worker starts, past a lock a killed build left, and says why."""
    cache = Path(os.environ["TORCH_EXTENSIONS_DIR"])  # the suite's: built once, then loaded
    built = (cache / "cpu_adam" / "cpu_adam.so").is_file()
    lock = _plant(cache, "cpu_adam", age_s=3600)
    proc = _train(tmp_path, prepared_dir, cache, "deepspeed.template=zero3_offload_optimizer")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"removed a stale JIT build lock {lock}" in proc.stdout
    assert (cache / "cpu_adam" / "cpu_adam.so").is_file()
    if not built:  # said before the first worker line
        building = proc.stdout.index("building DeepSpeed's CPU Adam op (deepspeed.template=")
        assert building < proc.stdout.index("precision fp32")
        assert "CPU Adam op built in" in proc.stdout
    assert "step     2/2" in proc.stdout


@pytest.mark.distributed
@pytest.mark.builds_ops("cpu_adam")
def test_build_ops_ahead_of_time_past_a_stale_lock():
    """`sftscale build-ops NAME` (cluster images) builds or loads an op into
    TORCH_EXTENSIONS_DIR past a lock that a killed build left there, with the environment's
    ninja whatever PATH says (another ninja version would rebuild every op)."""
    cache = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    lock = _plant(cache, "cpu_adam", age_s=3600)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "sftscale", "build-ops", "cpu_adam"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"removed a stale JIT build lock {lock}" in proc.stdout
    assert f"CPUAdamBuilder: ready in {cache}" in proc.stdout, proc.stdout
    assert not lock.exists() and (cache / "cpu_adam" / "cpu_adam.so").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "sftscale", "build-ops", "apex_adam"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2 and "choose from cpu_adam, async_io" in bad.stdout + bad.stderr


def test_a_missing_compiler_is_named_before_any_worker_starts(monkeypatch, tmp_path):

    from sftscale.jit_locks import OpBuildError, ensure_ops

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(shutil, "which", lambda _: None)
    with pytest.raises(
        OpBuildError,
        match=r"CPU Adam op \(why\) cannot be built.*install a C\+\+ compiler: apt-get install g\+\+",
    ):
        ensure_ops([("CPUAdamBuilder", "why")], log=print)
    assert list(tmp_path.iterdir()) == []
