"""Will it fit, and what makes it fit: the memory plan of a resolved run checked against its
device, and the search for changes (cheapest first) that bring it under.

    plan = plan_for_cli(cfg, devices="8xH100", seq_len=None, vocab_size=None)   # sftscale plan
    plan = plan_with_fixes(resolved, device)                                    # validation

Every candidate change is planned the way the run itself is: resolved by sftscale.resolve
(template, precision, vocabulary) and planned by sftscale.plan.
"""

from __future__ import annotations

import math
from dataclasses import replace
from fractions import Fraction

from sftscale.config import Config, ConfigError, apply_overrides, from_dict
from sftscale.devices import GIB, Device, host_device, parse_devices, this_device
from sftscale.model import PRESETS, is_preset
from sftscale.plan import Plan
from sftscale.precision import choose, cpu_native_bf16
from sftscale.resolve import ResolvedRun, precision_for, resolve_run
from sftscale.storage import load_manifest

TEMPLATES = (
    "zero2",
    "zero3",
    "zero3_offload_optimizer",
    "zero3_offload_params",
    "zero3_nvme_optimizer",
    "zero3_nvme",
)  # less memory per rank, more traffic
NVME_PLACEHOLDER = "/nvme"  # where a planned NVMe template swaps (the place does not change sizes)
# ZeRO-3 gathers bounded to 1e8 live weights and 1e7 fetched ahead (the templates: 1e9 and 5e7,
# which keep a model under 1e9 parameters gathered whole): less overlap, far less memory
LEAN_GATHERS = ["deepspeed.max_live_parameters=1e8", "deepspeed.prefetch_bucket_size=1e7"]
LEANEST = "deepspeed.max_in_cpu=0"  # with zero3_nvme: no weight kept in RAM


def with_nvme_path(cfg: Config) -> Config:
    """A placeholder disk to plan an NVMe template with (where does not change the sizes)."""
    if cfg.deepspeed.nvme_path:
        return cfg
    return override(cfg, [f"deepspeed.nvme_path={NVME_PLACEHOLDER}"])


def override(cfg: Config, overrides: list[str]) -> Config:
    return from_dict(Config, apply_overrides(cfg.to_dict(), overrides))


def candidates(run: ResolvedRun, *, bf16_native: bool) -> list[tuple[list[str], int]]:
    """(overrides, world multiplier) a user could change, cheapest first: the step's own
    settings, then precision, then expert parallelism, then heavier ZeRO templates, then more
    ranks. A mixture of experts tiles no MLP and runs no sequence parallelism
    (sftscale.validate refuses both)."""
    cfg = run.config
    t, sc = cfg.train, cfg.scale
    experts = run.shape.experts
    out: list[tuple[list[str], int]] = []
    if not t.tiled_logits:
        out.append((["train.tiled_logits=true"], 1))
    if not cfg.model.gradient_checkpointing:
        out.append((["model.gradient_checkpointing=true"], 1))
    if not t.mlp_tiles and not experts:
        out.append((["train.mlp_tiles=4"], 1))
    if t.micro_batch_size > 1:
        accum = f"train.grad_accum={t.micro_batch_size * t.grad_accum}"
        out.append((["train.micro_batch_size=1", accum], 1))
    if run.precision.name == "fp32" and bf16_native:
        out.append((["deepspeed.precision=bf16"], 1))
    # each rank gathers 1/e of a MoE layer's experts: e divides the world and the experts
    ep = sc.expert_parallel_size
    for e in range(ep + 1, run.world + 1):
        if experts and run.world % e == 0 and experts % e == 0:
            out.append(([f"scale.expert_parallel_size={e}"], 1))
    lean = lean_gathers(run)
    if lean:
        out.append((lean, 1))
    current = TEMPLATES.index(cfg.deepspeed.template) if cfg.deepspeed.template in TEMPLATES else 0
    for template in TEMPLATES[current + 1 :]:
        nvme = []
        if "nvme" in template and not cfg.deepspeed.nvme_path:
            nvme = ["deepspeed.nvme_path=<a local disk>"]
        out.append(([f"deepspeed.template={template}", *nvme], 1))
    if cfg.deepspeed.max_in_cpu != 0:  # the leanest: every weight on NVMe, gathers bounded
        nvme = [] if cfg.deepspeed.nvme_path else ["deepspeed.nvme_path=<a local disk>"]
        out.append((["deepspeed.template=zero3_nvme", *nvme, *lean, LEANEST], 1))
    for k in (2, 4, 8):
        out.append(([f"scale.num_workers={sc.num_workers * k}"], k))
    if not experts:
        sp, workers = sc.sequence_parallel_size, f"scale.num_workers={sc.num_workers * 2}"
        out.append(([f"scale.sequence_parallel_size={sp * 2}", workers], 2))
    return out


def lean_gathers(run: ResolvedRun) -> list[str]:
    """LEAN_GATHERS where they lower what the run's resolved ZeRO settings (the template with
    the deepspeed.* knobs over it) keep gathered, else []."""
    z = run.ds_config.get("zero_optimization", {})
    live = int(z.get("stage3_max_live_parameters", 10**9))
    ahead = int(z.get("stage3_prefetch_bucket_size", 5 * 10**7))
    return LEAN_GATHERS if live > 10**8 or ahead > 10**7 else []


