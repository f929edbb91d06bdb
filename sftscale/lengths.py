"""The lengths micro-batches and documents are padded to. Light (no torch): the planner counts
them, the data loader and per-document attention pad to them."""

from __future__ import annotations

import math

from sftscale.config import Config

# Micro-batches are padded to their longest row rounded up to this (packed rows are nearly
# full anyway; unpacked rows would otherwise pay for padding up to seq_len). 64 cost ~9% extra
# compute on single unpacked documents (bench: llama-100m, micro 1); 8 keeps tensor-core shapes.
PAD_MULTIPLE = 8


def row_multiple(cfg: Config) -> int:
    """Micro-batches are padded to a multiple of this many positions: PAD_MULTIPLE, and whole
    equal slices for each rank of a sequence-parallel group and each tile of a tiled MLP."""
    return math.lcm(PAD_MULTIPLE, cfg.scale.sequence_parallel_size * max(cfg.train.mlp_tiles, 1))


def padded_length(n: int) -> int:
    """`n` positions rounded up to one of few lengths: a multiple of 64 up to 512, then of
    1/8 of the power of two at or below `n` (at most 12.5% more positions, 8 lengths an
    octave)."""
    if n <= 512:
        return -(-n // 64) * 64
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step


def padded_lengths(top: int) -> list[int]:
    """Every length `padded_length` gives for 1..`top` positions, shortest first."""
    found, last = [], 0
    while last < top:
        last = padded_length(last + 1)
        found.append(last)
    return found


def batch_lengths(cfg: Config, seq_len: int, *, packed: bool) -> int:
    """How many micro-batch lengths a CPU rank can meet in this run (data.collate with
    few_lengths): packed rows are full but for a few (the data's last row, which packing
    leaves short: 2); unpacked rows (`prepare --packing none`) any of the padded lengths up to
    seq_len. At most one new one per micro-batch."""
    multiple = row_multiple(cfg)
    found = {min(seq_len, -(-p // multiple) * multiple) for p in padded_lengths(seq_len)}
    possible = min(len(found), 2) if packed else len(found)
    return min(possible, cfg.train.max_steps * cfg.train.grad_accum)


# Document lengths beyond this reuse the attention kernels of shorter ones: the CPU's flash
# attention works in blocks (queries 32-256 positions, keys 512) and keeps a kernel per block
# and tail shape, and the tails of padded lengths repeat above it (measured on tiny-llama: 2.3
# MiB a new length up to 1024 positions, 0.7 above, after those)
DOCUMENT_KERNELS_UP_TO = 1024


def document_lengths(seq_len: int, longest: int | None) -> int:
    """How many document lengths with kernels of their own per-document attention can meet
    on a CPU (each document is padded to `padded_length`, sequence_parallel.document_attention):
    every padded length up to the data's longest document (None: up to seq_len), at most
    DOCUMENT_KERNELS_UP_TO."""
    top = min(seq_len, longest if longest is not None else seq_len, DOCUMENT_KERNELS_UP_TO)
    return max(len(padded_lengths(top)), 1)
