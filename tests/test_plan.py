"""`sftscale plan`: memory per rank before launch, and the check `sftscale train` makes with it.

The planner's figures against measured runs are in benchmarks/results/plan_validation.md; here
its parts are checked against what they count (parameters of real models, DeepSpeed's bytes
per parameter) and the fixes it names are checked to fit by the same plan."""

import json
from dataclasses import replace

import pytest

from sftscale.config import ConfigError, load_config
from sftscale.devices import CPU_RUNTIME_BYTES, GIB, GPUS, host_device, parse_devices
from sftscale.ds_config import load_template, resolve_ds_config
from sftscale.fit import candidates, plan_with_fixes
from sftscale.fit import override as _override
from sftscale.model import model_config
from sftscale.plan import HEAP_HOLES_PER_WIDTH, heap_holes, saved_per_token_layer
from sftscale.precision import Precision
from sftscale.resolve import resolve_run
from sftscale.shape import ModelShape
from sftscale.validate import validate_run


def model_sizes(mcfg):
    return {"total": ModelShape.from_config(mcfg).total_params}


def plan_run(cfg, *, mcfg, world, seq_len, device, precision):
    """The run resolved on `device` and planned, with fixes when it does not fit."""
    run = resolve_run(
        cfg,
        world=world,
        seq_len=seq_len,
        vocab_size=mcfg.vocab_size,
        precision=Precision(precision, "test"),
        device=device,
        base_model_config=mcfg,
    )
    return plan_with_fixes(run, device)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "llama-3.2-1b", "qwen2.5-1.5b"])
def test_parameter_count_equals_the_model(preset):
    import torch
    from transformers import AutoModelForCausalLM

    mcfg = model_config(preset, vocab_size=1000)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(mcfg)
    assert model_sizes(mcfg)["total"] == sum(p.numel() for p in model.parameters())


def _plan(*overrides, world=8, seq_len=4096, device=GPUS["h100"], precision="bf16"):
    cfg = load_config(None, ["data.path=x", "train.micro_batch_size=1", *overrides])
    mcfg = model_config(cfg.model.name_or_path, vocab_size=32000)
    run = resolve_run(
        cfg,
        world=world,
        seq_len=seq_len,
        vocab_size=32000,
        precision=Precision(precision, "test"),
        device=device,
        base_model_config=mcfg,
    )
    return cfg, mcfg, run.plan


def _line(plan, prefix):
    (line,) = [b for what, b, _, _ in plan.lines if what.startswith(prefix)]
    return line


def test_model_states_follow_zero_partitioning():
    _, mcfg, plan = _plan("model.name_or_path=llama-3.1-8b", world=8)
    p = model_sizes(mcfg)["total"]
    # bf16 weights and gradients, fp32 master and moments: 2 + 2 + 4 + 8 bytes, over 8 ranks
    for prefix, nbytes in (("weights", 2), ("gradients", 2), ("fp32 master", 4), ("AdamW", 8)):
        assert _line(plan, prefix) == pytest.approx(nbytes * p / 8, rel=1e-6)
    _, _, zero2 = _plan("model.name_or_path=llama-3.1-8b", "deepspeed.template=zero2", world=8)
    assert _line(zero2, "weights") == pytest.approx(2 * p, rel=1e-6)  # whole on every rank
    assert _line(zero2, "AdamW") == pytest.approx(8 * p / 8, rel=1e-6)


def test_offload_moves_optimizer_states_off_the_gpu():
    _, _, on_gpu = _plan("model.name_or_path=llama-3.1-8b")
    _, _, offload = _plan(
        "model.name_or_path=llama-3.1-8b", "deepspeed.template=zero3_offload_optimizer"
    )
    assert offload.peak_bytes < on_gpu.peak_bytes
    assert offload.total("host") >= _line(on_gpu, "AdamW")
    # on a CPU host, host RAM is the device's memory: nothing is saved
    cpu = host_device(2, 64 * GIB)
    _, _, a = _plan("model.name_or_path=llama-100m", world=2, device=cpu)
    _, _, b = _plan(
        "model.name_or_path=llama-100m",
        "deepspeed.template=zero3_offload_optimizer",
        world=2,
        device=cpu,
    )
    assert b.peak_bytes >= a.peak_bytes * 0.9


