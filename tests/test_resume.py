"""Checkpoints survive anything: exact resume after SIGTERM, after a crash in the middle of
writing a checkpoint, after SIGSTOP of a Ray worker (a killed node and an elastic resume on
another world size: tests/test_cluster.py; another SP x DP split: tests/test_sequence_parallel.py).
Every interrupted run is compared with an uninterrupted one, and its sample ledger shows no
sample skipped or repeated."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
import torch

from helpers import RANK_ENV, torchrun
from sftscale.checkpoint import CRASH_ENV, TMP_PREFIX, read_ledger
from sftscale.config import load_config, save_config
from sftscale.data import stream_rows
from sftscale.jit_locks import op_available

STEPS = 20  # every interruption point (steps 6, 7, 8, 12) lies well inside


def _cfg(tmp_path, prepared_dir, name, *extra):
    return load_config(
        None,
        [
            "model.name_or_path=tiny-llama",
            f"data.path={prepared_dir}",
            "deepspeed.precision=fp32",
            "optim.lr=2e-3",
            "optim.warmup_steps=3",
            "train.micro_batch_size=1",
            "train.grad_accum=2",
            f"train.max_steps={STEPS}",
            "checkpoint.every_n_steps=4",
            "checkpoint.keep_last=2",
            f"logging.output_dir={tmp_path}",
            f"logging.run_name={name}",
            "logging.tensorboard=false",
            *extra,
        ],
    )


def _config_file(cfg) -> str:
    """`cfg` saved beside its run directory: the file the run commands name."""
    path = cfg.run_dir.parent / f"{cfg.logging.run_name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_config(cfg, path)
    return str(path)


def _cmd(cfg):
    return [sys.executable, "-m", "sftscale", "train", _config_file(cfg), "--local"]


def _records(cfg):
    lines = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def _last_step(cfg):
    try:
        return _records(cfg)[-1]["step"]
    except (FileNotFoundError, IndexError, json.JSONDecodeError):
        return 0


def _two_ranks(cfg):
    """The run of `cfg` on 2 ranks of this host (torchrun)."""
    return torchrun("-m", "sftscale", "train", _config_file(cfg))


_RANKS_ENV = {**os.environ, **RANK_ENV}


def _start_until(cfg, step: int, *, timeout_s: float = 300, watch=lambda: None, cmd=None, env=None):
    """Start a run (`cmd`, by default the local one) with its output in a file (a pipe nobody
    reads would stall a chatty run, e.g. compiler warnings of a first op build) and wait until it
    logged `step`; if it ends or hangs before that, fail with its output."""
    log = open(cfg.run_dir.parent / f"{cfg.logging.run_name}.out", "w+")  # noqa: SIM115
    cmd = cmd or _cmd(cfg)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + timeout_s
    while _last_step(cfg) < step and proc.poll() is None and time.time() < deadline:
        watch()
        time.sleep(0.02)
    if _last_step(cfg) < step:
        proc.kill()
        proc.wait()
        log.seek(0)
        pytest.fail(
            f"the run never reached step {step} (rc {proc.returncode}):\n{log.read()[-3000:]}"
        )
    return proc, log


def _finish(proc, log) -> str:
    proc.wait(timeout=300)
    log.seek(0)
    out = log.read()
    log.close()
    return out


def _weights(cfg):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(cfg.run_dir / "export"), dtype=torch.float32)
    return dict(m.named_parameters())


def _assert_same_run(a, b, *, exact=True):
    la, lb = [r["loss"] for r in _records(a)], [r["loss"] for r in _records(b)]
    assert [r["step"] for r in _records(b)] == list(range(1, STEPS + 1))  # each step logged once
    if exact:
        assert la == lb
        for name, p in _weights(a).items():
            assert torch.equal(p, _weights(b)[name]), name
    else:
        assert max(abs(x - y) / abs(x) for x, y in zip(la, lb, strict=True)) <= 1e-5


def _assert_ledger_complete(cfg, *, rows_per_step, steps=STEPS):
    """0 skipped, 0 repeated: the ledger is exactly the first steps * G positions of the stream."""
    from sftscale.data import PackedDataset

    ledger = read_ledger(cfg.run_dir / "ledger")
    n = len(PackedDataset(cfg.data.path))
    assert ledger[:, 0].tolist() == [s for s in range(1, steps + 1) for _ in range(rows_per_step)]
    epochs, rows = stream_rows(
        0, steps * rows_per_step, num_rows=n, seed=cfg.data.seed, shuffle=True
    )
    assert ledger[:, 1].tolist() == epochs.tolist() and ledger[:, 2].tolist() == rows.tolist()
    for e in np.unique(ledger[:, 1]):  # within an epoch, no row twice
        in_epoch = ledger[ledger[:, 1] == e, 2]
        assert len(np.unique(in_epoch)) == len(in_epoch)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, prepared_dir):
    cfg = _cfg(tmp_path_factory.mktemp("base"), prepared_dir, "base")
    subprocess.run(_cmd(cfg), check=True, capture_output=True)
    return cfg


@pytest.mark.distributed
@pytest.mark.parametrize("how", ["sigterm", "stop-file"])
def test_stop_request_checkpoints_and_resume_is_exact(tmp_path, prepared_dir, uninterrupted, how):
    cfg = _cfg(tmp_path, prepared_dir, "preempted")
    proc, log = _start_until(cfg, 6)
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)  # preemption, as a scheduler sends it
    else:
        (cfg.run_dir / "STOP").touch()  # what the SLURM trap does
    out = _finish(proc, log)
    assert proc.returncode == 143, out[-3000:]
    assert not (cfg.run_dir / "STOP").exists()  # served, so the rerun does not stop again
    stopped = _last_step(cfg)
    assert 6 <= stopped < STEPS
    assert (cfg.run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"

    again = subprocess.run(_cmd(cfg), capture_output=True, text=True)  # the same command resumes
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and f"at step {stopped}" in again.stdout
    _assert_same_run(uninterrupted, cfg)  # bitwise: CPU, fp32
    _assert_ledger_complete(cfg, rows_per_step=2)


# A run whose STOP file appears during step 3's forward (as a scheduler's trap may touch it at
# any moment): the file is made from inside the step, so when it arrives is not a race.
_STOP_DURING_STEP_3 = r"""
import sys
from pathlib import Path
import sftscale.train as train
from sftscale.config import load_config
from sftscale.launch import run

