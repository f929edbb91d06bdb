"""Checks that need more than the config itself (the data manifest, the model, the templates).

They run in the driver before any worker starts, so a bad run fails in seconds with a message
that names the field and the fix, not minutes later inside a Ray worker.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_tools.console import say
from data_tools.schema import Manifest
from sftscale.checkpoint import check_expert_layout, latest_checkpoint, lora_state, read_state
from sftscale.config import Config, ConfigError
from sftscale.data import data_fingerprint
from sftscale.devices import Device, ranks_here, this_device
from sftscale.fit import plan_with_fixes
from sftscale.identity import describe_changes, identity_changes, run_identity
from sftscale.jit_locks import op_available
from sftscale.resolve import ResolvedRun, base_config, precision_for, resolve_run
from sftscale.sequence_parallel import EXACT_ON_PACKED_ROWS, sliding_window
from sftscale.shape import ModelShape
from sftscale.storage import is_uri, load_manifest
from sftscale.storage.cache import cache_root
from sftscale.verify import check_token_ids, verify_data


@dataclass(frozen=True)
class Validated:
    """What the driver hands on: the data's manifest, the run resolved for its world size, and
    the parts of the resolution for every world size it may run on (the workers compare)."""

    manifest: Manifest
    run: ResolvedRun
    expected: dict[int, dict[str, str]]
    identity: dict[str, Any]  # the run's defining settings (sftscale.identity)
    changes: list[tuple[str, Any, Any]]  # from the checkpoint it resumes (checkpoint.resume=force)


def validate_run(cfg: Config, *, world_size: int) -> Validated:
    """Raise ConfigError for any setting that cannot work; return the resolved run."""
    manifest = load_manifest(cfg.data.path, field="data.path")
    eval_manifest = load_manifest(cfg.eval.path, field="eval.path") if cfg.eval.path else None
    _check_data(cfg, manifest, "data.path", cfg.data.path)
    if eval_manifest is not None:
        _check_data(cfg, eval_manifest, "eval.path", cfg.eval.path)

    rows = manifest.num_rows
    need = cfg.global_batch_rows(world_size)
    if rows < need:
        raise ConfigError(
            f"train.micro_batch_size * train.grad_accum * scale.num_workers = {need} rows per step, "
            f"but data.path holds only {rows} rows; lower the batch or prepare more data"
        )

    vocab = manifest.tokenizer.vocab_size
    base = base_config(cfg, vocab)
    positions = getattr(base, "max_position_embeddings", None) or manifest.seq_len
    if manifest.seq_len > positions:
        raise ConfigError(
            f"data.path: seq_len {manifest.seq_len} exceeds the model's max_position_embeddings "
            f"{positions}; prepare the data with a shorter --seq-len"
        )
    # Added tokens (the chat template's markers that prepare adds, a user's own) beyond the
    # model's vocabulary are grown at load time, and the worker says so. A base vocabulary
    # larger than the model's is another tokenizer than the model's.
    base_vocab = manifest.tokenizer.base_vocab_size or vocab
    if base_vocab > base.vocab_size:
        raise ConfigError(
            f"model.name_or_path: the data's tokenizer has {base_vocab} tokens before added ones "
            f"but the model's vocabulary has {base.vocab_size}; use the tokenizer the model was "
            "trained with"
        )
    _check_devices(cfg)
    if cfg.model.lora is not None:
        _check_lora(cfg)
    if cfg.scale.sequence_parallel_size > 1:
        _check_sequence_parallel(cfg, base, world_size, manifest.seq_len)
    _check_experts(cfg, base)
    _check_row_slices(cfg, manifest, eval_manifest)
    for flag, module in (("wandb", "wandb"), ("mlflow", "mlflow")):
        if getattr(cfg.logging, flag) and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"logging.{flag} is true but {module} is not installed: pip install {module}"
            )
    if eval_manifest is not None:
        _check_eval_set(eval_manifest, manifest, positions)

    # The run, resolved once for every world size it may run on (an elastic run must be able
    # to continue on each); the workers resolve again and compare.
    device = this_device(cfg, world=world_size)
    precision = precision_for(cfg, device)
    runs = {
        world: resolve_run(
            cfg,
            world=world,
            seq_len=manifest.seq_len,
            vocab_size=vocab,
            precision=precision,
            device=device if world == world_size else None,
            base_model_config=base,
            packed=manifest.packed,
            longest_document=manifest.longest_document,
        )
        for world in range(cfg.scale.min_workers or world_size, world_size + 1)
    }
    run = runs[world_size]
    _check_nvme_param_buffer(run)
    _check_nvme_resume(run.ds_config, cfg, world_size)
    _check_zero_options(run.ds_config, cfg)
    if cfg.scale.memory_check and device is not None:
        _check_memory(run, device)
    identity, changes = check_resume(cfg, manifest, run)
    return Validated(manifest, run, {w: r.parts() for w, r in runs.items()}, identity, changes)


def _check_data(cfg: Config, manifest: Manifest, field: str, path: str) -> None:
    """The shards are what the manifest says (local data here; a URI's copy is checked file by
    file as each node downloads it), and hold only the tokenizer's ids."""
    vocab = manifest.tokenizer.vocab_size
    if is_uri(path):
        check_token_ids(manifest, field=field, vocab_size=vocab)
        return
    record_dir = cache_root(Path(cfg.data.cache_dir) if cfg.data.cache_dir else None)
    verify_data(
        Path(path.removeprefix("file://")),
        manifest,
        field=field,
        vocab_size=vocab,
        record_dir=record_dir,
        log=say,
    )


