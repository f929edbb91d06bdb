"""The one resolver for DeepSpeed settings: a checked-in template from ds_configs/ with its
"auto" fields filled from the run config.

    resolve_ds_config(cfg, world_size=8, precision="bf16")  ->  dict for deepspeed.initialize

Any "auto" left unfilled is an error, and the batch arithmetic is asserted:
train_batch_size == micro_batch_size * grad_accum * world_size.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from sftscale.config import Config, ConfigError

# Shipped inside the package (package data), so a non-editable `pip install` finds them too;
# the repository's top-level ds_configs/ is a link to this folder.
TEMPLATE_DIR = Path(__file__).resolve().parent / "ds_configs"


def template_path(template: str) -> Path:
    p = Path(template)
    if p.suffix == ".json":
        if not p.is_file():
            raise ConfigError(f"deepspeed.template: {template} does not exist")
        return p
    p = TEMPLATE_DIR / f"{template}.json"
    if not p.is_file():
        names = sorted(q.stem for q in TEMPLATE_DIR.glob("*.json"))
        raise ConfigError(
            f"deepspeed.template: no template {template!r}; choose one of {names} or a .json path"
        )
    return p


def load_template(template: str) -> dict[str, Any]:
    return json.loads(template_path(template).read_text())


def optimizer_offload(template: dict[str, Any]) -> str | None:
    """Where the template keeps the optimizer: "cpu", "nvme" or None (with the weights' ranks)."""
    device = template.get("zero_optimization", {}).get("offload_optimizer", {}).get("device")
    return device if device in ("cpu", "nvme") else None


def uses_torch_adam(cfg: Config, template: dict[str, Any]) -> bool:
    """optim.kernel resolved for this template: torch's AdamW (True) or DeepSpeed's own op.

    auto takes torch's fused AdamW (no JIT op, and on CPU 6x foreach's speed on a ZeRO
    partition) unless the template offloads the optimizer, where DeepSpeed's CPU Adam (AVX
    kernels over the host's fp32 partition) is the faster step."""
    kernel = cfg.optim.kernel
    return kernel == "torch" or (kernel == "auto" and optimizer_offload(template) is None)


def with_adam_kernel(template: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """A copy of `template` whose AdamW is optim.kernel's: `torch_adam` true or false (a template
    of one's own without the field takes optim.kernel too), and torch's fused kernel (CPU and
    CUDA), not its per-tensor loop, unless the template chose `foreach`. DeepSpeed passes the
    remaining params to torch.optim.AdamW."""
    template = copy.deepcopy(template)
    optimizer = template.get("optimizer", {})
    if str(optimizer.get("type", "")).lower() not in ("adam", "adamw"):
        return template
    params = optimizer.setdefault("params", {})
    if params.get("torch_adam", "auto") == "auto":
        params["torch_adam"] = uses_torch_adam(cfg, template)
    if params["torch_adam"] is True and "foreach" not in params:
        params.setdefault("fused", True)
    return template


def auto_values(
    cfg: Config, world_size: int, precision: str, largest_weight: int = 0
) -> dict[str, Any]:
    """Values for every "auto" field a template may hold, keyed by dotted path.

    precision: bf16 or fp32, what the run computes in (`deepspeed.precision` resolved by
    sftscale.precision on the workers' device). largest_weight: elements of the model's largest
    weight (0: unknown), for ZeRO-Infinity's weight buffers, which must hold its partition."""
    o, t = cfg.optim, cfg.train
    return {
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": o.max_grad_norm,
        "bf16.enabled": precision == "bf16",
        "optimizer.params.lr": o.lr,
        "optimizer.params.betas": list(o.betas),
        "optimizer.params.eps": o.eps,
        "optimizer.params.weight_decay": o.weight_decay,
        "zero_optimization.offload_optimizer.nvme_path": cfg.deepspeed.nvme_path,
        "zero_optimization.offload_param.nvme_path": cfg.deepspeed.nvme_path,
        "zero_optimization.offload_param.buffer_size": max(10**8, -(-largest_weight // world_size)),
    }


def _fill(node: Any, values: dict[str, Any], path: str, template: str) -> Any:
    if isinstance(node, dict):
        return {
            k: _fill(v, values, f"{path}.{k}" if path else k, template) for k, v in node.items()
        }
    if node == "auto":
        if path not in values:
            raise ConfigError(
                f'deepspeed.template {template}: no value for the "auto" field {path}'
            )
        return values[path]
    return node


def resolve_ds_config(
    cfg: Config, *, world_size: int, precision: str, largest_weight: int = 0
) -> dict[str, Any]:
    """The template filled for `world_size` ranks computing in `precision` (bf16 | fp32)."""
    template = load_template(cfg.deepspeed.template)
    if template.get("bf16", {}).get("enabled") is True and cfg.deepspeed.precision != "bf16":
        raise ConfigError(
            f"deepspeed.precision is {cfg.deepspeed.precision} but the template enables bf16; "
            'set bf16.enabled to "auto"'
        )
    resolved = _fill(
        with_adam_kernel(template, cfg),
        auto_values(cfg, world_size, precision, largest_weight),
        "",
        cfg.deepspeed.template,
    )
    t = cfg.train
    if resolved["train_batch_size"] != t.micro_batch_size * t.grad_accum * world_size:
        raise ConfigError(
            f"deepspeed.template {cfg.deepspeed.template}: train_batch_size {resolved['train_batch_size']} != "
            f"train.micro_batch_size {t.micro_batch_size} * train.grad_accum {t.grad_accum} * "
            f'world size {world_size}; leave these fields "auto"'
        )
    if resolved.get("fp16", {}).get("enabled"):
        raise ConfigError("deepspeed.template: fp16 is not supported (use bf16)")
    _memory_knobs(resolved, cfg)
    ep = cfg.scale.expert_parallel_size
    if ep > 1:  # DeepSpeed AutoEP: finds the MoE blocks and replaces them at initialize
        resolved["expert_parallel"] = {"enabled": True, "autoep_size": ep}
    return resolved


def _memory_knobs(resolved: dict[str, Any], cfg: Config) -> None:
    """deepspeed.max_live_parameters / prefetch_bucket_size / max_in_cpu over the template's
    ZeRO-3 settings; refused where the template has nothing for them to bound."""
    d, z = cfg.deepspeed, resolved.get("zero_optimization", {})
    knobs = {
        "max_live_parameters": (d.max_live_parameters, z, "stage3_max_live_parameters"),
        "prefetch_bucket_size": (d.prefetch_bucket_size, z, "stage3_prefetch_bucket_size"),
        "max_in_cpu": (d.max_in_cpu, z.get("offload_param", {}), "max_in_cpu"),
    }
    for name, (value, node, key) in knobs.items():
        if value is None:
            continue
        if int(z.get("stage", 0)) != 3:
            raise ConfigError(
                f"deepspeed.{name}={value}: a ZeRO-3 setting, and deepspeed.template="
                f"{d.template} is stage {z.get('stage', 0)}; use a zero3 template or leave it unset"
            )
        if name == "max_in_cpu" and node.get("device") != "nvme":
            raise ConfigError(
                f"deepspeed.max_in_cpu={value}: bounds the weights kept in RAM under NVMe weight "
                f"offload, and deepspeed.template={d.template} does not swap weights to NVMe "
                "(zero3_nvme does); leave it unset"
            )
        node[key] = value


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
