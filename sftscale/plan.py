"""Will this run fit? Memory per rank, broken down, before any worker starts.

    sftscale plan configs/tiny-cpu.yaml model.name_or_path=llama-3.1-8b --devices 8xH100
    plan = plan_memory(shape, cfg, ds_config, world=8, seq_len=4096, device=GPUS["h100"])

A pure function of (model shape, training config, resolved ZeRO template, world size, row
length, device); sftscale.resolve calls it for every run, sftscale.fit searches the changes
that make a run fit. Model states follow DeepSpeed's accounting (bytes per parameter, partitioned by
the ZeRO stage, placed where the template offloads them); on top of that, what DeepSpeed's
estimator (`estimate_zero3_model_states_mem_needs_all_live`) leaves out: the reduce bucket, the
weights ZeRO-3 keeps gathered, the NVMe swap buffers, the optimizer step's fp32 gradient copy,
activations with and without gradient checkpointing, the logits and the loss's chunk, and the
runtime's own memory. Each term was checked against tensors counted on a running ZeRO-3 engine
(benchmarks/plan_validation.py); the validation table is benchmarks/results/plan_validation.md.
Mixtures of experts add the routers' scores, the experts' inputs and, with expert parallelism
(scale.expert_parallel_size), the all-to-all buffers, and gather 1/e of a layer's experts; these
MoE terms are counted from the code (transformers, sftscale.moe, AutoEP), not yet measured
(benchmarks/results/moe_plan.md).

Each line is (what, bytes, where, phase): where is "device" (GPU memory; on a CPU host the
process's memory), "host" (CPU RAM per rank) or "nvme" (disk); phase is "held" (all run long),
"fwd/bwd" (forward and backward) or "step" (the optimizer step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sftscale.config import Config, ConfigError
from sftscale.devices import GIB, Device
from sftscale.shape import ModelShape


@dataclass
class Plan:
    device: Device
    world: int
    lines: list[tuple[str, int, str, str]] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)
    gathered_bytes: int = 0  # ZeRO-3's gathered weights
    # Freed and still resident. A CPU host with glibc's dynamic mmap threshold: it rises to
    # 32 MiB, so ZeRO-3's gathers (an allocation a parameter) land in glibc's heap and stay
    # there when freed, fragmented: the heap's free bytes (mallinfo2) measured 1.1-2.5x the
    # gathered weights at llama-100m and 544M, 0.6-0.8x at 1.24B (2 ranks). The plan counts
    # them once, as it did before the threshold was pinned (then 0.86-1.02 of measured); not
    # validated since: the default pins it.
    kept_bytes: int = 0

    def add(self, what: str, nbytes: float, *, where: str = "device", phase: str = "held") -> None:
        if nbytes > 0:
            self.lines.append((what, int(nbytes), where, phase))

    def _on_device(self, where: str) -> bool:
        return where == "device" or (where == "host" and self.device.kind == "cpu")

    def phase_bytes(self, phase: str) -> int:
        return sum(b for _, b, w, p in self.lines if p == phase and self._on_device(w))

    @property
    def peak_bytes(self) -> int:
        """What must fit in the device's memory per rank (on a CPU host, host lines too): the
        held memory and the larger phase (the GPU's caching allocator, and on a CPU host glibc
        with its mmap threshold pinned, hand what forward and backward freed to the step),
        and what glibc keeps resident on a CPU host otherwise."""
        held = self.phase_bytes("held")
        fwd, step = self.phase_bytes("fwd/bwd"), self.phase_bytes("step")
        return held + max(fwd, step) + self.kept_bytes

    def total(self, where: str) -> int:
        return sum(b for _, b, w, _ in self.lines if w == where)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.device.memory_bytes

    def advice(self) -> str:
        if self.fixes:
            return "to make it fit (cheapest first): " + "; ".join(self.fixes)
        # only what lives in the memory that is short: not NVMe, not a GPU run's host RAM
        short = [line for line in self.lines if self._on_device(line[2])]
        largest = sorted(short, key=lambda line: -line[1])[:3]
        return (
            "no change sftscale tries (tiling, checkpointing, micro-batch, precision, ZeRO "
            "templates, up to 8x the ranks, alone or in pairs) makes it fit; the largest parts: "
            + ", ".join(f"{w} {b / GIB:.1f} GiB" for w, b, _, _ in largest)
        )

    def table(self) -> str:
        rows = [f"{'per rank':<72} {'GiB':>7}  {'where':<6} phase"]
        rows += [
            f"{what:<72} {b / GIB:>7.2f}  {where:<6} {phase}"
            for what, b, where, phase in self.lines
        ]
        if self.kept_bytes:
            what = "freed gathers glibc keeps resident (train.cpu_mmap_threshold=0)"
            rows.append(f"{what:<72} {self.kept_bytes / GIB:>7.2f}  {'device':<6} held")
        how = "held + max(fwd/bwd, step)" + (" + kept by glibc" if self.kept_bytes else "")
        rows.append(f"{'peak per rank (' + how + ')':<72} {self.peak_bytes / GIB:>7.2f}")
        if self.device.kind == "gpu" and self.total("host"):
            rows.append(f"{'host RAM per rank':<72} {self.total('host') / GIB:>7.2f}")
        if self.total("nvme"):
            rows.append(f"{'on NVMe per rank':<72} {self.total('nvme') / GIB:>7.2f}")
        verdict = "fits" if self.fits else "does NOT fit"
        rows.append(
            f"{self.world} x {self.device.name}: {self.device.memory_bytes / GIB:.1f} GiB "
            f"per rank: {verdict}"
        )
        if not self.fits:
            rows.append(self.advice())
        return "\n".join(rows)


# glibc's heap on a CPU host with the mmap threshold pinned (train.cpu_mmap_threshold), 2 ranks
# or more: tensors below the threshold (each document's q, k and v under per-document attention,
# a short row's hidden states, small weights' gathered partitions) are carved from the heap and
# freed in another order than they were made, and the holes between those still live stay
# resident: the heap's free bytes (mallinfo2) reached 0.15-0.24 GiB at llama-100m and at a
# hidden-1024 Llama on 512-token rows, unevenly between the ranks of one run, and stayed
# near 0.02 GiB on 1 rank. Not derived: fitted per decoder layer to the runs of six Llama
# shapes that no validation row uses (benchmarks/results/plan_validation.md, "Fit set"), and
# validated on the other rows there. Per unit of attention width (q + 2 kv): the fit set's
# largest need, 18,030 B, rounded up. At most a cap a layer: wider layers' tensors pass the
# threshold and leave no holes (1.24B: none measured); 24 MiB, above the fit set's largest
# need a layer (20.8 MB) and the 23.7 MiB one run of its hidden-1024 shape needed on this host.
HEAP_HOLES_PER_WIDTH = 18_048
HEAP_HOLES_CAP_PER_LAYER = 24 << 20


def heap_holes(s: ModelShape) -> int:
    """The fitted holes of glibc's heap on a CPU rank (see HEAP_HOLES_PER_WIDTH)."""
    return s.n_layers * min((s.q + 2 * s.kv) * HEAP_HOLES_PER_WIDTH, HEAP_HOLES_CAP_PER_LAYER)


