"""The devices a run is planned for: a catalogue of GPUs, this host's memory, and which device
a rank of a given run gets.

    world, device = parse_devices("8xH100")      # --devices
    device = this_device(cfg, world=2)           # what the ranks of this run get here (or None)

A CPU host is a device too: its memory shared by the ranks that run on it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from sftscale.config import Config

GIB = 2**30


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int  # per rank
    kind: str  # gpu | cpu
    # What a training process holds besides tensors. GPU: the CUDA context, NCCL's buffers, the
    # caching allocator's slack. CPU: the interpreter and libraries (torch, transformers,
    # deepspeed, gloo, oneDNN's kernels) and what glibc keeps of allocations below the mmap
    # threshold, measured on the host (sftscale.runtime_probe).
    runtime_bytes: int
    # Computes bf16 natively (every GPU of the catalogue: Ampere and newer). For a CPU host
    # sftscale.precision reads the CPU's flags instead.
    native_bf16: bool = True
    runtime_source: str = "assumed"  # how runtime_bytes was found: measured here, or assumed
    # CPU: what a rank keeps for each further micro-batch length it meets (the kernels made
    # per shape), measured with the runtime. 0 on a GPU (not measured there: not planned).
    length_kernel_bytes: int = 0
    doc_kernel_bytes: int = 0  # and for each further document length (per-document attention)


GPUS = {
    d.name.lower(): d
    for d in (
        Device("H100", 80 * GIB, "gpu", int(2.5 * GIB)),
        Device("H200", 141 * GIB, "gpu", int(2.5 * GIB)),
        Device("A100", 80 * GIB, "gpu", int(2.5 * GIB)),
        Device("A100-40GB", 40 * GIB, "gpu", int(2.5 * GIB)),
        Device("L40S", 48 * GIB, "gpu", 2 * GIB),
        Device("A10G", 24 * GIB, "gpu", int(1.5 * GIB)),
    )
}
# A CPU host's runtime when it cannot be measured (sftscale.runtime_probe failed): the
# largest measured on this project's hosts before the probe, 0.86 GiB, kept as a ceiling.
CPU_RUNTIME_BYTES = int(0.86 * GIB)
# What a CPU rank keeps per further micro-batch length when it cannot be measured: above the
# 12-15 MiB measured for bf16 on an AMX host (fp32: about 0.1 MiB).
CPU_LENGTH_KERNEL_BYTES = 16 << 20
CPU_DOC_KERNEL_BYTES = 4 << 20  # per further document length: 1.8-1.9 MiB measured in bf16


M_MMAP_THRESHOLD = -3  # mallopt's parameter (malloc.h)


def pin_mmap_threshold(nbytes: int) -> bool:
    """Fix glibc's mmap threshold of this process at `nbytes` (train.cpu_mmap_threshold):
    allocations at least this large are mapped on their own and unmapped when freed, instead
    of glibc raising the threshold to 32 MiB and keeping freed gathers in its heap. False
    where it is not set: 0 (glibc's default asked for) or a libc without mallopt (musl)."""
    import ctypes  # only CPU workers set it

    if nbytes <= 0:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, nbytes))


def host_memory_bytes() -> int:
    """This host's memory, or the cgroup's limit when it is lower (a container)."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            total = min(total, int(limit))
    except (OSError, ValueError):
        pass
    return total


def host_device(
    ranks: int,
    memory_bytes: int | None = None,
    runtime_bytes: int | None = None,
    length_kernel_bytes: int = CPU_LENGTH_KERNEL_BYTES,
    doc_kernel_bytes: int = CPU_DOC_KERNEL_BYTES,
) -> Device:
    """This host as the device of `ranks` ranks: its memory shared between them, each rank's
    runtime and per-length kernels measured here (once per host and software;
    `runtime_bytes` and `length_kernel_bytes` to give them)."""
    memory = host_memory_bytes() if memory_bytes is None else memory_bytes
    source = "given"
    if runtime_bytes is None:
        runtime_bytes, source, length_kernel_bytes, doc_kernel_bytes = cpu_runtime()
    return Device(
        f"CPU host ({memory / GIB:.1f} GiB for {ranks} ranks)",
        memory // ranks,
        "cpu",
        runtime_bytes,
        runtime_source=source,
        length_kernel_bytes=length_kernel_bytes,
        doc_kernel_bytes=doc_kernel_bytes,
    )


def cpu_runtime() -> tuple[int, str, int, int]:
    """(a CPU rank's runtime on this host, how it was found, what it keeps per further
    micro-batch length, per further document length): measured by sftscale.runtime_probe
    (cached), else CPU_RUNTIME_BYTES, CPU_LENGTH_KERNEL_BYTES and CPU_DOC_KERNEL_BYTES, saying
    why."""
    from data_tools.console import say  # the console: light, used once here
    from sftscale.runtime_probe import ProbeError, cpu_measured

    try:
        found = cpu_measured(log=say)
        kernels = found["length_kernel_bytes"], found["doc_kernel_bytes"]
        return found["runtime_bytes"], "measured here", *kernels
    except (ProbeError, OSError) as e:
        say(f"warning: {e}\nplanning with an assumed runtime of {CPU_RUNTIME_BYTES / GIB:.2f} GiB")
        return CPU_RUNTIME_BYTES, "assumed", CPU_LENGTH_KERNEL_BYTES, CPU_DOC_KERNEL_BYTES


def cuda_device() -> Device:
    """The driver's GPU 0 (the workers' GPUs are assumed alike)."""
    import torch  # heavy: only a run on GPUs asks

    props = torch.cuda.get_device_properties(0)
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    return Device(props.name, props.total_memory, "gpu", int(2.5 * GIB), native)


def parse_devices(text: str) -> tuple[int, Device]:
    """'8xH100' -> (8, H100); 'H100' -> (1, H100); '2xcpu' -> 2 ranks sharing this host."""
    m = re.fullmatch(r"(?:(\d+)\s*x\s*)?([A-Za-z0-9-]+)", text.strip())
    if not m or int(m.group(1) or 1) < 1:
        raise ValueError(f"--devices {text!r}: expected COUNTxNAME, e.g. 8xH100 or 2xcpu")
    count, name = int(m.group(1) or 1), m.group(2).lower()
    if name == "cpu":
        return count, host_device(count)
    if name not in GPUS:
        known = ", ".join(d.name for d in GPUS.values())
        raise ValueError(f"--devices {text!r}: unknown device {name!r}; one of {known} or cpu")
    return count, GPUS[name]


def this_device(cfg: Config, *, world: int, env: dict[str, str] | None = None) -> Device | None:
    """The device a rank of this run gets, when the driver can know it: the driver's GPU, or
    this host's memory shared by the ranks that run here (all of them, or torchrun's local
    ones). None for CPU ranks on other hosts of a Ray cluster, and for GPU ranks planned from
    a driver without a GPU."""
    env = dict(os.environ) if env is None else env
    if cfg.scale.use_gpu:
        import torch  # heavy: only a run on GPUs asks

        return cuda_device() if torch.cuda.is_available() else None
    if "LOCAL_WORLD_SIZE" not in env and (cfg.scale.ray_address or env.get("RAY_ADDRESS")):
        return None
    return host_device(ranks_here(world, env))


def ranks_here(world: int, env: dict[str, str] | None = None) -> int:
    """Ranks of this run on this host: torchrun's local ones, else all of them."""
    env = os.environ if env is None else env
    return int(env.get("LOCAL_WORLD_SIZE", world))
