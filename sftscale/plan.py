"""Will this run fit? Memory per rank, broken down, before any worker starts.

    sftscale plan configs/tiny-cpu.yaml model.name_or_path=llama-3.1-8b --devices 8xH100
    plan = plan_memory(mcfg, cfg, ds_config, world=8, seq_len=4096, device=DEVICES["h100"])

A pure function of (model config, training config, resolved ZeRO template, world size, row
length, device). Model states follow DeepSpeed's accounting (bytes per parameter, partitioned by
the ZeRO stage, placed where the template offloads them); on top of that, what DeepSpeed's
estimator (`estimate_zero3_model_states_mem_needs_all_live`) leaves out: the reduce bucket, the
weights ZeRO-3 keeps gathered, the NVMe swap buffers, the optimizer step's fp32 gradient copy,
activations with and without gradient checkpointing, the logits and the loss's chunk, and the
runtime's own memory. Each term was checked against tensors counted on a running ZeRO-3 engine
(benchmarks/plan_validation.py); the validation table is benchmarks/results/plan_validation.md.

Each line is (what, bytes, where, phase): where is "device" (GPU memory; on a CPU host the
process's memory), "host" (CPU RAM per rank) or "nvme" (disk); phase is "held" (all run long),
"fwd/bwd" (forward and backward) or "step" (the optimizer step).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 2**30


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int  # per rank
    kind: str  # gpu | cpu
    # What a training process holds besides tensors. GPU: the CUDA context, NCCL's buffers, the
    # caching allocator's slack. CPU: the interpreter and libraries (torch, transformers,
    # deepspeed, gloo, oneDNN's kernels), measured 0.45-0.5 GiB resident per rank here.
    runtime_bytes: int


GPUS = {
    d.name.lower(): d
    for d in (
        Device("H100", 80 * GIB, "gpu", int(2.5 * GIB)),
        Device("H200", 141 * GIB, "gpu", int(2.5 * GIB)),
        Device("A100", 80 * GIB, "gpu", int(2.5 * GIB)),
        Device("A100-40GB", 40 * GIB, "gpu", int(2.5 * GIB)),
        Device("L40S", 48 * GIB, "gpu", 2 * GIB),
        Device("A10G", 24 * GIB, "gpu", int(1.5 * GIB)),
    )
}
CPU_RUNTIME_BYTES = int(0.5 * GIB)


def host_memory_bytes() -> int:
    """This host's memory, or the cgroup's limit when it is lower (a container)."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            total = min(total, int(limit))
    except (OSError, ValueError):
        pass
    return total


def host_device(ranks: int, memory_bytes: int | None = None) -> Device:
    """This host as the device of `ranks` ranks: its memory shared between them."""
    memory = host_memory_bytes() if memory_bytes is None else memory_bytes
    return Device(
        f"CPU host ({memory / GIB:.1f} GiB for {ranks} ranks)",
        memory // ranks,
        "cpu",
        CPU_RUNTIME_BYTES,
    )


def cuda_device() -> Device:
    """The driver's GPU 0 (the workers' GPUs are assumed alike)."""
    import torch

    props = torch.cuda.get_device_properties(0)
    return Device(props.name, props.total_memory, "gpu", int(2.5 * GIB))


def parse_devices(text: str) -> tuple[int, Device]:
    """'8xH100' -> (8, H100); 'H100' -> (1, H100); '2xcpu' -> 2 ranks sharing this host."""
    m = re.fullmatch(r"(?:(\d+)\s*x\s*)?([A-Za-z0-9-]+)", text.strip())
    if not m or int(m.group(1) or 1) < 1:
        raise ValueError(f"--devices {text!r}: expected COUNTxNAME, e.g. 8xH100 or 2xcpu")
    count, name = int(m.group(1) or 1), m.group(2).lower()
    if name == "cpu":
        return count, host_device(count)
    if name not in GPUS:
        known = ", ".join(d.name for d in GPUS.values())
        raise ValueError(f"--devices {text!r}: unknown device {name!r}; one of {known} or cpu")
    return count, GPUS[name]


