"""Settings that cannot work fail in the driver, before any worker starts, naming the field."""

import json

import pytest

from sftscale.config import ConfigError, load_config
from sftscale.validate import validate_run


def _cfg(prepared_dir, *overrides):
    return load_config(
        None, [f"data.path={prepared_dir}", "model.name_or_path=tiny-llama", *overrides]
    )


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["train.micro_batch_size=100000"], "train.micro_batch_size"),
        # fine: 1B vocab is larger than ours (on 1 rank it needs more memory than a CI host)
        (["model.name_or_path=llama-3.2-1b", "scale.memory_check=false"], None),
        (["model.name_or_path=/nonexistent/model"], "model.name_or_path"),
        (["deepspeed.template=zero7"], "deepspeed.template"),
        (["model.attn_implementation=flash_attention_2"], "flash_attention_2"),
        (["logging.wandb=true"], "logging.wandb"),
        (["eval.path=/nonexistent"], "eval.path"),
        (["scale.use_gpu=true"], "scale.use_gpu"),
    ],
)
def test_rejected_before_workers(prepared_dir, overrides, field):
    import importlib.util

    cfg = _cfg(prepared_dir, *overrides)
    if field is None:
        validate_run(cfg, world_size=1)
        return
    if field == "logging.wandb" and importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_run(cfg, world_size=1)


def test_seq_len_beyond_model_positions(tmp_path, prepared_dir):
    from transformers import AutoConfig

    model_dir = tmp_path / "m"
    AutoConfig.for_model("llama", max_position_embeddings=64, vocab_size=1000).save_pretrained(
        model_dir
    )
    with pytest.raises(ConfigError, match="max_position_embeddings 64"):
        validate_run(_cfg(prepared_dir, f"model.name_or_path={model_dir}"), world_size=1)


def test_vocabulary_mismatch(tmp_path, prepared_dir):
    from transformers import AutoConfig

    model_dir = tmp_path / "m"
    AutoConfig.for_model("llama", vocab_size=10).save_pretrained(model_dir)
    with pytest.raises(ConfigError, match="vocabulary"):
        validate_run(_cfg(prepared_dir, f"model.name_or_path={model_dir}"), world_size=1)


@pytest.mark.parametrize(
    "zero, message",
    [
        ({"stage": 2, "offload_param": {"device": "cpu"}}, "offload_param needs ZeRO stage 3"),
        ({"stage": 0, "offload_optimizer": {"device": "cpu"}}, "offload_optimizer needs"),
        ({"stage": 3, "offload_param": {"device": "nvme"}}, "nvme_path"),
        ({"stage": 5}, "not 0-3"),
    ],
)
def test_incompatible_zero_options(tmp_path, prepared_dir, zero, message):
    template = tmp_path / "t.json"
    template.write_text(
        json.dumps(
            {
                "train_batch_size": "auto",
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "zero_optimization": zero,
            }
        )
    )
    with pytest.raises(ConfigError, match=message):
        validate_run(_cfg(prepared_dir, f"deepspeed.template={template}"), world_size=1)


@pytest.mark.parametrize("template", ["zero3_nvme_optimizer", "zero3_nvme"])
def test_nvme_templates_say_what_they_need(tmp_path, prepared_dir, monkeypatch, template):
    cfg = _cfg(prepared_dir, f"deepspeed.template={template}")
    with pytest.raises(ConfigError, match=r"deepspeed.nvme_path=<a directory on a fast local disk"):
        validate_run(cfg, world_size=1)
    cfg = _cfg(prepared_dir, f"deepspeed.template={template}", f"deepspeed.nvme_path={tmp_path}")
    from deepspeed.accelerator import get_accelerator

    builder = type(get_accelerator().create_op_builder("AsyncIOBuilder"))
    monkeypatch.setattr(builder, "is_compatible", lambda self, verbose=False: False)  # no libaio
    with pytest.raises(ConfigError, match=r"apt-get install libaio-dev"):
        validate_run(cfg, world_size=1)


