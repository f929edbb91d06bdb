"""The one representation of a model's shape: what FLOPs, MFU, the memory planner and the
DeepSpeed resolver need to know of a model.

    ModelShape.from_config(model_config)   # before any weight exists (driver, planner)
    ModelShape.of(model)                   # a loaded (possibly ZeRO-3 partitioned) model

Parameter counts follow Llama / Qwen2 / Mistral-shaped decoders: per layer, the attention
projections (q, k, v, o; Qwen2's and `attention_bias` models' q/k/v biases), a gated MLP and
two norms; the embedding, the final norm and the LM head (counted once when tied).
No torch import: the planner stays light.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    matmul_params: int  # parameters that take part in a matmul (all but an untied embedding)
    n_layers: int
    hidden: int
    # (out_features, in_features) of every distinct weight matrix a matmul uses
    weights: tuple[tuple[int, int], ...] = ()
    # Of matmul_params, the frozen ones (LoRA's base): their weight gradients are never
    # computed, so a token costs 6N - 2 * frozen, not 6N.
    frozen_matmul_params: int = 0
    total_params: int = 0  # every parameter, the embedding included
    layer_params: int = 0  # one decoder layer
    vocab: int = 0
    intermediate: int = 0
    q: int = 0  # query width: heads x head_dim
    kv: int = 0  # key/value width: kv heads x head_dim
    tied: bool = False

    @property
    def embed(self) -> int:
        return self.vocab * self.hidden

    @property
    def largest_weight(self) -> int:
        """Elements of the largest weight: the embedding, or an MLP projection."""
        return max(self.embed, self.hidden * self.intermediate)

    @classmethod
    def from_config(cls, mcfg: Any) -> ModelShape:
        """From a Hugging Face model config (its text config for a multimodal one)."""
        t = mcfg.get_text_config() if hasattr(mcfg, "get_text_config") else mcfg
        h, i, n, v = t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.vocab_size
        head_dim = getattr(t, "head_dim", None) or h // t.num_attention_heads
        q, kv = t.num_attention_heads * head_dim, t.num_key_value_heads * head_dim
        qwen2 = t.model_type == "qwen2"
        bias = q + 2 * kv if getattr(t, "attention_bias", False) or qwen2 else 0
        layer = 2 * h * q + 2 * h * kv + bias + 3 * h * i + 2 * h
        tied = bool(getattr(t, "tie_word_embeddings", False))
        total = n * layer + v * h * (1 if tied else 2) + h
        weights = {(q, h), (kv, h), (h, q), (i, h), (h, i), (v, h)}
        return cls(
            matmul_params=total - (0 if tied else v * h),
            n_layers=n,
            hidden=h,
            weights=tuple(sorted(weights)),
            total_params=total,
            layer_params=layer,
            vocab=v,
            intermediate=i,
            q=q,
            kv=kv,
            tied=tied,
        )

    @classmethod
    def of(cls, model: Any) -> ModelShape:
        """From a loaded Hugging Face causal LM (ZeRO-3 partitioned or not): the config's shape,
        with the parameters counted on the model itself (adapters and frozen ones included)."""
        embedding = model.get_input_embeddings().weight
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is embedding
        total = sum(numel(p) for p in model.parameters())
        matmul = [
            p
            for p in model.parameters()
            if len(getattr(p, "ds_shape", p.shape)) == 2 and (p is not embedding or tied)
        ]
        return replace(
            cls.from_config(model.config),
            matmul_params=total - numel(embedding) + (numel(embedding) if tied else 0),
            weights=tuple(sorted({tuple(getattr(p, "ds_shape", p.shape)) for p in matmul})),
            frozen_matmul_params=sum(numel(p) for p in matmul if not p.requires_grad),
            total_params=total,
            tied=tied,
        )


def numel(p: Any) -> int:
    """Elements of the whole parameter, also when ZeRO-3 keeps only a partition on this rank."""
    return int(getattr(p, "ds_numel", p.numel()))
