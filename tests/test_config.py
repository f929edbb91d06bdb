from pathlib import Path

import pytest
import yaml

from sftscale.config import Config, ConfigError, load_config, save_config

ROOT = Path(__file__).resolve().parent.parent


def _write(tmp_path, data) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_yaml_and_overrides(tmp_path):
    p = _write(
        tmp_path, {"data": {"path": "d"}, "optim": {"lr": "3e-4"}, "train": {"max_steps": 7}}
    )
    cfg = load_config(
        p, ["optim.lr=1e-3", "train.micro_batch_size=4", "model.gradient_checkpointing=false"]
    )
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.train.micro_batch_size == 4 and cfg.train.max_steps == 7
    assert cfg.model.gradient_checkpointing is False
    assert isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize(
    "data, overrides, field",
    [
        ({"data": {"path": "d"}, "optim": {"lrr": 1}}, [], "optim.lrr"),
        ({"data": {"path": "d"}, "nonsense": {}}, [], "nonsense"),
        ({"data": {"path": "d"}}, ["train.micro_batch_size=two"], "train.micro_batch_size"),
        ({"data": {"path": "d"}}, ["train.micro_batch_size=0"], "train.micro_batch_size"),
        ({"data": {"path": "d"}}, ["optim.schedule=cosinus"], "optim.schedule"),
        ({"data": {"path": "d"}}, ["deepspeed.precision=fp16"], "deepspeed.precision"),
        ({"data": {"path": "d"}}, ["optim.betas=[0.9]"], "optim.betas"),
        (
            {"data": {"path": "d"}},
            ["model.gradient_checkpointing=1"],
            "model.gradient_checkpointing",
        ),
        ({}, [], "data.path"),
        (
            {"data": {"path": "d"}},
            ["train.max_steps=5", "optim.warmup_steps=5"],
            "optim.warmup_steps",
        ),
        ({"data": {"path": "d"}}, ["lr=3"], "section.key=value"),
    ],
)
def test_bad_values_name_the_field(tmp_path, data, overrides, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace(".", r"\.")):
        load_config(_write(tmp_path, data), overrides)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(_write(tmp_path, {"data": {"path": "d"}}), ["optim.lr=0.5"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), Config)


def test_elastic_runs_keep_the_global_batch_on_fewer_workers():
    from sftscale.config import ConfigError, load_config

    cfg = load_config(
        None,
        [
            "data.path=d",
            "scale.num_workers=4",
            "scale.min_workers=2",
            "train.micro_batch_size=2",
            "train.grad_accum=3",
        ],
    )
    assert cfg.for_world(4) is cfg
    assert cfg.for_world(2).train.grad_accum == 6
    assert cfg.for_world(2).global_batch_rows(2) == cfg.global_batch_rows() == 24
    with pytest.raises(ConfigError, match="3 workers cannot split the global batch of 8 rows"):
        load_config(
            None,
            [
                "data.path=d",
                "scale.num_workers=4",
                "scale.min_workers=3",
                "train.micro_batch_size=2",
                "train.grad_accum=1",
            ],
        ).for_world(3)
    fixed = load_config(None, ["data.path=d", "scale.num_workers=4"])
    assert fixed.for_world(2) is fixed  # not elastic: a smaller world is a smaller batch
    with pytest.raises(ConfigError, match="scale.min_workers: must be 0"):
        load_config(None, ["data.path=d", "scale.num_workers=2", "scale.min_workers=3"])


@pytest.mark.parametrize("value", ["-1", "33554433", "lots"])
def test_cpu_mmap_threshold_is_bounded(value):
    """glibc's mmap threshold: 0 (its dynamic default) up to 32 MiB (the largest mallopt takes)."""
    with pytest.raises(ConfigError, match="train.cpu_mmap_threshold"):
        load_config(None, ["data.path=x", f"train.cpu_mmap_threshold={value}"])
    assert (
        load_config(None, ["data.path=x", "train.cpu_mmap_threshold=0"]).train.cpu_mmap_threshold
        == 0
    )
