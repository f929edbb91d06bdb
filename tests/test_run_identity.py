"""A run is what it says it is: a checkpoint resumes only the run that wrote it (or a forced
resume, on the record), one launch owns a run directory, nothing sftscale wrote is unpickled,
`latest` names a step, exports replace themselves whole, and credentials stay out of what is
saved and forwarded."""

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sftscale.checkpoint import STATE_FILE, _prune, latest_checkpoint, load_rng_state
from sftscale.config import load_config, redact, save_config
from sftscale.rundir import OWNER_FILE, own_run_dir


def _cmd(tmp_path, prepared_dir, name, *extra):
    cfg = load_config(
        None,
        [
            "model.name_or_path=tiny-llama",
            f"data.path={prepared_dir}",
            "deepspeed.precision=fp32",
            "optim.lr=2e-3",
            "optim.schedule=constant",  # a longer run is the shorter one continued
            "train.micro_batch_size=1",
            "train.grad_accum=2",
            "train.max_steps=4",
            "checkpoint.keep_last=2",
            f"logging.output_dir={tmp_path}",
            f"logging.run_name={name}",
            "logging.tensorboard=false",
            "logging.progress_bar=false",
        ],
    )
    path = tmp_path / f"{name}.yaml"
    save_config(cfg, path)
    return [sys.executable, "-m", "sftscale", "train", str(path), "--local", *extra]


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


