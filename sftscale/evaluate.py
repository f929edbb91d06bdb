"""Held-out loss and perplexity (eval.path), every eval.every_n_steps and at the end."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from sftscale.config import Config
from sftscale.data import PackedDataset, collate
from sftscale.forward import forward_loss_sum
from sftscale.lengths import row_multiple


def evaluate(
    engine, eval_set: PackedDataset, cfg: Config, *, rank: int, world: int, pad_id: int
) -> dict:
    """Held-out loss and perplexity over the eval set (or its first eval.max_rows rows).

    Collective. Under ZeRO-3 every forward gathers parameters from all ranks, so every rank
    runs the same number of forwards: a rank out of rows runs one on row 0 and counts nothing.
    Rows go to data-parallel ranks; a sequence-parallel group shares them, each rank its slice.
    """
    sp, dp = cfg.scale.sequence_parallel_size, cfg.data_parallel_size(world)
    n = len(eval_set) if not cfg.eval.max_rows else min(cfg.eval.max_rows, len(eval_set))
    mine = list(range(rank // sp, n, dp))
    m = cfg.eval.micro_batch_size
    n_batches = math.ceil(math.ceil(n / dp) / m)
    # On the engine's device: NCCL (the GPU backend) reduces only CUDA tensors.
    sums = torch.zeros(2, dtype=torch.float64, device=engine.device)  # loss sum, supervised tokens
    engine.eval()
    with torch.no_grad():
        for b in range(n_batches):
            rows = mine[b * m : (b + 1) * m]
            batch = collate(
                [eval_set.row(i) for i in (rows or [0])],
                seq_len=eval_set.seq_len,
                pad_id=pad_id,
                pad_to_multiple_of=row_multiple(cfg),
                few_lengths=engine.device.type == "cpu",
            )
            batch = batch.shard(rank % sp, sp).to(engine.device)
            loss = forward_loss_sum(engine, batch, cfg, rows=m, seq_len=eval_set.seq_len)
            if rows:
                sums[0] += loss.double()
                sums[1] += batch.num_supervised
    engine.train()
    dist.all_reduce(sums)  # collective
    loss = (sums[0] / sums[1].clamp(min=1)).item()
    return {
        "eval_loss": loss,
        "eval_ppl": math.exp(min(loss, 50.0)),
        "eval_tokens": int(sums[1].item()),
    }