def test_activation_memory_follows_checkpointing_tiling_and_sequence_parallelism():
    base = dict(world=8, seq_len=32768)
    _, _, gc = _plan("model.name_or_path=llama-3.1-8b", **base)
    _, _, no_gc = _plan(
        "model.name_or_path=llama-3.1-8b", "model.gradient_checkpointing=false", **base
    )
    assert _line(no_gc, "activations") > 10 * _line(gc, "activations")
    _, _, tiled = _plan("model.name_or_path=llama-3.1-8b", "train.tiled_logits=true", **base)
    assert _line(tiled, "the larger of") < _line(gc, "the larger of")
    _, _, sp = _plan(
        "model.name_or_path=llama-3.1-8b",
        "scale.num_workers=8",
        "scale.sequence_parallel_size=4",
        **base,
    )
    assert _line(sp, "activations") == pytest.approx(_line(gc, "activations") / 4, rel=1e-3)


def test_fixes_fit_by_the_same_plan():
    cfg = load_config(
        None, ["data.path=x", "model.name_or_path=llama-3.1-8b", "train.micro_batch_size=1"]
    )
    mcfg = model_config(cfg.model.name_or_path, vocab_size=32000)
    _, a10g = parse_devices("2xA10G")
    plan = plan_run(cfg, mcfg=mcfg, world=2, seq_len=4096, device=a10g, precision="bf16")
    assert not plan.fits and plan.fixes
    assert "does NOT fit" in plan.table() and plan.fixes[0] in plan.table()
    for fix in plan.fixes:
        overrides = fix.split(" (")[0].replace("<a local disk>", "/nvme").split()
        changed = _override(cfg, overrides)
        again = plan_run(
            changed,
            mcfg=mcfg,
            world=changed.scale.num_workers * 2 // cfg.scale.num_workers,
            seq_len=4096,
            device=a10g,
            precision="bf16",
        )
        assert again.fits, fix


def test_parse_devices():
    assert parse_devices("8xH100")[0] == 8 and parse_devices("8xH100")[1].memory_bytes == 80 * GIB
    assert parse_devices("h100")[0] == 1
    n, cpu = parse_devices("4xcpu")
    assert n == 4 and cpu.kind == "cpu"
    with pytest.raises(ValueError, match="unknown device"):
        parse_devices("8xTPU")
    with pytest.raises(ValueError, match="COUNTxNAME"):
        parse_devices("eight H100")


def test_train_stops_before_launch_when_the_run_cannot_fit(prepared_dir):
    # bf16 whatever this CPU computes natively, so that the fixes are the same on every host
    cfg = load_config(
        None,
        [
            f"data.path={prepared_dir}",
            "model.name_or_path=llama-3.1-8b",
            "train.micro_batch_size=1",
            "deepspeed.precision=bf16",
        ],
    )
    with pytest.raises(ConfigError, match="does not fit.*to make it fit.*scale.num_workers=") as e:
        validate_run(cfg, world_size=2)
    assert "sftscale plan" in str(e.value) and "scale.memory_check=false" in str(e.value)
    huge = _override(cfg, ["model.name_or_path=llama-3.1-70b"])
    with pytest.raises(ConfigError, match="no change sftscale tries .* the largest parts: AdamW"):
        validate_run(huge, world_size=2)
    validate_run(_override(huge, ["scale.memory_check=false"]), world_size=2)
    small = _override(cfg, ["model.name_or_path=tiny-llama"])
    validate_run(small, world_size=2)