@dataclass
class Plan:
    device: Device
    world: int
    lines: list[tuple[str, int, str, str]] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)
    gathered_bytes: int = 0  # ZeRO-3's gathered weights (what glibc keeps on a CPU host)

    def add(self, what: str, nbytes: float, *, where: str = "device", phase: str = "held") -> None:
        if nbytes > 0:
            self.lines.append((what, int(nbytes), where, phase))

    def _on_device(self, where: str) -> bool:
        return where == "device" or (where == "host" and self.device.kind == "cpu")

    def phase_bytes(self, phase: str) -> int:
        return sum(b for _, b, w, p in self.lines if p == phase and self._on_device(w))

    @property
    def peak_bytes(self) -> int:
        """What must fit in the device's memory per rank (on a CPU host, host lines too).

        GPU: the held memory and the larger phase (the caching allocator reuses what forward
        and backward freed for the step). CPU: glibc keeps the memory of the weights ZeRO-3
        gathered and freed resident (many allocations of one parameter each, most below its
        mmap threshold), so the step comes on top of it: RSS after backward measured 0.4 GiB
        above the live tensors and the runtime at 96M parameters (gathered: 0.17 GiB), 1.5 GiB
        at 544M (1.0) and 1.1-1.5 GiB at 1.24B (1.9), 2 ranks; the plan adds the gathered
        weights once more."""
        held = self.phase_bytes("held")
        fwd, step = self.phase_bytes("fwd/bwd"), self.phase_bytes("step")
        kept = self.gathered_bytes if self.device.kind == "cpu" else 0
        return held + max(fwd, step) + kept

    def total(self, where: str) -> int:
        return sum(b for _, b, w, _ in self.lines if w == where)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.device.memory_bytes

    def advice(self) -> str:
        if self.fixes:
            return "to make it fit (cheapest first): " + "; ".join(self.fixes)
        largest = sorted(self.lines, key=lambda line: -line[1])[:3]
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
        how = "held + max(fwd/bwd, step)" + (
            " + gathered kept by glibc" if self.device.kind == "cpu" else ""
        )
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


def model_sizes(mcfg: Any) -> dict[str, int]:
    """Parameter counts of a Llama / Qwen2 / Mistral-shaped config."""
    t = mcfg.get_text_config() if hasattr(mcfg, "get_text_config") else mcfg
    h, i, n, v = t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.vocab_size
    head_dim = getattr(t, "head_dim", None) or h // t.num_attention_heads
    q, kv = t.num_attention_heads * head_dim, t.num_key_value_heads * head_dim
    bias = q + 2 * kv if getattr(t, "attention_bias", False) or t.model_type == "qwen2" else 0
    layer = 2 * h * q + 2 * h * kv + bias + 3 * h * i + 2 * h
    tied = bool(getattr(t, "tie_word_embeddings", False))
    return {
        "total": n * layer + v * h * (1 if tied else 2) + h,
        "layer": layer,
        "embed": v * h,
        "hidden": h,
        "intermediate": i,
        "layers": n,
        "vocab": v,
        "q": q,
        "kv": kv,
    }


def with_vocabulary(mcfg: Any, vocab_size: int) -> Any:
    """The model config as the run trains it: sftscale grows the embeddings to the tokenizer's
    added tokens (a model directory's config still has the old vocabulary)."""
    if vocab_size <= mcfg.vocab_size:
        return mcfg
    import copy

    grown = copy.deepcopy(mcfg)
    grown.vocab_size = vocab_size
    return grown


def largest_weight(mcfg: Any) -> int:
    """Elements of the largest weight: the embedding, or an MLP projection."""
    s = model_sizes(mcfg)
    return max(s["embed"], s["hidden"] * s["intermediate"])


def lora_params(s: dict[str, int], r: int, targets: list[str]) -> int:
    """Adapter parameters: r x (in + out) per targeted Linear per layer."""
    h, i, q, kv = s["hidden"], s["intermediate"], s["q"], s["kv"]
    shapes = {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }
    return s["layers"] * sum(r * sum(shapes[t]) for t in targets if t in shapes)


def saved_per_token_layer(s: dict[str, int], b: int, mlp_tiles: int) -> float:
    """Bytes one decoder layer saves for backward per token (sdpa): the two norms' inputs and
    their fp32 statistics, q, k, v, the attention output, the residual, and the MLP's gate, up,
    activation and product (1/tiles of them with a tiled MLP). Checked against autograd's saved
    tensors (bf16, per token per layer): small-llama 11.1 vs 11.3 KB, llama-100m 36.9 vs
    37.2 KB, Llama-3.2-1B 108 vs 109 KB."""
    h, i = s["hidden"], s["intermediate"]
    return (4 * h + 2 * s["q"] + 2 * s["kv"] + 4 * i / max(mlp_tiles, 1)) * b + 2 * h * 4