cfg = load_config(sys.argv[1])
inner = train.micro_step
def micro_step(r, *args, **kwargs):
    if r.step == 2:  # steps count from 0 until the first one ends
        (Path(r.out) / "STOP").touch()
    return inner(r, *args, **kwargs)
train.micro_step = micro_step
print("STOPPED AT", run(cfg, local=True)["step"])
"""


@pytest.mark.distributed
def test_stop_is_served_after_the_step_it_arrives_in(tmp_path, prepared_dir):
    """The step running when the request comes ends and is saved; no further step is taken
    (a scheduler's grace period has to cover one step, not two)."""
    cfg = _cfg(tmp_path, prepared_dir, "stop-in-step", "checkpoint.every_n_steps=0")
    path = _config_file(cfg)
    proc = subprocess.run(
        [sys.executable, "-c", _STOP_DURING_STEP_3, path], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STOPPED AT 3" in proc.stdout, proc.stdout[-3000:]
    assert _last_step(cfg) == 3
    assert (cfg.run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert not (cfg.run_dir / "STOP").exists()


@pytest.mark.distributed
def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(
    tmp_path, prepared_dir, uninterrupted
):
    cfg = _cfg(tmp_path, prepared_dir, "crashed")
    env = {**os.environ, CRASH_ENV: "12"}  # SIGKILL after the step-12 files, before the commit
    crashed = subprocess.run(_cmd(cfg), env=env, capture_output=True, text=True)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    root = cfg.run_dir / "checkpoints"
    assert (root / f"{TMP_PREFIX}step_00000012").is_dir()  # the half-written one
    assert (root / "latest").read_text().strip() == "step_00000008"  # still names a whole one

    again = subprocess.run(_cmd(cfg), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "at step 8" in again.stdout
    _assert_same_run(uninterrupted, cfg)
    _assert_ledger_complete(cfg, rows_per_step=2)
    assert sorted(p.name for p in root.glob("step_*")) == [
        f"step_{STEPS - 4:08d}",
        f"step_{STEPS:08d}",
    ]  # keep_last


def _ray_worker_pids(run_dir):
    """This run's rank processes, from their heartbeats (never a process of anyone else's)."""
    from sftscale.heartbeat import read_heartbeats

    beats = sorted(read_heartbeats(run_dir), key=lambda b: b["rank"])
    return [b["pid"] for b in beats if b["phase"] == "train"]


@pytest.fixture(scope="module")
def ray_uninterrupted(tmp_path_factory, prepared_dir):
    """The Ray run's uninterrupted reference, on 2 torchrun ranks: the same loop, gloo and
    one thread per rank, so the same arithmetic bit for bit (held below), without a second
    Ray instance's start-up (this fixture took 54 s on Ray)."""
    cfg = _cfg(
        tmp_path_factory.mktemp("ray_base"),
        prepared_dir,
        "ray_base",
        "scale.num_workers=2",
        "train.grad_accum=1",
    )
    subprocess.run(_two_ranks(cfg), check=True, capture_output=True, env=_RANKS_ENV)
    return cfg


@pytest.mark.distributed
# SIGKILL of a whole node (raylet and workers) and its restart: tests/test_cluster.py.
@pytest.mark.parametrize("sig", ["SIGSTOP"])
def test_ray_restarts_a_dead_or_stopped_worker(
    tmp_path, prepared_dir, ray_uninterrupted, sig, capfd, monkeypatch
):
    """SIGKILL: Ray sees a dead worker. SIGSTOP: the worker is alive but makes no progress; the
    other rank's collective times out naming it, the driver reports it, Ray restarts the group
    (killing the stopped process) and the run ends as if nothing happened."""
    from sftscale.launch import run

    stopped = ["scale.collective_timeout_s=15"] if sig == "SIGSTOP" else []
    cfg = _cfg(
        tmp_path,
        prepared_dir,
        "ray_" + sig,
        "scale.num_workers=2",
        "train.grad_accum=1",
        "scale.max_failures=2",
        *stopped,
    )
    hit = []

    def signal_a_worker():
        deadline = time.time() + 300
        while _last_step(cfg) < 7 and time.time() < deadline:
            time.sleep(0.02)
        pids = _ray_worker_pids(cfg.run_dir)
        if pids:
            os.kill(pids[-1], getattr(signal, sig))
            hit.append(pids[-1])

    # Ray Train waits 30 s (its default) for a torch process group to shut down; a stopped
    # rank never answers, so the restart waited that long every run
    monkeypatch.setenv("TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S", "3")
    signaller = threading.Thread(target=signal_a_worker)
    signaller.start()
    try:
        run(cfg, local=False)
    finally:
        signaller.join()
        for pid in hit:  # never leave a stopped process behind, whatever happened
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
    assert hit, "no Ray worker was found to signal"
    assert not psutil.pid_exists(hit[0]) or psutil.Process(hit[0]).status() == psutil.STATUS_ZOMBIE
    _assert_same_run(ray_uninterrupted, cfg)
    _assert_ledger_complete(cfg, rows_per_step=2)
    if sig == "SIGSTOP":
        out = "".join(capfd.readouterr())
        assert "did not complete within scale.collective_timeout_s=15 s; rank(s) " in out, out[
            -4000:
        ]
        assert "process gone or stopped" in out  # the driver's report


@pytest.mark.distributed
@pytest.mark.builds_ops("cpu_adam", "async_io")
@pytest.mark.skipif(
    not op_available("AsyncIOBuilder"), reason="needs libaio-dev (make install adds it as root)"
)
def test_nvme_offload_equals_cpu_offload_and_resumes(tmp_path, prepared_dir, sp_tokenizer):
    """ZeRO-Infinity (zero3_nvme: optimizer states and weights swapped to a local disk through
    the async I/O op) trains bitwise like the optimizer in host RAM, also across a stop and a
    resume, on 2 ranks: DeepSpeed 0.19 alone would restart AdamW (fresh moments, step 1) after a
    resume (13% loss gap 2 steps later); sftscale.checkpoint.restore_nvme_optimizer_state
    restores it, and re-gathers the norms every rank keeps whole (read stale otherwise: 5e-4 off
    from the first step resumed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    # DeepSpeed swaps only tensors of >= 1 MiB: one layer wide enough for its MLP weights to be
    # swapped (512 x 1024 fp32 = 2 MiB), small enough to stay fast
    torch.manual_seed(0)
    shape = AutoConfig.for_model(
        "llama",
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(sp_tokenizer),
    )
    AutoModelForCausalLM.from_config(shape).save_pretrained(tmp_path / "model")
    # the async I/O op is built first, outside the run's deadline: on a fresh machine its first
    # build alone takes minutes (6 min of CPU on a 2-core AVX2 host)
    build = subprocess.run(
        [sys.executable, "-m", "sftscale", "build-ops", "cpu_adam", "async_io"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    steps = ["train.max_steps=12", f"model.name_or_path={tmp_path / 'model'}"]
    cpu = _cfg(tmp_path, prepared_dir, "cpu", *steps, "deepspeed.template=zero3_offload_optimizer")
    subprocess.run(_two_ranks(cpu), check=True, capture_output=True, env=_RANKS_ENV)
    swap = tmp_path / "swap"
    nvme = _cfg(
        tmp_path,
        prepared_dir,
        "nvme",
        *steps,
        "deepspeed.template=zero3_nvme",
        f"deepspeed.nvme_path={swap}",
    )
    swapped = set()

    def note_swapped():
        swapped.update(str(p.relative_to(swap)) for p in swap.rglob("*.tensor.swp"))

    proc, log = _start_until(nvme, 5, watch=note_swapped, cmd=_two_ranks(nvme), env=_RANKS_ENV)
    (nvme.run_dir / "STOP").touch()
    out = _finish(proc, log)
    assert proc.returncode == 1, out[-3000:]  # torchrun's exit when its ranks exit 143
    assert "checkpoint saved: rerun to resume" in out, out[-3000:]
    stopped = _last_step(nvme)
    assert 5 <= stopped < 12
    # the optimizer states and the weights really lived on the disk
    assert any((swap / "zero_stage_3" / "optimizer").rglob("exp_avg*.tensor.swp"))
    assert any("params/" in p for p in swapped), sorted(swapped)

    again = subprocess.run(_two_ranks(nvme), capture_output=True, text=True, env=_RANKS_ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"at step {stopped}" in again.stdout
    la, lb = [r["loss"] for r in _records(cpu)], [r["loss"] for r in _records(nvme)]
    assert [r["step"] for r in _records(nvme)] == list(range(1, 13))
    assert la == lb  # the same arithmetic as in host RAM, bit for bit, before and after resume
    _assert_ledger_complete(nvme, rows_per_step=4, steps=12)
