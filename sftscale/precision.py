"""Which floating-point precision a run computes in: `deepspeed.precision: auto | bf16 | fp32`.

auto (the default) picks bf16 where the device computes it natively and fp32 elsewhere:

    CUDA with bf16 (Ampere and newer)          bf16
    CUDA without (V100, T4)                    fp32
    CPU with AVX512-BF16 or AMX (oneDNN bf16)  bf16
    CPU without (AVX2 only, most AMD Zen 2/3)  fp32: there a bf16 matmul runs ~50x slower than
                                               fp32 (measured 0.96 vs 47 GFLOP/s, one core)

An explicit bf16 is honoured everywhere; on a CPU without native bf16 it comes with a warning.
The choice is a pure function of the hardware (never of a timing), so every run and every
resume on the same machine type computes in the same precision. Every rank of a run must
agree: the training loop takes the choice all ranks can make (see `agree`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

PRECISIONS = ("auto", "bf16", "fp32")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Precision:
    name: str  # bf16 | fp32
    reason: str  # one line: why this precision
    warning: str = ""  # set when the choice will be slow on this device

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.name == "bf16" else torch.float32


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The CPU's native-bf16 instruction-set flags (empty where /proc/cpuinfo is absent)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return []
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")),
        [],
    )
    return [f for f in _CPU_BF16_FLAGS if f in flags]


def cpu_native_bf16() -> tuple[bool, str]:
    """(does this CPU compute bf16 natively, what that was read from).

    Both must hold: the CPU has the instructions, and oneDNN (torch's CPU matmul library) will
    use them. The second is False under ONEDNN_MAX_CPU_ISA=AVX2 even on a CPU with AMX, which is
    how the tests make a bf16-capable machine behave like one without.
    """
    flags = cpu_bf16_flags()
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the probe: trust the flags
        onednn = bool(flags)
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    limit = f", ONEDNN_MAX_CPU_ISA={isa}" if isa else ""
    if flags and onednn:
        return True, f"CPU has native bf16 ({'+'.join(flags)})"
    if flags:
        return False, f"CPU has {'+'.join(flags)} but oneDNN will not use it{limit}"
    return False, f"CPU has no native bf16 (no AVX512-BF16/AMX){limit}"


def device_native_bf16(*, cuda: bool) -> tuple[bool, str]:
    if cuda:
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{name} computes bf16 natively"
        return False, f"{name} has no native bf16"
    return cpu_native_bf16()


def choose(requested: str, *, native_bf16: bool, why: str) -> Precision:
    """The precision for `requested` on a device whose native-bf16 support is `native_bf16`."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r} is not one of {', '.join(PRECISIONS)}")
    if requested == "fp32":
        return Precision("fp32", "deepspeed.precision=fp32")
    if requested == "bf16":
        warning = (
            ""
            if native_bf16
            else (
                f"deepspeed.precision=bf16 on a device without native bf16 ({why}): matmuls run "
                "far slower than in fp32 (~50x on AVX2 CPUs); deepspeed.precision=auto picks fp32 here"
            )
        )
        return Precision("bf16", "deepspeed.precision=bf16", warning)
    if native_bf16:
        return Precision("bf16", f"auto: {why}")
    return Precision("fp32", f"auto: {why}, so fp32 (bf16 would be emulated and slow)")


def agree(precision: Precision, *, native_everywhere: bool) -> Precision:
    """The same choice on every rank: auto picks bf16 only when every rank's device has it
    (the caller all-reduces the native flag with MIN)."""
    if precision.name == "bf16" and precision.reason.startswith("auto:") and not native_everywhere:
        return Precision("fp32", "auto: another rank's device has no native bf16, so fp32")
    return precision
