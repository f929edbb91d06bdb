"""The training loss: summed token cross-entropy over supervised positions, in fp32.

The loop divides the sum by the step's global supervised-token count (across micro-steps and
data-parallel ranks), so the update does not depend on how the global batch is split.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from sftscale.data import IGNORE_INDEX


def token_loss_sum(
    logits: torch.Tensor, targets: torch.Tensor, *, chunk_tokens: int = 0
) -> torch.Tensor:
    """Summed cross-entropy over supervised positions, in fp32 whatever the logits' dtype.

    With `chunk_tokens`, positions are taken that many at a time and each chunk's fp32 work is
    recomputed in backward instead of kept: the fp32 copy of the logits and the fp32
    log-softmax autograd would save (8 bytes per logit, 4 GiB for one 4096-token row of a
    128k vocabulary) become one chunk's worth. The logits tensor itself stays.
    """
    flat_logits, flat_targets = logits.flatten(0, 1), targets.flatten()
    n = flat_targets.numel()
    if not chunk_tokens or n <= chunk_tokens or not torch.is_grad_enabled():
        return _ce_sum(flat_logits, flat_targets)

    # split, not slicing: the backward of one split is one concatenation, where each slice's
    # backward would add a whole-logits gradient (quadratic in the positions)
    parts = [
        checkpoint(_ce_sum, logits_part, targets_part, use_reentrant=False)
        for logits_part, targets_part in zip(
            flat_logits.split(chunk_tokens), flat_targets.split(chunk_tokens), strict=True
        )
    ]
    return torch.stack(parts).sum()


def tiled_head_loss_sum(
    hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, *, tiles: int
) -> torch.Tensor:
    """`token_loss_sum(head(hidden), targets)` without the logits tensor: the positions are
    split into `tiles` slices (some may be empty) and each slice's logits are computed, reduced
    and, in backward, recomputed on their own. `head` is called once per slice whatever the
    slice holds: under ZeRO-3 each call gathers its weight from every rank, so every rank must
    pass the same `tiles`.
    """
    n = targets.numel()
    sizes = [n // tiles + (i < n % tiles) for i in range(tiles)]  # tensor_split's sizes
    # split (one concatenation in backward), not slices (a whole-row gradient each)
    pieces = zip(hidden.flatten(0, 1).split(sizes), targets.flatten().split(sizes), strict=True)
    if not torch.is_grad_enabled():
        return torch.stack([_head_ce_sum(head, h, t) for h, t in pieces]).sum()

    parts = [checkpoint(_head_ce_sum, head, h, t, use_reentrant=False) for h, t in pieces]
    return torch.stack(parts).sum()


def _head_ce_sum(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    return _ce_sum(head(hidden), targets)


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )
