"""Launchers for real: `ray job submit` to a Ray cluster started with `ray start --head` on
127.0.0.1, running the 2-worker ZeRO-3 training as a job."""

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from sftscale.launch import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _ray(*args, env, check=True, timeout=600):
    return subprocess.run(
        [str(BIN / "ray"), *args],
        env=env,
        capture_output=True,
        text=True,
        check=check,
        timeout=timeout,
    )


@pytest.mark.distributed
def test_ray_job_submit_runs_zero3_training(tmp_path, prepared_dir):
    # Token authentication on, as on a real cluster: the cluster and its clients share a token.
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    env.pop("RAY_ADDRESS", None)
    cfg = {
        "model": {"name_or_path": "tiny-llama"},
        "data": {"path": str(prepared_dir)},
        "optim": {"lr": 5e-3, "warmup_steps": 2},
        "train": {"micro_batch_size": 2, "grad_accum": 1, "max_steps": 8},
        "scale": {"num_workers": 2},
        "logging": {"output_dir": str(tmp_path / "runs"), "run_name": "job", "tensorboard": False},
    }
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    # This test's own Ray head, on free ports, ended by its process group (never `ray stop`,
    # which ends every Ray process on the host)
    port, dashboard = free_port(), free_port()
    # its own temp dir (short: Ray's socket paths): its sessions and ray_current_cluster file
    # land there, not in the host's /tmp/ray, where a later ray.init() would try to join it
    ray_tmp = tempfile.mkdtemp(prefix="rayt-")
    env = {**env, "RAY_TMPDIR": ray_tmp}
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--num-cpus=2",
            "--disable-usage-stats",
            f"--temp-dir={ray_tmp}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while time.time() < deadline:
        probe = _ray("job", "list", "--address", address, env=env, check=False, timeout=60)
        if probe.returncode == 0:
            break
        time.sleep(2)
    try:
        submit = subprocess.run(
            [
                str(BIN / "ray"),
                "job",
                "submit",
                "--address",
                address,
                "--runtime-env",
                str(ROOT / "launchers/ray/runtime_env.yaml"),
                "--working-dir",
                str(ROOT),
                "--",
                sys.executable,
                "-m",
                "sftscale",
                "train",
                str(cfg_path),
                "checkpoint.every_n_steps=4",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            cwd=ROOT,
        )
        out = submit.stdout + submit.stderr
        assert submit.returncode == 0, out[-4000:]
        assert "succeeded" in out, out[-4000:]
        assert "[sftscale] step" in out  # the job's logs stream back to the submitter
        run_dir = tmp_path / "runs" / "job"
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000008"
        assert (run_dir / "export" / "model.safetensors").is_file()
        jobs = _ray("job", "list", "--address", address, env=env).stdout
        assert "SUCCEEDED" in jobs
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
