"""No silent hangs: a rank that stops before a collective makes the others fail within
scale.collective_timeout_s, naming it; `sftscale status` tells a stuck run from a slow one."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from sftscale.heartbeat import Heartbeat, missing_ranks, read_heartbeats, status
from sftscale.launch import free_port


def test_status_reads_heartbeats(tmp_path, capsys):
    from sftscale.cli import main

    assert "no heartbeat yet" in status(tmp_path)
    Heartbeat(tmp_path, rank=0).beat(step=7, phase="train", step_time_s=0.5)
    gone = Heartbeat(tmp_path, rank=1)
    gone.base["pid"] = 2**22 + 12345  # no such process
    gone.beat(step=6, phase="train", step_time_s=0.5)
    assert [b["rank"] for b in read_heartbeats(tmp_path)] == [0, 1]
    assert missing_ranks(tmp_path, step=7, world=3) == [1, 2]  # behind / gone; never started
    assert main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "step 6 (slowest rank)" in out
    assert "rank   0" in out and "running" in out
    assert "rank   1" in out and "process gone or stopped" in out


@pytest.mark.distributed
def test_a_stopped_rank_is_named_within_the_timeout(tmp_path, prepared_dir):
    run_dir = tmp_path / "runs" / "t"
    cfg = {
        "model": {"name_or_path": "tiny-llama"},
        "data": {"path": str(prepared_dir)},
        "train": {"micro_batch_size": 1, "max_steps": 100000},
        "scale": {"collective_timeout_s": 15},
        "checkpoint": {"at_end": False, "export": False},
        "logging": {"output_dir": str(tmp_path / "runs"), "run_name": "t", "every_n_steps": 50},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), "-m", "sftscale", "train", str(tmp_path / "cfg.yaml")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    victim = None
    try:
        deadline = time.time() + 300
        while victim is None and time.time() < deadline and proc.poll() is None:
            beats = {b["rank"]: b for b in read_heartbeats(run_dir)}
            if 1 in beats and beats[1]["phase"] == "train" and beats[1]["step"] >= 3:
                victim = beats[1]["pid"]
            time.sleep(0.2)
        assert victim is not None, proc.communicate(timeout=60)[0][-3000:]
        os.kill(victim, signal.SIGSTOP)
        stopped_at = time.time()
        time.sleep(2)
        assert "process gone or stopped" in status(run_dir).splitlines()[2]  # rank 1's line
        out, _ = proc.communicate(timeout=240)
        waited = time.time() - stopped_at
    finally:
        if victim is not None:
            with __import__("contextlib").suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert (
        "did not complete within scale.collective_timeout_s=15 s; rank(s) 1 did not arrive" in out
    ), out[-4000:]
    assert waited < 15 + 120, waited  # the timeout, plus torchrun stopping the other rank
    beat0 = json.loads((run_dir / "heartbeat" / "rank0.json").read_text())
    assert beat0["phase"] == "train"
