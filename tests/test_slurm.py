"""The SLURM launcher under a real single-node SLURM (Debian's slurm-wlm + munge, installed and
started here): sbatch the script, deliver the pre-timeout USR1, and check that the job
checkpoints, requeues itself, resumes from the checkpoint and completes, with no sample skipped
or repeated. Skips, saying why, where SLURM cannot be installed or started."""

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
SLURM_CONF = Path("/etc/slurm/slurm.conf")


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


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("starting SLURM daemons needs root")
    if not shutil.which("slurmctld"):
        install = _sh(
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge",
            timeout=900,
        )
        if install.returncode != 0 or not shutil.which("slurmctld"):
            pytest.skip(f"could not install slurm-wlm and munge: {install.stderr[-500:]}")
    host = socket.gethostname().split(".")[0]
    mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
    SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
    SLURM_CONF.write_text(f"""ClusterName=sftscale
SlurmctldHost={host}
SlurmUser=root
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
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
""")
    _sh("pkill -x slurmctld; pkill -x slurmd; pkill -x munged; sleep 1")
    _sh(
        "mkdir -p /run/munge /var/spool/slurmctld /var/spool/slurmd && chown munge:munge /run/munge"
    )
    if not Path("/etc/munge/munge.key").is_file():
        _sh("/usr/sbin/mungekey --create || create-munge-key")
    started = _sh("runuser -u munge -- /usr/sbin/munged && /usr/sbin/slurmctld && /usr/sbin/slurmd")
    if started.returncode != 0:
        pytest.skip(f"could not start munged/slurmctld/slurmd: {started.stderr[-500:]}")
    try:
        _wait(
            lambda: "idle" in _sh("sinfo -h -o %T").stdout,
            timeout=60,
            what="the SLURM node to be idle",
        )
    except AssertionError:
        pytest.skip(
            f"SLURM node never became idle: {_sh('sinfo; scontrol show node').stdout[-800:]}"
        )
    yield host
    _sh("scancel --user=root; sleep 1; pkill -x slurmd; pkill -x slurmctld; pkill -x munged")
    # No Ray cluster of the job may outlive the test: later tests start their own local Ray.
    _sh(f"{Path(sys.executable).parent / 'ray'} stop --force; rm -f /tmp/ray/ray_current_cluster")


@pytest.mark.distributed
def test_sbatch_preemption_requeue_and_resume(slurm, tmp_path, prepared_dir):
    steps = 60
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
