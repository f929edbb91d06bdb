"""A cluster whose nodes share no disk, on this machine: a Ray head and a second Ray node, each
in its own mount namespace with a private tmpfs as its local disk (the run directory and Ray's
/tmp/ray), joined over 127.0.0.1; data and checkpoints on an S3 server on 127.0.0.1. Training
is submitted with `ray job submit`; the second node is killed mid-run (raylet and workers,
SIGKILL) and a replacement node joins; the run finishes with the weights of an uninterrupted
run and a ledger with no sample skipped or repeated.

Every process a node started lives in the node's mount namespace and is killed with it; the
tmpfs mounts exist only inside those namespaces and vanish with their last process."""

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import registered_checkpoint
from sftscale.launch import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NODE_DISK = "/tmp/sftscale-node-disk"  # the same path on every node, a different tmpfs on each
STEPS = 24

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("unshare") is None,
        reason="mount namespaces need root and unshare",
    ),
]


class Node:
    """`ray start --block` in a new mount namespace with private tmpfs mounts."""

    def __init__(self, name: str, *, env: dict, head_port: int, head: bool) -> None:
        self.name = name
        ports = {
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--metrics-export-port": free_port(),
            "--runtime-env-agent-port": free_port(),
        }
        if head:
            ports["--ray-client-server-port"] = free_port()
        # workers' ports clear of every port chosen above (one overlap made ray start refuse);
        # below Linux's ephemeral range, where free_port() picks, by default
        taken = {*ports.values(), head_port}
        low = 10000 + secrets.randbelow(20000)
        while any(low <= p <= low + 200 for p in taken):
            low = 10000 + secrets.randbelow(20000)
        args = [
            str(BIN / "ray"),
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=1",
            "--disable-usage-stats",
            f"--min-worker-port={low}",
            f"--max-worker-port={low + 200}",
            *(f"{k}={v}" for k, v in ports.items()),
        ]
        if head:
            args += [f"--port={head_port}", "--head", "--dashboard-host=127.0.0.1"]
        else:
            args += [f"--address=127.0.0.1:{head_port}"]
        script = (
            f"mkdir -p {NODE_DISK} /tmp/ray && mount -t tmpfs -o size=6g node {NODE_DISK} && "
            f"mount -t tmpfs -o size=2g node /tmp/ray && exec {' '.join(args)}"
        )
        self.log = open(Path(env["SFTSCALE_TEST_LOGS"]) / f"{name}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + 60
        while self.namespace() is None and time.time() < deadline:
            time.sleep(0.2)

    def namespace(self) -> str | None:
        try:
            return os.readlink(f"/proc/{self.proc.pid}/ns/mnt")
        except OSError:
            return None

    def pids(self, ns: str) -> list[int]:
        out = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.readlink(entry / "ns" / "mnt") == ns:
                        out.append(int(entry.name))
                except OSError:
                    continue
        return out

    def kill(self) -> None:
        """SIGKILL every process of the node (raylet, its workers, the job driver on a head)."""
        ns = self.namespace()
        if ns is None or ns == os.readlink("/proc/self/ns/mnt"):
            return
        for _ in range(3):  # processes forked while we kill
            for pid in self.pids(ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        self.proc.wait(timeout=30)
        self.log.close()

    def log_tail(self, chars: int = 3000) -> str:
        if not self.log.closed:
            self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-chars:]


def _wait_for_nodes(env: dict, head_port: int, n: int, joining: Node, timeout: float = 90) -> None:
    """Until `ray status` (which asks the GCS; no local raylet needed) shows n active nodes.
    Raises NodeDidNotJoin early when the joining node's `ray start` has exited."""
    deadline, out = time.time() + timeout, ""
    while time.time() < deadline:
        p = subprocess.run(
            [str(BIN / "ray"), "status", f"--address=127.0.0.1:{head_port}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        out = p.stdout + p.stderr
        active = out.split("Active:", 1)[-1].split("Pending:", 1)[0] if "Active:" in out else ""
        if active.count("node_") >= n:
            return
        if joining.proc.poll() is not None:
            break
        time.sleep(1)
    code = joining.proc.poll()
    state = "still running" if code is None else f"exited {code}"
    raise NodeDidNotJoin(
        f"{joining.name} did not join ({n} nodes expected) within {timeout:.0f} s; "
        f"`ray start` {state}\n"
        f"ray status:\n{out[-2000:]}\n{joining.name}'s log:\n{joining.log_tail()}"
    )


class NodeDidNotJoin(AssertionError):
    pass


def _join(name: str, env: dict, head_port: int, n: int) -> Node:
    """A worker node started and seen active by the head. One more attempt, with new ports,
    when the first did not join: ports are picked free but bound only later by `ray start`,
    so another process can take one in between (the reason is printed, not hidden)."""
    for attempt in (1, 2):
        node = Node(
            name if attempt == 1 else f"{name}-retry", env=env, head_port=head_port, head=False
        )
        try:
            _wait_for_nodes(env, head_port, n, node)
            return node
        except NodeDidNotJoin as e:
            node.kill()
            if attempt == 2:
                raise
            print(f"attempt {attempt}: {e}", file=sys.stderr)
    raise AssertionError("unreachable")


def _job_config(tmp_path: Path, name: str, data: str, **scale) -> Path:
    cfg = {
        "model": {"name_or_path": "tiny-llama"},
        "data": {"path": data, "cache_dir": f"{NODE_DISK}/cache"},
        "deepspeed": {"precision": "fp32"},
        # weight decay: an elastic resume must keep each parameter group's own
        "optim": {"lr": 2e-3, "warmup_steps": 3, "weight_decay": 0.1},
        "train": {"micro_batch_size": 1, "grad_accum": 1, "max_steps": STEPS},
        "scale": {"num_workers": 2, "max_failures": 2, "collective_timeout_s": 60, **scale},
        "checkpoint": {"every_n_steps": 8, "storage": "s3://runs/cluster"},
        "logging": {"output_dir": f"{NODE_DISK}/runs", "run_name": name, "tensorboard": False},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _from_s3(s3, key: str, dest: Path) -> Path:
    import pyarrow.fs as pafs

    dest.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(key, str(dest), source_filesystem=s3)
    return dest


def test_a_node_dies_and_a_replacement_finishes_the_run(tmp_path, prepared_dir, s3):
    import pyarrow.fs as pafs

    pafs.copy_files(str(prepared_dir), "runs/cluster-data", destination_filesystem=s3)
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_failure_threshold": "5",
        "SFTSCALE_TEST_LOGS": str(logs),
        "OMP_NUM_THREADS": "1",
        # elastic: after a node loss, try the old size for 15 s (not 60) before a smaller one
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15",
    }
    env.pop("RAY_ADDRESS", None)
    head_port = free_port()
    nodes = [Node("head", env=env, head_port=head_port, head=True)]
    dashboard = "http://127.0.0.1:8265"
    try:
        time.sleep(3)
        nodes.append(_join("node-b", env, head_port, 2))

        def submit(name: str, **scale) -> subprocess.Popen:
            cmd = [
                str(BIN / "ray"),
                "job",
                "submit",
                "--address",
                dashboard,
                "--runtime-env",
                str(ROOT / "launchers/ray/runtime_env.yaml"),
                "--working-dir",
                str(ROOT),
                "--",
                sys.executable,
                "-m",
                "sftscale",
                "train",
                str(_job_config(tmp_path, name, "s3://runs/cluster-data", **scale)),
            ]
            # output to a file: a pipe read only at the end would stall a chatty job
            out = open(tmp_path / f"{name}.out", "w")  # noqa: SIM115
            return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

        def output(job, name, timeout=900):
            job.wait(timeout=timeout)
            return (tmp_path / f"{name}.out").read_text()

        def when_a_checkpoint_is_registered(job, name):
            registered_checkpoint(s3, f"runs/cluster/{name}", timeout=600)
            assert job.poll() is None, (tmp_path / f"{name}.out").read_text()[-4000:]

        base = submit("base")
        out = output(base, "base")
        assert base.returncode == 0, out[-4000:]

        job = submit("killed")
        when_a_checkpoint_is_registered(job, "killed")
        nodes[1].kill()  # raylet, workers, the node's disk
        nodes.append(Node("node-c", env=env, head_port=head_port, head=False))
        out = output(job, "killed")
        assert job.returncode == 0, out[-4000:]
        assert "resumed from" in out, out[-4000:]

        # Elastic: a node is lost and none replaces it; the run goes on with one worker.
        job = submit("elastic", min_workers=1)
        when_a_checkpoint_is_registered(job, "elastic")
        nodes[2].kill()
        out = output(job, "elastic")
        assert job.returncode == 0, out[-4000:]
        assert "saved by 2 worker(s), now 1" in out, out[-4000:]
    finally:
        for node in reversed(nodes):
            node.kill()
    # Weights: the exports both runs left on storage.
    from transformers import AutoModelForCausalLM

    def weights(name):
        d = _from_s3(s3, f"runs/cluster/{name}/export", tmp_path / f"{name}-export")
        m = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
        return dict(m.named_parameters())

    final = s3.get_file_info(
        pafs.FileSelector(f"runs/cluster/killed/step_{STEPS:08d}", recursive=True)
    )
    names = {Path(i.path).name for i in final}  # every node's leader uploaded its ranks' files
    assert {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "rng_rank0.json",
        "rng_rank0.safetensors",
        "rng_rank1.json",
        "rng_rank1.safetensors",
        "sftscale_state.json",
    } <= names, names
    a, b = weights("base"), weights("killed")
    for name, p in a.items():
        assert torch.equal(p, b[name]), name
    from sftscale.checkpoint import read_ledger

    ledger = read_ledger(_from_s3(s3, "runs/cluster/killed/ledger", tmp_path / "ledger"))
    assert ledger[:, 0].tolist() == [s for s in range(1, STEPS + 1) for _ in range(2)]
    base_ledger = read_ledger(_from_s3(s3, "runs/cluster/base/ledger", tmp_path / "base-ledger"))
    np.testing.assert_array_equal(ledger, base_ledger)  # 0 skipped, 0 repeated
    records = [
        json.loads(x)
        for x in s3.open_input_stream("runs/cluster/killed/metrics.jsonl")
        .read()
        .decode()
        .splitlines()
    ]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    # Elastic: the same global batch on one worker (accumulating twice as many micro-batches):
    # the same samples, and losses within fp32 reduction-order tolerance.
    elastic = read_ledger(_from_s3(s3, "runs/cluster/elastic/ledger", tmp_path / "elastic-ledger"))
    np.testing.assert_array_equal(elastic, base_ledger)

    def losses(name):
        lines = (
            s3.open_input_stream(f"runs/cluster/{name}/metrics.jsonl").read().decode().splitlines()
        )
        return [r["loss"] for r in map(json.loads, lines) if "loss" in r]

    rel = [abs(a - b) / abs(b) for a, b in zip(losses("elastic"), losses("base"), strict=True)]
    assert max(rel) <= 1e-5, rel
