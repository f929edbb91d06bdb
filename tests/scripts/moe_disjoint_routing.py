"""Run by tests/test_moe.py under torchrun (2 ranks, gloo, fp32): a one-layer Qwen3-MoE whose
router sends rank 0's tokens to experts {0, 1} and rank 1's to experts {2, 3, 4, 5}, trained 3
steps under ZeRO-3. Writes each rank's chosen experts (before any collective) to OUT_DIR.

    python -m torch.distributed.run --nproc-per-node 2 tests/scripts/moe_disjoint_routing.py \
        OUT_DIR {leaf|no-leaf} {eager|grouped_mm}

`leaf`: the MoE blocks are ZeRO-3 leaf modules (sftscale.moe.mark_zero3_leaves, what the
training loop does). `no-leaf` is the negative control. DeepSpeed's default leaf list is
emptied in both. With `eager` experts (a loop over the experts that received tokens) the ranks'
ZeRO-3 module traces differ; `grouped_mm` (transformers' default) runs every expert's weights
in one call.
"""

import json
import os
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

from sftscale.moe import RouterTap, mark_zero3_leaves, routing_of

HIDDEN, VOCAB = 64, 32


def crafted_model(experts_implementation: str):
    """Tokens 0-15 embed along `a`, 16-23 along `b`, 24-31 along `c` (orthogonal); attention
    adds nothing; the router scores experts 0, 1 by `a`, 2, 3 by `b` and 4, 5 by `c`. So a
    token's two experts are fixed by the part of the vocabulary it is in."""
    cfg = AutoConfig.for_model(
        "qwen3_moe",
        hidden_size=HIDDEN,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=6,
        num_experts_per_tok=2,
        vocab_size=VOCAB,
        router_aux_loss_coef=0.0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        cfg, dtype=torch.float32, experts_implementation=experts_implementation
    )
    a, b, c = torch.zeros(3, HIDDEN)
    a[:20], b[20:40], c[40:] = 1.0, 1.0, 1.0
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        for lo, hi, d in ((0, 16, a), (16, 24, b), (24, 32, c)):
            emb[lo:hi] = d + 0.01 * torch.randn(hi - lo, HIDDEN)
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.gate.weight.copy_(torch.stack([a, 0.5 * a, b, 0.5 * b, c, 0.5 * c]))
    model.config.use_cache = False
    return model


def main() -> None:
    out, leaf, impl = Path(sys.argv[1]), sys.argv[2] == "leaf", sys.argv[3]
    rank = int(os.environ["RANK"])
    model = crafted_model(impl)
    tap = RouterTap(routing_of(model.config, 0.0)).attach(model)
    half = VOCAB // 2
    ids = torch.randint(
        half * rank, half * (rank + 1), (1, 24), generator=torch.Generator().manual_seed(rank)
    )
    with torch.no_grad(), tap.recording():
        model(input_ids=ids)
    chosen = sorted({int(e) for x in tap.layers for e in x.chosen.flatten()})
    (out / f"rank{rank}.json").write_text(json.dumps({"experts": chosen}))
    if leaf:
        mark_zero3_leaves(model)
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # DeepSpeed's own default leaf list (zero_optimization.leaf_module) names the Qwen3-MoE
        # block: emptied, so that what marks it here is sftscale's marking or nothing
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "leaf_module": {"classes": [], "names": [], "name_suffixes": []},
        },
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    for _ in range(3):
        logits = engine(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        engine.backward(loss)
        engine.step()
    dist.barrier()
    (out / f"rank{rank}.done").write_text(f"{loss.item()}\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
