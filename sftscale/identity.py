"""What a run is: the settings that define it, recorded in every checkpoint and compared on every
resume (the CLI's and SLURM's requeue in the driver, Ray's restart in the workers).

    ident = run_identity(resolved, data_id=..., tokenizer_id=...)   # {"optim.lr": 3e-4, ...}
    changes = identity_changes(saved, ident)                         # [("optim.lr", 3e-4, 1e-4)]

Every setting of the config defines the run except those in MAY_CHANGE: how long it trains,
where and how often it logs and saves, how many workers run it (the global batch is what
counts, and elastic resume keeps it), memory techniques that do not change the math, and
where the data and checkpoints live (the data's content is compared by its fingerprint).
Derived values define it too: the model's resolved config, the data's and the tokenizer's
fingerprints, the precision the run computes in, the global batch.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sftscale.resolve import ResolvedRun

# Dotted config keys (or prefixes ending in ".") that may change between a run's launches.
MAY_CHANGE = (
    "train.max_steps",
    "train.micro_batch_size",  # the global batch (train.global_batch_rows) is what counts
    "train.grad_accum",
    "train.loss_chunk_tokens",  # memory techniques: the same math
    "train.tiled_logits",
    "train.mlp_tiles",
    "train.cpu_mmap_threshold",  # where glibc puts memory, not what is computed
    "model.gradient_checkpointing",
    "model.attn_implementation",
    "data.path",  # where the data lives; its content: data.fingerprint
    "data.cache_dir",
    "data.cache_max_gb",
    "eval.",
    "logging.",
    "checkpoint.",
    "scale.",  # workers, sequence-parallel split (resumes exactly), timeouts, Ray address
    "deepspeed.nvme_path",
    "deepspeed.precision",  # what it resolves to: precision
)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, f"{key}."))
        else:
            out[key] = v
    return out


def _may_change(key: str) -> bool:
    return any(key == m or (m.endswith(".") and key.startswith(m)) for m in MAY_CHANGE)


def run_identity(run: ResolvedRun, *, data_id: str, tokenizer_id: str) -> dict[str, Any]:
    """The defining settings of `run`, as flat JSON values."""
    cfg = run.config
    ident = {k: v for k, v in _flat(cfg.to_dict()).items() if not _may_change(k)}
    model = run.model_config.to_dict()
    for volatile in ("transformers_version", "_attn_implementation_autoset", "_name_or_path"):
        model.pop(volatile, None)
    ident.update(
        {
            "model.config": hashlib.sha256(
                json.dumps(model, sort_keys=True, default=str).encode()
            ).hexdigest()[:16],
            "data.fingerprint": data_id,
            "tokenizer.fingerprint": tokenizer_id,
            "precision": run.precision.name,
            "train.global_batch_rows": cfg.global_batch_rows(run.world),
        }
    )
    return json.loads(json.dumps(ident, default=str))  # as a checkpoint stores it


def identity_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every defining setting that differs."""
    keys = sorted(set(saved) | set(current))
    return [(k, saved.get(k), current.get(k)) for k in keys if saved.get(k) != current.get(k)]


def describe_changes(changes: list[tuple[str, Any, Any]], *, checkpoint: str) -> str:
    listed = "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, old, new in changes)
    return (
        f"checkpoint {checkpoint} belongs to a run with other defining settings ({listed}). "
        "To start a new run, choose another logging.run_name; to resume this one anyway, set "
        "checkpoint.resume=force (the change is recorded in <run>/history.jsonl)"
    )
