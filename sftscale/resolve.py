"""A run, resolved once: everything its workers will compute with, as one frozen value.

    run = resolve_run(cfg, world=8, seq_len=4096, vocab_size=len(tokenizer),
                      precision=precision_for(cfg, device), device=device)
    run.model_config, run.shape, run.precision, run.ds_config, run.plan, run.fingerprint

The chain config -> model config with its final vocabulary -> shape -> DeepSpeed config ->
layout -> memory plan runs here and nowhere else. Validation and `sftscale train` (in the driver),
`sftscale plan`, the workers' setup, `sftscale bench` and the benchmark scripts all take their
pieces from a ResolvedRun. The workers resolve again from the same inputs, with the precision
their devices agreed on, and compare fingerprints with the driver's (`check_same`), so that a
driver and its workers cannot train two different runs.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sftscale.config import Config, ConfigError
from sftscale.devices import Device
from sftscale.ds_config import resolve_ds_config
from sftscale.lengths import batch_lengths, document_lengths
from sftscale.model import model_config as load_model_config
from sftscale.plan import Plan, plan_memory
from sftscale.precision import Precision, choose, cpu_native_bf16
from sftscale.shape import ModelShape


@dataclass(frozen=True)
class ResolvedRun:
    config: Config  # as `world` workers compute it (elastic: cfg.for_world)
    model_config: Any  # transformers config, vocabulary grown to the tokenizer's
    shape: ModelShape
    precision: Precision
    ds_config: dict[str, Any]  # the template filled (treat as read-only; copy to change)
    world: int
    seq_len: int
    vocab_size: int  # the tokenizer's, added tokens included
    plan: Plan | None  # memory per rank on `device`; None where the device is unknown
    packed: bool = True  # the data's rows are packed (the plan counts its micro-batch lengths)
    longest_document: int | None = None  # the data's, in tokens (and its document lengths)

    @property
    def sequence_parallel(self) -> int:
        return self.config.scale.sequence_parallel_size

    @property
    def data_parallel(self) -> int:
        return self.config.data_parallel_size(self.world)

    def parts(self) -> dict[str, str]:
        """A short hash of each resolved part: what the workers compare with the driver's."""
        model = self.model_config.to_dict()
        model.pop("transformers_version", None)
        layout = {
            "world": self.world,
            "sequence_parallel": self.sequence_parallel,
            "data_parallel": self.data_parallel,
            "seq_len": self.seq_len,
            "vocab_size": self.vocab_size,
        }
        values = {
            "config": self.config.to_dict(),
            "model": model,
            "precision": self.precision.name,
            "deepspeed": self.ds_config,
            "layout": layout,
        }
        return {k: _digest(v) for k, v in values.items()}

    @property
    def fingerprint(self) -> str:
        return _digest(self.parts())


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def with_vocabulary(mcfg: Any, vocab_size: int) -> Any:
    """The model config as the run trains it: sftscale grows the embeddings to the tokenizer's
    added tokens (a model directory's config still has the old vocabulary)."""
    if vocab_size <= mcfg.vocab_size:
        return mcfg
    grown = copy.deepcopy(mcfg)
    grown.vocab_size = vocab_size
    return grown


def precision_for(cfg: Config, device: Device | None) -> Precision:
    """deepspeed.precision on `device` as the driver can know it: a GPU's own flag (the
    catalogue's GPUs compute bf16 natively), else this host's CPU (the workers of a local or
    single-host run share it). The workers decide with the same rule (sftscale.precision.choose)
    on their own devices and agree across ranks; `check_same` catches a difference."""
    if device is not None and device.kind == "gpu":
        native, why = (
            device.native_bf16,
            f"{device.name} "
            + ("computes bf16 natively" if device.native_bf16 else "has no native bf16"),
        )
    else:
        native, why = cpu_native_bf16()
    return choose(cfg.deepspeed.precision, native_bf16=native, why=why)


def base_config(cfg: Config, vocab_size: int) -> Any:
    """The model's own config (a preset's sized for `vocab_size` tokens); ConfigError when
    model.name_or_path names neither a preset nor a model directory."""
    try:
        return load_model_config(
            cfg.model.name_or_path,
            vocab_size=vocab_size,
            attn_implementation=cfg.model.attn_implementation,
        )
    except FileNotFoundError as e:
        raise ConfigError(f"model.name_or_path: {e}") from e


def resolve_run(
    cfg: Config,
    *,
    world: int,
    seq_len: int,
    vocab_size: int,
    precision: Precision,
    device: Device | None,
    base_model_config: Any = None,
    packed: bool = True,
    longest_document: int | None = None,
) -> ResolvedRun:
    """The one resolution of a run on `world` ranks of `device`, rows of `seq_len` positions,
    a tokenizer of `vocab_size` tokens. `base_model_config`: the model's own config, when the
    caller has read it already (else read from model.name_or_path). `packed`: the data's rows
    are packed (else one document a row: micro-batches of many lengths); `longest_document`:
    the data's (tokens; None: up to seq_len). Both from the manifest (Manifest.packed,
    Manifest.longest_document)."""
    cfg = cfg.for_world(world)
    if base_model_config is None:
        base_model_config = base_config(cfg, vocab_size)
    mcfg = with_vocabulary(base_model_config, vocab_size)
    shape = ModelShape.from_config(mcfg)
    ds_config = resolve_ds_config(
        cfg, world_size=world, precision=precision.name, largest_weight=shape.largest_weight
    )
    plan = None
    if device is not None:
        plan = plan_memory(
            shape,
            cfg,
            ds_config,
            world=world,
            seq_len=seq_len,
            device=device,
            lengths=batch_lengths(cfg, seq_len, packed=packed),
            documents=document_lengths(seq_len, longest_document),
        )
    return ResolvedRun(
        config=cfg,
        model_config=mcfg,
        shape=shape,
        precision=precision,
        ds_config=ds_config,
        world=world,
        seq_len=seq_len,
        vocab_size=vocab_size,
        plan=plan,
        packed=packed,
        longest_document=longest_document,
    )


def check_same(run: ResolvedRun, expected: dict[str, str] | None) -> None:
    """Raise when the workers' resolution differs from the driver's (`expected`: the driver's
    `parts()` for this world size; None: the driver did not resolve this world size)."""
    if not expected:
        return
    ours = run.parts()
    differ = [k for k in ours if ours[k] != expected.get(k)]
    if not differ:
        return
    hint = ""
    if "precision" in differ:
        hint = (
            f" The workers compute in {run.precision.name} ({run.precision.reason}), which the "
            "driver could not see from its own device: set deepspeed.precision=bf16 or fp32."
        )
    raise ConfigError(
        f"the workers resolved this run differently from the driver ({', '.join(differ)} "
        f"differ).{hint}"
    )
