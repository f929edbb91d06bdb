"""Hugging Face export: safetensors shards + index + config + generation config + tokenizer.

Two ways in:

* `export_from_engine` — at the end of training, inside the workers. Parameters are gathered
  from their ZeRO-3 partitions a bounded group at a time (collective on every rank) and rank 0
  streams them into shards, so peak host memory is about one shard, never the whole model.
* `export_from_checkpoint` — `sftscale export CHECKPOINT --out DIR`, offline, from a DeepSpeed
  checkpoint written by training (consolidates the fp32 master weights).

Either way `AutoModelForCausalLM.from_pretrained(DIR)` loads the result.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

MODEL_META_DIR = "hf_model"  # under the checkpoint root: config + tokenizer, written by training


class ShardWriter:
    """Streams tensors into safetensors files of at most `max_shard_bytes` (HF naming + index)."""

    def __init__(self, out_dir: Path, *, max_shard_bytes: int) -> None:
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[tuple[Path, list[str], int]] = []
        out_dir.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out_dir / f".part-{len(self._files):05d}.safetensors"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._files.append((path, list(self._pending), self._pending_bytes))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        if self._pending or not self._files:
            self._flush()
        n = len(self._files)
        if n == 1:
            self._files[0][0].replace(self.out_dir / "model.safetensors")
            return
        weight_map, total = {}, 0
        for i, (path, names, size) in enumerate(self._files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.replace(self.out_dir / final)
            weight_map.update({k: final for k in names})
            total += size
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2) + "\n"
        )


def _full_numel(p: torch.nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 params hold only a partition


def save_model_meta(module: torch.nn.Module, tokenizer_dir: Path, out_dir: Path) -> None:
    """config.json, generation_config.json and the tokenizer: everything but the weights."""
    out_dir.mkdir(parents=True, exist_ok=True)
    module.config.save_pretrained(str(out_dir))
    gen = getattr(module, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(out_dir))
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            shutil.copy2(f, out_dir / f.name)


def export_from_engine(
    module: torch.nn.Module, *, out_dir: Path, tokenizer_dir: Path, max_shard_bytes: int, rank: int
) -> None:
    """Collective: every rank must call it. Rank 0 writes `out_dir`."""
    import deepspeed

    writer = ShardWriter(out_dir, max_shard_bytes=max_shard_bytes) if rank == 0 else None
    named = list(module.named_parameters())  # tied weights appear once
    group: list[tuple[str, torch.nn.Parameter]] = []
    group_bytes = 0
    for i, (name, p) in enumerate(named):
        group.append((name, p))
        group_bytes += _full_numel(p) * p.element_size()
        last = i == len(named) - 1
        if group_bytes >= max_shard_bytes // 4 or last:
            # Collective: all-gathers the group's partitions on every rank; freed on exit.
            with deepspeed.zero.GatheredParameters([q for _, q in group], modifier_rank=None):
                if writer is not None:
                    for n, q in group:
                        writer.add(n, q.data.detach().to("cpu", copy=True))
            group, group_bytes = [], 0
    if writer is not None:  # rank-0-only effect
        writer.close()
        save_model_meta(module, tokenizer_dir, out_dir)


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(checkpoint root, tag) for a checkpoint root (uses its `latest`) or a tag directory."""
    p = Path(path)
    if (p / "latest").is_file():
        return p, (p / "latest").read_text().strip()
    if p.is_dir() and (p.parent / MODEL_META_DIR).is_dir():
        return p.parent, p.name
    raise FileNotFoundError(
        f"{path} is not a sftscale checkpoint: pass <run>/checkpoints or <run>/checkpoints/<tag>"
    )


def export_from_checkpoint(
    checkpoint: str | Path,
    *,
    out_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 2_000_000_000,
) -> Path:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, GenerationConfig

    root, tag = resolve_checkpoint(checkpoint)
    meta = root / MODEL_META_DIR
    out = Path(out_dir)
    state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    writer = ShardWriter(out, max_shard_bytes=max_shard_bytes)
    for name in list(state):
        writer.add(name, state.pop(name).to(dtype))
    writer.close()
    cfg = AutoConfig.from_pretrained(str(meta))
    cfg.dtype = dtype
    cfg.save_pretrained(str(out))
    if (meta / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(str(meta)).save_pretrained(str(out))
    for f in meta.iterdir():
        if f.is_file() and f.name not in ("config.json", "generation_config.json"):
            shutil.copy2(f, out / f.name)
    return out
