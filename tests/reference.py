"""A plain single-process PyTorch fp32 training loop: the reference our DeepSpeed path must match.

Deliberately independent of sftscale's loop: its own optimizer (torch AdamW), clipping
(torch.nn.utils.clip_grad_norm_) and loss normalization, one forward over the whole global
batch per step. It shares only the data order (stream_rows), the collation and the
schedule's definition, which are what the runs are supposed to agree on.
"""

from __future__ import annotations

import numpy as np
import torch

from sftscale.config import Config
from sftscale.data import IGNORE_INDEX, PackedDataset, collate, stream_rows
from sftscale.optim import lr_at


def reference_run(
    model_dir: str, cfg: Config, *, world_size: int, balance_coef: float = 0.0
) -> tuple[list[float], dict]:
    """Per-step losses and final weights of the reference loop for the same global batches.

    balance_coef: a mixture of experts' load-balancing loss is added with this weight:
    transformers' own `load_balancing_loss_func` of each document alone, weighted by the
    document's tokens, over the global batch's tokens (the definition in sftscale.moe)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = PackedDataset(cfg.data.path)
    tok = AutoTokenizer.from_pretrained(str(data.tokenizer_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    o = cfg.optim
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": o.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=o.lr,
        betas=tuple(o.betas),
        eps=o.eps,
    )
    losses = []
    for step in range(cfg.train.max_steps):
        g = cfg.global_batch_rows(world_size)
        _, rows = stream_rows(
            step * g, g, num_rows=len(data), seed=cfg.data.seed, shuffle=cfg.data.shuffle
        )
        batch = collate(
            [data.row(int(i)) for i in np.sort(rows)], seq_len=data.seq_len, pad_id=tok.pad_token_id
        )
        out = model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            use_cache=False,
            **({"output_router_logits": True} if balance_coef else {}),
        )
        logits = out.logits
        loss = (
            torch.nn.functional.cross_entropy(
                logits.flatten(0, 1),
                batch.targets.flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            / (batch.targets != IGNORE_INDEX).sum()
        )
        losses.append(loss.item())  # the SFT loss, which the runs log as `loss`
        if balance_coef:
            loss = loss + balance_coef * _balance(out.router_logits, batch, model.config)
        loss.backward()
        if o.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.max_grad_norm)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, o, cfg.train.max_steps)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, {k: v.detach().clone() for k, v in model.named_parameters()}


def _balance(router_logits, batch, config) -> torch.Tensor:
    """sum over documents of tokens x transformers' balance loss of the document alone, over
    the batch's non-pad tokens."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    width = batch.input_ids.shape[1]
    total, tokens = 0.0, 0
    for row, length in enumerate(batch.lengths):
        starts = (batch.position_ids[row, :length] == 0).nonzero().flatten().tolist() + [length]
        for lo, hi in zip(starts, starts[1:], strict=False):
            doc = tuple(x[row * width + lo : row * width + hi] for x in router_logits)
            total = total + (hi - lo) * load_balancing_loss_func(
                doc, config.num_experts, config.num_experts_per_tok
            )
            tokens += hi - lo
    return total / tokens
