"""What a training process on this CPU host holds besides the tensors a plan counts: the
interpreter, the code of torch, DeepSpeed and transformers as far as training touches it, gloo,
oneDNN, Python's objects and glibc's heap. It differs between hosts and software versions
(measured: 0.12 GiB per rank between two hosts of this project with the same code), so it is
measured here, once per host and software, and cached:

    runtime = cpu_runtime_bytes()      # measures on first use (about 15 s), then cached
    python -m sftscale.runtime_probe   # measure again, print it

The measurement trains a 0.2M-parameter Llama (the tiny-llama preset) for 3 steps in one
process, as `sftscale train --local` would (ZeRO-3, the precision `auto` picks here, glibc's mmap
threshold pinned as the workers pin it), on 256-token rows of synthetic chat data: its peak RSS
minus the tensors its own plan counts is the runtime. The data is made by another process first,
so the tokenizer's training does not count.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

SEQ_LEN = 256
# sftscale train's settings for the probe's run beside the data it trains on
TRAIN = [
    "model.name_or_path=tiny-llama",
    "deepspeed.template=zero3",
    "train.micro_batch_size=1",
    "train.grad_accum=1",
    "train.max_steps=3",
    "optim.warmup_steps=1",
    "scale.num_workers=1",
    "checkpoint.every_n_steps=0",
    "checkpoint.at_end=false",
    "checkpoint.export=false",
    "logging.tensorboard=false",
    "logging.progress_bar=false",
    "logging.every_n_steps=1",
    "logging.run_name=probe",
]


class ProbeError(RuntimeError):
    pass


def cache_path() -> Path:
    """One file per host and software: the CPU, the versions of what a rank runs, and
    sftscale's own code (a change to it can change what a rank imports)."""
    cpu = platform.processor() or platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(line for line in info.splitlines() if line.startswith("model name"))
        flags = next(line for line in info.splitlines() if line.startswith("flags")).split()
        cpu += " " + " ".join(sorted(f for f in flags if f.startswith(("avx", "amx"))))
    except (OSError, StopIteration):
        pass
    versions = []
    for dist in ("torch", "deepspeed", "transformers", "accelerate", "tokenizers", "pyarrow"):
        try:
            versions.append(f"{dist}={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist}=-")
    code = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.rglob("*.py")):
        code.update(path.read_bytes())
    key = hashlib.sha256(
        "\n".join([cpu, sys.version, *versions, code.hexdigest()]).encode()
    ).hexdigest()[:16]
    root = Path(os.environ.get("SFTSCALE_CACHE", Path.home() / ".cache" / "sftscale"))
    return root / "runtime" / f"cpu-{key}.json"


def cpu_runtime_bytes(*, log=None) -> int:
    """This host's runtime per rank (bytes), from the cache or measured now (`log` says so).
    Raises ProbeError when the measurement fails."""
    from sftscale.storage.cache import locked  # the lock's module: on the measuring path only

    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path.with_suffix(".lock")):  # another planner on this host measures once
        if path.is_file():
            return int(json.loads(path.read_text())["runtime_bytes"])
        if log:
            log("measuring this host's runtime memory (once per host and software, ~15 s)")
        result = measure()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(path)
        return int(result["runtime_bytes"])


def measure() -> dict:
    """Make the data in one process, train on it in another: the second's peak RSS and the
    tensors its plan counts."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",  # as each of several ranks on a host runs
        "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
    }
    with tempfile.TemporaryDirectory(prefix="sftscale-runtime-") as tmp:
        out = {}
        for step in ("data", "train"):
            proc = subprocess.run(
                [sys.executable, "-m", "sftscale.runtime_probe_steps", step, tmp],
                env=env,
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
                raise ProbeError(f"measuring this host's runtime memory failed ({step}):\n{tail}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out | {"runtime_bytes": max(out["peak_rss_bytes"] - out["tensor_bytes"], 0)}


def main() -> None:
    result = measure()
    print(json.dumps(result | {"cache": str(cache_path())}, indent=1))


if __name__ == "__main__":
    main()
