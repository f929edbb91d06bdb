"""Typed run configuration: nested dataclasses loaded from YAML, overridable as `section.key=value`.

Every section is a plain dataclass (picklable, so it crosses the Ray boundary unchanged) that
checks its own fields in `__post_init__`; `Config.__post_init__` checks the rules that span
sections. Unknown keys and values of the wrong type are errors that name the field — nothing is
silently defaulted or rewritten. Checks that need the data manifest or the model live in
`sftscale.validate` and also run before any worker starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field and the fix."""


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}: {message}")


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    """LoRA adapters (peft): W x + (alpha / r) B A x on every target Linear, base frozen."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    # Linear layers by their attribute name (Llama/Qwen/Mistral: the attention and MLP ones).
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    # A 4-bit base (QLoRA) needs bitsandbytes on CUDA; not built yet (sftscale.validate says so).
    qlora: bool = False

    def __post_init__(self) -> None:
        _check(self.r >= 1, "model.lora.r", f"must be >= 1, got {self.r}")
        _check(self.alpha > 0, "model.lora.alpha", f"must be > 0, got {self.alpha}")
        _check(
            0 <= self.dropout < 1, "model.lora.dropout", f"must be in [0, 1), got {self.dropout}"
        )
        _check(bool(self.target_modules), "model.lora.target_modules", "name at least one Linear")


@dataclass
class ModelConfig:
    # A local Hugging Face model directory, or a preset name (see sftscale.model.PRESETS)
    # built from its config with random init.
    name_or_path: str = "tiny-llama"
    gradient_checkpointing: bool = True
    attn_implementation: str = "sdpa"
    # Train LoRA adapters instead of every weight (`model.lora={}` for the defaults, or
    # `model.lora.r=8`); null: full fine-tuning.
    lora: LoraConfig | None = None
    # Mixtures of experts: the weight of the routers' load-balancing loss in the training loss
    # (sftscale.moe); null: the model config's router_aux_loss_coef (0 where it has none).
    router_aux_loss_coef: float | None = None

    def __post_init__(self) -> None:
        _check(
            bool(self.name_or_path), "model.name_or_path", "must name a preset or a local directory"
        )
        _check(
            self.router_aux_loss_coef is None or self.router_aux_loss_coef >= 0,
            "model.router_aux_loss_coef",
            f"must be >= 0 (or null for the model's own), got {self.router_aux_loss_coef}",
        )
        _check(
            self.attn_implementation in ("sdpa", "eager", "flash_attention_2"),
            "model.attn_implementation",
            f"{self.attn_implementation!r} is not one of sdpa, eager, flash_attention_2",
        )


@dataclass
class DataConfig:
    # Directory written by `sftscale prepare` (manifest.json + Arrow shards + tokenizer/), or
    # its URI on object storage (s3://bucket/prepared, gs://..., any pyarrow filesystem): each
    # node then copies it to cache_dir once, checking every file (sftscale.storage).
    path: str = ""
    seed: int = 0
    shuffle: bool = True
    cache_dir: str = ""  # empty: $SFTSCALE_CACHE/data, else ~/.cache/sftscale/data
    cache_max_gb: float = 50.0  # copies of other URIs are evicted beyond this

    def __post_init__(self) -> None:
        _check(bool(self.path), "data.path", "set it to a directory written by `sftscale prepare`")
        _check(self.cache_max_gb > 0, "data.cache_max_gb", "must be > 0")


ADAM_KERNELS = ("auto", "torch", "deepspeed")
RESUME_MODES = ("auto", "never", "force")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    max_grad_norm: float = 1.0
    # Which AdamW steps the weights (sftscale.ds_config.adam_kernel):
    #   auto       torch's fused AdamW, except where the template offloads the optimizer:
    #              DeepSpeed's CPU Adam there. Nothing to compile on the default path.
    #   torch      torch's fused AdamW everywhere (with offload too: no JIT op at all, a slower
    #              step on the host than CPU Adam's).
    #   deepspeed  DeepSpeed's FusedAdam (CPU Adam with offload): a JIT-built op, compiled on
    #              first use; the choice where it measures faster than torch's (some GPUs).
    kernel: str = "auto"

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(
            self.kernel in ADAM_KERNELS,
            "optim.kernel",
            f"{self.kernel!r} is not one of {', '.join(ADAM_KERNELS)}",
        )
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optim.betas",
            f"must be two numbers in [0, 1), got {self.betas}",
        )
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(
            self.schedule in ("cosine", "linear", "constant"),
            "optim.schedule",
            f"{self.schedule!r} is not one of cosine, linear, constant",
        )
        _check(self.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0 (0 disables clipping)")


@dataclass
class TrainConfig:
    micro_batch_size: int = 1  # packed rows per rank per forward
    grad_accum: int = 1
    max_steps: int = 100  # optimizer steps
    seed: int = 0
    # Assign each step's rows to ranks by token cost (FLOPs, attention included) instead of by
    # position, so no rank waits on another; the global batch of every step is the same either way.
    balance_ranks: bool = True
    # Cross-entropy over this many positions at a time, recomputed in backward: the fp32
    # logits and log-softmax of a whole micro-batch are never held at once. 0: in one piece.
    loss_chunk_tokens: int = 1024
    # Long rows (DeepSpeed ALST's tiling). tiled_logits: the LM head runs on loss_chunk_tokens
    # positions at a time inside the chunked loss, so the (positions x vocabulary) logits tensor
    # never exists whole; costs one more head GEMM per chunk in backward (and, under ZeRO-3, a
    # gather of the head per chunk). mlp_tiles: every MLP computes this many slices of the
    # sequence at a time, its (positions x intermediate) activations recomputed in backward
    # (DeepSpeed's TiledMLP; about positions per rank / hidden_size is ALST's rule). 0: off.
    tiled_logits: bool = False
    mlp_tiles: int = 0
    # CPU workers (tensors in host RAM): glibc's mmap threshold, in bytes. Every allocation this
    # large gets a mapping of its own, returned to the system when freed, so a rank's RSS
    # follows its live tensors (what sftscale plan counts). 0: glibc's dynamic threshold, which
    # rises to 32 MiB and keeps what ZeRO-3 gathered and freed resident (544M on 2 ranks
    # peaked at 8.0 GiB instead of 6.3; fp32 1.24B on 2 ranks of a 23.5 GiB host was killed,
    # and trains pinned); faster on small models with long rows (docs/long_context.md).
    cpu_mmap_threshold: int = 1 << 20

    def __post_init__(self) -> None:
        _check(self.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
        _check(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        _check(self.max_steps >= 1, "train.max_steps", "must be >= 1")
        _check(self.loss_chunk_tokens >= 0, "train.loss_chunk_tokens", "must be >= 0 (0 = off)")
        _check(
            not self.tiled_logits or self.loss_chunk_tokens > 0,
            "train.tiled_logits",
            "needs train.loss_chunk_tokens > 0 (the positions per tile)",
        )
        _check(self.mlp_tiles >= 0, "train.mlp_tiles", "must be >= 0 (0 = off)")
        _check(
            0 <= self.cpu_mmap_threshold <= 1 << 25,
            "train.cpu_mmap_threshold",
            "must be 0 (glibc's dynamic threshold) or 1..33554432 bytes (glibc's largest)",
        )


@dataclass
class EvalConfig:
    # A directory written by `sftscale prepare` with the same tokenizer as data.path; empty: no eval.
    path: str = ""
    every_n_steps: int = 0  # 0: only at the end (when path is set)
    max_rows: int = 0  # 0: every row of the eval set
    micro_batch_size: int = 1

    def __post_init__(self) -> None:
        _check(self.every_n_steps >= 0, "eval.every_n_steps", "must be >= 0")
        _check(self.max_rows >= 0, "eval.max_rows", "must be >= 0 (0 = all rows)")
        _check(self.micro_batch_size >= 1, "eval.micro_batch_size", "must be >= 1")


@dataclass
class DeepSpeedConfig:
    # A template name in ds_configs/ (without .json) or a path to a JSON file; its "auto"
    # fields are filled from this config by sftscale.ds_config.resolve_ds_config.
    template: str = "zero3"
    # auto: bf16 where the device computes it natively, fp32 elsewhere (sftscale.precision);
    # bf16 or fp32 force one (bf16 on a CPU without native bf16 runs, with a warning).
    precision: str = "auto"
    # A directory on a fast local disk of every node, for the NVMe offload templates
    # (zero3_nvme_optimizer, zero3_nvme): each rank swaps its optimizer states (and weights)
    # there through DeepSpeed's async I/O op (libaio). Not shared between nodes; not kept.
    nvme_path: str = ""
    # ZeRO-3 knobs that bound host or GPU memory, over the template's values (None: the
    # template's). max_live_parameters: weights kept gathered at once (stage3_max_live_parameters);
    # prefetch_bucket_size: weights gathered ahead of use (stage3_prefetch_bucket_size);
    # max_in_cpu: elements of a rank's weight partition kept in host RAM under NVMe weight
    # offload (offload_param.max_in_cpu; 0 swaps them all). `sftscale plan` proposes them.
    max_live_parameters: int | None = None
    prefetch_bucket_size: int | None = None
    max_in_cpu: int | None = None

    def __post_init__(self) -> None:
        _check(
            self.precision in ("auto", "bf16", "fp32"),
            "deepspeed.precision",
            f"{self.precision!r} is not one of auto, bf16, fp32",
        )
        for name in ("max_live_parameters", "prefetch_bucket_size", "max_in_cpu"):
            value = getattr(self, name)
            _check(value is None or value >= 0, f"deepspeed.{name}", f"{value} is negative")


@dataclass
class ScaleConfig:
    num_workers: int = 1
    # Elastic under Ray: > 0 lets Ray Train run with between min_workers and num_workers
    # workers (a lost node does not stop the run when the rest can go on; a joining one is
    # taken in). The global batch stays micro_batch_size * grad_accum * num_workers rows: each
    # world size in the range must divide it, and grad_accum grows as workers go.
    min_workers: int = 0
    use_gpu: bool = False
    cpus_per_worker: int = 1
    # Ray cluster address; empty starts a local Ray instance (RAY_ADDRESS in the environment
    # still wins, as with every Ray program).
    ray_address: str = ""
    # Ray Train restarts the worker group from the last checkpoint this many times after a
    # worker dies (FailureConfig.max_failures); -1: without limit.
    max_failures: int = 0
    # A collective (or the rendezvous) that waits longer than this fails with an error naming
    # what it waited for and the ranks that did not arrive, instead of waiting forever.
    collective_timeout_s: int = 1800
    # A rank whose heartbeat has not moved for this long (stuck without a deadline of its own:
    # I/O, a deadlock) prints its threads' stacks and exits 75, which Ray treats as a dead
    # worker (max_failures). Longer than collective_timeout_s, so a rank waiting on a stopped
    # peer reports the peer first. 0: off.
    stall_timeout_s: int = 3600
    # Ulysses sequence parallelism (DeepSpeed ALST): each group of this many consecutive ranks
    # splits every row along the sequence; data parallelism is num_workers / this.
    sequence_parallel_size: int = 1
    # Mixtures of experts: each group of this many ranks holds 1/this of every MoE layer's
    # experts and sends tokens to the rank with their expert (DeepSpeed AutoEP, docs/moe.md).
    expert_parallel_size: int = 1
    # Before any worker starts, `sftscale plan`'s memory plan per rank is checked against the
    # device (this host's memory shared by its ranks, or the driver's GPU); a run that does not
    # fit stops with the changes that would make it fit. false: launch anyway.
    memory_check: bool = True

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, "scale.num_workers", "must be >= 1")
        _check(self.sequence_parallel_size >= 1, "scale.sequence_parallel_size", "must be >= 1")
        _check(self.expert_parallel_size >= 1, "scale.expert_parallel_size", "must be >= 1")
        _check(
            0 <= self.min_workers <= self.num_workers,
            "scale.min_workers",
            f"must be 0 (fixed size) or between 1 and scale.num_workers ({self.num_workers})",
        )
        _check(
            self.collective_timeout_s >= 10, "scale.collective_timeout_s", "must be >= 10 (seconds)"
        )
        _check(
            self.stall_timeout_s == 0 or self.stall_timeout_s > self.collective_timeout_s,
            "scale.stall_timeout_s",
            f"must be 0 (off) or longer than scale.collective_timeout_s "
            f"({self.collective_timeout_s} s), so that a rank waiting on a stopped peer names it first",
        )
        _check(self.cpus_per_worker >= 1, "scale.cpus_per_worker", "must be >= 1")


@dataclass
class CheckpointConfig:
    every_n_steps: int = 0  # 0: only at the end
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted after a new one commits
    # auto: continue from <run>/checkpoints/latest when it exists (the same command resumes a
    # stopped run), only if the checkpoint was written by this run (sftscale.identity: a
    # changed defining setting is refused before launch, with the difference listed);
    # never: start over, which needs an empty run directory; force: resume although defining
    # settings changed, recorded in <run>/history.jsonl. true/false mean auto/never.
    resume: bool | str = "auto"
    at_end: bool = True  # save a checkpoint after the last step (benchmarks turn it off)
    export: bool = True  # write a Hugging Face export under <run>/export at the end
    export_max_shard_mb: int = 2000
    # LoRA runs: also write the merged model (W + s·B·A) to <run>/export/merged (streamed).
    export_merged: bool = False
    # Object storage for a cluster whose nodes share no disk (s3://bucket/runs, gs://..., any
    # pyarrow filesystem; S3-compatible endpoints via AWS_ENDPOINT_URL). Under Ray every node
    # writes its ranks' checkpoint files to its local logging.output_dir and Ray Train uploads
    # them to <storage>/<run_name>/; a restarted worker downloads the checkpoint it resumes
    # from. Metrics, ledger and export end up there too. Empty: logging.output_dir is the
    # run's only home (one machine, or a filesystem every node shares).
    storage: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.resume, bool):
            self.resume = "auto" if self.resume else "never"
        _check(
            self.resume in RESUME_MODES,
            "checkpoint.resume",
            f"{self.resume!r} is not one of {', '.join(RESUME_MODES)}",
        )
        _check(self.every_n_steps >= 0, "checkpoint.every_n_steps", "must be >= 0")
        _check(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
        _check(self.export_max_shard_mb >= 1, "checkpoint.export_max_shard_mb", "must be >= 1")
        _check(
            not self.storage or "://" in self.storage,
            "checkpoint.storage",
            f"{self.storage!r} is not a URI (s3://bucket/path, gs://...); for a filesystem every "
            "node shares, set logging.output_dir to a path on it instead",
        )


@dataclass
class LoggingConfig:
    output_dir: str = "runs"
    run_name: str = "run"
    every_n_steps: int = 1
    tensorboard: bool = True
    wandb: bool = False  # needs `pip install wandb` (and WANDB_* settings) on the workers
    mlflow: bool = False  # needs `pip install mlflow`; MLFLOW_TRACKING_URI as usual
    wandb_project: str = "sftscale"
    progress_bar: bool = True  # on rank 0, when its stderr is a terminal

    def __post_init__(self) -> None:
        _check(self.every_n_steps >= 1, "logging.every_n_steps", "must be >= 1")
        _check(
            bool(self.run_name) and "/" not in self.run_name,
            "logging.run_name",
            "must be a plain name",
        )

    def sinks(self) -> dict[str, Any]:
        """The metrics sinks' settings, as sftscale.metrics.MetricsLogger takes them."""
        return {
            "tensorboard": self.tensorboard,
            "wandb": self.wandb,
            "mlflow": self.mlflow,
            "project": self.wandb_project,
            "run_name": self.run_name,
        }


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        _check(
            self.optim.warmup_steps < self.train.max_steps or self.optim.warmup_steps == 0,
            "optim.warmup_steps",
            f"{self.optim.warmup_steps} warmup steps leave no decay within train.max_steps={self.train.max_steps}",
        )

    @property
    def run_dir(self) -> Path:
        return Path(self.logging.output_dir) / self.logging.run_name

    def data_parallel_size(self, world_size: int | None = None) -> int:
        """Groups of ranks that read different rows: the world over the sequence-parallel size."""
        world = self.scale.num_workers if world_size is None else world_size
        sp = self.scale.sequence_parallel_size
        if world % sp:
            raise ConfigError(
                f"scale.sequence_parallel_size: {world} workers do not split into groups of {sp}; "
                "make scale.num_workers (and every elastic world size) a multiple of it"
            )
        return world // sp

    def global_batch_rows(self, world_size: int | None = None) -> int:
        return (
            self.train.micro_batch_size
            * self.train.grad_accum
            * self.data_parallel_size(world_size)
        )

    def for_world(self, world_size: int) -> Config:
        """This config as a run of `world_size` workers computes it: elastic runs
        (scale.min_workers > 0) keep the global batch of num_workers workers by accumulating
        over more micro-batches when fewer workers run."""
        if not self.scale.min_workers or world_size == self.scale.num_workers:
            return self
        rows = self.global_batch_rows()
        per_micro_step = self.train.micro_batch_size * self.data_parallel_size(world_size)
        if rows % per_micro_step:
            raise ConfigError(
                f"scale.min_workers: {world_size} workers cannot split the global batch of {rows} "
                f"rows into micro-batches of {self.train.micro_batch_size}; choose "
                "train.grad_accum so that every world size in [min_workers, num_workers] divides it"
            )
        train = dataclasses.replace(self.train, grad_accum=rows // per_micro_step)
        return dataclasses.replace(self, train=train)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, strictly.


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        _check(isinstance(value, list), name, f"expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        _check(
            isinstance(value, dict),
            name,
            f"expected a mapping of {tp.__name__} fields, got {value!r}",
        )
        return from_dict(tp, value, prefix=f"{name}.")
    if tp is bool:
        _check(isinstance(value, bool), name, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        # 1e8 (a float in YAML, a string on the command line) is the integer anyone typing it means
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        _check(
            isinstance(value, int) and not isinstance(value, bool),
            name,
            f"expected an integer, got {value!r}",
        )
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads `3e-4` (no dot) as a string; a number is what anyone typing it means.
            with contextlib.suppress(ValueError):
                value = float(value)
        _check(
            isinstance(value, (int, float)) and not isinstance(value, bool),
            name,
            f"expected a number, got {value!r}",
        )
        return float(value)
    if tp is str:
        _check(isinstance(value, str), name, f"expected a string, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported field type {tp!r}")


def from_dict(cls: type, data: dict[str, Any], *, prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key (known keys in {prefix.rstrip('.') or 'the top level'}: "
            f"{', '.join(sorted(known))})"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings; values are parsed as YAML scalars (`lr=3e-4`, `x=true`)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override {item!r}: expected section.key=value (e.g. optim.lr=3e-4)")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = out
        for depth, part in enumerate(parts[:-1]):  # model.lora.r=8 reaches into model.lora
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(
                    f"override {item!r}: {'.'.join(parts[: depth + 1])} is not a section"
                )
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load YAML at `path` (or defaults when None), apply overrides, validate everything."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        data = loaded or {}
    data = apply_overrides(data, overrides or [])
    return from_dict(Config, data)


# Credentials a URI can carry: s3://KEY:SECRET@bucket/..., or pyarrow's query parameters.
_URI_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_URI_SECRET_PARAM = re.compile(
    r"(?P<key>[?&](?:access_key|secret_key|session_token|password|token|credential[s]?)=)[^&\s]*",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """`text` with the credentials of any URI in it replaced by ***."""
    text = _URI_USERINFO.sub(r"\g<scheme>***@", text)
    return _URI_SECRET_PARAM.sub(r"\g<key>***", text)


def redacted(value: Any) -> Any:
    """A config dict (or any JSON-like value) with every string passed through `redact`."""
    if isinstance(value, dict):
        return {k: redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v) for v in value]
    return redact(value) if isinstance(value, str) else value


def save_config(cfg: Config, path: str | Path) -> None:
    """The config as YAML, URIs' credentials redacted, written atomically and durably."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(yaml.safe_dump(redacted(cfg.to_dict()), sort_keys=False))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
