"""Mixtures of experts in the training loop: the routers' load-balancing loss, tokens per
expert, and what ZeRO-3 must know of the MoE blocks.

The balance loss is the model's own (Switch Transformer's, transformers'
`load_balancing_loss_func`: num_experts x sum_e f_e P_e, f_e the fraction of routed slots that
went to expert e and P_e its mean router probability, over every layer's tokens), computed
**per document** and weighted by the document's tokens:

    balance loss of a step = sum over documents d of  n_d * L_d  /  (non-pad tokens of the step)

A document's L_d is what transformers computes for that document alone. Because the sum runs
over documents and is divided by the step's global token count, the loss does not depend on
how the step's rows are split into micro-batches and ranks, nor on how documents are packed
into rows (a batch-level f and P would make every document's loss depend on its neighbours).
The training loss adds `coef` times it; metrics.jsonl logs it beside the SFT loss, with the
tokens each expert received.

DeepSeek-V3 scores experts with a sigmoid, not a softmax: P_e is then the normalized sigmoid
score, as in its sequence-wise auxiliary loss; its config has no coefficient, so the default
is 0 (it balances with its routers' score-correction bias instead).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from sftscale.data import Batch


@dataclass(frozen=True)
class Routing:
    experts: int
    top_k: int
    coef: float  # the balance loss's weight in the training loss
    sigmoid: bool  # DeepSeek-V3: experts scored by a sigmoid


def routing_of(model_config, coef: float | None) -> Routing | None:
    """The routing of a transformers MoE config (None for a dense model). `coef` None: the
    config's router_aux_loss_coef (0 where the model has none)."""
    from sftscale.shape import ModelShape  # light: no torch in shape

    shape = ModelShape.from_config(model_config)
    if not shape.experts:
        return None
    text = model_config.get_text_config()
    if coef is None:
        coef = float(getattr(text, "router_aux_loss_coef", 0.0) or 0.0)
    return Routing(
        experts=shape.experts,
        top_k=shape.top_k,
        coef=coef,
        sigmoid=text.model_type == "deepseek_v3",
    )


def router_class(model: torch.nn.Module) -> type:
    """The class transformers records router logits from (its `OutputRecorder`)."""
    recorders = getattr(model, "_can_record_outputs", None) or {}
    recorder = recorders.get("router_logits")
    target = getattr(recorder, "target_class", None)
    if target is None:
        raise ValueError(
            f"{type(model).__name__} has experts but transformers records no router logits for "
            "it; sftscale supports the MoE classes transformers records them for (docs/moe.md)"
        )
    return target


def moe_block_classes(model: torch.nn.Module) -> list[type]:
    """Classes of the modules that hold a router: the MoE blocks."""
    router = router_class(model)
    classes = {type(m) for m in model.modules() if any(isinstance(c, router) for c in m.children())}
    return sorted(classes, key=lambda c: c.__name__)


@dataclass
class _Layer:
    logits: torch.Tensor  # (tokens, experts)
    chosen: torch.Tensor  # (tokens, top_k) expert indices