def _check_devices(cfg: Config) -> None:
    if cfg.scale.use_gpu:
        import torch  # heavy: only a GPU run asks

        if not torch.cuda.is_available() and not cfg.scale.ray_address:
            raise ConfigError(
                "scale.use_gpu is true but this machine has no CUDA device; set it to false"
            )
    if cfg.model.attn_implementation == "flash_attention_2":
        if not cfg.scale.use_gpu:
            raise ConfigError(
                "model.attn_implementation=flash_attention_2 needs GPUs: set scale.use_gpu=true or use sdpa"
            )
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError(
                "model.attn_implementation=flash_attention_2 but flash_attn is not installed; use sdpa"
            )


def _check_nvme_resume(ds: dict, cfg: Config, world: int) -> None:
    """An optimizer on NVMe lives in per-rank swap files on each node's own disk: a run resumes
    it on the same number of workers only."""
    if ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") != "nvme":
        return
    where = f"deepspeed.template={cfg.deepspeed.template}"
    if cfg.scale.min_workers:
        raise ConfigError(
            f"scale.min_workers with {where}: the optimizer's state is in per-rank swap files, "
            "which a run on fewer workers cannot take over; set scale.min_workers=0 or use "
            "zero3_offload_optimizer"
        )
    latest = (
        latest_checkpoint(cfg.run_dir / "checkpoints") if cfg.checkpoint.resume != "never" else None
    )
    if latest is not None and (saved := read_state(latest)["world_size"]) != world:
        raise ConfigError(
            f"{where}: checkpoint {latest} was saved by {saved} workers with the optimizer on "
            f"NVMe (per-rank swap files); resume it with scale.num_workers={saved}"
        )