def test_plan_command(prepared_dir, capsys):
    from sftscale.cli import main

    # no prepared data needed for a model with a vocabulary of its own
    code = main(
        [
            "plan",
            "configs/tiny-cpu.yaml",
            "model.name_or_path=llama-3.1-8b",
            "data.path=/nonexistent",
            "--devices",
            "8xH100",
            "--seq-len",
            "4096",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "8 x H100: 80.0 GiB per rank: fits" in out
    assert "optimizer step" in out and "gathered weights" in out
    code = main(
        [
            "plan",
            "configs/tiny-cpu.yaml",
            "model.name_or_path=llama-3.1-70b",
            "--devices",
            "8xH100",
            "--seq-len",
            "4096",
        ]
    )
    out = capsys.readouterr().out
    assert code == 1 and "does NOT fit" in out and "to make it fit" in out
    # the row length and vocabulary come from the prepared data
    assert main(["plan", "configs/tiny-cpu.yaml", f"data.path={prepared_dir}"]) == 0
    assert "CPU host" in capsys.readouterr().out
    assert main(["plan", "configs/tiny-cpu.yaml", "data.path=/nonexistent"]) != 0
    assert "give --seq-len" in capsys.readouterr().err


def test_weight_buffers_hold_the_grown_vocabulary(tmp_path):
    """A model directory's config keeps its vocabulary; the workers grow the embedding to the
    tokenizer's added tokens, and ZeRO-Infinity's weight buffers must hold that partition (a
    1.24B run failed in DeepSpeed on 2 rows: 132,384,768 elements > 132,382,720)."""
    from sftscale.resolve import with_vocabulary

    model_config("llama-3.2-1b", vocab_size=129280).save_pretrained(tmp_path)
    mcfg = model_config(str(tmp_path), vocab_size=129282)
    assert mcfg.vocab_size == 129280
    grown = with_vocabulary(mcfg, 129282)
    assert grown.vocab_size == 129282 and mcfg.vocab_size == 129280
    cfg = load_config(
        None, ["data.path=x", "deepspeed.template=zero3_nvme", "deepspeed.nvme_path=/x"]
    )
    ds = resolve_ds_config(
        cfg,
        world_size=2,
        precision="bf16",
        largest_weight=ModelShape.from_config(grown).largest_weight,
    )
    assert ds["zero_optimization"]["offload_param"]["buffer_size"] == 129282 * 2048 // 2


def test_fp32_runs_are_planned_in_fp32():
    """Where bf16 is not native (AVX2-only CPUs), deepspeed.precision=auto trains in fp32:
    4 B weights and gradients, ZeRO's own fp32 copy, no bf16-to-fp32 copy in the step."""
    _, mcfg, plan = _plan("model.name_or_path=llama-3.1-8b", world=8, precision="fp32")
    p = model_sizes(mcfg)["total"]
    for prefix, nbytes in (
        ("weights, fp32", 4),
        ("gradients", 4),
        ("fp32 master", 4),
        ("AdamW", 8),
    ):
        assert _line(plan, prefix) == pytest.approx(nbytes * p / 8, rel=1e-6)
    assert not [w for w, *_ in plan.lines if w.startswith("optimizer step")]


def test_auto_precision_is_planned_as_the_workers_resolve_it(prepared_dir, tmp_path, monkeypatch):
    """A CPU without native bf16 (simulated: ONEDNN_MAX_CPU_ISA=AVX2) plans the fp32 run that
    deepspeed.precision=auto trains there. The runtime that ISA limit keys is seeded (the
    probe's measurement, 25-30 s, is test_runtime_probe's)."""
    import os
    import subprocess
    import sys

    from sftscale import runtime_probe

    monkeypatch.setenv("SFTSCALE_CACHE", str(tmp_path))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    seeded = runtime_probe.cache_path()
    seeded.parent.mkdir(parents=True)
    runtime_probe._write(
        seeded,
        {"runtime_bytes": CPU_RUNTIME_BYTES, "length_kernel_bytes": 0, "doc_kernel_bytes": 0},
    )
    cmd = [
        sys.executable,
        "-m",
        "sftscale",
        "plan",
        "configs/tiny-cpu.yaml",
        f"data.path={prepared_dir}",
        "--devices",
        "2xcpu",
    ]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ),
    ).stdout
    assert "weights, fp32" in out and "fits" in out
    assert "measuring this host" not in out  # the seeded runtime was read: keyed alike


def _lines(plan):
    return {what: b for what, b, _, _ in plan.lines}


def _moe_plan(name, *overrides, world=8):
    cfg = load_config(None, ["data.path=x", "train.micro_batch_size=1", *overrides])
    cfg = _override(cfg, [f"model.name_or_path={name}"])
    mcfg = model_config(name, vocab_size=0)
    run = resolve_run(
        cfg,
        world=world,
        seq_len=4096,
        vocab_size=mcfg.vocab_size,
        precision=Precision("bf16", "test"),
        device=GPUS["h100"],
        base_model_config=mcfg,
    )
    return mcfg, run.plan


