"""Building and loading Hugging Face causal LMs, unmodified.

No distributed code here. Under ZeRO-3 the caller keeps a `transformers.integrations.
HfDeepSpeedConfig` alive while calling `load_model`; transformers then creates (or loads)
every parameter inside `deepspeed.zero.Init`, so each rank only ever holds its partition.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Shapes of well-known models, built with random init (benchmarks, tests). vocab_size None:
# taken from the tokenizer (tiny shapes); otherwise the model's own vocabulary.
_PRESET_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "vocab_size",
    "tie_word_embeddings",
    "rope_theta",
)
PRESETS: dict[str, dict[str, Any]] = {
    name: dict(zip(_PRESET_FIELDS, values, strict=True))
    for name, values in {
        "tiny-llama": ("llama", 64, 176, 2, 4, 2, 2048, None, False, 1e4),
        "small-llama": ("llama", 256, 688, 4, 8, 4, 131072, None, False, 1e4),  # long rows too
        # ~100M parameters with a tokenizer-sized vocabulary: the CPU benchmark's larger model
        "llama-100m": ("llama", 768, 2560, 12, 12, 4, 4096, None, False, 1e4),
        "tiny-qwen2": ("qwen2", 64, 176, 2, 4, 2, 2048, None, True, 1e4),
        "llama-3.2-1b": ("llama", 2048, 8192, 16, 32, 8, 131072, 128256, True, 5e5),
        "llama-3.2-3b": ("llama", 3072, 8192, 28, 24, 8, 131072, 128256, True, 5e5),
        "llama-3.1-8b": ("llama", 4096, 14336, 32, 32, 8, 131072, 128256, False, 5e5),
        "llama-3.1-70b": ("llama", 8192, 28672, 80, 64, 8, 131072, 128256, False, 5e5),
        "qwen2.5-1.5b": ("qwen2", 1536, 8960, 28, 12, 2, 32768, 151936, True, 1e6),
        "qwen2.5-7b": ("qwen2", 3584, 18944, 28, 28, 4, 32768, 152064, False, 1e6),
    }.items()
}
# Mixtures of experts: transformers' own classes (docs/moe.md). Tiny shapes for tests (4
# experts, top-2, so two ranks can route to disjoint experts); real shapes for planning.
_TINY_MOE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    vocab_size=None,
    tie_word_embeddings=False,
    rope_theta=1e4,
    num_experts_per_tok=2,
)
PRESETS |= {
    "tiny-qwen3-moe": dict(
        model_type="qwen3_moe",
        **_TINY_MOE,
        intermediate_size=176,
        moe_intermediate_size=48,
        num_experts=4,
        norm_topk_prob=True,
        router_aux_loss_coef=0.01,
    ),
    "tiny-mixtral": dict(
        model_type="mixtral",
        **_TINY_MOE,
        intermediate_size=48,
        num_local_experts=4,
        router_aux_loss_coef=0.01,
    ),
    "tiny-deepseek-v3": dict(
        model_type="deepseek_v3",
        **(_TINY_MOE | dict(num_key_value_heads=4)),
        intermediate_size=176,
        moe_intermediate_size=48,
        n_routed_experts=4,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        rope_interleave=True,
    ),
    # Qwen3-30B-A3B: 128 experts, 8 active, 3.3B of 30.5B parameters per token
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe",
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        max_position_embeddings=40960,
        vocab_size=151936,
        tie_word_embeddings=False,
        rope_theta=1e6,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        router_aux_loss_coef=0.001,
    ),
    "mixtral-8x7b": dict(
        model_type="mixtral",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        vocab_size=32000,
        tie_word_embeddings=False,
        rope_theta=1e6,
        num_local_experts=8,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.02,
    ),
    # DeepSeek-V3's architecture (multi-head latent attention, shared + routed experts, dense
    # first layer) at DeepSeek-V2-Lite's size: 15.7B parameters, 64 routed experts, 6 active
    "deepseek-v3-16b": dict(
        model_type="deepseek_v3",
        hidden_size=2048,
        intermediate_size=10944,
        num_hidden_layers=27,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=32768,
        vocab_size=102400,
        tie_word_embeddings=False,
        rope_theta=1e4,
        moe_intermediate_size=1408,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_shared_experts=2,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
    ),
}


def full_numel(p: torch.nn.Parameter) -> int:
    """Elements of the whole parameter, also when ZeRO-3 keeps only a partition on this rank."""
    return int(getattr(p, "ds_numel", p.numel()))


def is_preset(name_or_path: str) -> bool:
    return name_or_path in PRESETS


def model_config(name_or_path: str, *, vocab_size: int, attn_implementation: str = "sdpa"):
    """The transformers config of a preset or a local model directory."""
    # heavy (transformers): loaded only on the path that uses it
    from transformers import AutoConfig

    if is_preset(name_or_path):
        spec = dict(PRESETS[name_or_path])
        model_type = spec.pop("model_type")
        # random init: room for every token of the tokenizer (template markers included)
        spec["vocab_size"] = max(spec["vocab_size"] or 0, vocab_size)
        cfg = AutoConfig.for_model(model_type, **spec)
    else:
        path = Path(name_or_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model.name_or_path {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) "
                "nor a directory with a config.json"
            )
        cfg = AutoConfig.from_pretrained(str(path))
    cfg._attn_implementation = attn_implementation
    return cfg


def load_model(
    name_or_path: str,
    *,
    vocab_size: int,
    dtype: torch.dtype,
    attn_implementation: str = "sdpa",
) -> torch.nn.Module:
    """A preset with random init (seeded by the caller), or weights from a local directory.
    A directory's vocabulary may be smaller than the tokenizer's (`grow_vocabulary`)."""
    # heavy (transformers): loaded only on the path that uses it
    from transformers import AutoModelForCausalLM

    cfg = model_config(name_or_path, vocab_size=vocab_size, attn_implementation=attn_implementation)
    if is_preset(name_or_path):
        model = AutoModelForCausalLM.from_config(
            cfg, dtype=dtype, attn_implementation=attn_implementation
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, config=cfg, dtype=dtype, attn_implementation=attn_implementation
        )
    return model


def model_vocab_size(model: torch.nn.Module) -> int:
    weight = model.get_input_embeddings().weight
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def grow_vocabulary(model: torch.nn.Module, vocab_size: int) -> list[torch.nn.Parameter]:
    """Resize input embeddings and LM head to `vocab_size` rows; returns the weights whose rows
    from the old size on are new, for `fill_new_rows`. transformers' resize gathers ZeRO-3
    partitions itself while a HfDeepSpeedConfig is alive."""
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    weights = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not weights[0]:
        weights.append(head.weight)
    return weights


def fill_new_rows(weights: list[torch.Tensor], *, old_rows: int) -> None:
    """Each row from `old_rows` on becomes the mean of the rows before it: a new token starts as
    an average token, so the first losses stay sane. (transformers' `mean_resizing` draws
    them from N(mean, 1e-9 * covariance) instead.) The caller holds the whole tensors."""
    with torch.no_grad():
        for w in weights:
            w[old_rows:] = w[:old_rows].float().mean(dim=0).to(w.dtype)


def set_special_token_ids(
    model: torch.nn.Module, *, bos: int | None, eos: list[int], pad: int | None
) -> None:
    """The ids generation starts, stops and pads with, in the model's config and generation
    config (saved with every export). `eos` is every id a turn may end with: plain
    `model.generate()` stops at any of them."""
    value = eos[0] if len(eos) == 1 else list(eos)
    for c in (model.config, getattr(model, "generation_config", None)):
        if c is not None:
            c.bos_token_id, c.eos_token_id, c.pad_token_id = bos, value, pad


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    # Non-reentrant checkpointing works with ZeRO-3's parameter hooks and inputs that do not
    # require grad; use_cache must be off or every layer would allocate a KV cache.
    model.config.use_cache = False
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
