"""What one optimizer step computes, as pure functions of the step's position: which rows each
rank takes (`plan_step`) and the summed token loss of a micro-batch (`forward_loss_sum`). The
training loop (sftscale.train) and the held-out evaluation (sftscale.evaluate) share them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sftscale.config import Config
from sftscale.data import Batch, PackedDataset, assign_ranks, collate, stream_rows
from sftscale.flops import doc_flops
from sftscale.lengths import row_multiple
from sftscale.loss import tiled_head_loss_sum, token_loss_sum
from sftscale.shape import ModelShape


def forward_loss_sum(engine, batch: Batch, cfg: Config, *, rows: int, seq_len: int) -> torch.Tensor:
    """The summed token loss of this rank's part of `batch` (forward only).

    With train.tiled_logits the model returns its last hidden states and the LM head runs tile
    by tile inside the loss. The tile count follows from the largest micro-batch any rank can
    hold (`rows` rows of `seq_len`, this rank's slice of them), so it is the same on every rank.
    """
    # use_cache=False is load-bearing: with a KV cache, transformers does not detect the
    # packed rows from position_ids and attention would cross document boundaries.
    inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "use_cache": False}
    t = cfg.train
    if not t.tiled_logits:
        logits = engine(**inputs).logits
        return token_loss_sum(logits, batch.targets, chunk_tokens=t.loss_chunk_tokens)
    # logits_to_keep: an empty index, so the model's own head computes nothing
    out = engine(
        **inputs, output_hidden_states=True, logits_to_keep=torch.zeros(0, dtype=torch.long)
    )
    tiles = math.ceil(rows * seq_len / cfg.scale.sequence_parallel_size / t.loss_chunk_tokens)
    return tiled_head_loss_sum(
        out.hidden_states[-1], engine.module.get_output_embeddings(), batch.targets, tiles=tiles
    )


@dataclass
class StepPlan:
    micro: list[Batch]  # this rank's micro-batches
    model_flops: float  # of the whole global batch
    imbalance: float  # max rank cost / mean rank cost - 1
    epochs: np.ndarray  # epoch of each of the step's global rows
    step_rows: np.ndarray  # the step's global rows, in stream order

    @property
    def rows(self) -> int:
        return len(self.step_rows)


def plan_step(
    position: int,
    dataset: PackedDataset,
    cfg: Config,
    *,
    rank: int,
    world: int,
    shape: ModelShape,
    pad_id: int,
    few_lengths: bool = False,
) -> StepPlan:
    """This rank's micro-batches for the step that starts at stream `position`.

    A pure function of its arguments: every rank computes the whole step's assignment. Rows go
    to data-parallel ranks; under sequence parallelism each rank of a group then takes its
    slice of the sequence of its group's rows. `few_lengths`: micro-batches padded to few
    lengths (a CPU's, see data.collate).
    """
    t, sp = cfg.train, cfg.scale.sequence_parallel_size
    epochs, step_rows = stream_rows(
        position,
        cfg.global_batch_rows(world),
        num_rows=len(dataset),
        seed=cfg.data.seed,
        shuffle=cfg.data.shuffle,
    )
    costs = np.array([doc_flops(dataset.doc_lens(int(i)), shape) for i in step_rows])
    per_rank, imbalance = assign_ranks(
        step_rows,
        costs,
        world_size=cfg.data_parallel_size(world),
        by_cost=t.balance_ranks,
        micro_batch_size=t.micro_batch_size,
        grad_accum=t.grad_accum,
    )
    micro = [
        collate(
            [dataset.row(int(i)) for i in rows],
            seq_len=dataset.seq_len,
            pad_id=pad_id,
            pad_to_multiple_of=row_multiple(cfg),
            few_lengths=few_lengths,
        ).shard(rank % sp, sp)
        for rows in per_rank[rank // sp]
    ]
    return StepPlan(
        micro=micro,
        model_flops=float(costs.sum()),
        imbalance=imbalance,
        epochs=epochs,
        step_rows=step_rows,
    )