@dataclass
class RouterTap:
    """Forward hooks on a model's routers: the logits and chosen experts of each layer, for
    one forward at a time (`recording`). Recomputation in backward (activation checkpointing)
    is not recorded: it repeats what the forward recorded."""

    routing: Routing
    layers: list[_Layer] = field(default_factory=list)
    _on: bool = False
    _logits: torch.Tensor | None = None

    def attach(self, model: torch.nn.Module) -> RouterTap:
        """Hooks on the routers of `model`: transformers' own, or DeepSpeed AutoEP's (which
        replaces each MoE block at initialize)."""
        autoep = [m for m in model.modules() if type(m).__name__ == "AutoEPMoELayer"]
        for m in autoep:  # its router returns (scores, chosen experts, counts); logits: gate
            m.router.gate.register_forward_hook(self._logits_hook)
            m.router.register_forward_hook(self._chosen_hook)
        if not autoep:
            router = router_class(model)
            for m in model.modules():
                if isinstance(m, router):
                    m.register_forward_hook(self._hook)
        return self

    def _hook(self, module, args, output) -> None:
        if self._on:  # (router logits, routing weights, chosen experts)
            self.layers.append(_Layer(logits=output[0], chosen=output[2]))

    def _logits_hook(self, module, args, output) -> None:
        self._logits = output  # the router's own call to its gate comes right before its end

    def _chosen_hook(self, module, args, output) -> None:
        if self._on:
            self.layers.append(_Layer(logits=self._logits, chosen=output[1]))
        self._logits = None

    @contextlib.contextmanager
    def recording(self) -> Iterator[RouterTap]:
        self.layers, self._on = [], True
        try:
            yield self
        finally:
            self._on = False

    def balance(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum over the batch's documents of tokens x balance loss, tokens per expert per
        layer) of the forward just recorded; padding counts in neither."""
        loss, counts = balance_loss_sum(
            [x.logits for x in self.layers],
            [x.chosen for x in self.layers],
            batch.position_ids,
            batch.lengths,
            self.routing,
        )
        self.layers = []
        return loss, counts


def balance_loss_sum(
    logits: list[torch.Tensor],
    chosen: list[torch.Tensor],
    position_ids: torch.Tensor,
    lengths: tuple[int, ...],
    routing: Routing,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_d n_d * L_d over the documents of rows `position_ids` (B, T) holding `lengths`
    non-pad tokens each (documents start where position ids restart at 0), and the tokens
    each expert received in each layer, (layers, experts)."""
    b, t = position_ids.shape
    device = position_ids.device
    valid = torch.arange(t, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    valid = valid.flatten()
    doc = torch.cumsum((position_ids == 0).flatten().long(), 0) - 1  # document of each token
    docs = int(doc[-1]) + 1
    e = routing.experts
    prob_sum = torch.zeros(docs, e, dtype=torch.float32, device=device)
    slot_sum = torch.zeros(docs, e, dtype=torch.float32, device=device)
    counts = []
    for layer_logits, layer_chosen in zip(logits, chosen, strict=True):
        scores = layer_logits.float()
        if routing.sigmoid:
            scores = scores.sigmoid()
            probs = scores / scores.sum(dim=-1, keepdim=True)
        else:
            probs = torch.softmax(scores, dim=-1)
        slots = torch.zeros_like(probs).scatter_add_(
            1, layer_chosen, torch.ones_like(layer_chosen, dtype=probs.dtype)
        )
        keep = valid[:, None].to(probs.dtype)
        prob_sum = prob_sum.index_add(0, doc, probs * keep)
        slot_sum = slot_sum.index_add(0, doc, slots.detach() * keep)
        counts.append((slots.detach() * keep).sum(0).double())  # exact past 2^24
    tokens = torch.zeros(docs, dtype=torch.float32, device=device).index_add(0, doc, valid.float())
    rows = (tokens * len(logits)).clamp(min=1.0)[:, None]  # a document's tokens x layers
    per_doc = e * ((slot_sum / rows) * (prob_sum / rows)).sum(dim=1)
    return (tokens * per_doc).sum(), torch.stack(counts)


def mark_zero3_leaves(model: torch.nn.Module) -> list[str]:
    """Make each MoE block one ZeRO-3 unit: its parameters are gathered together when the
    block starts, whatever experts this rank's tokens reach (docs/moe.md). Returns the
    classes marked."""
    from deepspeed.utils import set_z3_leaf_modules  # heavy: workers only

    classes = moe_block_classes(model)
    set_z3_leaf_modules(model, classes)
    return [c.__name__ for c in classes]


@contextlib.contextmanager
def autoep_compatible_transformers() -> Iterator[None]:
    """DeepSpeed 0.19.8's AutoEP retargets transformers' output recorders through
    `_CAN_RECORD_REGISTRY.get(key, default)`, a dict's signature; transformers 5.24 made the
    registry a class whose `get` takes a model only (TypeError at deepspeed.initialize). For the
    duration of initialize, string keys are looked up as in a dict."""
    from transformers.utils import output_capturing  # heavy: workers only

    registry = getattr(output_capturing, "_CanRecordRegistry", None)
    if registry is None:
        yield
        return
    original = registry.get

    def get(self, key, *default):
        return dict.get(self, key, *default) if isinstance(key, str) else original(self, key)

    registry.get = get
    try:
        yield
    finally:
        registry.get = original
