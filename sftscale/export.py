"""Hugging Face export: safetensors shards + index + config + generation config + tokenizer.

Two ways in:

* `export_from_engine` — at the end of training, inside the workers. Parameters are gathered
  from their ZeRO-3 partitions a bounded group at a time (collective on every rank) and rank 0
  streams them into shards, so peak host memory is about one shard, never the whole model.
* `export_from_checkpoint` — `sftscale export CHECKPOINT --out DIR`, offline, from a DeepSpeed
  checkpoint written by training: the fp32 master weights, streamed a shard at a time.

Either way `AutoModelForCausalLM.from_pretrained(DIR)` loads the result.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import math
import mmap
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from data_tools.durable import staging_dir, swap_in
from sftscale.checkpoint import STATE_FILE
from sftscale.lora import peft_key
from sftscale.model import full_numel

MODEL_META_DIR = "hf_model"  # under the checkpoint root: config + tokenizer, written by training


_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class ShardWriter:
    """Writes tensors straight into safetensors files (Hugging Face shard names + index).

    The layout — names, shapes, dtypes, in the order they will come — is known up front, so
    each file's header is written first and every tensor is appended as it arrives: memory holds
    one tensor at a time, whatever the shard size. Files get their final names when complete.
    """

    def __init__(
        self,
        out_dir: Path,
        layout: list[tuple[str, tuple[int, ...], torch.dtype]],
        *,
        max_shard_bytes: int,
    ) -> None:
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in layout:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype, nbytes))
            size += nbytes
        n = len(shards)
        self._files = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._shards = shards
        self._queue = [(k, entry) for k, shard in enumerate(shards) for entry in shard]
        self._next = 0
        self._handle = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        k, (expected, shape, dtype, nbytes) = self._queue[self._next]
        if name != expected or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(
                f"expected {expected} {shape} {dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        if self._handle is None:
            self._open(k)
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        assert data.nbytes == nbytes
        self._handle.write(memoryview(data))
        self._next += 1
        if self._next == len(self._queue) or self._queue[self._next][0] != k:
            self._handle.close()
            self._handle = None
            (self.out_dir / f".{self._files[k]}.tmp").replace(self.out_dir / self._files[k])

    def _open(self, k: int) -> None:
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype, nbytes in self._shards[k]:
            header[name] = {
                "dtype": _SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self._handle = open(self.out_dir / f".{self._files[k]}.tmp", "wb")  # noqa: SIM115 (closed in write)
        self._handle.write(struct.pack("<Q", len(raw)) + raw)

    def close(self) -> None:
        if self._next != len(self._queue):
            raise RuntimeError(f"{len(self._queue) - self._next} tensors were never written")
        if len(self._files) > 1:
            weight_map = {
                name: self._files[k] for k, shard in enumerate(self._shards) for name, *_ in shard
            }
            total = sum(e[3] for shard in self._shards for e in shard)
            index = {
                "metadata": {"total_size": total},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (self.out_dir / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n"
            )


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


def bounded_groups(
    named: list[tuple[str, torch.nn.Parameter]],
) -> Iterator[list[tuple[str, torch.nn.Parameter]]]:
    """Consecutive groups of (name, parameter), each closed once it holds GATHER_GROUP_BYTES of
    whole tensors: what an export all-gathers at once (one group, never the model)."""
    group, size = [], 0
    for name, p in named:
        group.append((name, p))
        size += full_numel(p) * p.element_size()
        if size >= GATHER_GROUP_BYTES:
            yield group
            group, size = [], 0
    if group:
        yield group


def export_from_engine(
    module: torch.nn.Module,
    *,
    out_dir: Path,
    tokenizer_dir: Path,
    max_shard_bytes: int,
    rank: int,
    hf_names: dict[int, str] | None = None,
) -> None:
    """Collective: every rank must call it. Rank 0 writes `out_dir`: the parameters and
    persistent buffers (DeepSeek-V3's expert score bias) under the model's Hugging Face names.
    hf_names: id(parameter) -> name before DeepSpeed AutoEP replaced the MoE blocks."""
    # heavy (deepspeed): loaded only on the path that uses it
    import deepspeed

    items = export_items(module, hf_names or {})
    layout = [(n, shape, dtype) for n, shape, dtype, _ in items]
    writer = ShardWriter(out_dir, layout, max_shard_bytes=max_shard_bytes) if rank == 0 else None
    plain = [(n, x) for n, _, _, x in items if isinstance(x, torch.Tensor)]
    groups = iter(bounded_groups(plain))
    pending: list[tuple[str, torch.Tensor]] = []
    for name, _, _, source in items:
        if isinstance(source, torch.Tensor):
            if not pending:  # the next bounded group: all-gathered on every rank, freed on exit
                group = next(groups)
                with deepspeed.zero.GatheredParameters([q for _, q in group], modifier_rank=None):
                    pending = [(n, q.data.clone() if writer else q.data) for n, q in group]
            n, tensor = pending.pop(0)
            assert n == name
        else:  # a MoE layer's experts, spread over an expert-parallel group
            tensor = gather_experts(*source)
        if writer is not None:
            writer.write(name, tensor)
    if writer is not None:  # rank-0-only effect
        writer.close()
        save_model_meta(module, tokenizer_dir, out_dir)


def export_items(
    module: torch.nn.Module, hf_names: dict[int, str]
) -> list[tuple[str, tuple[int, ...], torch.dtype, Any]]:
    """(Hugging Face name, shape, dtype, source) of everything an export writes, in order:
    parameters (tied ones once), persistent buffers, and for each DeepSpeed AutoEP layer its
    router as the model's `gate` and its experts as the fused `experts.gate_up_proj` /
    `experts.down_proj` transformers stores (source: (layer, gate_up))."""
    autoep = {n: m for n, m in module.named_modules() if type(m).__name__ == "AutoEPMoELayer"}
    items = []
    for name, p in [*module.named_parameters(), *persistent_buffers(module)]:
        shape = tuple(getattr(p, "ds_shape", p.shape))
        prefix = next((k for k in autoep if name.startswith(k + ".")), None)
        if prefix is None:
            items.append((name, shape, p.dtype, p))
            continue
        layer, rest = autoep[prefix], name[len(prefix) + 1 :]
        experts = layer.num_experts
        if rest == "experts.w1":  # with w3: gate_up_proj, (experts, 2 x intermediate, hidden)
            gate_up = (experts, 2 * shape[1], shape[2])
            items.append((f"{prefix}.experts.gate_up_proj", gate_up, p.dtype, (layer, True)))
        elif rest == "experts.w2":  # down_proj, (experts, hidden, intermediate)
            items.append(
                (f"{prefix}.experts.down_proj", (experts, *shape[1:]), p.dtype, (layer, False))
            )
        elif rest.startswith("router."):
            items.append((f"{prefix}.gate.{rest.split('.', 2)[-1]}", shape, p.dtype, p))
        elif id(p) in hf_names:  # a shared expert: the model's own module, kept by AutoEP
            items.append((hf_names[id(p)], shape, p.dtype, p))
        elif rest != "experts.w3":
            raise ValueError(f"export: no Hugging Face name for {name} of an AutoEP layer")
    return items


def persistent_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Buffers a state dict holds (e.g. DeepSeek-V3's e_score_correction_bias), not rotary
    caches and other non-persistent ones."""
    out = []
    for prefix, m in module.named_modules():
        for name, b in m.named_buffers(recurse=False):
            if b is not None and name not in m._non_persistent_buffers_set:
                out.append((f"{prefix}.{name}" if prefix else name, b))
    return out


def gather_experts(layer: Any, gate_up: bool) -> torch.Tensor:
    """Collective over the world: every expert of an AutoEP layer, in the model's order, as
    transformers stores them (gate_up_proj = gate rows then up rows)."""
    # heavy (deepspeed): loaded only on the path that uses it
    import deepspeed
    import torch.distributed as dist

    weights = [layer.experts.w1, layer.experts.w3] if gate_up else [layer.experts.w2]
    # gathered within the expert-data-parallel group: this rank's experts whole
    with deepspeed.zero.GatheredParameters(weights, modifier_rank=None):
        local = torch.cat([w.data for w in weights], dim=1).contiguous()
    group = layer.ep_group
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    owned = [None] * len(parts)
    dist.all_gather_object(owned, list(layer_experts(layer)), group=group)
    full = torch.empty((layer.num_experts, *local.shape[1:]), dtype=local.dtype)
    for part, ids in zip(parts, owned, strict=True):
        full[ids] = part
    return full


def layer_experts(layer: Any) -> list[int]:
    """The experts (global ids) this rank holds of an AutoEP layer, in its local order."""
    from deepspeed.checkpoint.autoep_affine import autoep_experts_for_rank  # heavy: workers

    return list(autoep_experts_for_rank(layer.expert_placement_descriptor, layer.ep_rank))


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


GATHER_GROUP_BYTES = 256 * 2**20  # parameters all-gathered at once by the in-training export
_MADV_DONTNEED = 4  # Linux


def _release_pages(lazy) -> None:
    """Tell the kernel the memory-mapped pages behind a lazy tensor's slices are not needed:
    they are clean file pages, so they are dropped (and re-read from disk if touched again)."""

    libc = ctypes.CDLL(None, use_errno=True)
    end_idx = lazy.offset + lazy.partitioned_numel
    bounds = lazy.flat_groups_offset
    for groups in lazy.flat_groups:  # one list of flat fp32 tensors per rank
        for g, flat in enumerate(groups):
            lo, hi = max(lazy.offset, bounds[g]), min(end_idx, bounds[g + 1])
            if lo >= hi:
                continue
            start = int(flat.data_ptr() + (lo - bounds[g]) * flat.element_size())
            aligned = start - start % mmap.PAGESIZE
            length = int((hi - lo) * flat.element_size() + (start - aligned))
            libc.madvise(ctypes.c_void_p(aligned), ctypes.c_size_t(length), _MADV_DONTNEED)


def export_from_checkpoint(
    checkpoint: str | Path,
    *,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2_000_000_000,
) -> Path:
    """Write a Hugging Face directory from a ZeRO checkpoint, one shard's worth of tensors at a
    time: peak host memory is about one output shard, not the model.

    The fp32 master weights live in every rank's optimizer-state file. DeepSpeed's lazy reader
    memory-maps those files and assembles a parameter from its per-rank slices on demand; the
    pages read for a parameter are handed back to the kernel right after, and the shard writer
    streams each tensor to disk, so memory holds about one parameter at a time.

    dtype: of the written weights; None writes them in the dtype the run trained in.
    """
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise FileNotFoundError(
            f"--out {out} exists and holds files that are not a model export; the export "
            "replaces the whole directory: choose a new or empty one"
        )
    stage = staging_dir(out)  # written beside, swapped in whole: no stale file of a layout
    shutil.rmtree(stage, ignore_errors=True)
    _export_from_checkpoint(checkpoint, out=stage, dtype=dtype, max_shard_bytes=max_shard_bytes)
    swap_in(stage, out)
    return out


def is_export(path: Path) -> bool:
    """Whether `path` holds a model export (what an export may replace)."""
    return any((path / f).is_file() for f in ("config.json", "adapter_config.json")) or any(
        path.glob("*.safetensors")
    )


def _export_from_checkpoint(
    checkpoint: str | Path, *, out: Path, dtype: torch.dtype | None, max_shard_bytes: int
) -> Path:
    """export_from_checkpoint's work, into `out`."""
    # heavy (deepspeed): loaded only on the path that uses it
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, GenerationConfig

    root, tag = resolve_checkpoint(checkpoint)
    meta = root / MODEL_META_DIR
    state_file = root / tag / STATE_FILE
    ep = json.loads(state_file.read_text()).get("expert_parallel_size", 1)
    if ep > 1:  # each rank's file holds its own experts, under AutoEP's names
        raise ValueError(
            f"{root / tag} was saved with scale.expert_parallel_size={ep}; exporting such a "
            "checkpoint offline is not supported yet. The run exports at its end "
            "(checkpoint.export, <run>/export); or resume it for one step with "
            "train.max_steps=<its step + 1> to export"
        )
    if (meta / "adapter_config.json").is_file():  # a LoRA run: its checkpoints hold the adapter
        return _adapter_from_checkpoint(root, tag, meta=meta, out=out)
    if dtype is None:  # the dtype the run trained in (bf16 or fp32), as its own export has
        trained = json.loads((meta / "config.json").read_text()).get("dtype")
        dtype = torch.float32 if trained == "float32" else torch.bfloat16

    def lazy_state() -> dict:
        with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints per call
            return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag, lazy_mode=True)

    state = lazy_state()  # one parse; the optimizer-state files are memory-mapped
    layout = [
        (n, tuple(t.shape), dtype if t.dtype.is_floating_point else t.dtype)
        for n, t in state.items()
    ]
    writer = ShardWriter(out, layout, max_shard_bytes=max_shard_bytes)
    for name, t in state.items():
        if hasattr(t, "flat_groups"):  # a lazy tensor: assemble it from every rank's slice
            full = t.contiguous()
            _release_pages(t)
        else:
            full = t
        writer.write(name, full.to(dtype) if full.is_floating_point() else full)
        del full
    writer.close()
    del state
    cfg = AutoConfig.from_pretrained(str(meta))
    cfg.dtype = dtype
    cfg.save_pretrained(str(out))
    if (meta / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(str(meta)).save_pretrained(str(out))
    for f in meta.iterdir():
        if f.is_file() and f.name not in ("config.json", "generation_config.json"):
            shutil.copy2(f, out / f.name)
    return out


def _adapter_from_checkpoint(root: Path, tag: str, *, meta: Path, out: Path) -> Path:
    """A LoRA checkpoint holds only the adapters (the base is model.name_or_path): write them
    in peft's format, fp32, with the run's adapter_config.json and tokenizer."""

    # heavy (deepspeed): loaded only on the path that uses it
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    with contextlib.redirect_stdout(io.StringIO()):
        state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {peft_key(n): t.contiguous() for n, t in state.items()}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    for f in meta.iterdir():
        if f.is_file() and f.name not in ("config.json", "generation_config.json"):
            shutil.copy2(f, out / f.name)
    return out