def test_expert_parallelism_gathers_a_layers_share_of_the_experts(tmp_path):
    """ZeRO-3 gathers a MoE block whole (a leaf module; its experts are fused 3-D parameters);
    with expert parallelism e a rank gathers only its 1/e of the experts."""
    # Qwen3-30B-A3B: a layer is 0.62B parameters, 0.60B of them its 128 experts. The shipped
    # templates keep 1e9 parameters gathered (stage3_max_live_parameters) and fetch 5e7 ahead
    # (stage3_prefetch_bucket_size), more than a layer with all its experts: the line is the
    # same with e = 1 and 8.
    kept = 2 * (10**9 + 5 * 10**7)
    mcfg, one = _moe_plan("qwen3-30b-a3b")
    _, eight = _moe_plan("qwen3-30b-a3b", "scale.expert_parallel_size=8")
    assert _line(one, "gathered weights") == _line(eight, "gathered weights") == kept
    # With fewer kept live, the largest gathered unit shows: the whole layer with e = 1; with
    # e = 8 the layer keeps 16 of 128 experts (0.09B), below the embedding (0.31B)
    template = load_template("zero3")
    template["zero_optimization"]["stage3_max_live_parameters"] = 10**8
    path = tmp_path / "zero3_live1e8.json"
    path.write_text(json.dumps(template))
    _, one = _moe_plan("qwen3-30b-a3b", f"deepspeed.template={path}")
    _, eight = _moe_plan(
        "qwen3-30b-a3b", f"deepspeed.template={path}", "scale.expert_parallel_size=8"
    )
    shape = ModelShape.from_config(mcfg)
    experts = 128 * 3 * 2048 * 768  # one layer's gate_up_proj [E, 2I, H] and down_proj [E, H, I]
    assert _line(one, "gathered weights") == 2 * shape.layer_params
    assert shape.layer_params - experts + experts // 8 < shape.embed == 151936 * 2048
    assert _line(eight, "gathered weights") == 2 * shape.embed
    assert _line(one, "gathered weights") - _line(eight, "gathered weights") == 2 * (
        shape.layer_params - shape.embed
    )
    # e = 2: 64 of 128 experts, still above the embedding: the experts' half comes off
    _, two = _moe_plan(
        "qwen3-30b-a3b", f"deepspeed.template={path}", "scale.expert_parallel_size=2"
    )
    assert _line(one, "gathered weights") - _line(two, "gathered weights") == 2 * experts // 2
    assert "experts 1/8" in eight.table() and "experts 1/" not in one.table()
    # Mixtral-8x7B: a layer (1.45B, 1.41B of it experts) is above 1e9, so e = 8 gathers less
    # with the shipped template: its 1e9 (and 5e7 ahead) instead of the whole layer
    mcfg, one = _moe_plan("mixtral-8x7b")
    _, eight = _moe_plan("mixtral-8x7b", "scale.expert_parallel_size=8")
    assert _line(one, "gathered weights") == 2 * ModelShape.from_config(mcfg).layer_params
    assert _line(eight, "gathered weights") == kept


def test_moe_activations_and_all_to_all():
    """A MoE layer saves its router's probabilities and the tokens its experts take; the balance
    loss keeps every layer's router scores; expert parallelism adds one layer's all-to-all."""
    mcfg, one = _moe_plan("qwen3-30b-a3b")
    _, eight = _moe_plan("qwen3-30b-a3b", "scale.expert_parallel_size=8")
    shape = ModelShape.from_config(mcfg)
    assert shape.intermediate == 8 * 768  # top_k experts' MLP per token
    dense_like = saved_per_token_layer(replace(shape, experts=0, top_k=0), 2, 0)
    assert saved_per_token_layer(shape, 2, 0) == dense_like + 128 * 4 + 8 * 2048 * 2
    scores = "router scores of 48 MoE layers for the balance loss (fp32)"
    assert _lines(one)[scores] == _lines(eight)[scores] == 48 * 4096 * 128 * 4
    all_to_all = "expert parallel all-to-all: dispatch, combine, permuted (4096 x top 8)"
    assert all_to_all not in _lines(one)
    assert _lines(eight)[all_to_all] == 3 * 4096 * 8 * 2048 * 2  # bf16
    # model states are still partitioned over all 8 ranks
    for prefix in ("weights", "gradients", "fp32 master", "AdamW"):
        assert _line(one, prefix) == _line(eight, prefix)


def test_expert_parallel_size_must_divide_the_ranks_and_the_experts():
    with pytest.raises(ConfigError, match=r"8 ranks and 128 experts .* divide both: 1, 2, 4, 8$"):
        _moe_plan("qwen3-30b-a3b", "scale.expert_parallel_size=3")
    with pytest.raises(ConfigError, match=r"=16: 8 ranks and 128 experts"):
        _moe_plan("qwen3-30b-a3b", "scale.expert_parallel_size=16")
    with pytest.raises(ConfigError, match=r"=16: 64 ranks and 8 experts .*: 1, 2, 4, 8$"):
        _moe_plan("mixtral-8x7b", "scale.expert_parallel_size=16", world=64)
    with pytest.raises(ConfigError, match="llama-3.1-8b has no experts"):
        _plan("model.name_or_path=llama-3.1-8b", "scale.expert_parallel_size=2")
    with pytest.raises(ConfigError, match="=2 with deepspeed.template=zero3_offload_optimizer"):
        _moe_plan(
            "qwen3-30b-a3b",
            "scale.expert_parallel_size=2",
            "deepspeed.template=zero3_offload_optimizer",
        )
    _moe_plan("mixtral-8x7b", "scale.expert_parallel_size=8", world=64)