def lora_params(s: ModelShape, r: int, targets: list[str]) -> int:
    """Adapter parameters: r x (in + out) per targeted Linear per layer."""
    h, i, q, kv = s.hidden, s.intermediate, s.q, s.kv
    shapes = {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }
    return s.n_layers * sum(r * sum(shapes[t]) for t in targets if t in shapes)


def saved_per_token_layer(s: ModelShape, b: int, mlp_tiles: int) -> float:
    """Bytes one decoder layer saves for backward per token (sdpa): the two norms' inputs and
    their fp32 statistics, q, k, v, the attention output, the residual, and the MLP's gate, up,
    activation and product (1/tiles of them with a tiled MLP). Checked against autograd's saved
    tensors (bf16, per token per layer): small-llama 11.1 vs 11.3 KB, llama-100m 36.9 vs
    37.2 KB, Llama-3.2-1B 108 vs 109 KB. A MoE layer's MLP is the token's top_k experts (and
    any shared one: `intermediate` counts them all); it also saves the router's probabilities
    (the softmax's output, experts x fp32) and the token's top_k copies as the experts take
    them (indexed out per expert, or permuted for a grouped GEMM)."""
    h, i = s.hidden, s.intermediate
    saved = (4 * h + 2 * s.q + 2 * s.kv + 4 * i / max(mlp_tiles, 1)) * b + 2 * h * 4
    if s.experts:
        saved += s.experts * 4 + s.top_k * h * b
    return saved