def test_nvme_weight_buffer_must_hold_the_largest_partition(tmp_path, prepared_dir):
    """Llama-3.2-1B's embedding on 2 ranks: 131M elements per partition. The shipped template
    sizes ZeRO-Infinity's weight buffers for it ("auto"); a template of one's own with 1e8 is
    refused before launch."""
    from sftscale.ds_config import load_template, resolve_ds_config
    from sftscale.model import model_config
    from sftscale.shape import ModelShape

    overrides = [
        "model.name_or_path=llama-3.2-1b",
        f"deepspeed.nvme_path={tmp_path}",
        "scale.memory_check=false",
    ]
    cfg = _cfg(prepared_dir, *overrides, "deepspeed.template=zero3_nvme")
    ds = resolve_ds_config(
        cfg,
        world_size=2,
        precision="bf16",
        largest_weight=ModelShape.from_config(
            model_config("llama-3.2-1b", vocab_size=0)
        ).largest_weight,
    )
    assert ds["zero_optimization"]["offload_param"]["buffer_size"] == 131334144
    try:
        validate_run(cfg, world_size=2)
    except ConfigError as e:  # only libaio may be missing here
        assert "libaio" in str(e)
    template = load_template("zero3_nvme")
    template["zero_optimization"]["offload_param"]["buffer_size"] = 10**8
    path = tmp_path / "small_buffers.json"
    path.write_text(json.dumps(template))
    with pytest.raises(
        ConfigError, match=r"offload_param.buffer_size is 100,000,000 elements.*131,334,144"
    ):
        validate_run(_cfg(prepared_dir, *overrides, f"deepspeed.template={path}"), world_size=2)


def test_nvme_swap_files_must_fit_on_the_disk(tmp_path, prepared_dir, monkeypatch):
    """Llama-3.2-1B on 2 ranks swaps about 18 GiB (measured 18.4 GiB in benchmarks/results/
    billion_cpu.md); a disk with 1 GiB free is refused before launch."""
    import collections
    import shutil

    cfg = _cfg(
        prepared_dir,
        "model.name_or_path=llama-3.2-1b",
        "deepspeed.precision=bf16",
        "deepspeed.template=zero3_nvme_optimizer",
        f"deepspeed.nvme_path={tmp_path / 'swap'}",
        "scale.num_workers=2",
    )
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(2**40, 2**40 - 2**30, 2**30))
    with pytest.raises(ConfigError, match=r"1.0 GiB free .* need about 18.\d GiB"):
        validate_run(cfg, world_size=2)


def test_nvme_optimizer_resumes_on_its_own_world_size_only(tmp_path, prepared_dir):
    from data_tools.schema import read_manifest
    from sftscale.data import data_fingerprint

    nvme = [
        "deepspeed.template=zero3_nvme_optimizer",
        f"deepspeed.nvme_path={tmp_path}",
        f"logging.output_dir={tmp_path}",
        "logging.run_name=r",
    ]
    with pytest.raises(ConfigError, match="scale.min_workers=0"):
        validate_run(
            _cfg(prepared_dir, *nvme, "scale.num_workers=2", "scale.min_workers=1"), world_size=2
        )
    tag = tmp_path / "r" / "checkpoints" / "step_00000004"
    tag.mkdir(parents=True)
    fingerprint = data_fingerprint(read_manifest(prepared_dir))
    (tag / "sftscale_state.json").write_text(
        json.dumps({"world_size": 2, "data_fingerprint": fingerprint, "lora": None, "step": 4})
    )
    (tag.parent / "latest").write_text(tag.name)
    with pytest.raises(ConfigError, match="saved by 2 workers .* scale.num_workers=2"):
        validate_run(_cfg(prepared_dir, *nvme), world_size=1)
    try:
        validate_run(_cfg(prepared_dir, *nvme), world_size=2)
    except ConfigError as e:  # only libaio may be missing here
        assert "libaio" in str(e)


def test_eval_set_with_another_tokenizer(tmp_path, prepared_dir):
    import shutil

    other = tmp_path / "eval"
    shutil.copytree(prepared_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["fingerprint"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="another tokenizer"):
        validate_run(_cfg(prepared_dir, f"eval.path={other}"), world_size=1)


def test_resume_on_other_data_fails_in_the_driver(tmp_path, prepared_dir):
    """A checkpoint's stream positions refer to the rows it was trained on."""
    from data_tools.schema import read_manifest
    from sftscale.checkpoint import LATEST, STATE_FILE
    from sftscale.data import data_fingerprint

    cfg = _cfg(prepared_dir, f"logging.output_dir={tmp_path}", "logging.run_name=r")
    tag = cfg.run_dir / "checkpoints" / "step_00000004"
    tag.mkdir(parents=True)
    (tag.parent / LATEST).write_text(tag.name)
    fingerprint = data_fingerprint(read_manifest(prepared_dir))
    (tag / STATE_FILE).write_text(json.dumps({"data_fingerprint": fingerprint}))
    validate_run(cfg, world_size=1)  # the same data: fine
    (tag / STATE_FILE).write_text(json.dumps({"data_fingerprint": "another"}))
    with pytest.raises(ConfigError, match=r"data\.path: checkpoint .* other data"):
        validate_run(cfg, world_size=1)
    validate_run(
        _cfg(
            prepared_dir,
            f"logging.output_dir={tmp_path}",
            "logging.run_name=r",
            "checkpoint.resume=false",
        ),
        world_size=1,
    )