def test_fixes_for_a_moe_try_expert_parallelism_not_tiles_or_sequence_parallelism():
    cfg = load_config(None, ["data.path=x", "model.name_or_path=mixtral-8x7b"])
    mcfg = model_config("mixtral-8x7b", vocab_size=0)
    run = resolve_run(
        cfg,
        world=8,
        seq_len=4096,
        vocab_size=mcfg.vocab_size,
        precision=Precision("bf16", "test"),
        device=GPUS["h100"],
        base_model_config=mcfg,
    )
    tried = [" ".join(overrides) for overrides, _ in candidates(run, bf16_native=True)]
    assert [t for t in tried if "expert_parallel" in t] == [
        f"scale.expert_parallel_size={e}" for e in (2, 4, 8)
    ]
    assert not [t for t in tried if "mlp_tiles" in t or "sequence_parallel" in t]


def test_dense_plans_are_unchanged_by_the_moe_terms():
    """Llama-3.1-8B on 8 x H100 at 4096 positions, as planned before mixtures of experts (and
    since then the LM head's gradient, written whole in backward: 128256 x 4096 in bf16)."""
    _, _, plan = _plan("model.name_or_path=llama-3.1-8b")
    assert _lines(plan) == {
        "weights, bf16 (1/8 of 8,030.3M)": 2007565312,
        "gradients (1/8)": 2007565312,
        "fp32 master weights (1/8)": 4015130624,
        "AdamW moments, fp32 (1/8)": 8030261248,
        "reduce bucket (reduce_bucket_size)": 100000000,
        "the reduce-scatter's copy of a bucket": 100000000,
        "gathered weights (up to stage3_max_live_parameters 1e+09 + prefetch 5e+07)": 2100000000,
        "the largest weight's gradient, whole, before it is reduced": 2 * 128256 * 4096,
        "activations: 32 checkpointed layer inputs (4096 tokens)": 1073741824,
        "the larger of: one layer's backward, the logits and the loss": 3677356032,
        "optimizer step: the largest sub-group's gradient flattened + fp32": 6000000000,
        "runtime (CUDA context, NCCL, allocator slack)": 2684354560,
    }


def test_the_largest_parts_are_those_in_the_memory_that_is_short():
    """What lives on NVMe (or, for a GPU run, in host RAM) is not what a user must shrink."""
    from sftscale.devices import GIB, Device
    from sftscale.plan import Plan

    plan = Plan(device=Device("cpu host", 4 * GIB, "cpu", 0), world=1)
    plan.add("moments on NVMe", 40 * GIB, where="nvme")
    plan.add("weights", 3 * GIB)
    plan.add("swap buffers", 2 * GIB, where="host")
    plan.add("activations", 1 * GIB, phase="fwd/bwd")
    assert plan.advice().endswith("weights 3.0 GiB, swap buffers 2.0 GiB, activations 1.0 GiB")
    gpu = Plan(device=Device("GPU", 4 * GIB, "gpu", 0), world=1)
    gpu.add("optimizer in host RAM", 40 * GIB, where="host")
    gpu.add("weights", 5 * GIB)
    assert gpu.advice().endswith("the largest parts: weights 5.0 GiB")


def test_nvme_weights_up_to_max_in_cpu_stay_in_host_ram():
    """DeepSpeed keeps offload_param.max_in_cpu elements of a rank's partition in a host
    buffer (zero3_nvme: 1e9, a 1.24B model's whole partition on 2 ranks). Missing it, the plan
    said 9.8 GiB per rank for an fp32 1.24B run that the kernel killed at 11.8 GiB."""
    host = host_device(2)
    overrides = [
        "model.name_or_path=llama-3.2-1b",
        "deepspeed.template=zero3_nvme",
        "deepspeed.nvme_path=/tmp/nvme",
    ]
    _, mcfg, plan = _plan(*overrides, world=2, seq_len=512, device=host, precision="fp32")
    partition = ModelShape.from_config(mcfg).total_params // 2
    kept = [(b, w) for what, b, w, _ in plan.lines if what.startswith("weights kept in host RAM")]
    assert kept == [(4 * partition, "host")]


def _fp32_billion(*overrides, world=2):
    """Llama-3.2-1B in fp32 (a CPU without native bf16), `world` ranks on a 23.5 GiB host, 512
    positions, micro-batch 1, tiled logits, DeepSeek-V3's vocabulary (benchmarks/billion_cpu)."""
    cfg = load_config(
        None,
        [
            "data.path=x",
            "model.name_or_path=llama-3.2-1b",
            "train.micro_batch_size=1",
            "train.tiled_logits=true",
            f"scale.num_workers={world}",
            *overrides,
        ],
    )
    mcfg = model_config("llama-3.2-1b", vocab_size=129280)
    device = host_device(world, memory_bytes=int(23.5 * GIB))
    run = resolve_run(
        cfg,
        world=world,
        seq_len=512,
        vocab_size=129280,
        precision=Precision("fp32", "test"),
        device=device,
        base_model_config=mcfg,
    )
    return run, device


