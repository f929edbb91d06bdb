"""LoRA adapters (peft) on a model that ZeRO-3 partitions (their export: sftscale.export_run).

    model = add_adapters(model, cfg.model.lora, seed=cfg.train.seed)  # base frozen (peft)

The base model is loaded partitioned under zero.Init as for full fine-tuning. The adapters are
created outside zero.Init, whole on every rank with peft's own initialization (A random, B zero,
under the run's seed), and `deepspeed.initialize` partitions them like any other parameter
(broadcasting rank 0's values). Only they require grad, so only they reach the optimizer and the
checkpoints.

"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch

from sftscale.config import LoraConfig
from sftscale.model import full_numel

ADAPTER_NAME = "default"  # peft's


def add_adapters(model: torch.nn.Module, lora: LoraConfig, *, seed: int) -> torch.nn.Module:
    """Wrap `model` in a peft LoRA model: every target Linear gets A (r x in) and B (out x r);
    everything else is frozen."""
    # heavy (peft): loaded only on the path that uses it
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = set(lora.target_modules)
    found = {
        name.rsplit(".", 1)[-1]
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    missing = sorted(targets - found)
    if missing:
        raise ValueError(
            f"model.lora.target_modules: {', '.join(missing)} name no Linear layer of this model "
            f"(its Linear layers: {', '.join(sorted(found))})"
        )
    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=sorted(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    # autocast_adapter_dtype=False: adapters in the run's dtype, as DeepSpeed expects of every
    # trainable parameter (its master copy is fp32 either way).
    model = get_peft_model(model, peft_cfg, autocast_adapter_dtype=False)
    init_adapters(model, seed=seed)
    return model


def init_adapters(model: torch.nn.Module, *, seed: int) -> None:
    """peft's initialization (A: kaiming-uniform, B: zero), each A drawn from its own generator
    seeded by the run's seed and the parameter's name: the same on every rank and in any other
    loop that calls this, whatever random numbers were drawn before (zero.Init draws its own)."""

    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                w = torch.empty(p.shape, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
                p.copy_(w)
            elif ".lora_B." in name:
                p.zero_()


def adapter_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def peft_key(name: str) -> str:
    """A parameter's name in peft's saved adapter: without the adapter name."""
    return name.replace(f".{ADAPTER_NAME}.", ".")


def lora_layers(module: torch.nn.Module) -> dict[str, Any]:
    """peft's LoRA layers by the name of their base weight (`...q_proj.base_layer.weight`)."""
    # heavy (peft): loaded only on the path that uses it
    from peft.tuners.lora import LoraLayer

    return {
        f"{name}.base_layer.weight": m
        for name, m in module.named_modules()
        if isinstance(m, LoraLayer) and ADAPTER_NAME in m.lora_A
    }


def hf_name(name: str) -> str:
    """A peft model's parameter name as the plain Hugging Face model names it."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def describe(module: torch.nn.Module, lora: LoraConfig) -> str:
    trainable = sum(full_numel(p) for _, p in adapter_parameters(module))
    total = sum(full_numel(p) for p in module.parameters())
    return (
        f"LoRA r={lora.r} alpha={lora.alpha:g} on {', '.join(lora.target_modules)}: "
        f"{trainable / 1e6:.2f}M trainable of {total / 1e6:.1f}M parameters "
        f"({trainable / total:.2%})"
    )
