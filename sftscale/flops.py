"""FLOPs of a training step, the device's peak, and from them MFU / HFU.

Model FLOPs of one document of L tokens (forward + backward = 3x forward):

    6 * N * L                      matmuls of the weights; N = parameters that take part in a
                                   matmul (every parameter except the input embedding table;
                                   the LM head counts even when tied)
  + 6 * n_layers * d_model * L^2   causal attention: QK^T and AV are 2 * L^2 * d_model
                                   multiply-adds per layer forward, halved because only the
                                   causal triangle is needed, times 3 for forward + backward

Attention is counted per *document*, from the actual document lengths of packed rows, since
attention never crosses a document boundary. Padding costs nothing in model FLOPs.

Hardware FLOPs (HFU) add what activation checkpointing recomputes: one more forward, so
4x forward instead of 3x.

MFU = model FLOPs per second / (world_size * peak FLOP/s of one device).
Peak: the dense bf16 tensor-core figure from the vendor's datasheet for known GPUs (table
below); on a CPU (or an unknown GPU) a matmul probe measures it in the process that uses it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from sftscale.model import full_numel

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


@dataclass(frozen=True)
class ModelShape:
    matmul_params: int  # N above
    n_layers: int
    hidden: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelShape:
        """From a (possibly ZeRO-3 partitioned) Hugging Face causal LM."""
        cfg = model.config

        total = sum(full_numel(p) for p in model.parameters())
        embed = full_numel(model.get_input_embeddings().weight)
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is model.get_input_embeddings().weight
        n = total - embed + (embed if tied else 0)
        return cls(matmul_params=n, n_layers=cfg.num_hidden_layers, hidden=cfg.hidden_size)


def doc_flops(lengths, shape: ModelShape) -> float:
    """Model FLOPs (forward + backward) of documents with the given lengths."""
    total = 0.0
    for n in lengths:
        n = float(n)
        total += 6.0 * shape.matmul_params * n + 6.0 * shape.n_layers * shape.hidden * n * n
    return total


def hardware_flops(model_flops: float, *, gradient_checkpointing: bool) -> float:
    return model_flops * (4.0 / 3.0 if gradient_checkpointing else 1.0)


def gpu_peak_flops(device_name: str) -> float | None:
    """Datasheet bf16 peak for a CUDA device name, or None when not in the table."""
    for key in sorted(GPU_PEAK_BF16, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in device_name:
            return GPU_PEAK_BF16[key]
    return None


def measure_matmul_peak(
    dtype: torch.dtype, device: str = "cpu", *, n: int = 512, seconds: float = 0.3
) -> float:
    """Best observed FLOP/s of an n x n matmul in `dtype` on `device` (this process's threads)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.matmul(a, b)  # warm-up
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(4):
            torch.matmul(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def device_peak_flops(dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = gpu_peak_flops(name)
        if peak is not None:
            return peak, f"datasheet bf16 peak of {name}"
        return measure_matmul_peak(dtype, "cuda", n=4096), f"matmul probe on {name}"
    return measure_matmul_peak(
        dtype
    ), f"matmul probe ({dtype}, {torch.get_num_threads()} CPU threads)"