def test_fp32_billion_fits_with_bounded_gathers():
    """On a CPU without native bf16 no template fits a 1.24B model in fp32 with the templates'
    gathers (1e9 live + 5e7 ahead: 4.6 GiB, kept twice on a CPU host); bounding them to 1e8 + 1e7
    brings the embedding (the largest weight) down to what is gathered, and the optimizer on
    NVMe makes it fit. The fix names the knobs, and the same plan with them fits."""
    from sftscale.fit import fixes

    run, device = _fp32_billion()
    assert not run.plan.fits
    found = fixes(run, device, bf16_native=False)
    assert found, "no fix found"
    assert "deepspeed.max_live_parameters=1e8 deepspeed.prefetch_bucket_size=1e7" in found[0]
    assert "deepspeed.template=zero3_nvme_optimizer" in found[0]
    fixed, _ = _fp32_billion(
        "deepspeed.max_live_parameters=1e8",
        "deepspeed.prefetch_bucket_size=1e7",
        "deepspeed.template=zero3_nvme_optimizer",
        "deepspeed.nvme_path=/nvme",
    )
    assert fixed.plan.fits and f"({fixed.plan.peak_bytes / GIB:.1f} GiB per rank)" in found[0]
    embed = 129280 * 2048  # above 1e8 + 1e7: gathered whole, the bound's floor
    assert _line(fixed.plan, "gathered weights") == fixed.plan.gathered_bytes == 4 * embed
    # the same model without the knobs gathers 1e9 + 5e7
    assert _line(run.plan, "gathered weights") == 4 * (10**9 + 5 * 10**7)


