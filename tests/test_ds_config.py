import pytest

from sftscale.config import Config, ConfigError, from_dict
from sftscale.ds_config import TEMPLATE_DIR, resolve_ds_config


def _cfg(**sections):
    return from_dict(Config, {"data": {"path": "d"}, **sections})


@pytest.mark.parametrize("template", sorted(p.stem for p in TEMPLATE_DIR.glob("*.json")))
def test_every_template_resolves_without_auto(template):
    cfg = _cfg(deepspeed={"template": template}, train={"micro_batch_size": 2, "grad_accum": 3})
    resolved = resolve_ds_config(cfg, world_size=4, precision="bf16")
    assert "auto" not in str(resolved)
    assert resolved["train_batch_size"] == 2 * 3 * 4
    assert resolved["train_micro_batch_size_per_gpu"] == 2
    assert resolved["gradient_accumulation_steps"] == 3


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_precision_and_optimizer_fields(precision):
    cfg = _cfg(optim={"lr": 0.01, "weight_decay": 0.1})  # deepspeed.precision: auto
    resolved = resolve_ds_config(cfg, world_size=1, precision=precision)
    assert resolved["bf16"]["enabled"] is (precision == "bf16")
    assert resolved["optimizer"]["params"]["lr"] == 0.01


@pytest.mark.parametrize("requested", ["auto", "fp32"])
def test_template_that_forces_bf16_needs_precision_bf16(tmp_path, requested):
    import json

    forced = tmp_path / "t.json"
    forced.write_text(
        json.dumps(
            {**json.loads((TEMPLATE_DIR / "zero3.json").read_text()), "bf16": {"enabled": True}}
        )
    )
    cfg = _cfg(deepspeed={"template": str(forced), "precision": requested})
    with pytest.raises(ConfigError, match='bf16.enabled to "auto"'):
        resolve_ds_config(cfg, world_size=1, precision="fp32")
    ok = _cfg(deepspeed={"template": str(forced), "precision": "bf16"})
    assert resolve_ds_config(ok, world_size=1, precision="bf16")["bf16"]["enabled"] is True


def test_fixed_batch_in_template_must_match(tmp_path):
    import json

    bad = tmp_path / "t.json"
    bad.write_text(
        json.dumps(
            {
                "train_batch_size": 64,
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
            }
        )
    )
    with pytest.raises(ConfigError, match="train_batch_size 64"):
        resolve_ds_config(_cfg(deepspeed={"template": str(bad)}), world_size=2, precision="fp32")


def test_unknown_template():
    with pytest.raises(ConfigError, match="deepspeed.template"):
        resolve_ds_config(_cfg(deepspeed={"template": "zero9"}), world_size=1, precision="fp32")


@pytest.mark.parametrize(
    ("template", "kernel", "torch_adam", "ops"),
    [
        ("zero3", "auto", True, []),
        ("zero2", "auto", True, []),
        ("zero3_offload_params", "auto", False, ["CPUAdamBuilder"]),
        ("zero3_offload_optimizer", "auto", False, ["CPUAdamBuilder"]),
        ("zero3_nvme_optimizer", "auto", False, ["CPUAdamBuilder", "AsyncIOBuilder"]),
        ("zero3_nvme", "auto", False, ["CPUAdamBuilder", "AsyncIOBuilder"]),
        ("zero3_offload_optimizer", "torch", True, []),
        ("zero3_nvme", "torch", True, ["AsyncIOBuilder"]),
        ("zero3", "deepspeed", False, ["FusedAdamBuilder"]),
    ],
)
def test_the_default_path_needs_no_jit_op(template, kernel, torch_adam, ops):
    """Without optimizer offload the optimizer is torch's fused AdamW (no JIT op); offload
    templates load DeepSpeed's CPU Adam, NVMe ones the async I/O op too."""
    from sftscale.jit_locks import required_ops

    cfg = _cfg(deepspeed={"template": template, "nvme_path": "/x"}, optim={"kernel": kernel})
    resolved = resolve_ds_config(cfg, world_size=2, precision="fp32")
    params = resolved["optimizer"]["params"]
    assert params["torch_adam"] is torch_adam
    assert params.get("fused") is (True if torch_adam else None)
    assert [name for name, _ in required_ops(resolved, template)] == ops


def test_a_template_of_ones_own_without_torch_adam_takes_the_kernel(tmp_path):
    import json

    own = json.loads((TEMPLATE_DIR / "zero3.json").read_text())
    del own["optimizer"]["params"]["torch_adam"]
    (tmp_path / "own.json").write_text(json.dumps(own))
    cfg = _cfg(deepspeed={"template": str(tmp_path / "own.json")})
    assert resolve_ds_config(cfg, world_size=1, precision="fp32")["optimizer"]["params"][
        "torch_adam"
    ]


def test_optim_kernel_is_checked():
    with pytest.raises(ConfigError, match="optim.kernel"):
        _cfg(optim={"kernel": "apex"})


def test_zero3_memory_knobs_override_the_template():
    """deepspeed.max_live_parameters / prefetch_bucket_size / max_in_cpu land in the resolved
    ZeRO-3 settings (1e8 as YAML or the command line writes it is an integer)."""
    from sftscale.config import load_config

    knobs = ["deepspeed.max_live_parameters=1e8", "deepspeed.prefetch_bucket_size=1e7"]
    cfg = load_config(None, ["data.path=d", *knobs])
    z = resolve_ds_config(cfg, world_size=2, precision="fp32")["zero_optimization"]
    assert z["stage3_max_live_parameters"] == 10**8 and z["stage3_prefetch_bucket_size"] == 10**7
    assert isinstance(z["stage3_max_live_parameters"], int)
    nvme = ["deepspeed.template=zero3_nvme", "deepspeed.nvme_path=/x", "deepspeed.max_in_cpu=0"]
    z = resolve_ds_config(load_config(None, ["data.path=d", *nvme]), world_size=2, precision="fp32")
    assert z["zero_optimization"]["offload_param"]["max_in_cpu"] == 0
    assert z["zero_optimization"]["stage3_max_live_parameters"] == 10**9  # the template's
    untouched = resolve_ds_config(_cfg(), world_size=2, precision="fp32")["zero_optimization"]
    assert untouched["stage3_max_live_parameters"] == 10**9


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["deepspeed.template=zero2", "deepspeed.max_live_parameters=1e8"], "is stage 2"),
        (["deepspeed.max_in_cpu=0"], "does not swap weights to NVMe"),
        (
            ["deepspeed.template=zero3_nvme_optimizer", "deepspeed.max_in_cpu=0"],
            "does not swap weights to NVMe",
        ),
        (["deepspeed.prefetch_bucket_size=-1"], "negative"),
        (["deepspeed.max_live_parameters=1.5"], "expected an integer"),
        (["deepspeed.max_live_parameters=lots"], "expected an integer"),
    ],
)
def test_zero3_memory_knobs_refused_where_they_bound_nothing(overrides, message):
    from sftscale.config import load_config

    with pytest.raises(ConfigError, match=message):
        cfg = load_config(None, ["data.path=d", "deepspeed.nvme_path=/x", *overrides])
        resolve_ds_config(cfg, world_size=2, precision="fp32")
