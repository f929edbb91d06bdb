"""Reading packed shards for training: global order, rank slices, collation.

The order of rows is a pure function of (seed, epoch, step, rank, world_size): every rank
computes the same permutation of all rows for an epoch, takes the step's global batch from it,
and its own micro-batches out of that. Seeking to any step is O(1) in data read — nothing is
replayed — which is what exact and elastic resume build on.

Imports only numpy, pyarrow and torch (no ray, no deepspeed).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from data_tools import schema
from sftscale.lengths import padded_length

IGNORE_INDEX = -100


class PackedDataset:
    """The rows of a prepared directory, memory-mapped, addressed by global row index."""

    def __init__(self, data_dir: str | Path) -> None:
        self.dir = Path(data_dir)
        self.manifest = schema.read_manifest(self.dir)
        self.seq_len: int = self.manifest.seq_len
        self._tables = [
            schema.open_shard(schema.member(self.dir, s.file)) for s in self.manifest.shards
        ]
        self._offsets = np.cumsum([0] + [t.num_rows for t in self._tables])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def tokenizer_dir(self) -> Path:
        return schema.member(self.dir, self.manifest.tokenizer.dir)

    def doc_lens(self, index: int) -> np.ndarray:
        return self.row(index)[2]

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        shard = int(np.searchsorted(self._offsets, index, side="right")) - 1
        table, r = self._tables[shard], index - int(self._offsets[shard])
        return tuple(  # type: ignore[return-value]
            table.column(c)[r].values.to_numpy(zero_copy_only=False)
            for c in ("input_ids", "loss_mask", "doc_lens")
        )


@lru_cache(maxsize=4)
def epoch_order(num_rows: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The permutation of all rows used in `epoch`; identical on every rank."""
    if not shuffle:
        return np.arange(num_rows)
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def steps_per_epoch(num_rows: int, rows_per_step: int) -> float:
    return num_rows / rows_per_step


def stream_rows(
    start: int, count: int, *, num_rows: int, seed: int, shuffle: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, row indices) of positions [start, start + count) of the sample stream.

    The stream is epoch 0's permutation of all rows, then epoch 1's, and so on: position p is
    row epoch_order(p // num_rows)[p % num_rows]. A global batch that runs past the end of an
    epoch continues into the next one, so no row is dropped or repeated within an epoch, and
    seeking to any position is O(1). Optimizer step s of a run with G rows per step consumes
    positions [s * G, (s + 1) * G); a run resumed with another G continues from where the
    checkpoint's position left off (elastic resume).
    """
    positions = np.arange(start, start + count, dtype=np.int64)
    epochs = positions // num_rows
    rows = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        rows[sel] = epoch_order(num_rows, seed=seed, epoch=int(epoch), shuffle=shuffle)[
            positions[sel] % num_rows
        ]
    return epochs, rows


def assign_ranks(
    step_rows: np.ndarray,
    costs: np.ndarray,
    *,
    world_size: int,
    micro_batch_size: int,
    grad_accum: int,
    by_cost: bool = True,
) -> tuple[list[list[np.ndarray]], float]:
    """Split a step's global rows into `grad_accum` micro-batches per rank, balancing cost.

    Each rank gets exactly micro_batch_size * grad_accum rows. Rows go, most expensive first,
    to the least-loaded rank that still has room (longest-processing-time greedy), so no rank
    waits long on another at the step's collectives. `costs` are per-row (FLOPs, including
    the quadratic attention term of each document). A pure function of its inputs: every rank
    computes the same assignment without communicating. by_cost=False (train.balance_ranks
    false) assigns by position instead: micro-step a on rank r takes the (a * world_size + r)-th
    slice of micro_batch_size rows.

    Returns (micro-batches per rank, imbalance), imbalance = max rank cost / mean rank cost - 1.
    """
    per_rank = micro_batch_size * grad_accum
    assert len(step_rows) == per_rank * world_size == len(costs)
    if not by_cost:
        m = micro_batch_size
        slots = [
            [
                np.arange((a * world_size + r) * m, (a * world_size + r + 1) * m)
                for a in range(grad_accum)
            ]
            for r in range(world_size)
        ]
        loads = [float(costs[np.concatenate(rank_slots)].sum()) for rank_slots in slots]
        mean = sum(loads) / world_size
        micro = [[step_rows[i] for i in rank_slots] for rank_slots in slots]
        return micro, (max(loads) / mean - 1.0) if mean > 0 else 0.0
    order = sorted(range(len(step_rows)), key=lambda i: (-float(costs[i]), int(step_rows[i])))
    load = [0.0] * world_size
    assigned: list[list[int]] = [[] for _ in range(world_size)]
    for i in order:
        r = min(
            (r for r in range(world_size) if len(assigned[r]) < per_rank),
            key=lambda r: (load[r], r),
        )
        assigned[r].append(i)
        load[r] += float(costs[i])
    micro = [
        [
            step_rows[np.array(idx[a * micro_batch_size : (a + 1) * micro_batch_size])]
            for a in range(grad_accum)
        ]
        for idx in assigned
    ]
    mean = sum(load) / world_size
    return micro, (max(load) / mean - 1.0) if mean > 0 else 0.0


def pad_token_id(tokenizer) -> int:
    """The id rows are padded with: the tokenizer's pad token, else its EOS (padding is never
    supervised nor attended to, so any id would do; these two are what a reader expects)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def data_fingerprint(m: schema.Manifest) -> str:
    """What a checkpoint's stream positions refer to: the rows of this prepared directory."""
    key = [
        m.sources["sha256"],
        m.tokenizer.fingerprint,
        m.num_rows,
        m.seq_len,
        [s.num_tokens for s in m.shards],
    ]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long
    position_ids: torch.Tensor  # (B, T) long, restarting at 0 at every document start
    targets: torch.Tensor  # (B, T) long: next-token id where supervised, else IGNORE_INDEX
    num_tokens: int  # non-pad tokens
    num_supervised: int  # targets != IGNORE_INDEX
    lengths: tuple[int, ...] = ()  # non-pad tokens of each row

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            input_ids=self.input_ids.to(device),
            position_ids=self.position_ids.to(device),
            targets=self.targets.to(device),
            num_tokens=self.num_tokens,
            num_supervised=self.num_supervised,
            lengths=self.lengths,
        )

    def shard(self, index: int, count: int) -> Batch:
        """Positions [index * T / count, (index + 1) * T / count) of every row: what rank
        `index` of a sequence-parallel group of `count` ranks computes. Targets were shifted on
        the whole row, so the shards' summed losses are the row's loss; the position ids keep
        the whole row's values, from which attention rebuilds the documents."""
        width = self.input_ids.shape[1]
        if width % count:
            raise ValueError(f"rows of {width} positions do not split into {count} shards")
        lo, hi = index * width // count, (index + 1) * width // count
        targets = self.targets[:, lo:hi]
        return Batch(
            input_ids=self.input_ids[:, lo:hi],
            position_ids=self.position_ids[:, lo:hi],
            targets=targets,
            num_tokens=sum(min(max(n - lo, 0), hi - lo) for n in self.lengths),
            num_supervised=int((targets != IGNORE_INDEX).sum()),
            lengths=tuple(min(max(n - lo, 0), hi - lo) for n in self.lengths),
        )