def fixes(run: ResolvedRun, device: Device, *, bf16_native: bool, limit: int = 3) -> list[str]:
    """Up to `limit` changes that make the run fit by the same plan: single changes, else
    pairs, cheapest first. More ranks on a CPU host means more hosts like this one."""
    options = candidates(run, bf16_native=bf16_native)

    def ranks_k(combo) -> Fraction:
        return math.prod((Fraction(k) for _, k in combo), start=Fraction(1))

    def device_for(k: Fraction) -> Device:  # fewer ranks on a CPU host: more memory each
        if k >= 1:
            return device
        return replace(device, memory_bytes=int(device.memory_bytes / k))

    def peak(combo: tuple[tuple[list[str], int], ...]) -> int | None:
        overrides = [o for ov, _ in combo for o in ov]
        planned = [o.replace("<a local disk>", NVME_PLACEHOLDER) for o in overrides]
        precision = run.precision
        if "deepspeed.precision=bf16" in overrides:
            precision = choose("bf16", native_bf16=bf16_native, why="")
        try:
            k = ranks_k(combo)
            p = resolve_run(
                override(run.config, planned),
                world=int(run.world * k),
                seq_len=run.seq_len,
                vocab_size=run.vocab_size,
                precision=precision,
                device=device_for(k),
                base_model_config=run.model_config,
                packed=run.packed,
                longest_document=run.longest_document,
            ).plan
        except (ConfigError, ValueError):
            return None
        return p.peak_bytes if p.fits else None

    def say(combo, nbytes: int) -> str:
        text = " ".join(o for ov, _ in combo for o in ov)
        k = ranks_k(combo)
        where = f", on {k}x the hosts" if k > 1 and device.kind == "cpu" else ""
        if k < 1:
            where = f", {int(run.world * k)} on this host"
        return f"{text} ({nbytes / GIB:.1f} GiB per rank{where})"

    # Changes on the same ranks first (single, then pairs), then every weight on NVMe (the
    # slowest step on the same ranks), then more ranks (more hosts)
    leanest = [o for o in options if LEANEST in o[0]]
    same = [o for o in options if o[1] == 1 and o not in leanest]
    more = [o for o in options if o[1] > 1]
    # A CPU host's memory is shared by its ranks: fewer of them get more each (the same global
    # batch: the accumulation grows as the ranks shrink), before every weight goes to NVMe
    fewer = fewer_ranks(run) if device.kind == "cpu" else []
    tiers = [
        [(o,) for o in same],
        [(a, b) for i, a in enumerate(same) for b in same[i + 1 :]],
        [(o,) for o in fewer] + [(a, b) for a in same for b in fewer],
        [(o,) for o in leanest] + [(a, b) for a in same for b in leanest],
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


def fewer_ranks(run: ResolvedRun) -> list[tuple[list[str], Fraction]]:
    """Half the ranks, a quarter, ... down to one, each with the same global batch."""
    t, out, n = run.config.train, [], run.world // 2
    while n >= 1 and run.world % n == 0:
        accum = t.grad_accum * run.world // n
        out.append(
            ([f"scale.num_workers={n}", f"train.grad_accum={accum}"], Fraction(n, run.world))
        )
        n //= 2
    return out


def plan_with_fixes(run: ResolvedRun, device: Device) -> Plan:
    """The run's plan on `device`; when it does not fit, with the changes that make it fit."""
    plan = run.plan
    if not plan.fits:
        native = device.native_bf16 if device.kind == "gpu" else cpu_native_bf16()[0]
        plan.fixes = fixes(run, device, bf16_native=native)
    return plan


def data_shape(
    cfg: Config, *, seq_len: int | None, vocab_size: int | None
) -> tuple[int, int, bool, int | None]:
    """(row length, tokenizer size, rows packed, longest document) from the arguments, else
    from the data's manifest (read only then: data.path may be remote); given both, rows count
    as packed, with documents of any length up to the row's."""
    if seq_len is not None and vocab_size is not None:  # (0: not needed)
        return seq_len, vocab_size, True, None
    try:
        manifest = load_manifest(cfg.data.path, field="data.path")
    except (ConfigError, OSError) as e:
        raise ConfigError(
            f"{e}; without prepared data give --seq-len (and --vocab-size for a preset "
            "without a vocabulary of its own)"
        ) from e
    seq_len = seq_len or manifest.seq_len
    vocab_size = manifest.tokenizer.vocab_size if vocab_size is None else vocab_size
    return seq_len, vocab_size, manifest.packed, manifest.longest_document


def plan_for_cli(
    cfg: Config, *, devices: str | None, seq_len: int | None, vocab_size: int | None
) -> Plan:
    """`sftscale plan`: on --devices, else on the devices this run would get here."""
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
    seq_len, vocab, packed, longest = data_shape(cfg, seq_len=seq_len, vocab_size=vocab_size)
    run = resolve_run(
        with_nvme_path(cfg),
        world=world,
        seq_len=seq_len,
        vocab_size=vocab,
        precision=precision_for(cfg, device),
        device=device,
        packed=packed,
        longest_document=longest,
    )
    return plan_with_fixes(run, device)
