"""Ulysses sequence parallelism (DeepSpeed's Arctic Long Sequence Training) and per-document
attention, applied to a loaded model from outside, like ZeRO-3: the model code is not changed.

    group = sequence_parallel_group(size)                     # collective: consecutive ranks
    apply_ulysses(model, group=group, attn_implementation="sdpa")
    apply_document_attention(model)                           # without SP (sdpa)
    tile_mlp(model, tiles)                                    # DeepSpeed's TiledMLP

Every group of `size` consecutive ranks works on the same rows, each rank on its 1/size slice of
the sequence (`Batch.shard`). In every attention layer DeepSpeed's `UlyssesSPAttentionHF`
exchanges the slices (all-to-all) so that each rank holds all positions for 1/size of the heads,
runs the core attention there, and exchanges the result back. Everything outside attention
(embeddings, MLP, norms, logits, loss) works on the rank's own positions only, so activations
per rank shrink with the group size.

Packed rows stay document-isolated. DeepSpeed's wrapper drops the attention mask, so plain sdpa
would attend causally over the whole row, across documents. Here the core attention receives the
whole row's position ids (they restart at every document; the wrapper gathers them) and runs
once per document (`document_attention`): no document sees another, and no seq x seq mask is
built. flash_attention_2 separates documents from the same position ids itself (varlen).
eager is refused by validation: it needs the full 4D mask that SP exists to avoid. (DeepSpeed's
flex_attention path rebuilds a plain causal mask, which would cross documents: not offered.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from sftscale.lengths import padded_length

# Core attentions that stay exact on packed rows under Ulysses (see the module docstring).
EXACT_ON_PACKED_ROWS = ("sdpa", "flash_attention_2")


@dataclass(frozen=True)
class SequenceParallelGroup:
    size: int
    rank: int  # within the group: which slice of the sequence this rank holds
    group: Any  # torch.distributed process group of the `size` ranks


def sequence_parallel_group(size: int) -> SequenceParallelGroup:
    """Collective: ranks [0, size), [size, 2 * size), ... form the groups (consecutive ranks, as
    DeepSpeed's parallel_state_sp does, so a group stays on one node where it can)."""

    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for first in range(0, world, size):
        group = dist.new_group(list(range(first, first + size)))  # every rank creates every group
        if first <= rank < first + size:
            mine = group
    return SequenceParallelGroup(size=size, rank=rank % size, group=mine)


def document_attention(core: Callable) -> Callable:
    """`core` (a transformers attention function) run once per document of each row.

    Documents start where the whole row's position ids are 0 (collate restarts them at every
    document; the padding tail is its own segment). Each call gets no mask, so the core is
    causal within the document and nothing crosses into another one.

    On a CPU each document is padded at its end to `padded_length`: oneDNN, under the bf16
    GEMMs of the CPU's sdpa kernels, builds and caches a kernel for every new shape, and a
    corpus's document lengths are many. Unpadded, a rank's RSS grew by 0.07 GiB every step
    of a 0.2M-parameter model (8 rows of 1024 positions, 20-300-token documents: 0.89 ->
    1.44 GiB over 12 steps), and on 64k-position rows by more than the activations. Padded,
    it stays flat (0.50 GiB). Exact: the padding comes after every real position, so causal
    attention never lets a real query see it, and its own outputs are dropped (their
    gradient is zero). GPUs' kernels keep no per-shape state: no padding there.
    """

    def attend(module, query, key, value, attention_mask, *args, position_ids=None, **kwargs):
        if position_ids is None:  # not a packed row: one document
            return core(module, query, key, value, attention_mask, *args, **kwargs)
        length = query.shape[2]  # [batch, heads, positions, head_dim]
        rows = []
        # split, not per-document slicing: the backward of one split is one concatenation,
        # where each slice's backward would add a whole-row gradient (quadratic in the row)
        for b, (q, k, v) in enumerate(zip(*(t.split(1) for t in (query, key, value)), strict=True)):
            starts = (position_ids[b] == 0).nonzero().flatten().tolist()
            bounds = sorted({0, *starts, length})
            sizes = [e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
            parts = [
                _padded(core, module, qd, kd, vd, args, kwargs)
                for qd, kd, vd in zip(
                    q.split(sizes, 2), k.split(sizes, 2), v.split(sizes, 2), strict=True
                )
            ]
            rows.append(torch.cat(parts, dim=1))  # [1, positions, heads, head_dim]
        return torch.cat(rows, dim=0), None

    return attend


def _padded(core: Callable, module, q, k, v, args, kwargs) -> torch.Tensor:
    """One document's attention output [1, positions, heads, head_dim]; on a CPU computed on
    the document padded to `padded_length` (see document_attention)."""
    n = q.shape[2]
    pad = padded_length(n) - n if q.device.type == "cpu" else 0
    if pad:
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    return core(module, q, k, v, None, *args, **kwargs)[0][:, :n]


def sliding_window(config: Any) -> int | None:
    """The model's attention window when it has one (Mistral v0.1, Qwen2 with
    use_sliding_window): per-document causal attention is exact only for documents no longer
    than it."""
    text = config.get_text_config()
    if text.model_type == "qwen2" and not getattr(text, "use_sliding_window", False):
        return None
    return getattr(text, "sliding_window", None)


def apply_document_attention(model: torch.nn.Module) -> str:
    """Without sequence parallelism: sdpa once per document of each row, as under SP.

    transformers' own sdpa path on packed rows builds a (positions x positions) mask per row
    and sdpa then runs its masked kernel over the whole row: quadratic in the row's length in
    memory and compute. Per document, each call is causal without a mask (the flash kernel
    where the device has one) and costs the document's own square
    (benchmarks/results/long_context.md). Returns the registered attention name.
    """
    # heavy (transformers): loaded only on the path that uses it
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = "sdpa_per_document"
    AttentionInterface.register(name, document_attention(ALL_ATTENTION_FUNCTIONS["sdpa"]))
    model.config._attn_implementation = name  # not a mask-building name: no mask is built
    return name


def apply_ulysses(
    model: torch.nn.Module, *, group: SequenceParallelGroup, attn_implementation: str
) -> str:
    """Route the model's attention through DeepSpeed's Ulysses all-to-all over `group`.

    Registers the wrapped attention under its own name and points the model's config at it, so
    other models in the process keep their attention. Returns that name.
    """
    # heavy (deepspeed): loaded only on the path that uses it
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if attn_implementation not in EXACT_ON_PACKED_ROWS:
        raise ValueError(
            f"attention {attn_implementation!r} is not exact on packed rows under "
            f"sequence parallelism; use one of {', '.join(EXACT_ON_PACKED_ROWS)}"
        )
    core = ALL_ATTENTION_FUNCTIONS[attn_implementation]
    if attn_implementation == "sdpa":
        core = document_attention(core)
    arch = model.config.get_text_config()
    head_dim = getattr(arch, "head_dim", None) or arch.hidden_size // arch.num_attention_heads
    by_batch: dict[int, UlyssesSPAttentionHF] = {}  # DeepSpeed's module fixes the batch size

    def ulysses(module, query, key, value, attention_mask, *args, **kwargs):
        batch = query.shape[0]
        if batch not in by_batch:
            by_batch[batch] = UlyssesSPAttentionHF(
                attn=core,
                batch_size=batch,
                attn_head_count=arch.num_attention_heads,
                attn_head_size=head_dim,
                kv_head_count=arch.num_key_value_heads,
                num_hidden_layers=arch.num_hidden_layers,
                process_group=group.group,
                seq_length_is_variable=True,
            )
        # The mask transformers built (if any) covers the local slice only: dropped, as
        # DeepSpeed's own wrapper does; documents come from the gathered position ids.
        return by_batch[batch](module, query, key, value, None, *args, **kwargs)

    name = f"ulysses_{attn_implementation}"
    AttentionInterface.register(name, ulysses)
    # Not one of transformers' mask-creating names: no mask is built for the local slice.
    model.config._attn_implementation = name
    return name


def tile_mlp(model: torch.nn.Module, tiles: int) -> int:
    """Every gated MLP (gate/up/down projections: Llama, Qwen2, Mistral) computes `tiles` slices
    of the sequence at a time with DeepSpeed's TiledMLP, which recomputes each slice in
    backward: the (positions x intermediate_size) activations exist for one slice at a time.
    Returns how many MLPs were tiled.

    Under ZeRO-3 each slice gathers the MLP's weights, so every rank must cut the same number
    of slices and TiledMLP needs them equal: rows are padded to a multiple of `tiles` positions
    per rank (see train.row_multiple).
    """
    # heavy (deepspeed): loaded only on the path that uses it
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    count = 0
    for module in model.modules():
        if not all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")):
            continue
        whole = module.forward  # the model's own forward, bound to this MLP
        params = list(module.parameters())  # TiledMLP holds their gradients until the last slice

        def tiled(x, _whole=whole, _module=module, _params=params):
            return TiledMLP.apply(lambda _self, part: _whole(part), _module, x, tiles, _params)

        module.forward = tiled
        count += 1
    return count