def test_every_weight_on_nvme_is_the_last_resort_on_the_same_ranks():
    """zero3_nvme with max_in_cpu=0 keeps no weight partition in RAM, only DeepSpeed's pinned
    buffer for the largest sub-group's weights whole (to swap them out after the step); the
    fit search offers it after every single change and pair on the same ranks."""
    run, device = _fp32_billion(
        "deepspeed.template=zero3_nvme",
        "deepspeed.nvme_path=/nvme",
        "deepspeed.max_live_parameters=1e8",
        "deepspeed.prefetch_bucket_size=1e7",
        "deepspeed.max_in_cpu=0",
    )
    lines = {what: b for what, b, _, _ in run.plan.lines}
    assert not [w for w in lines if w.startswith("weights kept in host RAM")]
    embed = 129280 * 2048  # one parameter, a sub-group of its own: 1/2 of it per rank
    pinned = "pinned buffer to swap updated weights out (the largest sub-group, whole)"
    assert lines[pinned] == 4 * 2 * (embed // 2)
    kept, _ = _fp32_billion(
        "deepspeed.template=zero3_nvme", "deepspeed.nvme_path=/nvme", "train.mlp_tiles=4"
    )
    assert pinned not in {what for what, _, _, _ in kept.plan.lines}  # all 1e9 in RAM
    tried = [" ".join(ov) for ov, _ in candidates(run, bf16_native=False)]
    assert not [t for t in tried if "max_in_cpu" in t]  # already the leanest
    plain, _ = _fp32_billion()
    tried = [" ".join(ov) for ov, _ in candidates(plain, bf16_native=False)]
    assert tried.index(
        "deepspeed.max_live_parameters=1e8 deepspeed.prefetch_bucket_size=1e7"
    ) < tried.index("deepspeed.template=zero3_offload_optimizer")
    assert tried[-5].endswith("deepspeed.max_in_cpu=0")  # before more ranks


def test_glibc_keeps_freed_gathers_only_with_its_dynamic_threshold():
    """A CPU host's workers pin glibc's mmap threshold (train.cpu_mmap_threshold, 1 MiB): what
    forward and backward gathered and freed goes back to the system, and the plan is held +
    the larger phase. With 0 (glibc's dynamic threshold) the freed gathers stay resident: the
    plan adds the gathered weights once more and names the line. Pinned, on 2 ranks, it counts
    the holes glibc's heap keeps between small tensors instead (fitted, plan.HEAP_HOLES_PER_WIDTH).
    A GPU's plan is the same either way."""
    cpu = host_device(2, 64 * GIB)
    _, _, pinned = _plan("model.name_or_path=llama-100m", world=2, seq_len=512, device=cpu)
    _, _, dynamic = _plan(
        "model.name_or_path=llama-100m",
        "train.cpu_mmap_threshold=0",
        world=2,
        seq_len=512,
        device=cpu,
    )
    held, phases = (
        pinned.phase_bytes("held"),
        (
            pinned.phase_bytes("fwd/bwd"),
            pinned.phase_bytes("step"),
        ),
    )
    assert pinned.kept_bytes == 0 and pinned.peak_bytes == held + max(phases)
    assert dynamic.gathered_bytes == pinned.gathered_bytes > 0
    assert dynamic.kept_bytes == dynamic.gathered_bytes
    holes = [b for what, b, _, _ in pinned.lines if what.startswith("glibc's heap: holes")]
    assert holes == [12 * (768 + 2 * 256) * HEAP_HOLES_PER_WIDTH]  # llama-100m: 12 layers
    assert dynamic.peak_bytes == pinned.peak_bytes - holes[0] + pinned.gathered_bytes
    assert "glibc keeps resident" in dynamic.table() and "holes" not in dynamic.table()
    assert "glibc keeps resident" not in pinned.table()
    gpu = [
        _plan("model.name_or_path=llama-100m", *t, world=2, seq_len=512)[2]
        for t in ([], ["train.cpu_mmap_threshold=0"])
    ]
    assert gpu[0].peak_bytes == gpu[1].peak_bytes and gpu[1].kept_bytes == 0


def test_fewer_ranks_share_a_cpu_host_when_nothing_fits_on_as_many():
    """fp32 1.24B on 4 ranks of one 23.5 GiB host: no change on 4 ranks fits (5.9 GiB each);
    one rank gets the whole host. The fix keeps the global batch (4x the accumulation), says
    where, and the same plan on 1 rank with the host's memory fits at its figure."""
    from sftscale.fit import fixes

    run, device = _fp32_billion(world=4)
    assert not run.plan.fits
    found = fixes(run, device, bf16_native=False)
    assert "scale.num_workers=1 train.grad_accum=4" in found[0] and "1 on this host" in found[0]
    assert all("hosts" not in f for f in found)  # more hosts come after
    fix = found[0].split(" (")[0].replace("<a local disk>", "/nvme").split()
    one, _ = _fp32_billion(*fix, world=1)
    assert one.plan.fits and f"({one.plan.peak_bytes / GIB:.1f} GiB per rank" in found[0]
    assert one.config.global_batch_rows(1) == run.config.global_batch_rows(4) == 4


def test_fp32_logits_need_no_fp32_copy_in_the_loss():
    """A loss chunk's fp32 work is the logits cast to fp32, their log-softmax and its gradient;
    fp32 logits are not cast (`.float()` returns them), so fp32 plans count two, not three."""
    over = ("model.name_or_path=tiny-llama", "train.tiled_logits=true")
    line = "the larger of: one layer's backward, the logits and the loss"
    chunk = 1024  # train.loss_chunk_tokens
    for precision, tensors in (("bf16", 3), ("fp32", 2)):
        _, _, plan = _plan(*over, world=2, seq_len=2048, precision=precision)
        assert _line(plan, line) == tensors * chunk * 32000 * 4


def test_tiled_mlp_keeps_whole_row_hidden_tensors():
    """With train.mlp_tiles the recomputed layer saves 1/tiles of the MLP's intermediates, and
    TiledMLP adds 7 whole-row tensors of the hidden size (its input, the output concatenated
    from the slices, the incoming gradient, the input's gradient, copies): small-llama's long
    rows with SP=2 and tiles were planned up to 9% low without them."""
    line = "the larger of: one layer's backward, the logits and the loss"
    base = ("model.name_or_path=small-llama", "train.tiled_logits=true")
    s = ModelShape.from_config(model_config("small-llama", vocab_size=32000))
    tokens = 65536
    for tiles in (0, 4):
        _, _, plan = _plan(*base, f"train.mlp_tiles={tiles}", world=2, seq_len=tokens)
        per_layer = saved_per_token_layer(s, 2, tiles)
        extra = 7 * s.hidden * 2 if tiles else 0
        assert _line(plan, line) == tokens * (2 * per_layer + extra)


def test_zero3_on_several_ranks_counts_the_reduce_scatters_copy():
    """DeepSpeed's reduce_scatter_coalesced interleaves a bucket's gradients into one flat copy;
    the rank's partitions are views of it, so the last one lives until the optimizer step. One
    rank, or ZeRO-2 (another reduction), has none; nor does a one-rank CPU plan have heap holes."""
    cpu = host_device(2, 64 * GIB, runtime_bytes=GIB // 2)
    copy = "the reduce-scatter's copy of a bucket"
    has = {
        (world, template): any(w.startswith(copy) for w, _, _, _ in plan.lines)
        for world in (1, 2)
        for template in ("zero3", "zero2")
        for plan in [
            _plan(
                "model.name_or_path=llama-100m",
                f"deepspeed.template={template}",
                world=world,
                seq_len=512,
                device=cpu,
            )[2]
        ]
    }
    assert has == {
        (1, "zero3"): False,
        (2, "zero3"): True,
        (1, "zero2"): False,
        (2, "zero2"): False,
    }
    one = _plan("model.name_or_path=llama-100m", world=1, seq_len=512, device=cpu)[2]
    assert "holes" not in one.table()


def test_the_fitted_heap_term_covers_its_fit_set():
    """plan.heap_holes is fitted, not derived: it must be at least what each run of its fit set
    needs (benchmarks/plan_validation.py FIT_SET, saved in
    benchmarks/results/plan_validation.json): lowering its constants, or a fit run measured
    higher, fails here. The fit set shares no configuration with the rows it is validated on."""
    from pathlib import Path

    saved = Path(__file__).resolve().parents[1] / "benchmarks/results/plan_validation.json"
    rows = json.loads(saved.read_text())["rows"]
    fit = [r for r in rows if r.get("held_out") == -1]
    assert len(fit) >= 6
    for r in fit:
        need = r["measured_bytes"] - (r["peak_bytes"] - r["holes_bytes"])
        shape = ModelShape(matmul_params=0, n_layers=r["layers"], hidden=0, q=r["width"], kv=0)
        assert need <= heap_holes(shape), r["name"]
    validated = {r["name"] for r in rows if r.get("held_out") != -1}
    assert validated and not validated & {r["name"] for r in fit}


def test_unpacked_rows_on_a_cpu_plan_the_kernels_of_each_micro_batch_length():
    """A CPU rank keeps the kernels made for every micro-batch length it meets (12-15 MiB
    each in bf16 on an AMX host): unpacked rows meet up to every padded length up to seq_len,
    at most one new one per micro-batch; packed rows one. A GPU plans none."""
    from sftscale.lengths import batch_lengths

    cfg = load_config(None, ["data.path=x", "train.max_steps=100", "train.grad_accum=1"])
    assert batch_lengths(cfg, 1024, packed=True) == 2  # full rows, and the last one
    assert batch_lengths(cfg, 1024, packed=False) == 16  # 64..512 by 64, 576..1024 by 64
    assert batch_lengths(cfg, 4096, packed=False) == 32
    short = load_config(None, ["data.path=x", "train.max_steps=3", "train.grad_accum=2"])
    assert batch_lengths(short, 4096, packed=False) == 6  # one new length a micro-batch
    sp = load_config(None, ["data.path=x", "scale.sequence_parallel_size=2"])
    assert batch_lengths(sp, 1000, packed=False) == 16  # the last length is seq_len itself

    cpu = replace(host_device(2, 64 * GIB, runtime_bytes=GIB // 2), length_kernel_bytes=13 << 20)

    def planned(device, packed):
        return resolve_run(
            cfg,
            world=2,
            seq_len=1024,
            vocab_size=32000,
            precision=Precision("bf16", "test"),
            device=device,
            base_model_config=model_config("tiny-llama", vocab_size=32000),
            packed=packed,
        ).plan

    packed, unpacked = planned(cpu, True), planned(cpu, False)
    assert unpacked.peak_bytes - packed.peak_bytes == 14 * (13 << 20)
    assert _line(unpacked, "kernels for 15 more micro-batch lengths") == 15 * (13 << 20)
    assert _line(packed, "kernels for 1 more micro-batch lengths") == 13 << 20
    gpu = GPUS["h100"]
    assert planned(gpu, False).peak_bytes == planned(gpu, True).peak_bytes


def test_the_launch_check_plans_with_the_datas_packing_and_longest_document(
    tmp_path, prepared_dir, monkeypatch
):
    """sftscale train plans with what the manifest says of the rows: packed or not, and the
    longest document (recorded per shard by prepare)."""
    import shutil

    import sftscale.validate as validate

    unpacked = tmp_path / "data"
    shutil.copytree(prepared_dir, unpacked)
    manifest = json.loads((unpacked / "manifest.json").read_text())
    manifest["options"]["packing"] = "none"
    (unpacked / "manifest.json").write_text(json.dumps(manifest))
    longest = max(s["max_doc_tokens"] for s in manifest["shards"])
    assert 0 < longest <= manifest["seq_len"]
    seen = []

    def resolve(*args, **kwargs):
        seen.append((kwargs["packed"], kwargs["longest_document"]))
        return resolve_run(*args, **kwargs)

    monkeypatch.setattr(validate, "resolve_run", resolve)
    for path in (prepared_dir, unpacked):
        cfg = load_config(None, [f"data.path={path}", "model.name_or_path=tiny-llama"])
        validate_run(cfg, world_size=2)
    assert set(seen) == {(True, longest), (False, longest)}
