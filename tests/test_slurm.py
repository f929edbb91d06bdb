"""The SLURM launcher under a real single-node SLURM (Debian's slurm-wlm + munge, installed and
started here): sbatch the script, deliver the pre-timeout USR1, and check that the job
checkpoints, requeues itself, resumes from the checkpoint and completes, with no sample skipped
or repeated. Skips, saying why, where SLURM cannot be installed or started."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sftscale.checkpoint import read_ledger

ROOT = Path(__file__).resolve().parent.parent


def _sh(cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, shell=True, capture_output=True, text=True, **kw)


def _job_state(job: str) -> dict:
    out = _sh(f"scontrol show job {job}").stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _wait(predicate, *, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """munged, slurmctld and slurmd of this test only: their configuration, key, sockets, state
    and logs in a temporary directory (clients find it through SLURM_CONF), on free ports, in a
    private mount and pid namespace. Nothing on the host is written or ended: the namespace's
    first process is ended at the end, which ends every process in it (the job's Ray too)."""
    if os.geteuid() != 0:
        pytest.skip("starting SLURM daemons (in a private namespace) needs root")
    daemons = [shutil.which(d) or f"/usr/sbin/{d}" for d in ("munged", "slurmctld", "slurmd")]
    if not all(Path(d).is_file() for d in daemons) or not shutil.which("unshare"):
        pytest.skip(
            "slurm-wlm and munge are not installed (`make test` installs them as root: "
            "apt-get install slurm-wlm munge), or unshare is missing"
        )
    munged, slurmctld, slurmd = daemons
    d = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
    conf = d / "slurm.conf"
    conf.write_text(f"""ClusterName=sftscale
SlurmctldHost={host}
SlurmUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthInfo=socket={d}/munge.socket
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
MinJobAge=300
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
StateSaveLocation={d}/slurmctld
SlurmdSpoolDir={d}/slurmd
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
""")
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    script = f"""set -e
mkdir -p /tmp/ray {d}/slurmctld {d}/slurmd
mount -t tmpfs tmpfs /tmp/ray  # this SLURM's Ray sessions stay in the namespace
{munged} --force --key-file={key} --socket={d}/munge.socket --pid-file={d}/munged.pid \
  --log-file={d}/munged.log --seed-file={d}/munge.seed
{slurmctld} -f {conf}
{slurmd} -f {conf}
exec sleep infinity
"""
    namespace = subprocess.Popen(
        [
            "unshare",
            "--mount",
            "--pid",
            "--fork",
            "--mount-proc",
            "--propagation",
            "private",
            "bash",
            "-c",
            script,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "SLURM_CONF": str(conf)},
    )
    os.environ["SLURM_CONF"] = str(conf)  # this module's clients: sbatch, scontrol, sinfo
    try:
        with contextlib.suppress(AssertionError):
            _wait(
                lambda: namespace.poll() is not None or "idle" in _sh("sinfo -h -o %T").stdout,
                timeout=60,
                what="the SLURM node to be idle",
            )
        if namespace.poll() is not None or "idle" not in _sh("sinfo -h -o %T").stdout:
            logs = " | ".join(f.read_text()[-300:] for f in sorted(d.glob("*.log")) if f.is_file())
            pytest.skip(f"SLURM did not start: {_sh('sinfo').stdout[-300:]} {logs}")
        yield host
    finally:
        os.environ.pop("SLURM_CONF", None)
        # the namespace's init is unshare's child: ending it ends every process inside
        inits = _sh(f"pgrep -P {namespace.pid}").stdout.split()
        for pid in inits:
            os.kill(int(pid), 9)
        namespace.kill()
        namespace.wait(timeout=30)


@pytest.mark.distributed
def test_sbatch_preemption_requeue_and_resume(slurm, tmp_path, prepared_dir):
    steps = 30  # USR1 arrives once 5 are logged: the stop lands well before the end
    cfg = {
        "model": {"name_or_path": "tiny-llama"},
        "data": {"path": str(prepared_dir)},
        "deepspeed": {"precision": "fp32"},
        "optim": {"lr": 2e-3, "warmup_steps": 2},
        "train": {"micro_batch_size": 1, "grad_accum": 1, "max_steps": steps},
        "checkpoint": {"every_n_steps": 10},
        "logging": {"tensorboard": False},
    }
    cfg_path = tmp_path / "slurm.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    storage = tmp_path / "runs"
    env = {
        **os.environ,
        "SFTSCALE_CONFIG": str(cfg_path),
        "SFTSCALE_STORAGE": str(storage),
        "SFTSCALE_PYTHON": sys.executable,
        "SFTSCALE_WORKERS_PER_NODE": "2",
        "SFTSCALE_CPUS_PER_NODE": "2",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    submit = _sh(
        f"sbatch --parsable --nodes=1 --cpus-per-task=2 --output={tmp_path}/slurm-%j.out "
        f"--export=ALL {ROOT}/launchers/slurm/sftscale.sbatch",
        env=env,
        cwd=ROOT,
    )
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    run_dir = storage / f"slurm-{job}"
    log = tmp_path / f"slurm-{job}.out"

    def trained_steps():
        try:
            lines = (run_dir / "metrics.jsonl").read_text().splitlines()
            return max(json.loads(x)["step"] for x in lines) if lines else 0
        except (FileNotFoundError, ValueError):
            return 0

    try:
        _wait(lambda: trained_steps() >= 5, timeout=400, what="training to start")
        # What --signal=B:USR1@120 does before the time limit, delivered now.
        assert _sh(f"scancel --signal=USR1 --batch {job}").returncode == 0
        _wait(
            lambda: _job_state(job).get("Restarts") == "1",
            timeout=400,
            what="the job to requeue itself",
        )
        stopped = trained_steps()
        assert stopped < steps

        def completed():
            state = _job_state(job).get("JobState")
            if state == "PENDING":  # a requeued job otherwise waits ~2.5 min to start again
                _sh(f"scontrol update JobId={job} StartTime=now")
            return state == "COMPLETED"

        _wait(completed, timeout=600, what="the job to start again and complete")
    finally:
        _sh(f"scancel {job}")
    text = log.read_text()
    assert "USR1: asking training to checkpoint" in text and "requeueing job" in text, text[-3000:]
    assert "restart 1" in text and "resumed from" in text, text[-3000:]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, steps + 1))
    ledger = read_ledger(run_dir / "ledger")
    assert ledger[:, 0].tolist() == [
        s for s in range(1, steps + 1) for _ in range(2)
    ]  # each step once
    assert (run_dir / "export" / "model.safetensors").is_file()
