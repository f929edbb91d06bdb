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