def expert_parallel(s: ModelShape, cfg: Config, z: dict[str, Any], *, world: int) -> int:
    """scale.expert_parallel_size, checked against the model, the ZeRO settings `z` and the
    world: each group of e consecutive ranks splits every MoE layer's experts, so e must divide
    both; the plan counts AutoEP under ZeRO-3 without offload (as sftscale runs it)."""
    e = cfg.scale.expert_parallel_size
    if e == 1:
        return e
    if not s.experts:
        raise ConfigError(
            f"scale.expert_parallel_size={e}: {cfg.model.name_or_path} has no experts to split "
            "(a dense model); use 1"
        )
    offload = [z.get(k, {}).get("device") for k in ("offload_optimizer", "offload_param")]
    if int(z.get("stage", 0)) != 3 or {"cpu", "nvme"} & set(offload):
        raise ConfigError(
            f"scale.expert_parallel_size={e} with deepspeed.template={cfg.deepspeed.template}: "
            "expert parallelism runs under ZeRO-3 without offload (zero3); use that or 1"
        )
    if world % e or s.experts % e:
        sizes = [d for d in range(1, world + 1) if world % d == 0 and s.experts % d == 0]
        raise ConfigError(
            f"scale.expert_parallel_size={e}: {world} ranks and {s.experts} experts must both "
            f"split into groups of it; sizes that divide both: {', '.join(map(str, sizes))}"
        )
    return e


