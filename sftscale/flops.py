"""FLOPs of a training step, the device's peak, and from them MFU / HFU.

Model FLOPs of one document of L tokens (forward + backward = 3x forward):

    6 * N * L                      matmuls of the weights; N = parameters that take part in a
                                   matmul (every parameter except the input embedding table;
                                   the LM head counts even when tied). In a mixture of
                                   experts, only the top_k routed experts a token runs count
                                   (the router and any shared expert always)
  + 6 * n_layers * d_model * L^2   causal attention: QK^T and AV are 2 * L^2 * d_model
                                   multiply-adds per layer forward, halved because only the
                                   causal triangle is needed, times 3 for forward + backward

Attention is counted per *document*, from the actual document lengths of packed rows, since
attention never crosses a document boundary. Padding costs nothing in model FLOPs.

Hardware FLOPs (HFU) add what activation checkpointing recomputes: one more forward, so
4x forward instead of 3x.

MFU = model FLOPs per second / (world_size * peak FLOP/s of one device).
Peak: the dense bf16 tensor-core figure from the vendor's datasheet for known GPUs in bf16
(table below). Anywhere else (CPUs, fp32, unknown GPUs) the peak is *measured* once per run, in
the process that trains, on what the step itself computes: the GEMMs of the model's own weight
shapes, forward (x W^T) and both backward products (g W, g^T x), with the step's rows, dtype and
this rank's threads; the peak is the best rate any of them reaches. The step runs those same
GEMMs plus work that is slower (attention, norms, communication), so its hardware FLOP rate
cannot exceed that peak: MFU <= HFU <= 1. (A probe of a square fp32 matmul on one thread, as
before, gave HFU 1.22 on an AVX2 CPU in bf16, where torch's bf16 linear runs 8x faster than its
bf16 matmul.) Each GEMM is timed for at least 0.1 s and 3 runs, and its best run counts, so a
moment of contention during the probe does not lower the peak. The peak is never moved
afterwards: a step that beats it (HFU > 1) is reported as measured, with a warning, because it
means the FLOP count or the probe is wrong.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from sftscale.shape import ModelShape

# Dense (no sparsity) bf16 peak, FLOP/s, from NVIDIA datasheets (SXM parts).
GPU_PEAK_BF16 = {
    "H200": 989.4e12,
    "H100": 989.4e12,  # SXM; the PCIe card is 756e12 (matched by "H100 PCIe" below)
    "H100 PCIe": 756.0e12,
    "A100": 312.0e12,
    "L40S": 362.1e12,
    "A10G": 70.0e12,
    "L4": 121.0e12,
}


def doc_flops(lengths, shape: ModelShape) -> float:
    """Model FLOPs (forward + backward) of documents with the given lengths."""
    total = 0.0
    for n in lengths:
        n = float(n)
        total += (6.0 * shape.active_matmul_params - 2.0 * shape.frozen_matmul_params) * n
        total += 6.0 * shape.n_layers * shape.hidden * n * n
    return total


def hardware_flops(model_flops: float, *, gradient_checkpointing: bool) -> float:
    return model_flops * (4.0 / 3.0 if gradient_checkpointing else 1.0)


def gpu_peak_flops(device_name: str) -> float | None:
    """Datasheet bf16 peak for a CUDA device name, or None when not in the table."""
    for key in sorted(GPU_PEAK_BF16, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in device_name:
            return GPU_PEAK_BF16[key]
    return None


def _best_rate(op, *, flops: float, device: str, seconds: float) -> float:
    """Best FLOP/s of `op` over repeats within `seconds` (at least three timed runs)."""

    def sync() -> None:
        if device != "cpu":
            torch.cuda.synchronize()

    op()  # warm-up: kernel selection, allocation
    sync()
    best, runs, deadline = 0.0, 0, time.perf_counter() + seconds
    while runs < 3 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        op()
        sync()
        best = max(best, flops / (time.perf_counter() - t0))
        runs += 1
    return best


def measure_gemm_peak(
    weights: tuple[tuple[int, int], ...],
    *,
    rows: int,
    dtype: torch.dtype,
    device: str = "cpu",
    max_flop: float = 1e9,
    seconds: float = 0.1,
) -> float:
    """Best FLOP/s over the GEMMs a training step runs for these weight shapes, in `dtype` with
    this process's threads: forward x W^T, backward g W and g^T x, with `rows` token rows
    (fewer for a weight so large that one GEMM would exceed `max_flop`, never under 256)."""

    best = 0.0
    gen = torch.Generator(device=device).manual_seed(0)
    for out_f, in_f in weights:
        t = max(min(rows, 256), min(rows, int(max_flop / (2 * in_f * out_f))))
        x = torch.randn(t, in_f, generator=gen, device=device).to(dtype)
        w = torch.randn(out_f, in_f, generator=gen, device=device).to(dtype)
        g = torch.randn(t, out_f, generator=gen, device=device).to(dtype)
        for op in (lambda: F.linear(x, w), lambda: g @ w, lambda: g.t() @ x):  # noqa: B023
            best = max(
                best, _best_rate(op, flops=2.0 * t * in_f * out_f, device=device, seconds=seconds)
            )
    return best


def device_peak_flops(shape: ModelShape, *, rows: int, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s of one device for this model's step, where the figure comes from)."""
    threads = torch.get_num_threads()
    what = f"{len(shape.weights)} weight shapes x 3 GEMMs, {rows} rows, {str(dtype).split('.')[-1]}"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = gpu_peak_flops(name) if dtype == torch.bfloat16 else None
        if peak is not None:
            return peak, f"datasheet bf16 peak of {name}"
        peak = measure_gemm_peak(shape.weights, rows=rows, dtype=dtype, device="cuda")
        return peak, f"measured on {name}: {what}"
    peak = measure_gemm_peak(shape.weights, rows=rows, dtype=dtype)
    return peak, f"measured: {what}, {threads} CPU thread(s)"
