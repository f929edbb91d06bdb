"""LoRA adapters (peft) on a model that ZeRO-3 partitions, and their export.

    model = add_adapters(model, cfg.model.lora, seed=cfg.train.seed)  # base frozen (peft)
    export_adapter(engine.module, out_dir=..., ...)           # collective: peft format, gathered
    export_base_and_merged(engine.module, merged_out=..., ...)  # collective: W + s·B·A, streamed

The base model is loaded partitioned under zero.Init as for full fine-tuning. The adapters are
created outside zero.Init, whole on every rank with peft's own initialization (A random, B zero,
under the run's seed), and `deepspeed.initialize` partitions them like any other parameter
(broadcasting rank 0's values). Only they require grad, so only they reach the optimizer and the
checkpoints.

The adapter that peft's own `save_pretrained` writes under ZeRO-3 is empty (every rank holds a
0-element partition of each LoRA matrix; trl #4416, DeepSpeed #7900): here the adapter weights
are gathered first, then written in peft's format, so `PeftModel.from_pretrained` loads them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sftscale.config import LoraConfig
from sftscale.export import ShardWriter, bounded_groups, save_model_meta
from sftscale.model import full_numel

ADAPTER_DIR, BASE_DIR, MERGED_DIR = "adapter", "base", "merged"  # under <run>/export
ADAPTER_NAME = "default"  # peft's


def add_adapters(model: torch.nn.Module, lora: LoraConfig, *, seed: int) -> torch.nn.Module:
    """Wrap `model` in a peft LoRA model: every target Linear gets A (r x in) and B (out x r);
    everything else is frozen."""
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
    import math
    import zlib

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


def _gathered(params: list[tuple[str, torch.nn.Parameter]]) -> Iterator[list[tuple[str, Any]]]:
    """Collective: yields bounded groups of (name, full tensor) on every rank."""
    import deepspeed

    for group in bounded_groups(params):
        with deepspeed.zero.GatheredParameters([q for _, q in group], modifier_rank=None):
            yield [(n, q.data) for n, q in group]


def export_adapter(
    module: torch.nn.Module, *, out_dir: Path, base_dir: str, tokenizer_dir: Path, rank: int
) -> None:
    """Collective. Rank 0 writes `out_dir` in peft's format (adapter_config.json +
    adapter_model.safetensors + the tokenizer), for `PeftModel.from_pretrained(base, out_dir)`
    with the base model at `base_dir`."""
    from safetensors.torch import save_file

    state = {}
    for group in _gathered(adapter_parameters(module)):
        if rank == 0:
            state.update(
                {peft_key(n): t.detach().to("cpu", copy=True).contiguous() for n, t in group}
            )
    if rank != 0:
        return
    empty = [k for k, t in state.items() if t.numel() == 0]
    if not state or empty:  # the ZeRO-3 regression this module exists to prevent
        raise RuntimeError(f"refusing to write an empty adapter ({len(empty)} empty tensors)")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = module.peft_config[ADAPTER_NAME]
    config.base_model_name_or_path = base_dir
    config.save_pretrained(str(out_dir))
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            (out_dir / f.name).write_bytes(f.read_bytes())


def _lora_layers(module: torch.nn.Module) -> dict[str, Any]:
    """peft's LoRA layers by the name of their base weight (`...q_proj.base_layer.weight`)."""
    from peft.tuners.lora import LoraLayer

    return {
        f"{name}.base_layer.weight": m
        for name, m in module.named_modules()
        if isinstance(m, LoraLayer) and ADAPTER_NAME in m.lora_A
    }


def hf_name(name: str) -> str:
    """A peft model's parameter name as the plain Hugging Face model names it."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def export_base_and_merged(
    module: torch.nn.Module,
    *,
    base_out: Path | None,
    merged_out: Path | None,
    tokenizer_dir: Path,
    max_shard_bytes: int,
    rank: int,
) -> None:
    """Collective. Streams the base model (as trained on: frozen weights, grown vocabulary) to
    `base_out` and/or the merged model (every target weight W + scaling * B @ A) to
    `merged_out`, both plain Hugging Face directories, gathering a bounded group of parameters
    at a time: rank 0 holds about one group, never the model."""
    import deepspeed

    layers = _lora_layers(module)
    base = [(n, p) for n, p in module.named_parameters() if not p.requires_grad]
    layout = [(hf_name(n), tuple(getattr(p, "ds_shape", p.shape)), p.dtype) for n, p in base]
    writers = [
        ShardWriter(out, layout, max_shard_bytes=max_shard_bytes)
        for out in (base_out, merged_out)
        if out is not None and rank == 0
    ]
    base_writer = writers[0] if rank == 0 and base_out is not None else None
    merged_writer = writers[-1] if rank == 0 and merged_out is not None else None
    for group in bounded_groups(base):
        params = [q for _, q in group]
        for n, _ in group:
            if n in layers:
                layer = layers[n]
                params += [layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            for n, q in group:
                if base_writer is not None:
                    base_writer.write(hf_name(n), q.data)
                if merged_writer is not None:
                    w = q.data
                    if n in layers:
                        layer = layers[n]
                        a = layer.lora_A[ADAPTER_NAME].weight.data.float()
                        b = layer.lora_B[ADAPTER_NAME].weight.data.float()
                        w = (w.float() + layer.scaling[ADAPTER_NAME] * (b @ a)).to(q.dtype)
                    merged_writer.write(hf_name(n), w)
    for writer, out in ((base_writer, base_out), (merged_writer, merged_out)):
        if writer is not None:  # rank-0-only effect
            writer.close()
            save_model_meta(module.get_base_model(), tokenizer_dir, out)


def describe(module: torch.nn.Module, lora: LoraConfig) -> str:
    trainable = sum(full_numel(p) for _, p in adapter_parameters(module))
    total = sum(full_numel(p) for p in module.parameters())
    return (
        f"LoRA r={lora.r} alpha={lora.alpha:g} on {', '.join(lora.target_modules)}: "
        f"{trainable / 1e6:.2f}M trainable of {total / 1e6:.1f}M parameters "
        f"({trainable / total:.2%})"
    )