def plan_memory(
    s: ModelShape,
    cfg: Config,
    ds: dict[str, Any],
    *,
    world: int,
    seq_len: int,
    device: Device,
    lengths: int = 1,
    documents: int = 1,
) -> Plan:
    """Memory per rank of training a model of shape `s` with `cfg` and the resolved DeepSpeed
    config `ds` on `world` ranks of `device`, rows of `seq_len` positions, micro-batches of
    `lengths` lengths and documents of `documents` padded lengths (sftscale.lengths)."""
    p = s.total_params
    z = ds.get("zero_optimization", {})
    stage = int(z.get("stage", 0))
    mixed = bool(ds.get("bf16", {}).get("enabled"))
    b = 2 if mixed else 4  # bytes of a weight, gradient and activation element
    w_shard, g_shard, o_shard = (world if stage >= k else 1 for k in (3, 2, 1))
    where = {"cpu": "host", "nvme": "nvme"}
    opt_at = where.get(z.get("offload_optimizer", {}).get("device"), "device")
    par_at = where.get(z.get("offload_param", {}).get("device"), "device")
    lora = cfg.model.lora
    trained = lora_params(s, lora.r, lora.target_modules) if lora is not None else p
    ep = expert_parallel(s, cfg, z, world=world)
    plan, dynamic_mmap = Plan(device=device, world=world), cfg.train.cpu_mmap_threshold == 0

    # Model states (DeepSpeed's accounting: counted on the engine, 16 B per trained parameter
    # in bf16 before partitioning, 2 + 2 + 4 + 8)
    plan.add(
        f"weights, {'bf16' if mixed else 'fp32'} (1/{w_shard} of {p / 1e6:,.1f}M)",
        b * p / w_shard,
        where=par_at,
    )
    plan.add(f"gradients (1/{g_shard})", b * trained / g_shard, where="device")
    if mixed or stage >= 1:  # ZeRO steps an fp32 copy even when the weights are fp32
        plan.add(f"fp32 master weights (1/{o_shard})", 4 * trained / o_shard, where=opt_at)
    plan.add(f"AdamW moments, fp32 (1/{o_shard})", 8 * trained / o_shard, where=opt_at)
    # An optimizer in host RAM steps on an fp32 gradient buffer of its own (counted on the
    # engine: 4 B per partition element, held); one on NVMe casts each reduced bucket's
    # gradients to fp32 to swap them out (stage3.py `_offload_grad_partition_at_boundary`)
    if opt_at == "host":
        plan.add(
            f"fp32 gradient buffer of the offloaded optimizer (1/{o_shard})",
            4 * trained / o_shard,
            where="host",
        )
    elif opt_at == "nvme":
        plan.add(
            "a reduce bucket's gradients in fp32, to swap out",
            int(z.get("reduce_bucket_size", 5e8)) * 4,
            where="host",
            phase="fwd/bwd",
        )
    group = min(int(z.get("sub_group_size", 10**9)), trained // o_shard)
    if stage == 3:  # a parameter larger than a sub-group is a sub-group of its own
        group = max(group, (s.embed if lora is None else 0) // o_shard)
    if opt_at == "nvme":
        plan.add(
            f"fp32 gradients, swapped out beside them (1/{o_shard})",
            4 * trained / o_shard,
            where="nvme",
        )
        # every sub-group's fp32 weights, moments and gradient pass through these buffers
        count = int(z["offload_optimizer"].get("buffer_count", 4))
        plan.add(
            f"NVMe swap buffers ({count} x the largest sub-group, fp32)",
            count * group * 4,
            where="host",
        )
        # the fp32 gradient of the sub-group swapped in for its step, in one buffer sized for
        # the largest and held all run (stage3.py `initialize_optimizer_states`)
        plan.add("fp32 gradient buffer of a swapped-in sub-group", group * 4, where="host")
    if par_at == "nvme":
        _nvme_weights(plan, z["offload_param"], trained // w_shard, group * w_shard, b=b)
    if stage >= 2:
        # DeepSpeed allocates the bucket whole; on a CPU only the pages gradients are written to
        # become resident, and one reduction writes at most the trained parameters' gradients
        bucket = int(z.get("reduce_bucket_size", 5e8))
        filled = min(bucket, trained) if device.kind == "cpu" else bucket
        plan.add("reduce bucket (reduce_bucket_size)", b * filled)
        if stage == 3 and world > 1:
            # the reduce-scatter interleaves a bucket's gradients into one flat copy
            # (coalesced_collectives.py `reduce_scatter_coalesced`); the rank's partitions are
            # views of it, so the last bucket's copy is still referenced at the optimizer step
            # (llama-100m, 2 ranks: 79 MiB of a 95 MiB bucket, found at the step)
            plan.add("the reduce-scatter's copy of a bucket", b * filled)

    _forward_backward(plan, s, cfg, z, seq_len=seq_len, b=b, stage=stage, ep=ep)

    if opt_at == "device" and mixed:
        _optimizer_step(plan, stage, group=group, b=b, partition=trained / o_shard, o_shard=o_shard)
    _runtime(plan, s, device, dynamic_mmap=dynamic_mmap, lengths=(lengths, documents))
    return plan


def _optimizer_step(
    plan: Plan, stage: int, *, group: int, b: int, partition: float, o_shard: int
) -> None:
    """The optimizer step on the device in mixed precision, one sub-group at a time: stage 3
    flattens the partition's gradients (b) and casts them to fp32 (4), stage3.py
    `_prepare_fp32_grad_for_sub_group`; stages 1 and 2 keep one fp32 flat of the partition
    (stage_1_and_2.py). An offloaded optimizer steps on its own fp32 buffer instead."""
    if stage == 3:
        plan.add(
            "optimizer step: the largest sub-group's gradient flattened + fp32",
            group * (b + 4),
            phase="step",
        )
    elif stage in (1, 2):
        plan.add(
            f"optimizer step: the gradient partition in fp32 (1/{o_shard})",
            4 * partition,
            phase="step",
        )


def _runtime(
    plan: Plan, s: ModelShape, device: Device, *, dynamic_mmap: bool, lengths: tuple[int, int]
) -> None:
    """What a rank holds besides the tensors: the device's runtime and, on a CPU host, the
    kernels of each further micro-batch and document length (`lengths`) and what glibc keeps
    resident."""
    what = f"interpreter, libraries, gloo, oneDNN: {device.runtime_source}"
    what = "CUDA context, NCCL, allocator slack" if device.kind == "gpu" else what
    plan.add(f"runtime ({what})", device.runtime_bytes)
    if device.kind != "cpu":
        return
    # the runtime's measurement met one length of each; the CPU keeps kernels per shape
    batches, documents = lengths
    if batches > 1:
        plan.add(
            f"kernels for {batches - 1} more micro-batch lengths ({device.runtime_source})",
            (batches - 1) * device.length_kernel_bytes,
        )
    if documents > 1:
        plan.add(
            f"attention kernels for {documents - 1} more document lengths "
            f"({device.runtime_source})",
            (documents - 1) * device.doc_kernel_bytes,
        )
    if dynamic_mmap:  # glibc's dynamic mmap threshold keeps freed gathers resident
        plan.kept_bytes = plan.gathered_bytes
    elif plan.world > 1:
        plan.add(
            f"glibc's heap: holes between small tensors ({s.n_layers} layers, fitted)",
            heap_holes(s),
        )


def _nvme_weights(
    plan: Plan, offload: dict[str, Any], partition: int, whole_group: int, *, b: int
) -> None:
    """Host RAM of weights offloaded to NVMe: the swap buffers, the part of a rank's
    `partition` (elements) that DeepSpeed keeps in RAM instead of swapping, and for the rest
    a buffer of the largest sub-group's weights whole (`whole_group` elements)."""
    buffer = int(offload.get("buffer_size", 10**8))
    count = int(offload.get("buffer_count", 5))
    plan.add(
        f"NVMe weight buffers ({count} x {buffer:,} elements)", count * buffer * b, where="host"
    )
    # DeepSpeed keeps up to offload_param.max_in_cpu elements of a rank's partition in a flat
    # host buffer, swapping only the rest (stage3.py `_create_param_groups_fp16_flat_cpu_memory`);
    # the templates' 1e9 keep a whole partition below 1e9 in RAM (1.24B fp32 on 2 ranks: 2.3 GiB
    # per rank)
    max_in_cpu = int(offload.get("max_in_cpu", 10**9))
    plan.add(
        f"weights kept in host RAM (offload_param.max_in_cpu {max_in_cpu:.0e})",
        min(max_in_cpu, partition) * b,
        where="host",
    )
    # What does not stay in RAM is swapped out after each step through one pinned buffer sized
    # for the largest sub-group's weights whole, not partitioned: stage3.py
    # `_create_fp16_partitions_with_defragmentation` -> `reserve_partitioned_swap_space(ds_numel)`
    if max_in_cpu < partition:
        plan.add(
            "pinned buffer to swap updated weights out (the largest sub-group, whole)",
            whole_group * b,
            where="host",
        )


def _forward_backward(
    plan: Plan,
    s: ModelShape,
    cfg: Config,
    z: dict[str, Any],
    *,
    seq_len: int,
    b: int,
    stage: int,
    ep: int,
) -> None:
    """The forward/backward lines: gathered weights, activations, one layer's backward or the
    logits and the loss (`b` bytes an element); a MoE's router scores and all-to-all (`ep`:
    the expert-parallel size)."""
    if stage == 3:
        # DeepSpeed keeps gathered weights live up to stage3_max_live_parameters while they
        # will be used again within stage3_max_reuse_distance: the templates' 1e9 keep a model
        # below 1e9 parameters gathered whole from the first forward to the end of backward.
        # A parameter is gathered whole, and a MoE block at once (ZeRO-3 leaf module): the
        # largest layer with all its experts, or with expert parallelism its 1/ep of them.
        # Below the model's size the bound is crossed by the weights fetched ahead of use (up
        # to stage3_prefetch_bucket_size), which are gathered before the used ones are released.
        live = int(z.get("stage3_max_live_parameters", 10**9))
        p, layer = s.gathered(ep)
        ahead = int(z.get("stage3_prefetch_bucket_size", 5 * 10**7)) if p > live else 0
        plan.gathered_bytes = b * max(min(p, live + ahead), s.embed, layer)
        plan.add(
            f"gathered weights (up to stage3_max_live_parameters {live:.0e}"
            + (f" + prefetch {ahead:.0e}" if ahead else "")
            + (f"; experts 1/{ep})" if ep > 1 else ")"),
            plan.gathered_bytes,
            phase="fwd/bwd",
        )
    if stage >= 2 and cfg.model.lora is None:
        # autograd writes a weight's gradient whole before ZeRO's hook reduces it into the
        # bucket and frees it: the LM head's (or the tied embedding's) at the start of backward,
        # or a MoE layer's fused experts (1/ep of them with expert parallelism)
        plan.add(
            "the largest weight's gradient, whole, before it is reduced",
            b * s.largest_weight_of_rank(ep),
            phase="fwd/bwd",
        )
    tokens = cfg.train.micro_batch_size * seq_len // cfg.scale.sequence_parallel_size
    n, h, v = s.n_layers, s.hidden, s.vocab
    per_layer = saved_per_token_layer(s, b, cfg.train.mlp_tiles)
    # DeepSpeed's TiledMLP keeps whole-row tensors of the hidden size beside its slices: its
    # input (saved), the output concatenated from the slices, the incoming gradient and the
    # input's gradient filled slice by slice (ulysses_sp.py `TiledMLP`), with copies: 7 a token
    # by census (small-llama, bf16, 16k-32k positions: 3.7 KB a token, 7 x 256 x 2 = 3.6)
    tiled_mlp = 7 * h * b if cfg.train.mlp_tiles > 1 else 0
    if cfg.model.gradient_checkpointing:
        plan.add(
            f"activations: {n} checkpointed layer inputs ({tokens} tokens)",
            n * tokens * h * b,
            phase="fwd/bwd",
        )
        # one layer recomputed, and its gradients
        layer_phase = tokens * (2 * per_layer + tiled_mlp)
    else:
        plan.add(
            f"activations: {n} layers' saved tensors ({tokens} tokens)",
            n * tokens * per_layer,
            phase="fwd/bwd",
        )
        layer_phase = tokens * (per_layer + tiled_mlp)
    if s.experts:
        _experts(plan, s, tokens=tokens, b=b, ep=ep)
    chunk = min(cfg.train.loss_chunk_tokens or tokens, tokens)
    # a chunk's fp32 work: the logits cast to fp32 (none when they are fp32 already: `.float()`
    # returns them), their log-softmax and its gradient
    fp32_chunk = (2 if b == 4 else 3) * chunk * v * 4
    # tiled: one tile's; else the logits, their gradient and a chunk's
    loss_phase = fp32_chunk if cfg.train.tiled_logits else 2 * tokens * v * b + fp32_chunk
    plan.add(
        "the larger of: one layer's backward, the logits and the loss",
        max(layer_phase, loss_phase),
        phase="fwd/bwd",
    )


def _experts(plan: Plan, s: ModelShape, *, tokens: int, b: int, ep: int) -> None:
    """A MoE's lines beside the layers' own: the routers' scores the balance loss keeps, and
    with expert parallelism one MoE layer's all-to-all buffers."""
    # sftscale.moe's balance loss takes every MoE layer's router logits after the forward and
    # keeps their softmax (fp32) for backward, outside the checkpointed layers (DeepSeek-V3's
    # normalized sigmoid keeps about twice that)
    plan.add(
        f"router scores of {s.moe_layers} MoE layers for the balance loss (fp32)",
        s.moe_layers * tokens * s.experts * 4,
        phase="fwd/bwd",
    )
    if ep > 1:
        # AutoEP, one MoE layer at a time: the tokens sent to their experts' ranks (dispatch),
        # the experts' outputs sent back (combine), and the received tokens permuted by expert
        # for the grouped GEMM, each tokens x top_k rows of the hidden size (balanced routing:
        # a rank receives as many rows as it sends; an overloaded rank receives more)
        plan.add(
            f"expert parallel all-to-all: dispatch, combine, permuted ({tokens} x top {s.top_k})",
            3 * tokens * s.top_k * s.hidden * b,
            phase="fwd/bwd",
        )
