"""Launchers for real: `ray job submit` to a Ray cluster started with `ray start --head` on
127.0.0.1, running the 2-worker ZeRO-3 training as a job."""

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import assert_export_matches_checkpoint

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
    _ray(
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--num-cpus=2",
        "--disable-usage-stats",
        env=env,
    )
    try:
        submit = subprocess.run(
            [
                str(BIN / "ray"),
                "job",
                "submit",
                "--address",
                "http://127.0.0.1:8265",
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
        # both ranks wrote their ZeRO-3 partitions, and the export (in the precision `auto`
        # picks: bf16 on a CPU that has it) is the checkpoint consolidated
        files = sorted(p.name for p in (run_dir / "checkpoints" / "step_00000008").iterdir())
        assert sum("zero_pp_rank_" in f and "optim_states" in f for f in files) == 2, files
        assert_export_matches_checkpoint(run_dir, tmp_path)
        jobs = _ray("job", "list", "--address", "http://127.0.0.1:8265", env=env).stdout
        assert "SUCCEEDED" in jobs
    finally:
        _ray("stop", "--force", env=env, check=False)
