"""Rank-0 metrics sink: one JSON object per logged step in metrics.jsonl, mirrored to TensorBoard."""

from __future__ import annotations

import json
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sftscale.flops import hardware_flops


def peak_memory_bytes() -> int:
    """Device memory high-water mark on GPU; peak resident set size of this process on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def peak_reserved_bytes() -> int:
    """Memory the CUDA caching allocator has held at most (what nvidia-smi sees, minus the
    context); on CPU the same as peak_memory_bytes (there is no caching allocator)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_reserved())
    return peak_memory_bytes()


def throughput(
    *,
    tokens: float,
    supervised: float,
    model_flops: float,
    seconds: float,
    world: int,
    peak_flops: float,
    gradient_checkpointing: bool,
) -> dict[str, float]:
    """Tokens/s, supervised tokens/s, MFU and HFU of `seconds` of training on `world` devices
    whose peak is `peak_flops` each (sftscale.flops). The training loop and the Hugging Face
    baseline of the benchmarks report the same numbers through this."""
    hw = hardware_flops(model_flops, gradient_checkpointing=gradient_checkpointing)
    return {
        "tokens_per_s": tokens / seconds,
        "supervised_tokens_per_s": supervised / seconds,
        "mfu": model_flops / seconds / (world * peak_flops),
        "hfu": hw / seconds / (world * peak_flops),
        "peak_flops_per_device": peak_flops,
    }


@dataclass
class Window:
    """Sums over the steps since the last log line."""

    loss_sum: float = 0.0
    supervised: float = 0.0
    tokens: float = 0.0
    capacity: float = 0.0
    flops: float = 0.0
    max_imbalance: float = 0.0
    seconds: float = 0.0
    steps: int = 0
    balance_sum: float = 0.0  # MoE: documents' tokens x balance loss, this rank
    expert_tokens: torch.Tensor | None = None  # MoE: (layers, experts) tokens, this rank

    def add(
        self,
        *,
        loss_sum,
        supervised,
        tokens,
        capacity,
        flops,
        imbalance,
        seconds,
        balance_sum=0.0,
        expert_tokens=None,
    ) -> None:
        self.loss_sum += loss_sum
        self.balance_sum += balance_sum
        if expert_tokens is not None:
            self.expert_tokens = expert_tokens + (
                0 if self.expert_tokens is None else self.expert_tokens
            )
        self.supervised += supervised
        self.tokens += tokens
        self.capacity += capacity
        self.flops += flops
        self.max_imbalance = max(self.max_imbalance, imbalance)
        self.seconds += seconds
        self.steps += 1


class MetricsLogger:
    """metrics.jsonl always; TensorBoard, W&B and MLflow when asked. Rank 0 only."""

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        resume_step: int = 0,
        tensorboard: bool,
        wandb: bool = False,
        mlflow: bool = False,
        project: str = "sftscale",
        run_name: str = "run",
        config: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self._file = None
        self._tb = None
        self._wandb = None
        self._mlflow = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        # A fresh run starts an empty file. A resumed one keeps the lines up to its checkpoint
        # and drops those of steps done after it (lost in the crash, about to be redone).
        kept = []
        if resume_step and path.is_file():
            kept = [
                x for x in path.read_text().splitlines() if json.loads(x)["step"] <= resume_step
            ]
        self._file = open(path, "w", buffering=1)  # noqa: SIM115 (closed in close())
        self._file.writelines(x + "\n" for x in kept)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if wandb:
            import wandb as wandb_module

            self._wandb = wandb_module.init(
                project=project, name=run_name, config=config, dir=str(run_dir)
            )
        if mlflow:
            import mlflow as mlflow_module

            mlflow_module.start_run(run_name=run_name)
            if config:
                mlflow_module.log_params(_flatten(config))
            self._mlflow = mlflow_module

    def log(self, record: dict[str, Any], *, prefix: str = "train") -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        step = record["step"]
        scalars = {
            f"{prefix}/{k}": v
            for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._mlflow is not None:
            self._mlflow.log_metrics(
                {k.replace("/", "."): v for k, v in scalars.items()}, step=step
            )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._mlflow is not None:
            self._mlflow.end_run()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@dataclass
class Peak:
    """FLOP/s of one device for the run's step (sftscale.flops), and where the figure comes from."""

    flops: float
    source: str
    beaten: bool = False  # a step's HFU exceeded 1 (said once)


def window_record(
    window: Window,
    *,
    engine,
    step: int,
    epoch: int,
    lr: float,
    world: int,
    rank: int,
    peak: Peak,
    gradient_checkpointing: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The metrics record of the steps in `window`. Collective (loss sum, memory)."""
    device = engine.device
    sums = torch.tensor([window.loss_sum, window.balance_sum], dtype=torch.float64, device=device)
    dist.all_reduce(sums)  # collective
    loss_sum, balance_sum = sums.tolist()
    experts = {}
    if window.expert_tokens is not None:  # a mixture of experts (every rank has one)
        counts = window.expert_tokens.to(device=device, dtype=torch.float64)
        dist.all_reduce(counts)  # collective
        experts = expert_metrics(counts, balance_loss=balance_sum / max(window.tokens, 1.0))
    memory = torch.tensor(
        [peak_memory_bytes(), peak_reserved_bytes()], dtype=torch.float64, device=device
    )
    dist.all_reduce(memory, op=dist.ReduceOp.MAX)  # collective: the worst rank

    def rates() -> dict[str, float]:
        return throughput(
            tokens=window.tokens,
            supervised=window.supervised,
            model_flops=window.flops,
            seconds=window.seconds,
            world=world,
            peak_flops=peak.flops,
            gradient_checkpointing=gradient_checkpointing,
        )

    measured = rates()
    if measured["hfu"] > 1 and rank == 0 and not peak.beaten:
        # never hidden by moving the peak: a step cannot beat its own GEMMs, so either the
        # FLOP count or the probe is wrong, and the figures say so
        peak.beaten = True
        log(
            f"warning: HFU {measured['hfu']:.3f} > 1 at step {step}: the step ran faster than "
            f"the device peak ({peak.flops / 1e12:.4f} TFLOP/s, {peak.source}); MFU and HFU "
            "are overstated. This is a defect of sftscale's FLOP count or peak probe: please "
            "report it with this line."
        )
    return {
        "step": step,
        "epoch": epoch,
        "loss": loss_sum / max(window.supervised, 1.0),
        "lr": lr,
        "grad_norm": grad_norm(engine),
        **measured,
        "padding_fraction": 1.0 - window.tokens / window.capacity,
        "rank_imbalance": window.max_imbalance,
        "step_time_s": window.seconds / window.steps,
        "peak_memory_bytes": int(memory[0].item()),
        "peak_reserved_bytes": int(memory[1].item()),
        **experts,
    }


def expert_metrics(counts: torch.Tensor, *, balance_loss: float) -> dict[str, Any]:
    """What a MoE's routers did over a window, from the tokens each expert received in each
    layer (all ranks): the balance loss (top_k when every expert gets the same share), the tokens
    per expert summed over layers, and the worst layer's busiest expert over its mean."""
    per_layer = counts.max(dim=1).values / counts.mean(dim=1).clamp(min=1e-9)
    return {
        "balance_loss": balance_loss,
        "expert_tokens": [int(x) for x in counts.sum(dim=0).tolist()],
        "expert_imbalance": float(per_layer.max().item()) - 1.0,
    }


def grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)
