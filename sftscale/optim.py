"""The optimizer's pieces that are ours: the learning-rate schedule and the parameter groups.

The optimizer itself (AdamW: torch's fused kernel by default, DeepSpeed's CPU Adam with
optimizer offload; `optim.kernel`) is built by DeepSpeed from the ds_configs/ template filled
by sftscale.ds_config (sftscale.engine).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sftscale.config import OptimConfig


def lr_at(step: int, o: OptimConfig, max_steps: int) -> float:
    """Linear warmup to `o.lr`, then cosine/linear decay to `o.lr * o.min_lr_ratio` at the end."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    span = max(1, max_steps - o.warmup_steps - 1)
    progress = min(1.0, (step - o.warmup_steps) / span)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1 - progress
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * decay)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms and biases (1-D tensors). ZeRO-3 keeps the real shape in ds_shape."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    # named: DeepSpeed's expert parallelism splits each group by name into expert and other
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
