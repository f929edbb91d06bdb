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
        str(tmp_path / "cfg.yaml"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    log = open(tmp_path / "run.out", "w")  # noqa: SIM115 (a file: an unread pipe could stall it)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    victim = None
    try:
        deadline = time.time() + 300
        while victim is None and time.time() < deadline and proc.poll() is None:
            beats = {b["rank"]: b for b in read_heartbeats(run_dir)}
            if 1 in beats and beats[1]["phase"] == "train" and beats[1]["step"] >= 3:
                victim = beats[1]["pid"]
            time.sleep(0.2)
        assert victim is not None, (tmp_path / "run.out").read_text()[-3000:]
        os.kill(victim, signal.SIGSTOP)
        stopped_at = time.time()
        time.sleep(2)
        assert "process gone or stopped" in status(run_dir).splitlines()[2]  # rank 1's line
        named = "did not complete within scale.collective_timeout_s=15 s; rank(s) 1 did not arrive"
        while named not in (tmp_path / "run.out").read_text() and time.time() < stopped_at + 120:
            time.sleep(0.2)
        waited = time.time() - stopped_at
        # torchrun would now wait 30 s for the stopped rank to obey its SIGTERM: end it here
        os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=240)
        out = (tmp_path / "run.out").read_text()
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
    assert waited < 15 + 45, waited  # named within the timeout (and a slow host's margin)
    beat0 = json.loads((run_dir / "heartbeat" / "rank0.json").read_text())
    assert beat0["phase"] == "train"


def test_a_rank_without_progress_prints_its_stacks_and_exits(tmp_path):
    """The stall watchdog: no heartbeat for scale.stall_timeout_s ends the process with 75, after
    printing where each thread was (here: a function that never returns)."""
    script = f"""
import time
from sftscale.heartbeat import Heartbeat
hb = Heartbeat({str(tmp_path)!r}, rank=3, stall_timeout_s=1)
hb.beat(step=5, phase="train")
def reading_a_shard_that_never_comes():
    time.sleep(60)
reading_a_shard_that_never_comes()
"""
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == 75, p.stderr
    assert time.time() - t0 < 30
    assert "rank 3: no progress for 1 s (phase train, 5 steps done)" in p.stderr
    assert "scale.stall_timeout_s=1" in p.stderr
    assert "reading_a_shard_that_never_comes" in p.stderr  # the stuck frame


def test_a_rank_that_beats_or_finishes_is_left_alone(tmp_path):
    script = f"""
import time
from sftscale.heartbeat import Heartbeat
hb = Heartbeat({str(tmp_path)!r}, rank=0, stall_timeout_s=1)
for step in range(8):
    hb.beat(step=step, phase="train")
    time.sleep(0.4)
hb.beat(step=8, phase="done")
time.sleep(2)  # after "done" the watchdog is off
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_the_driver_reports_a_stopped_rank_once(tmp_path):
    from sftscale.heartbeat import StallReporter

    Heartbeat(tmp_path, rank=0).beat(step=4, phase="train", step_time_s=0.5)
    gone = Heartbeat(tmp_path, rank=1)
    gone.base["pid"] = 2**22 + 12345  # no such process
    gone.beat(step=4, phase="checkpoint", step_time_s=0.5)
    said = []
    reporter = StallReporter(tmp_path, log=said.append)
    assert len(reporter.check()) == 1 and reporter.check() == []
    assert "rank 1" in said[0] and "phase checkpoint after 4 steps" in said[0]
    assert "process gone or stopped" in said[0]
    # rank 0 running but silent for far longer than 20 typical steps: reported too
    assert "rank 0" in reporter.check(now=time.time() + 120)[0]


def test_stall_timeout_must_outlast_the_collective_timeout():
    from sftscale.config import ConfigError, ScaleConfig

    with pytest.raises(ConfigError, match="scale.stall_timeout_s: must be 0 .off. or longer"):
        ScaleConfig(collective_timeout_s=600, stall_timeout_s=300)
    assert ScaleConfig(stall_timeout_s=0).stall_timeout_s == 0
