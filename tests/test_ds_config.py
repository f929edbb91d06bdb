import pytest

from sftscale.config import Config, ConfigError, from_dict
from sftscale.ds_config import TEMPLATE_DIR, resolve_ds_config


def _cfg(**sections):
    return from_dict(Config, {"data": {"path": "d"}, **sections})


@pytest.mark.parametrize("template", sorted(p.stem for p in TEMPLATE_DIR.glob("*.json")))
def test_every_template_resolves_without_auto(template):
    cfg = _cfg(deepspeed={"template": template}, train={"micro_batch_size": 2, "grad_accum": 3})
    resolved = resolve_ds_config(cfg, world_size=4)
    assert "auto" not in str(resolved)
    assert resolved["train_batch_size"] == 2 * 3 * 4
    assert resolved["train_micro_batch_size_per_gpu"] == 2
    assert resolved["gradient_accumulation_steps"] == 3


def test_precision_and_optimizer_fields():
    cfg = _cfg(deepspeed={"precision": "fp32"}, optim={"lr": 0.01, "weight_decay": 0.1})
    resolved = resolve_ds_config(cfg, world_size=1)
    assert resolved["bf16"]["enabled"] is False
    assert resolved["optimizer"]["params"]["lr"] == 0.01


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
        resolve_ds_config(_cfg(deepspeed={"template": str(bad)}), world_size=2)


def test_unknown_template():
    with pytest.raises(ConfigError, match="deepspeed.template"):
        resolve_ds_config(_cfg(deepspeed={"template": "zero9"}), world_size=1)
