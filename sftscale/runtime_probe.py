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
so the tokenizer's training does not count. A third process measures what each further
micro-batch length and each further document length (per-document attention) costs: the CPU's
kernels are kept per shape, and the plan counts the lengths the data can give.
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
# The third process: rows of ROW positions with documents of DOC_LENGTHS (each divides ROW),
# then rows of the further LENGTHS
ROW = 768
DOC_LENGTHS = (64, 128, 192, 256, 384)
LENGTHS = (576, 640, 704, 832)
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


# Set in the probe's own processes: a plan there uses the fallback instead of waiting for the
# measurement it is part of.
PROBING = "SFTSCALE_RUNTIME_PROBE"
WAIT_S = 300.0  # the longest a planner waits for another process's measurement
STEP_TIMEOUT_S = 900  # a step that takes longer is stuck (the train step takes ~15 s)
MAX_RUNTIME = 64 << 30  # no process's runtime is this large: a cache saying so is not ours
# What torchrun, SLURM, MPI and Ray set in a rank's environment
LAUNCHER_VARS = {
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
}
LAUNCHER_PREFIXES = ("TORCHELASTIC_", "SLURM_", "PMI_", "OMPI_", "RAY_")


class ProbeError(RuntimeError):
    pass


def cache_path() -> Path:
    """One file per host and software: the CPU, oneDNN's ISA limit, the versions of what a
    rank runs, and sftscale's own code (a change to it can change what a rank imports)."""
    from sftscale.storage.cache import sftscale_cache  # the cache's module: on this path only

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
    # oneDNN's ISA limit changes the kernels and the precision `auto` picks (precision.py)
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    key = hashlib.sha256(
        "\n".join([cpu, isa, sys.version, *versions, code.hexdigest()]).encode()
    ).hexdigest()[:16]
    return sftscale_cache() / "runtime" / f"cpu-{key}.json"


def cpu_runtime_bytes(*, log=None) -> int:
    """This host's runtime per rank (bytes), from the cache or measured now (`log` says so).
    Raises ProbeError when it can be neither: the measurement failed, the cache directory is
    not writable, another process has been measuring for longer than WAIT_S, or this is the
    probe's own run (which must not wait for itself)."""
    return cpu_measured(log=log)["runtime_bytes"]


def cpu_measured(*, log=None) -> dict[str, int]:
    """{"runtime_bytes", "length_kernel_bytes", "doc_kernel_bytes"} of this host, from the
    cache or measured now: see cpu_runtime_bytes."""
    from sftscale.storage.cache import CacheError, locked  # the lock: on the measuring path only

    if os.environ.get(PROBING):
        raise ProbeError("the runtime probe's own run plans without a measured runtime")
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with locked(path.with_suffix(".lock"), wait_s=WAIT_S):  # one process measures
            cached = _read(path)
            if cached is not None:
                return cached
            if log:
                log("measuring this host's runtime memory (once per host and software, ~20 s)")
            result = measure()
            _write(path, result)
            return {k: int(result[k]) for k in MEASURED}
    except CacheError as e:
        raise ProbeError(f"another process is measuring this host's runtime memory: {e}") from None
    except OSError as e:
        raise ProbeError(
            f"cannot keep this host's runtime memory in {path.parent} ({e.strerror or e}); "
            "set SFTSCALE_CACHE to a writable directory"
        ) from None


MEASURED = ("runtime_bytes", "length_kernel_bytes", "doc_kernel_bytes")


def _read(path: Path) -> dict[str, int] | None:
    """The cached measurements, or None when there are none or they are not what this code
    wrote (not JSON, another key, a value no process has): such a file is measured over,
    never trusted."""
    if not path.is_file() or path.is_symlink():
        return None
    try:
        data = json.loads(path.read_text())
        values = {k: data[k] for k in MEASURED}
        ok = data.get("key") == path.stem and all(
            type(v) is int and 0 <= v < MAX_RUNTIME for v in values.values()
        )
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError):
        ok = False
    return values if ok else None


def _write(path: Path, result: dict) -> None:
    """Atomically, through a new file of our own (never through a name someone else made)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".runtime-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(result | {"key": path.stem}, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def measure() -> dict:
    """Make the data in one process, train on it in another: the second's peak RSS and the
    tensors its plan counts. Their environment is this one's without a launcher's (a rank of
    a torchrun, SLURM or Ray job that plans must not make the probe join its process group)."""
    env = {
        **{k: v for k, v in os.environ.items() if not _launcher_var(k)},
        "OMP_NUM_THREADS": "1",  # as each of several ranks on a host runs
        "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
        PROBING: "1",
    }
    with tempfile.TemporaryDirectory(prefix="sftscale-runtime-") as tmp:
        out = {}
        for step in ("data", "train", "lengths"):
            try:
                proc = subprocess.run(
                    [sys.executable, "-m", "sftscale.runtime_probe_steps", step, tmp],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=STEP_TIMEOUT_S,
                )
            except subprocess.TimeoutExpired:
                raise ProbeError(
                    f"measuring this host's runtime memory ({step}) took over {STEP_TIMEOUT_S} s"
                ) from None
            if proc.returncode != 0:
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
                raise ProbeError(f"measuring this host's runtime memory failed ({step}):\n{tail}")
            out |= json.loads(proc.stdout.strip().splitlines()[-1])
    return out | {"runtime_bytes": max(out["peak_rss_bytes"] - out["tensor_bytes"], 0)}


def _launcher_var(name: str) -> bool:
    return name in LAUNCHER_VARS or name.startswith(LAUNCHER_PREFIXES)


def main() -> None:
    result = measure()
    print(json.dumps(result | {"cache": str(cache_path())}, indent=1))


if __name__ == "__main__":
    main()
