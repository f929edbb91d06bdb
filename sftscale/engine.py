"""DeepSpeed lives here: the process group, the precision every rank agrees on, and the engine.

    rank, world = init_distributed()
    precision = choose_precision(cfg.deepspeed.precision, world=world)      # collective
    built = build_engine(cfg, ds_config=..., dtype=precision.dtype, ...)    # ZeRO-3 load + initialize

Model code (sftscale.model) stays free of distributed code: ZeRO-3 partitioning is applied from
here, by keeping a HfDeepSpeedConfig alive while transformers builds or loads the model, so
every parameter is created inside deepspeed.zero.Init and each rank holds only its partition.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from sftscale.config import Config
from sftscale.ds_config import zero_stage
from sftscale.flops import ModelShape
from sftscale.model import (
    enable_gradient_checkpointing,
    fill_new_rows,
    grow_vocabulary,
    load_model,
    model_vocab_size,
    set_special_token_ids,
)
from sftscale.moe import (
    RouterTap,
    autoep_compatible_transformers,
    mark_zero3_leaves,
    routing_of,
)
from sftscale.optim import param_groups
from sftscale.precision import Precision, agree, choose, device_native_bf16


def init_distributed(*, timeout_s: int = 1800) -> tuple[int, int]:
    """Join the process group (Ray Train has already created it, with its TorchConfig timeout;
    local mode creates it here). A collective waiting longer than `timeout_s` raises."""
    # heavy (deepspeed): loaded only on the path that uses it
    import deepspeed

    if torch.cuda.is_available():
        # Before any CUDA allocation (zero.Init places partitions on the current device): one
        # GPU per rank. A launcher that shows each rank only its own GPU gets device 0.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    with _without_shm_comm_op():
        _join(deepspeed, dist, timeout_s)
    return dist.get_rank(), dist.get_world_size()


@contextlib.contextmanager
def _without_shm_comm_op():
    """DeepSpeed's CPU accelerator JIT-builds its shared-memory comm op when it joins the
    process group (~1 min on 2 cores). The op serves only `inference_all_reduce` (tensor-parallel
    inference kernels); training's collectives (ZeRO gathers, reduce-scatters, all-reduces) go
    through torch.distributed over gloo either way. So training skips it, as DeepSpeed itself
    does where the op is not compatible (build_shm_op returns None)."""

    # by module path: the package's attribute `deepspeed.comm.torch` is torch itself
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    build = ds_torch_comm.build_shm_op
    ds_torch_comm.build_shm_op = lambda: None
    try:
        yield
    finally:
        ds_torch_comm.build_shm_op = build


def _join(deepspeed, dist, timeout_s: int) -> None:
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if torch.cuda.is_available() else "gloo",
            timeout=timedelta(seconds=timeout_s),
        )
    else:
        deepspeed.init_distributed()  # wraps the existing group


def choose_precision(requested: str, *, world: int) -> Precision:
    """`deepspeed.precision` resolved on this device, the same on every rank. Collective."""

    native, why = device_native_bf16(cuda=torch.cuda.is_available())
    chosen = choose(requested, native_bf16=native, why=why)
    if world > 1:
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        flag = torch.tensor([float(native)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # collective: bf16 only if every rank has it
        chosen = agree(chosen, native_everywhere=bool(flag.item()))
    return chosen


@dataclass
class Built:
    engine: Any  # deepspeed.DeepSpeedEngine
    optimizer: Any
    shape: ModelShape
    vocab_grown: bool = False  # rows added for the tokenizer's added tokens
    router: RouterTap | None = None  # a mixture of experts' routers (sftscale.moe)
    hf_names: dict[int, str] | None = None  # id(parameter) -> its name before AutoEP


def build_engine(
    cfg: Config,
    *,
    ds_config: dict[str, Any],
    dtype: torch.dtype,
    tokenizer: Any,
    eos_ids: list[int],
    pad_id: int | None,
    log: Callable[[str], None],
) -> Built:
    """Load the model partitioned (ZeRO-3) or whole, fit its vocabulary to the tokenizer, and
    wrap it in a DeepSpeed engine. Collective."""
    # heavy (deepspeed): loaded only on the path that uses it
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    # While this object lives, transformers builds/loads the model inside deepspeed.zero.Init:
    # each rank materializes only its partition of every parameter.
    hf_ds = HfDeepSpeedConfig(ds_config) if zero_stage(ds_config) == 3 else None
    model = load_model(
        cfg.model.name_or_path,
        vocab_size=len(tokenizer),
        dtype=dtype,
        attn_implementation=cfg.model.attn_implementation,
    )
    old_rows = model_vocab_size(model)
    if old_rows < len(tokenizer):  # tokens prepare added (template markers)
        weights = grow_vocabulary(model, len(tokenizer))
        # Collective under ZeRO-3: gathers the partitions; rank 0's rows are kept.
        gathered = (
            deepspeed.zero.GatheredParameters(weights, modifier_rank=0)
            if hf_ds is not None
            else contextlib.nullcontext()
        )
        with gathered:
            fill_new_rows(weights, old_rows=old_rows)
        log(
            f"model vocabulary grown from {old_rows} to {len(tokenizer)} tokens for the "
            "tokenizer's added tokens (new rows: the mean of the old ones)"
        )
    set_special_token_ids(model, bos=tokenizer.bos_token_id, eos=eos_ids, pad=pad_id)
    sp = cfg.scale.sequence_parallel_size
    if sp > 1:  # Ulysses: attention over all positions for 1/sp of the heads (collective)
        from sftscale.sequence_parallel import apply_ulysses, sequence_parallel_group

        name = apply_ulysses(
            model,
            group=sequence_parallel_group(sp),
            attn_implementation=cfg.model.attn_implementation,
        )
        log(f"sequence parallel: groups of {sp} ranks split every row; attention {name}")
    elif cfg.model.attn_implementation == "sdpa":  # packed rows: one sdpa call per document
        from sftscale.sequence_parallel import apply_document_attention, sliding_window

        if sliding_window(model.config) is None:  # else transformers' mask keeps the window
            apply_document_attention(model)
    if cfg.train.mlp_tiles > 1:
        from sftscale.sequence_parallel import tile_mlp

        n = tile_mlp(model, cfg.train.mlp_tiles)
        if n == 0:
            raise ValueError(
                f"train.mlp_tiles: {cfg.model.name_or_path} has no gated MLP (gate_proj, "
                "up_proj, down_proj) to tile; set train.mlp_tiles=0"
            )
        log(f"tiled MLP: {n} MLPs compute {cfg.train.mlp_tiles} slices of the sequence at a time")
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.model.lora is not None:  # adapters whole on every rank; initialize partitions them
        from sftscale.lora import add_adapters, describe

        model = add_adapters(model, cfg.model.lora, seed=cfg.train.seed)
        log(describe(model, cfg.model.lora))
    shape = ModelShape.of(model)
    router = prepare_experts(model, shape, cfg, log) if shape.experts else None
    autoep = "expert_parallel" in ds_config
    hf_names = {id(p): n for n, p in model.named_parameters()} if autoep else None
    with autoep_compatible_transformers() if autoep else contextlib.nullcontext():
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, cfg.optim.weight_decay),
            config=ds_config,
        )
    if router is not None:  # after initialize: AutoEP replaces the MoE blocks there
        router.attach(engine.module)
    del hf_ds
    make_adam_resumable(optimizer)  # DeepSpeed's CPU Adam kernels: bitwise-exact resume
    return Built(
        engine=engine,
        optimizer=optimizer,
        shape=shape,
        vocab_grown=old_rows < len(tokenizer),
        router=router,
        hf_names=hf_names,
    )


def prepare_experts(
    model: torch.nn.Module, shape: ModelShape, cfg: Config, log: Callable[[str], None]
) -> RouterTap:
    """Before initialize (ZeRO-3 registers its hooks there): the MoE blocks become ZeRO-3
    leaf modules; returns the router tap to attach once the engine exists."""
    router = RouterTap(routing_of(model.config, cfg.model.router_aux_loss_coef))
    blocks = mark_zero3_leaves(model)
    ep = cfg.scale.expert_parallel_size
    layout = (
        f"expert parallel: groups of {ep} ranks, {shape.experts // ep} experts each"
        if ep > 1
        else f"ZeRO-3 leaf modules: {', '.join(blocks)}"
    )
    log(
        f"mixture of experts: {shape.experts} experts, top {shape.top_k}, "
        f"{shape.active_matmul_params / 1e6:.1f}M of {shape.matmul_params / 1e6:.1f}M matmul "
        f"params per token; balance loss x {router.routing.coef:g}; {layout}"
    )
    return router


def make_adam_resumable(optimizer) -> None:
    """Make DeepSpeed's CPU Adam kernels resume bitwise (a no-op for other optimizers).

    DeepSpeedCPUAdam (optimizer offload) and FusedAdam under the CPU accelerator keep beta1^t and
    beta2^t between steps and advance them by one multiplication per step, but compute them with
    pow() when the step number does not follow the previous one -- as the first step after a
    resume does. The two differ in the last bit, so a resumed run would drift from an
    uninterrupted one. Before every step this resets the kernel's cache to step 0, so that every
    step takes the pow() path and its update is a function of the saved step number alone.
    """
    # heavy (deepspeed): loaded only on the path that uses it
    import deepspeed
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    basic = getattr(optimizer, "optimizer", optimizer)  # the ZeRO wrapper holds the torch optimizer
    empty = torch.empty(0)
    if isinstance(basic, DeepSpeedCPUAdam):

        def reset(opt, *_):
            g = opt.param_groups[0]
            opt.ds_opt_adam.adam_update(
                opt.opt_id,
                0,
                g["lr"],
                *g["betas"],
                g["eps"],
                g["weight_decay"],
                g["bias_correction"],
                empty,
                empty,
                empty,
                empty,
            )

    elif isinstance(basic, FusedAdam) and deepspeed.get_accelerator().device_name() == "cpu":
        from deepspeed.ops.adam.multi_tensor_apply import MultiTensorApply

        def reset(opt, *_):
            g = opt.param_groups[0]
            MultiTensorApply(1)(
                opt.multi_tensor_adam,
                opt._dummy_overflow_buf,
                [[empty]] * 4,
                g["lr"],
                *g["betas"],
                g["eps"],
                0,
                int(opt.adam_w_mode),
                int(g["bias_correction"]),
                g["weight_decay"],
            )

    else:
        return
    basic.register_step_pre_hook(reset)