def _check_nvme_param_buffer(run: ResolvedRun) -> None:
    """ZeRO-Infinity swaps each weight's partition through buffers of offload_param.buffer_size
    elements; a larger partition (a large vocabulary's embedding on few ranks) fails in the
    workers after the model has loaded. The shipped template's "auto" sizes them; a template
    of one's own may not."""
    offload = run.ds_config.get("zero_optimization", {}).get("offload_param", {})
    if offload.get("device") != "nvme":
        return
    largest = -(-run.shape.largest_weight // run.world)
    size = int(offload.get("buffer_size", 10**8))
    if size < largest:
        raise ConfigError(
            f"deepspeed.template={run.config.deepspeed.template}: offload_param.buffer_size is "
            f"{size:,} elements but the largest weight's partition on {run.world} ranks has "
            f"{largest:,}; copy the template to a .json file with offload_param.buffer_size >= "
            f"{largest} and set deepspeed.template=<that file>, or run on more ranks"
        )


def _check_memory(run: ResolvedRun, device: Device) -> None:
    cfg = run.config
    plan = plan_with_fixes(run, device)
    gib = 2**30
    if plan.total("nvme") and cfg.deepspeed.nvme_path:
        _check_nvme_space(cfg.deepspeed.nvme_path, plan.total("nvme") * ranks_here(run.world))
    if not plan.fits:
        raise ConfigError(
            f"this run does not fit: it needs about {plan.peak_bytes / gib:.1f} GiB per rank and "
            f"{device.name} gives each rank {device.memory_bytes / gib:.1f} GiB; {plan.advice()}. "
            "`sftscale plan` with the same arguments prints the breakdown; "
            "scale.memory_check=false launches anyway"
        )


def _check_nvme_space(nvme_path: str, need: int) -> None:
    """The swap files of this host's ranks must fit on the disk of deepspeed.nvme_path (those
    already there, of a run that resumes, are rewritten in place)."""

    path = Path(nvme_path)
    existing = sum(f.stat().st_size for f in path.rglob("*.swp")) if path.is_dir() else 0
    probe = next(p for p in (path, *path.parents) if p.exists())
    free = shutil.disk_usage(probe).free + existing
    if free < need:
        gib = 2**30
        raise ConfigError(
            f"deepspeed.nvme_path: {nvme_path} has {free / gib:.1f} GiB free for swap files and "
            f"the ranks on this host need about {need / gib:.1f} GiB (fp32 weights, AdamW moments "
            "and gradients); free space there or point deepspeed.nvme_path at a larger disk"
        )


def _check_lora(cfg: Config) -> None:
    if importlib.util.find_spec("peft") is None:
        raise ConfigError("model.lora is set but peft is not installed: pip install peft")
    if cfg.model.lora.qlora:
        import torch

        if not (cfg.scale.use_gpu and torch.cuda.is_available()):
            raise ConfigError(
                "model.lora.qlora: a 4-bit base needs bitsandbytes on CUDA GPUs, and this run has "
                "none (scale.use_gpu=false or no CUDA device); set model.lora.qlora=false for LoRA "
                "on the base in the run's precision"
            )
        raise ConfigError(
            "model.lora.qlora: 4-bit bases (bitsandbytes) are not supported by sftscale yet; set "
            "model.lora.qlora=false (LoRA on a bf16 base under ZeRO-3)"
        )


def _check_sequence_parallel(cfg: Config, mcfg: Any, world: int, seq_len: int) -> None:
    sp, key = cfg.scale.sequence_parallel_size, "scale.sequence_parallel_size"
    cfg.data_parallel_size(world)  # the world splits into whole groups
    arch = mcfg.get_text_config()
    heads, kv = arch.num_attention_heads, arch.num_key_value_heads
    if heads % sp:
        raise ConfigError(
            f"{key}={sp}: the model's {heads} attention heads do not split over {sp} "
            f"ranks; use a divisor of {heads}"
        )
    if kv % sp and sp % kv:
        raise ConfigError(
            f"{key}={sp}: the model's {kv} key/value heads neither split over {sp} "
            f"ranks nor replicate to them; use a divisor or a multiple of {kv}"
        )
    window = sliding_window(mcfg)
    if window is not None and window < seq_len:
        raise ConfigError(
            f"{key}={sp}: the model attends within a sliding window of {window} "
            f"positions, which sequence parallelism does not apply; use rows of at "
            f"most {window} positions (prepare --seq-len) or {key}=1"
        )
    impl = cfg.model.attn_implementation
    if impl not in EXACT_ON_PACKED_ROWS:
        raise ConfigError(
            f"model.attn_implementation={impl} with {key}={sp} needs a full seq x "
            "seq mask, which sequence parallelism exists to avoid; use sdpa (one "
            "attention call per document) or flash_attention_2 on GPUs"
        )


def _check_experts(cfg: Config, mcfg: Any) -> None:
    """What sftscale does not do with a mixture of experts, refused before any worker starts."""
    shape = ModelShape.from_config(mcfg)
    text = mcfg.get_text_config()
    counts = ("num_experts", "num_local_experts", "n_routed_experts")
    if not shape.experts and any(getattr(text, k, None) for k in counts):
        raise ConfigError(
            f"model.name_or_path: {cfg.model.name_or_path} is a mixture of experts of type "
            f"{text.model_type!r}, which sftscale does not support yet (its routers, balance loss "
            "and FLOPs would be wrong); supported: qwen2_moe, qwen3_moe, mixtral, deepseek_v3 "
            "(docs/moe.md)"
        )
    if not shape.experts:
        if cfg.model.router_aux_loss_coef:
            raise ConfigError(
                f"model.router_aux_loss_coef={cfg.model.router_aux_loss_coef}: "
                f"{cfg.model.name_or_path} has no experts (a dense model); remove it"
            )
        return
    if cfg.scale.sequence_parallel_size > 1:  # a document's balance loss needs all its tokens
        raise ConfigError(
            f"scale.sequence_parallel_size={cfg.scale.sequence_parallel_size}: sequence "
            "parallelism is not supported for mixtures of experts yet (docs/moe.md); use 1"
        )
    if cfg.train.mlp_tiles > 1:
        raise ConfigError(
            f"train.mlp_tiles={cfg.train.mlp_tiles}: a MoE layer's MLP is its experts, which "
            "sftscale does not tile; use train.mlp_tiles=0"
        )
    if cfg.scale.expert_parallel_size > 1:
        _check_expert_parallel(cfg, shape.experts)


def _check_expert_parallel(cfg: Config, experts: int) -> None:
    """DeepSpeed AutoEP under ZeRO-3, as sftscale tests it (docs/moe.md)."""
    ep, key, s = cfg.scale.expert_parallel_size, "scale.expert_parallel_size", cfg.scale
    fits = [d for d in range(1, experts + 1) if experts % d == 0 and s.num_workers % d == 0]
    if experts % ep or s.num_workers % ep:
        raise ConfigError(
            f"{key}={ep}: it must divide the model's {experts} experts and the "
            f"{s.num_workers} workers; use one of {fits}"
        )
    if s.min_workers and s.min_workers != s.num_workers:
        raise ConfigError(
            f"{key}={ep} with scale.min_workers={s.min_workers}: elastic expert-parallel "
            "runs are not supported yet (every world size would need a divisor of the experts); "
            "set scale.min_workers=0. A stopped run resumes on another number of workers"
        )
    if cfg.model.lora is not None:
        raise ConfigError(f"{key}={ep}: LoRA with expert parallelism is not supported; use 1")


def _check_row_slices(cfg: Config, manifest: Manifest, eval_manifest: Manifest | None) -> None:
    """Rows must cut into equal slices: one per rank of a sequence-parallel group, and each of
    those into train.mlp_tiles tiles."""
    sp, tiles = cfg.scale.sequence_parallel_size, max(cfg.train.mlp_tiles, 1)
    if sp * tiles == 1:
        return
    seq_lens = [("data.path", manifest.seq_len)]
    if eval_manifest is not None:
        seq_lens.append(("eval.path", eval_manifest.seq_len))
    for where, seq_len in seq_lens:
        if seq_len % (sp * tiles):
            raise ConfigError(
                f"{where}: seq_len {seq_len} does not split into {sp * tiles} equal "
                f"slices (scale.sequence_parallel_size={sp} x train.mlp_tiles="
                f"{tiles}); prepare it with a --seq-len that is a multiple of "
                f"{sp * tiles}"
            )


def check_resume(
    cfg: Config, manifest: Manifest, run: ResolvedRun
) -> tuple[dict[str, Any], list[tuple[str, Any, Any]]]:
    """The run's identity, and how it differs from the checkpoint it would resume (empty: the
    same run, or nothing to resume). A difference is an error unless checkpoint.resume=force."""
    ident = run_identity(
        run, data_id=data_fingerprint(manifest), tokenizer_id=manifest.tokenizer.fingerprint
    )
    resuming = cfg.checkpoint.resume != "never"
    latest = latest_checkpoint(cfg.run_dir / "checkpoints") if resuming else None
    if latest is None:
        return ident, []
    state = read_state(latest)
    check_expert_layout(state, cfg, world=run.world, checkpoint=latest)
    if "identity" not in state:  # written before checkpoints recorded it: data and LoRA
        _check_resume_data(cfg, manifest, state, latest)
        return ident, []
    changes = identity_changes(state["identity"], ident)
    if changes and cfg.checkpoint.resume != "force":
        raise ConfigError(describe_changes(changes, checkpoint=str(latest)))
    return ident, changes


def _check_resume_data(cfg: Config, manifest: Manifest, state: dict, latest: Path) -> None:
    """A run that will resume must read the rows its checkpoint's stream positions refer to."""
    if state["data_fingerprint"] != data_fingerprint(manifest):
        raise ConfigError(
            f"data.path: checkpoint {latest} was trained on other data than {cfg.data.path}; "
            "point data.path at the same prepared directory or start a new run (logging.run_name)"
        )
    lora = lora_state(cfg)
    if state.get("lora") != lora:
        raise ConfigError(
            f"model.lora: checkpoint {latest} was trained with model.lora={state.get('lora')}, "
            f"this run asks for {lora}; set it back or start a new run (logging.run_name)"
        )


def _check_eval_set(ev: Manifest, manifest: Manifest, positions: int) -> None:
    if ev.tokenizer.fingerprint != manifest.tokenizer.fingerprint:
        raise ConfigError(
            "eval.path was prepared with another tokenizer or chat template than data.path; "
            "prepare both with the same --tokenizer and --chat-template"
        )
    if ev.seq_len > positions:
        raise ConfigError(
            f"eval.path: seq_len {ev.seq_len} exceeds the model's max_position_embeddings {positions}"
        )


def _check_async_io(where: str) -> None:
    """NVMe offload swaps through DeepSpeed's async I/O op, which links libaio."""

    if not op_available("AsyncIOBuilder"):
        raise ConfigError(
            f"{where}: NVMe offload needs DeepSpeed's async I/O op, which needs libaio on every "
            "node: apt-get install libaio-dev (Debian, Ubuntu) or dnf install libaio-devel (the "
            "op is then built on first use); or choose a template without nvme"
        )


def _check_zero_options(ds: dict, cfg: Config) -> None:
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    where = f"deepspeed.template={cfg.deepspeed.template}"
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage {stage} is not 0-3")
    if "offload_param" in zero and stage != 3:
        raise ConfigError(
            f"{where}: offload_param needs ZeRO stage 3 (got {stage}); use zero3_offload_params"
        )
    if "offload_optimizer" in zero and stage == 0:
        raise ConfigError(f"{where}: offload_optimizer needs ZeRO stage 1-3")
    for key in ("offload_param", "offload_optimizer"):
        device = zero.get(key, {}).get("device", "cpu")
        if device not in ("cpu", "none", "nvme"):
            raise ConfigError(
                f"{where}: zero_optimization.{key}.device {device!r} is not cpu, nvme or none"
            )
        if device == "nvme" and not zero[key].get("nvme_path"):
            raise ConfigError(
                f"{where}: zero_optimization.{key}.device is nvme but no nvme_path is set; "
                "set deepspeed.nvme_path=<a directory on a fast local disk of every node>"
            )
    if any(zero.get(k, {}).get("device") == "nvme" for k in ("offload_param", "offload_optimizer")):
        _check_async_io(where)
    ep = cfg.scale.expert_parallel_size
    offload = any(zero.get(k, {}).get("device", "none") != "none" for k in zero if "offload" in k)
    if ep > 1 and (stage != 3 or offload):
        raise ConfigError(
            f"scale.expert_parallel_size={ep} with {where}: expert parallelism runs under ZeRO-3 "
            "without offload in sftscale (zero3); use that template or "
            "scale.expert_parallel_size=1"
        )
