"""The one representation of a model's shape: what FLOPs, MFU, the memory planner and the
DeepSpeed resolver need to know of a model.

    ModelShape.from_config(model_config)   # before any weight exists (driver, planner)
    ModelShape.of(model)                   # a loaded (possibly ZeRO-3 partitioned) model

Parameter counts follow Llama / Qwen2 / Mistral-shaped decoders: per layer, the attention
projections (q, k, v, o; Qwen2's and `attention_bias` models' q/k/v biases; Qwen3's q/k norms;
DeepSeek-V3's latent attention), a gated MLP and two norms; the embedding, the final norm and
the LM head (counted once when tied). Mixtures of experts (Qwen2/Qwen3-MoE, Mixtral,
DeepSeek-V3): a MoE layer's MLP is a router, its routed experts and any shared expert; a
token runs top_k of the routed experts, so FLOPs count `active_matmul_params` while memory
counts `total_params`. tests/test_moe.py checks every count against the model transformers
builds. No torch import: the planner stays light.
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
    experts: int = 0  # routed experts of a MoE layer (0: a dense model)
    top_k: int = 0  # routed experts each token runs
    expert_params: int = 0  # every routed expert of every MoE layer
    largest_param: int = 0  # elements of the largest single parameter (ZeRO-3 gathers it whole)
    # (parameters, of them routed experts) of each decoder layer, in order
    layer_sizes: tuple[tuple[int, int], ...] = ()

    @property
    def active_matmul_params(self) -> int:
        """Matmul parameters one token runs through: all but the routed experts it skips."""
        if not self.experts:
            return self.matmul_params
        return self.matmul_params - self.expert_params * (self.experts - self.top_k) // self.experts

    @property
    def moe_layers(self) -> int:
        return sum(1 for _, routed in self.layer_sizes if routed)

    def gathered(self, expert_parallel: int = 1) -> tuple[int, int]:
        """Parameters ZeRO-3 gathers on one rank: (of the whole model, of its largest decoder
        layer). A MoE layer's experts are fused 3-D parameters, each gathered whole; with expert
        parallelism a rank holds, and so gathers, only 1/expert_parallel of each MoE layer's
        routed experts (the router and any shared expert: all of them)."""
        e = expert_parallel
        if not self.layer_sizes:  # a shape built by hand
            return self.total_params, self.layer_params
        layer = max(p - routed + routed // e for p, routed in self.layer_sizes)
        return self.total_params - self.expert_params + self.expert_params // e, layer

    @property
    def embed(self) -> int:
        return self.vocab * self.hidden

    @property
    def largest_weight(self) -> int:
        """Elements of the largest weight: the embedding, or an MLP projection."""
        return self.largest_weight_of_rank()

    def largest_weight_of_rank(self, expert_parallel: int = 1) -> int:
        """The largest weight one rank holds whole: with expert parallelism a MoE layer's fused
        experts are split into 1/expert_parallel (the embedding and dense weights are not)."""
        return max(
            self.embed, self.hidden * self.intermediate, self.largest_param // expert_parallel
        )

    @classmethod
    def from_config(cls, mcfg: Any) -> ModelShape:
        """From a Hugging Face model config (its text config for a multimodal one)."""
        t = mcfg.get_text_config() if hasattr(mcfg, "get_text_config") else mcfg
        h, i, n, v = t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.vocab_size
        attention, q, kv, weights = _attention(t)
        moe = _moe(t)
        dense_mlp = 3 * h * i
        routed = [moe.routed if moe and moe.sparse(k) else 0 for k in range(n)]
        layers = [
            attention + 2 * h + (moe.mlp if moe and moe.sparse(k) else dense_mlp) for k in range(n)
        ]
        weights |= {(i, h), (h, i), (v, h)} | (moe.weights if moe else set())
        tied = bool(getattr(t, "tie_word_embeddings", False))
        total = sum(layers) + v * h * (1 if tied else 2) + h
        return cls(
            matmul_params=total - (0 if tied else v * h),
            n_layers=n,
            hidden=h,
            weights=tuple(sorted(weights)),
            total_params=total,
            layer_params=max(layers),
            vocab=v,
            # what a token's MLP computes: its top_k experts and any shared one, in a MoE layer
            intermediate=moe.per_token_intermediate if moe else i,
            q=q,
            kv=kv,
            tied=tied,
            experts=moe.experts if moe else 0,
            top_k=moe.top_k if moe else 0,
            expert_params=sum(routed),
            largest_param=max(v * h, h * i, moe.largest if moe else 0),
            layer_sizes=tuple(zip(layers, routed, strict=True)),
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
            largest_param=max(numel(p) for p in model.parameters()),
        )


def numel(p: Any) -> int:
    """Elements of the whole parameter, also when ZeRO-3 keeps only a partition on this rank."""
    return int(getattr(p, "ds_numel", p.numel()))


def _attention(t: Any) -> tuple[int, int, int, set[tuple[int, int]]]:
    """Parameters of one attention block, its query and key/value widths, its weight shapes."""
    h, heads = t.hidden_size, t.num_attention_heads
    if getattr(t, "kv_lora_rank", None):  # DeepSeek-V2/V3 multi-head latent attention
        qk = t.qk_nope_head_dim + t.qk_rope_head_dim
        q, kv, lora = heads * qk, heads * (t.qk_nope_head_dim + t.v_head_dim), t.kv_lora_rank
        weights = {(lora + t.qk_rope_head_dim, h), (kv, lora), (h, heads * t.v_head_dim)}
        if t.q_lora_rank:
            weights |= {(t.q_lora_rank, h), (q, t.q_lora_rank)}
            query = t.q_lora_rank * (h + 1 + q)  # down, its norm, up
        else:
            weights.add((q, h))
            query = h * q
        # attention_bias: q_a_proj, kv_a_proj_with_mqa and o_proj have biases
        biased = getattr(t, "attention_bias", False)
        bias = ((t.q_lora_rank or 0) + lora + t.qk_rope_head_dim + h) if biased else 0
        params = query + h * (lora + t.qk_rope_head_dim) + lora + lora * kv
        return params + heads * t.v_head_dim * h + bias, q, kv, weights
    head_dim = getattr(t, "head_dim", None) or h // heads
    q, kv = heads * head_dim, t.num_key_value_heads * head_dim
    biased = getattr(t, "attention_bias", False) or getattr(t, "qkv_bias", False)
    bias = q + 2 * kv if biased or t.model_type == "qwen2" else 0
    bias += 2 * head_dim if t.model_type in ("qwen3", "qwen3_moe") else 0  # q_norm, k_norm
    return 2 * h * q + 2 * h * kv + bias, q, kv, {(q, h), (kv, h), (h, q)}


@dataclass(frozen=True)
class _Moe:
    """The MLP of a MoE layer, as transformers builds it for the model type."""

    experts: int
    top_k: int
    expert_intermediate: int
    shared_intermediate: int  # 0: no shared expert
    shared_gate: bool  # Qwen2-MoE gates its shared expert with a (1, hidden) weight
    hidden: int
    dense_layers: frozenset[int]  # layers whose MLP stays dense

    def sparse(self, layer: int) -> bool:
        return layer not in self.dense_layers

    @property
    def routed(self) -> int:
        return self.experts * 3 * self.hidden * self.expert_intermediate

    @property
    def mlp(self) -> int:
        shared = 3 * self.hidden * self.shared_intermediate + self.shared_gate * self.hidden
        return self.experts * self.hidden + self.routed + shared  # router, experts, shared

    @property
    def per_token_intermediate(self) -> int:
        return self.top_k * self.expert_intermediate + self.shared_intermediate

    @property
    def largest(self) -> int:  # the fused gate/up projection of all experts: one parameter
        return self.experts * 2 * self.expert_intermediate * self.hidden

    @property
    def weights(self) -> set[tuple[int, int]]:
        e, m, h, s = self.experts, self.expert_intermediate, self.hidden, self.shared_intermediate
        shapes = {(e, h), (2 * m, h), (h, m)}
        return shapes | ({(s, h), (h, s)} if s else set())


def _moe(t: Any) -> _Moe | None:
    """The MoE layout of a Qwen2/Qwen3-MoE, Mixtral or DeepSeek-V3 config; None if dense."""
    kind, n, h = t.model_type, t.num_hidden_layers, t.hidden_size
    if kind in ("qwen2_moe", "qwen3_moe") and t.num_experts:
        step = t.decoder_sparse_step
        dense = {k for k in range(n) if k in (t.mlp_only_layers or []) or (k + 1) % step}
        shared = getattr(t, "shared_expert_intermediate_size", 0) if kind == "qwen2_moe" else 0
        return _Moe(
            t.num_experts,
            t.num_experts_per_tok,
            t.moe_intermediate_size,
            shared,
            kind == "qwen2_moe",
            h,
            frozenset(dense),
        )
    if kind == "mixtral":
        return _Moe(
            t.num_local_experts,
            t.num_experts_per_tok,
            t.intermediate_size,
            0,
            False,
            h,
            frozenset(),
        )
    if kind == "deepseek_v3":
        return _Moe(
            t.n_routed_experts,
            t.num_experts_per_tok,
            t.moe_intermediate_size,
            t.moe_intermediate_size * t.n_shared_experts,
            False,
            h,
            frozenset(range(t.first_k_dense_replace)),
        )
    return None
