"""The run's export: the trained model, or for a LoRA run the adapter in peft's format, the
base it applies to and the merged model. The loop calls `export_trained` and `save_export_meta`
whatever it trained; which files that means is decided here.

    <run>/export/              the full model (safetensors + config + tokenizer)
    <run>/export/adapter/      LoRA: peft's format, for PeftModel.from_pretrained(base, adapter)
    <run>/export/base/         LoRA on a preset or a grown vocabulary: the base as trained on
    <run>/export/merged/       with checkpoint.export_merged: W + scaling * B @ A

The adapter that peft's own `save_pretrained` writes under ZeRO-3 is empty (every rank holds a
0-element partition of each LoRA matrix; trl #4416, DeepSpeed #7900): here the adapter weights
are gathered first, then written in peft's format, so `PeftModel.from_pretrained` loads them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from data_tools.durable import staging_dir, swap_in
from sftscale.config import Config
from sftscale.export import ShardWriter, bounded_groups, export_from_engine, save_model_meta
from sftscale.lora import ADAPTER_NAME, adapter_parameters, hf_name, lora_layers, peft_key
from sftscale.model import is_preset

ADAPTER_DIR, BASE_DIR, MERGED_DIR = "adapter", "base", "merged"  # under <run>/export


def export_trained(
    module: torch.nn.Module,
    cfg: Config,
    *,
    out: Path,
    tokenizer_dir: Path,
    rank: int,
    vocab_grown: bool,
    hf_names: dict[int, str] | None = None,
) -> None:
    """Collective: `out` holds the trained model; for a LoRA run the adapter (out/adapter), the
    base it applies to when that is not model.name_or_path as is (a preset, or a vocabulary
    grown for added tokens: out/base) and, with checkpoint.export_merged, the merged model
    (out/merged). Rank 0 writes it beside `out` and swaps it in whole at the end: a failed
    export leaves the previous one, and no file of an earlier layout survives."""
    stage = staging_dir(out)
    if rank == 0:
        shutil.rmtree(stage, ignore_errors=True)
    common = {"tokenizer_dir": tokenizer_dir, "rank": rank}
    shard_bytes = cfg.checkpoint.export_max_shard_mb * 2**20
    if cfg.model.lora is None:
        export_from_engine(
            module, out_dir=stage, max_shard_bytes=shard_bytes, hf_names=hf_names, **common
        )
    else:
        own_base = is_preset(cfg.model.name_or_path) or vocab_grown
        # the adapter names its base where it will be once swapped in
        base = out / BASE_DIR if own_base else Path(cfg.model.name_or_path).resolve()
        export_adapter(module, out_dir=stage / ADAPTER_DIR, base_dir=str(base), **common)
        if own_base or cfg.checkpoint.export_merged:
            export_base_and_merged(
                module,
                base_out=stage / BASE_DIR if own_base else None,
                merged_out=stage / MERGED_DIR if cfg.checkpoint.export_merged else None,
                max_shard_bytes=shard_bytes,
                **common,
            )
    if rank == 0:  # rank-0-only effect
        swap_in(stage, out)


def save_export_meta(module: torch.nn.Module, tokenizer_dir: Path, dest: Path) -> None:
    """What `sftscale export` needs beside a checkpoint: the model's config and tokenizer, and
    an adapter's peft config when the model carries one. Written whole or not at all."""
    stage = staging_dir(dest)
    shutil.rmtree(stage, ignore_errors=True)
    save_model_meta(module, tokenizer_dir, stage)
    peft_config = getattr(module, "peft_config", None)
    if peft_config is not None:
        peft_config[ADAPTER_NAME].save_pretrained(str(stage))
    swap_in(stage, dest)


def _gathered(params: list[tuple[str, torch.nn.Parameter]]) -> Iterator[list[tuple[str, Any]]]:
    """Collective: yields bounded groups of (name, full tensor) on every rank."""
    # heavy (deepspeed): loaded only on the path that uses it
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
    # heavy (safetensors): loaded only on the path that uses it
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
    # heavy (deepspeed): loaded only on the path that uses it
    import deepspeed

    layers = lora_layers(module)
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