class _Payload:
    """Unpickling this writes a marker file: what a planted checkpoint file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


@pytest.mark.distributed
def test_a_changed_run_is_refused_a_longer_one_resumes_and_force_is_recorded(
    tmp_path, prepared_dir
):
    run_dir = tmp_path / "a"
    first = subprocess.run(_cmd(tmp_path, prepared_dir, "a"), capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    config_before = (run_dir / "config.yaml").read_text()

    # Another experiment into the same run directory: refused before any worker starts
    t0 = time.time()
    other = subprocess.run(
        _cmd(tmp_path, prepared_dir, "a", "optim.lr=1e-4"), capture_output=True, text=True
    )
    assert other.returncode == 2, other.stdout[-2000:] + other.stderr[-2000:]
    assert "optim.lr: 0.002 in the checkpoint, 0.0001 now" in other.stderr
    assert "logging.run_name" in other.stderr and "checkpoint.resume=force" in other.stderr
    assert "precision" not in other.stdout and time.time() - t0 < 60  # no worker started
    assert (run_dir / "config.yaml").read_text() == config_before

    # A planted pickle beside the RNG state: never loaded
    marker = tmp_path / "pwned"
    tag = latest_checkpoint(run_dir / "checkpoints")
    (tag / "rng_rank0.pt").write_bytes(pickle.dumps(_Payload(marker)))

    # max_steps raised: the same run, continued; with a constant schedule it is the 6-step run
    longer = subprocess.run(
        _cmd(tmp_path, prepared_dir, "a", "--max-steps", "6"), capture_output=True, text=True
    )
    assert longer.returncode == 0, longer.stdout[-3000:] + longer.stderr[-3000:]
    assert "resumed from" in longer.stdout and "at step 4" in longer.stdout
    assert not marker.exists()
    straight = subprocess.run(
        _cmd(tmp_path, prepared_dir, "b", "--max-steps", "6"), capture_output=True, text=True
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert _losses(run_dir) == _losses(tmp_path / "b")  # bitwise: resumed == uninterrupted

    # force: resumes with the change, and says so in the run's history
    forced = subprocess.run(
        _cmd(
            tmp_path,
            prepared_dir,
            "a",
            "optim.lr=1e-4",
            "checkpoint.resume=force",
            "--max-steps",
            "7",
        ),
        capture_output=True,
        text=True,
    )
    assert forced.returncode == 0, forced.stdout[-3000:] + forced.stderr[-3000:]
    (event,) = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert event["event"] == "resume forced"
    assert {"key": "optim.lr", "was": 0.002, "now": 0.0001} in event["changes"]


@pytest.mark.distributed
def test_a_second_launch_into_a_live_run_directory_fails_naming_the_holder(tmp_path, prepared_dir):
    run_dir = tmp_path / "held"
    with own_run_dir(run_dir, log=print):
        t0 = time.time()
        second = subprocess.run(
            _cmd(tmp_path, prepared_dir, "held"), capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 2
        assert f"in use by pid {os.getpid()} on host" in second.stderr
        assert time.time() - t0 < 60 and not (run_dir / "checkpoints").exists()
    # A launch killed without cleaning up left its record: taken over, with a message
    (run_dir / OWNER_FILE).write_text(
        json.dumps({"host": os.uname().nodename, "pid": 2**22 + 7, "since": time.time()})
    )
    third = subprocess.run(_cmd(tmp_path, prepared_dir, "held"), capture_output=True, text=True)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "taking over" in third.stdout and "which is no longer running" in third.stdout
    assert not (run_dir / OWNER_FILE).exists()


@pytest.mark.distributed
def test_a_re_export_with_another_shard_size_replaces_the_old_one(tmp_path, prepared_dir):
    """Export a checkpoint in one file, then a later one in small shards into the same
    directory: from_pretrained loads the new weights (the old model.safetensors is gone)."""
    from transformers import AutoModelForCausalLM

    run = subprocess.run(
        _cmd(tmp_path, prepared_dir, "x", "checkpoint.every_n_steps=2"),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ckpts, out = tmp_path / "x" / "checkpoints", tmp_path / "hf"
    # the CLI in one file, then the API in shards of 100 kB (a tiny model fits one MB)
    exported = subprocess.run(
        [
            sys.executable,
            "-m",
            "sftscale",
            "export",
            str(ckpts / "step_00000002"),
            "--out",
            str(out),
            "--dtype",
            "float32",
        ],
        capture_output=True,
        text=True,
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (out / "model.safetensors").is_file()
    from sftscale.export import export_from_checkpoint

    export_from_checkpoint(
        ckpts / "step_00000004", out_dir=out, dtype=torch.float32, max_shard_bytes=10**5
    )
    assert (
        not (out / "model.safetensors").exists()
        and (out / "model.safetensors.index.json").is_file()
    )
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    final = AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "x" / "export"), dtype=torch.float32
    )
    for (name, a), (_, b) in zip(
        loaded.state_dict().items(), final.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    refused = subprocess.run(
        [sys.executable, "-m", "sftscale", "export", str(ckpts), "--out", str(mine)],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "not a model export" in refused.stderr
    assert (mine / "notes.txt").read_text() == "mine"


def _tag(root: Path, step: int) -> Path:
    tag = root / f"step_{step:08d}"
    tag.mkdir(parents=True)
    (tag / STATE_FILE).write_text(json.dumps({"step": step}))
    return tag


@pytest.mark.parametrize("name", ["../../etc", "/etc", "step_1/../..", "step_00000002/x"])
def test_latest_names_a_step_never_a_path(tmp_path, name):
    _tag(tmp_path, 2)
    (tmp_path / "latest").write_text(name + "\n")
    with pytest.raises(FileNotFoundError, match="not a checkpoint name"):
        latest_checkpoint(tmp_path)


def test_pruning_keeps_what_latest_names_past_an_orphaned_newer_step(tmp_path):
    for step in (1, 2, 9):  # step 9: a crashed run's directory that latest never named
        _tag(tmp_path, step)
    (tmp_path / "latest").write_text("step_00000002\n")
    _prune(tmp_path, keep_last=1)
    assert (tmp_path / "step_00000002").is_dir() and not (tmp_path / "step_00000001").exists()


def test_a_pickled_rng_file_is_never_loaded(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "rng_rank0.pt").write_bytes(pickle.dumps(_Payload(marker)))
    assert load_rng_state(tmp_path, 0) is False
    assert not marker.exists()


def test_credentials_in_uris_are_redacted_and_not_forwarded(tmp_path, monkeypatch):
    from sftscale.launch import _worker_env

    text = "s3://AKIAX:hunter2@bucket/p?endpoint_override=h:9&secret_key=abc&scheme=http"
    assert redact(text) == "s3://***@bucket/p?endpoint_override=h:9&secret_key=***&scheme=http"
    cfg = load_config(None, [f"data.path={text}", f"logging.output_dir={tmp_path}"])
    save_config(cfg, tmp_path / "c.yaml")
    saved = (tmp_path / "c.yaml").read_text()
    assert "hunter2" not in saved and "secret_key=abc" not in saved
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    assert _worker_env(cfg).get("AWS_SECRET_ACCESS_KEY") == "s3cr3t"  # a URI needs it
    local = load_config(None, ["data.path=/data/prepared"])
    assert "AWS_SECRET_ACCESS_KEY" not in _worker_env(local)  # nothing needs it: not sent
