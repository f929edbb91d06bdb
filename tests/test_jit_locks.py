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


@pytest.mark.distributed
def test_run_proceeds_past_a_lock_a_killed_run_left(tmp_path, prepared_dir):
    """The reported hang: a lock file in fused_adam's build directory made every later run wait
    in FileBaton.wait forever. Now the run removes it, says so, and trains."""
    cache = tmp_path / "torch_extensions"
    built = ROOT / ".cache" / "torch_extensions"
    if built.is_dir():  # the ops built by earlier tests: no rebuild needed
        shutil.copytree(built, cache, ignore=shutil.ignore_patterns("lock"))
    lock = _plant(cache, "fused_adam", age_s=3600)
    cfg = {
        "model": {"name_or_path": "tiny-llama"},
        "data": {"path": str(prepared_dir)},
        "train": {"micro_batch_size": 1, "max_steps": 2},
        "checkpoint": {"at_end": False, "export": False},
        "logging": {"output_dir": str(tmp_path / "runs"), "run_name": "t"},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "sftscale", "train", str(tmp_path / "cfg.yaml"), "--local"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TORCH_EXTENSIONS_DIR": str(cache)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"removed a stale JIT build lock {lock}" in proc.stdout
    assert "step     2/2" in proc.stdout


@pytest.mark.distributed
def test_build_ops_fills_the_cache_past_a_stale_lock(tmp_path):
    """`sftscale build-ops` (make install runs it): every op a run loads is built or loaded into
    TORCH_EXTENSIONS_DIR, past a lock that a killed build left there, with the environment's
    ninja whatever PATH says (another ninja version would rebuild every op)."""
    cache = tmp_path / "torch_extensions"
    built = ROOT / ".cache" / "torch_extensions"
    if built.is_dir():  # built by make install: loaded, not rebuilt
        shutil.copytree(built, cache, ignore=shutil.ignore_patterns("lock"))
    lock = _plant(cache, "cpu_adam", age_s=3600)
    env = {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": str(cache),
        "DS_ACCELERATOR": "cpu",
        "PATH": "/usr/bin:/bin",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "sftscale", "build-ops"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"removed a stale JIT build lock {lock}" in proc.stdout
    for op in ("FusedAdamBuilder", "CPUAdamBuilder", "ShareMemCommBuilder"):
        assert f"{op}: ready in {cache}" in proc.stdout, proc.stdout
    assert not lock.exists()
    names = {p.name for p in cache.glob("*/*.so")}
    assert {"cpu_adam.so", "deepspeed_shm_comm.so", "fused_adam.so"} <= names