def collate(
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    *,
    seq_len: int,
    pad_id: int,
    pad_to_multiple_of: int | None = None,
    few_lengths: bool = False,
) -> Batch:
    """Pad packed rows and build position ids and shifted targets.

    Rows are padded to `seq_len`, or, with `pad_to_multiple_of`, to the longest row of the
    batch rounded up to that multiple (at most `seq_len`): what the training loop does, so
    unpacked data (`prepare --packing none`) does not pay for padding up to `seq_len`. With
    `few_lengths` (a CPU), the longest row is first rounded up to `padded_length`: the CPU's
    kernels keep memory for every shape they meet (not only oneDNN's primitive cache: at
    capacity 0 it still grew), and micro-batches of unpacked documents in multiples of 8
    positions grew a rank's RSS by 10 MB a step, steadily (tiny-llama, 1024-token rows of one
    document each, micro-batch 2: 0.57 -> 1.07 GiB over 48 steps). With these lengths it grows
    only while a new one appears, 16 up to 1024 positions (0.66 -> 0.77 GiB over 48 steps;
    0.65 with every micro-batch at one length).

    Position ids restart at every document (and for the padding tail), which is what makes
    Hugging Face models keep attention inside each document for packed rows (see
    transformers.masking_utils.find_packed_sequence_indices). A document's last token gets no
    target: it must not learn to predict the first token of the next document.
    """
    b = len(rows)
    if pad_to_multiple_of:
        longest = max(len(r[0]) for r in rows)
        longest = padded_length(longest) if few_lengths else longest
        seq_len = min(seq_len, -(-longest // pad_to_multiple_of) * pad_to_multiple_of)
    input_ids = np.full((b, seq_len), pad_id, dtype=np.int64)
    position_ids = np.zeros((b, seq_len), dtype=np.int64)
    targets = np.full((b, seq_len), IGNORE_INDEX, dtype=np.int64)
    num_tokens = 0
    for i, (ids, mask, doc_lens) in enumerate(rows):
        n = len(ids)
        if n > seq_len:
            raise ValueError(f"row of {n} tokens is longer than seq_len {seq_len}")
        num_tokens += n
        input_ids[i, :n] = ids
        starts = np.concatenate([[0], np.cumsum(doc_lens)[:-1]])
        position_ids[i, :n] = np.arange(n) - np.repeat(starts, doc_lens)
        position_ids[i, n:] = np.arange(seq_len - n)
        # target[t] = ids[t+1] when token t+1 is supervised and belongs to the same document.
        same_doc = np.ones(n, dtype=bool)
        same_doc[starts] = False  # token at a document start has no predecessor in its document
        take = (mask[1:] == 1) & same_doc[1:]
        targets[i, : n - 1] = np.where(take, ids[1:], IGNORE_INDEX)
    t = torch.from_numpy(targets)
    return Batch(
        input_ids=torch.from_numpy(input_ids),
        position_ids=torch.from_numpy(position_ids),
        targets=t,
        num_tokens=num_tokens,
        num_supervised=int((t != IGNORE_INDEX).sum()),
        lengths=tuple(len(r[0]) for r in rows),
    )
