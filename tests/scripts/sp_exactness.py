"""Run by tests/test_sequence_parallel.py under torchrun (2 ranks, gloo, fp32) and by
tests/test_gpu.py (2 GPUs, nccl, bf16, flash_attention_2): Ulysses SP=2 against the same model
on whole rows (SP=1), on packed rows. Writes what it measured as JSON.

    python -m torch.distributed.run --nproc-per-node 2 tests/scripts/sp_exactness.py OUT.json [ATTN]
"""

import copy
import json
import os
import sys

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from sftscale.data import IGNORE_INDEX, collate
from sftscale.loss import token_loss_sum
from sftscale.model import enable_gradient_checkpointing, model_config
from sftscale.sequence_parallel import apply_ulysses, sequence_parallel_group

VOCAB = 96


def packed_rows(rng, doc_lens_per_row):
    """Rows of several documents; the second half of each document is supervised."""
    rows = []
    for doc_lens in doc_lens_per_row:
        ids = rng.integers(3, VOCAB, size=sum(doc_lens))
        mask = np.concatenate([np.r_[np.zeros(n // 2), np.ones(n - n // 2)] for n in doc_lens])
        rows.append((ids, mask.astype(np.int8), np.array(doc_lens)))
    return rows


def token_losses(model, batch):
    logits = model(
        input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
    ).logits
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(batch.targets.shape)


def gathered(t):
    """The whole rows' values from each rank's slice (sequence dimension 1)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=1)


def loss_and_grads(model, batch, *, sp):
    """Summed token loss and its gradients; under SP summed over the group's slices."""
    model.zero_grad()
    part = batch.shard(dist.get_rank(), 2) if sp else batch
    logits = model(input_ids=part.input_ids, position_ids=part.position_ids, use_cache=False).logits
    loss = token_loss_sum(logits, part.targets)
    loss.backward()
    loss = loss.detach()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    if sp:
        dist.all_reduce(loss)
        for g in grads.values():
            dist.all_reduce(g)
    return loss.item(), grads


def main(out: str, attn: str) -> None:
    cuda = attn != "sdpa"  # flash_attention_2: GPUs, nccl, bf16
    # UlyssesSPAttentionHF talks through deepspeed.comm
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if cuda:
        torch.cuda.set_device(rank)
        torch.set_default_device("cuda")
    torch.manual_seed(0)
    mcfg = model_config("tiny-llama", vocab_size=VOCAB, attn_implementation=attn)
    base = AutoModelForCausalLM.from_config(mcfg, dtype=torch.bfloat16 if cuda else torch.float32)
    base.train()
    reference = copy.deepcopy(base)  # whole rows, transformers' own packed-row masking
    sp_model = copy.deepcopy(base)
    enable_gradient_checkpointing(sp_model)  # the all-to-all also runs in the recomputation
    apply_ulysses(sp_model, group=sequence_parallel_group(2), attn_implementation=attn)

    rng = np.random.default_rng(0)
    # Row 0: 3 documents filling 128 positions, the slice boundary (64) inside document 2.
    # Row 1: 3 documents and a padding tail.
    rows = packed_rows(rng, [[40, 50, 38], [20, 70, 30]])
    batch = collate(rows, seq_len=128, pad_id=0, pad_to_multiple_of=8).to(base.device)
    result = {
        "supervised": batch.num_supervised,
        "shard_supervised": [batch.shard(i, 2).num_supervised for i in range(2)],
        "shard_tokens": [batch.shard(i, 2).num_tokens for i in range(2)],
        "num_tokens": batch.num_tokens,
    }

    ref_loss, ref_grads = loss_and_grads(reference, batch, sp=False)
    sp_loss, sp_grads = loss_and_grads(sp_model, batch, sp=True)
    result["loss"] = {"sp1": ref_loss, "sp2": sp_loss}
    result["grad_max_abs_diff"] = max(
        (sp_grads[n] - g).abs().max().item() for n, g in ref_grads.items()
    )
    result["grad_max_abs"] = max(g.abs().max().item() for g in ref_grads.values())

    # Cross-document probe: new tokens in document 1 of row 0 must not move documents 2 and 3.
    probe_rows = [(r[0].copy(), r[1], r[2]) for r in rows]
    probe_rows[0][0][:40] = rng.integers(3, VOCAB, size=40)
    probe = collate(probe_rows, seq_len=128, pad_id=0, pad_to_multiple_of=8).to(base.device)

    def later_docs_moved(model, *, sp):
        with torch.no_grad():
            a, b = (token_losses(model, x.shard(rank, 2) if sp else x) for x in (batch, probe))
            if sp:
                a, b = gathered(a), gathered(b)
        doc1_moved = (a[0, :40] - b[0, :40]).abs().max().item()
        return (a[0, 40:] - b[0, 40:]).abs().max().item(), doc1_moved

    result["probe"] = {
        "sp1": later_docs_moved(reference, sp=False),
        "sp2": later_docs_moved(sp_model, sp=True),
    }

    # A slice with no supervised token: rank 1's half of every row unsupervised.
    quiet = collate(rows, seq_len=128, pad_id=0, pad_to_multiple_of=8).to(base.device)
    quiet.targets[:, 64:] = IGNORE_INDEX
    quiet.num_supervised = int((quiet.targets != IGNORE_INDEX).sum())
    q_ref, q_ref_grads = loss_and_grads(reference, quiet, sp=False)
    q_sp, q_sp_grads = loss_and_grads(sp_model, quiet, sp=True)
    result["quiet"] = {
        "rank1_supervised": quiet.shard(1, 2).num_supervised,
        "sp1": q_ref,
        "sp2": q_sp,
        "finite": bool(all(torch.isfinite(g).all() for g in q_sp_grads.values())),
        "grad_max_abs_diff": max(
            (q_sp_grads[n] - g).abs().max().item() for n, g in q_ref_grads.items()
        ),
    }

    # DeepSpeed's own registration (mask dropped, sdpa causal over the whole row) leaks across
    # documents: the probe above must be able to see that. Last: it replaces "sdpa" globally.
    if attn == "sdpa":
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        plain = copy.deepcopy(base)
        UlyssesSPAttentionHF.register_with_transformers(plain, "sdpa", 2, 2)
        result["probe"]["deepspeed_plain_sp2"] = later_docs_moved(plain, sp=True)

    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "sdpa")
    # Everything is written and the process group is gone: leave without the interpreter's
    # teardown, where gloo sometimes aborts ("terminate called without an active exception")
    # and torchrun then reports a finished rank as failed (as sftscale.cli does for its ranks).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