def plan_memory(
    mcfg: Any, cfg: Any, ds: dict[str, Any], *, world: int, seq_len: int, device: Device
) -> Plan:
    """Memory per rank of training `mcfg` with `cfg` and the resolved DeepSpeed config `ds` on
    `world` ranks of `device`, rows of `seq_len` positions."""
    s = model_sizes(mcfg)
    p = s["total"]
    z = ds.get("zero_optimization", {})
    stage = int(z.get("stage", 0))
    mixed = bool(ds.get("bf16", {}).get("enabled"))
    b = 2 if mixed else 4  # bytes of a weight, gradient and activation element
    w_shard = world if stage == 3 else 1
    g_shard = world if stage >= 2 else 1
    o_shard = world if stage >= 1 else 1
    where = {"cpu": "host", "nvme": "nvme"}
    opt_at = where.get(z.get("offload_optimizer", {}).get("device"), "device")
    par_at = where.get(z.get("offload_param", {}).get("device"), "device")
    lora = cfg.model.lora
    trained = lora_params(s, lora.r, lora.target_modules) if lora is not None else p
    plan = Plan(device=device, world=world)

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
        group = max(group, (s["embed"] if lora is None else 0) // o_shard)
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
    if par_at == "nvme":
        buffer = int(z["offload_param"].get("buffer_size", 10**8))
        count = int(z["offload_param"].get("buffer_count", 5))
        plan.add(
            f"NVMe weight buffers ({count} x {buffer:,} elements)", count * buffer * b, where="host"
        )
    if stage >= 2:
        plan.add("reduce bucket (reduce_bucket_size)", int(z.get("reduce_bucket_size", 5e8)) * b)

    # Forward and backward
    if stage == 3:
        # DeepSpeed keeps gathered weights live up to stage3_max_live_parameters while they
        # will be used again within stage3_max_reuse_distance: the templates' 1e9 keep a model
        # below 1e9 parameters gathered whole from the first forward to the end of backward.
        live = int(z.get("stage3_max_live_parameters", 10**9))
        largest = max(s["embed"], s["layer"])
        plan.gathered_bytes = b * max(min(p, live), largest)
        plan.add(
            f"gathered weights (up to stage3_max_live_parameters {live:.0e})",
            plan.gathered_bytes,
            phase="fwd/bwd",
        )
    tokens = cfg.train.micro_batch_size * seq_len // cfg.scale.sequence_parallel_size
    n, h, v = s["layers"], s["hidden"], s["vocab"]
    per_layer = saved_per_token_layer(s, b, cfg.train.mlp_tiles)
    if cfg.model.gradient_checkpointing:
        plan.add(
            f"activations: {n} checkpointed layer inputs ({tokens} tokens)",
            n * tokens * h * b,
            phase="fwd/bwd",
        )
        layer_phase = 2 * tokens * per_layer  # one layer recomputed, and its gradients
    else:
        plan.add(
            f"activations: {n} layers' saved tensors ({tokens} tokens)",
            n * tokens * per_layer,
            phase="fwd/bwd",
        )
        layer_phase = tokens * per_layer
    chunk = min(cfg.train.loss_chunk_tokens or tokens, tokens)
    if cfg.train.tiled_logits:
        loss_phase = 3 * chunk * v * 4  # one tile's logits, log-softmax and gradient in fp32
    else:
        loss_phase = 2 * tokens * v * b + 3 * chunk * v * 4  # the logits, their gradient, a chunk
    plan.add(
        "the larger of: one layer's backward, the logits and the loss",
        max(layer_phase, loss_phase),
        phase="fwd/bwd",
    )

    # The optimizer step, one sub-group at a time: the partition's gradients flattened (b) and
    # cast to fp32 (4), stage3.py `_prepare_fp32_grad_for_sub_group`; an offloaded optimizer
    # steps on its fp32 buffer instead
    if stage == 3 and opt_at == "device" and mixed:
        plan.add(
            "optimizer step: the largest sub-group's gradient flattened + fp32",
            group * (b + 4),
            phase="step",
        )
    elif stage in (1, 2) and opt_at == "device" and mixed:  # stage_1_and_2.py: one fp32 flat
        plan.add(
            f"optimizer step: the gradient partition in fp32 (1/{o_shard})",
            4 * trained / o_shard,
            phase="step",
        )
    plan.add(
        "runtime (CUDA context, NCCL, allocator slack)"
        if device.kind == "gpu"
        else "runtime (interpreter, libraries, gloo, oneDNN)",
        device.runtime_bytes,
    )
    return plan


TEMPLATES = (
    "zero2",
    "zero3",
    "zero3_offload_optimizer",
    "zero3_offload_params",
    "zero3_nvme_optimizer",
    "zero3_nvme",
)  # less memory per rank, more traffic


def plan_run(
    cfg: Any,
    *,
    mcfg: Any,
    world: int,
    seq_len: int,
    device: Device,
    precision: str,
    bf16_native: bool = True,
) -> Plan:
    """`plan_memory` for a Config (its template resolved for `precision`, bf16 | fp32); when the
    run does not fit, `fixes` lists changes that make it fit, each planned the same way."""
    plan = _resolve_and_plan(
        cfg, mcfg=mcfg, world=world, seq_len=seq_len, device=device, precision=precision
    )
    if not plan.fits:
        plan.fixes = fixes(
            cfg,
            mcfg=mcfg,
            world=world,
            seq_len=seq_len,
            device=device,
            precision=precision,
            bf16_native=bf16_native,
        )
    return plan


def _resolve_and_plan(
    cfg: Any, *, mcfg: Any, world: int, seq_len: int, device: Device, precision: str
) -> Plan:
    from sftscale.ds_config import resolve_ds_config

    ds = resolve_ds_config(
        _with_nvme_path(cfg),
        world_size=world,
        precision=precision,
        largest_weight=largest_weight(mcfg),
    )
    return plan_memory(mcfg, cfg, ds, world=world, seq_len=seq_len, device=device)


def _with_nvme_path(cfg: Any) -> Any:
    """A placeholder disk to plan an NVMe template with (where does not change the sizes)."""
    if cfg.deepspeed.nvme_path:
        return cfg
    return _override(cfg, ["deepspeed.nvme_path=/nvme"])


def _override(cfg: Any, overrides: list[str]) -> Any:
    from sftscale.config import Config, apply_overrides, from_dict

    return from_dict(Config, apply_overrides(cfg.to_dict(), overrides))


def candidates(
    cfg: Any, *, device: Device, precision: str, bf16_native: bool
) -> list[tuple[list[str], int]]:
    """(overrides, world multiplier) a user could change, cheapest first: the step's own
    settings, then precision, then heavier ZeRO templates, then more ranks."""
    t, sc = cfg.train, cfg.scale
    out: list[tuple[list[str], int]] = []
    if not t.tiled_logits:
        out.append((["train.tiled_logits=true"], 1))
    if not cfg.model.gradient_checkpointing:
        out.append((["model.gradient_checkpointing=true"], 1))
    if not t.mlp_tiles:
        out.append((["train.mlp_tiles=4"], 1))
    if t.micro_batch_size > 1:
        out.append(
            (
                [
                    "train.micro_batch_size=1",
                    f"train.grad_accum={t.micro_batch_size * t.grad_accum}",
                ],
                1,
            )
        )
    if precision == "fp32" and bf16_native:
        out.append((["deepspeed.precision=bf16"], 1))
    current = TEMPLATES.index(cfg.deepspeed.template) if cfg.deepspeed.template in TEMPLATES else 0
    for template in TEMPLATES[current + 1 :]:
        nvme = (
            ["deepspeed.nvme_path=<a local disk>"]
            if "nvme" in template and not cfg.deepspeed.nvme_path
            else []
        )
        out.append(([f"deepspeed.template={template}", *nvme], 1))
    for k in (2, 4, 8):
        out.append(([f"scale.num_workers={sc.num_workers * k}"], k))
    sp = sc.sequence_parallel_size
    out.append(
        ([f"scale.sequence_parallel_size={sp * 2}", f"scale.num_workers={sc.num_workers * 2}"], 2)
    )
    return out


def fixes(
    cfg: Any,
    *,
    mcfg: Any,
    world: int,
    seq_len: int,
    device: Device,
    precision: str,
    bf16_native: bool,
    limit: int = 3,
) -> list[str]:
    """Up to `limit` changes that make the run fit by the same plan: single changes, else
    pairs, cheapest first. More ranks on a CPU host means more hosts like this one."""
    from sftscale.config import ConfigError

    options = candidates(cfg, device=device, precision=precision, bf16_native=bf16_native)

    def peak(combo: tuple[tuple[list[str], int], ...]) -> int | None:
        overrides = [o for ov, _ in combo for o in ov]
        planned = [o.replace("<a local disk>", "/nvme") for o in overrides]
        precision_k = "bf16" if "deepspeed.precision=bf16" in overrides else precision
        try:
            p = _resolve_and_plan(
                _override(cfg, planned),
                mcfg=mcfg,
                world=world * ranks_k(combo),
                seq_len=seq_len,
                device=device,
                precision=precision_k,
            )
        except (ConfigError, ValueError):
            return None
        return p.peak_bytes if p.fits else None

    def ranks_k(combo) -> int:
        return math.prod(k for _, k in combo)

    def say(combo, nbytes: int) -> str:
        text = " ".join(o for ov, _ in combo for o in ov)
        k = ranks_k(combo)
        where = f", on {k}x the hosts" if k > 1 and device.kind == "cpu" else ""
        return f"{text} ({nbytes / GIB:.1f} GiB per rank{where})"

    # Changes on the same ranks first (single, then pairs), then more ranks (more hosts)
    same = [o for o in options if o[1] == 1]
    more = [o for o in options if o[1] > 1]
    tiers = [
        [(o,) for o in same],
        [(a, b) for i, a in enumerate(same) for b in same[i + 1 :]],
        [(o,) for o in more],
        [(a, b) for a in same for b in more],
    ]
    found: list[str] = []
    for combos in tiers:
        for combo in combos:
            nbytes = peak(combo)
            if nbytes is not None and len(found) < limit:
                found.append(say(combo, nbytes))
        if found:
            return found
    return found


# ---------------------------------------------------------------------------------------------
# The plan of a run as `sftscale plan` and `sftscale train` see it.


def run_precision(cfg: Any, device: Device) -> tuple[str, bool]:
    """(bf16 | fp32, whether the device computes bf16 natively) for deepspeed.precision on
    `device`, as the workers resolve it (GPUs planned here compute bf16 natively)."""
    if device.kind == "gpu":
        native = True
    else:
        from sftscale.precision import cpu_native_bf16

        native = cpu_native_bf16()[0]
    requested = cfg.deepspeed.precision
    if requested == "auto":
        return ("bf16" if native else "fp32"), native
    return requested, native


def this_device(cfg: Any, *, world: int, env: dict[str, str] | None = None) -> Device | None:
    """The device a rank of this run gets, when the driver can know it: the driver's GPU, or
    this host's memory shared by the ranks that run here (all of them, or torchrun's local
    ones). None for CPU ranks on other hosts of a Ray cluster."""
    env = dict(os.environ) if env is None else env
    if cfg.scale.use_gpu:
        import torch

        return cuda_device() if torch.cuda.is_available() else None
    if "LOCAL_WORLD_SIZE" not in env and (cfg.scale.ray_address or env.get("RAY_ADDRESS")):
        return None
    return host_device(ranks_here(world, env))


def ranks_here(world: int, env: dict[str, str] | None = None) -> int:
    """Ranks of this run on this host: torchrun's local ones, else all of them."""
    env = os.environ if env is None else env
    return int(env.get("LOCAL_WORLD_SIZE", world))


def data_shape(cfg: Any, *, seq_len: int | None, vocab_size: int | None) -> tuple[int, int]:
    """(row length, tokenizer size) from the arguments, else from the data's manifest."""
    from sftscale.config import ConfigError

    if seq_len is None or vocab_size is None:  # (0: not needed)
        from sftscale.validate import load_manifest

        try:
            manifest = load_manifest(cfg.data.path, field="data.path")
        except (ConfigError, OSError) as e:
            raise ConfigError(
                f"{e}; without prepared data give --seq-len (and --vocab-size for a preset "
                "without a vocabulary of its own)"
            ) from e
        seq_len = seq_len or manifest.seq_len
        vocab_size = manifest.tokenizer.vocab_size if vocab_size is None else vocab_size
    return seq_len, vocab_size


def plan_for_cli(
    cfg: Any, *, devices: str | None, seq_len: int | None, vocab_size: int | None
) -> Plan:
    """`sftscale plan`: on --devices, else on the devices this run would get here."""
    from sftscale.config import ConfigError
    from sftscale.model import PRESETS, is_preset, model_config

    if devices:
        try:
            world, device = parse_devices(devices)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    else:
        world = cfg.scale.num_workers
        device = this_device(cfg, world=world) or host_device(world)
    if world % cfg.scale.sequence_parallel_size:
        raise ConfigError(
            f"--devices: {world} ranks do not split into sequence-parallel groups "
            f"of {cfg.scale.sequence_parallel_size}"
        )
    name = cfg.model.name_or_path
    if vocab_size is None and not (is_preset(name) and PRESETS[name]["vocab_size"] is None):
        vocab_size = 0  # the model's own vocabulary (a directory, or a preset that has one)
    seq_len, vocab = data_shape(cfg, seq_len=seq_len, vocab_size=vocab_size)
    mcfg = with_vocabulary(model_config(name, vocab_size=vocab), vocab)
    precision, native = run_precision(cfg, device)
    return plan_run(
        cfg,
        mcfg=mcfg,
        world=world,
        seq_len=seq_len,
        device=device,
        precision=precision,
        bf16_native=native,
    )
