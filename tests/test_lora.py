"""LoRA under ZeRO-3: the same losses and adapters as a plain peft fp32 loop, exports that are
never empty (stage3_param_persistence_threshold=0 partitions every adapter matrix) and agree with
each other, checkpoints of the adapter's size, exact resume and resume on another world size."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import train_local_subprocess
from sftscale.checkpoint import CRASH_ENV
from sftscale.config import ConfigError, load_config, save_config

STEPS = 12
LORA = {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


@pytest.fixture(scope="module")
def threshold0_template(tmp_path_factory):
    """zero3 with every parameter partitioned, however small: the setting under which peft's own
    save_pretrained writes an empty adapter."""
    from sftscale.ds_config import load_template

    t = load_template("zero3")
    t["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path_factory.mktemp("ds") / "zero3_threshold0.json"
    path.write_text(json.dumps(t))
    return path


def _cfg(tmp_path, prepared_dir, model_dir, template, name, *extra):
    return load_config(
        None,
        [
            f"model.name_or_path={model_dir}",
            f"model.lora={json.dumps(LORA)}",
            f"data.path={prepared_dir}",
            f"deepspeed.template={template}",
            "deepspeed.precision=fp32",
            "optim.lr=5e-3",
            "optim.schedule=constant",
            "optim.weight_decay=0.1",
            "train.micro_batch_size=2",
            "train.grad_accum=2",
            f"train.max_steps={STEPS}",
            "checkpoint.every_n_steps=4",
            f"logging.output_dir={tmp_path}",
            f"logging.run_name={name}",
            "logging.tensorboard=false",
            *extra,
        ],
    )


def _losses(cfg):
    lines = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def _adapter(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "export" / "adapter" / "adapter_model.safetensors"))


def _peft_reference(model_dir, cfg):
    """Plain single-process fp32 loop: peft on the base directory, torch AdamW, the same global
    batches (the same data order and collation), the same adapter initialization."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftscale.data import IGNORE_INDEX, PackedDataset, collate, stream_rows
    from sftscale.lora import init_adapters, peft_key

    data = PackedDataset(cfg.data.path)
    tok = AutoTokenizer.from_pretrained(str(data.tokenizer_dir))
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = get_peft_model(
        base,
        LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["target_modules"]),
    )
    init_adapters(model, seed=cfg.train.seed)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    opt = torch.optim.AdamW(
        trainable, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
    )
    losses, g = [], cfg.global_batch_rows(1)
    for step in range(STEPS):
        _, rows = stream_rows(step * g, g, num_rows=len(data), seed=cfg.data.seed, shuffle=True)
        batch = collate(
            [data.row(int(i)) for i in np.sort(rows)], seq_len=data.seq_len, pad_id=tok.pad_token_id
        )
        logits = model(
            input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
        ).logits
        loss = (
            torch.nn.functional.cross_entropy(
                logits.flatten(0, 1),
                batch.targets.flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            / (batch.targets != IGNORE_INDEX).sum()
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, o.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    adapter = {
        peft_key(n): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
    }
    return losses, adapter


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, prepared_dir, model_dir, threshold0_template):
    cfg = _cfg(
        tmp_path_factory.mktemp("lora"),
        prepared_dir,
        model_dir,
        threshold0_template,
        "lora",
        "checkpoint.export_merged=true",
    )
    train_local_subprocess(cfg)
    return cfg


@pytest.mark.distributed
def test_lora_matches_a_plain_peft_loop(lora_run, model_dir):
    losses, adapter = _peft_reference(model_dir, lora_run)
    ours = _losses(lora_run)
    rel = [abs(a - b) / abs(b) for a, b in zip(ours, losses, strict=True)]
    print(f"LoRA vs plain peft: max relative loss difference {max(rel):.1e} over {STEPS} steps")
    assert max(rel) <= 1e-5, rel
    assert ours[-1] < ours[0] - 0.2  # it trained
    exported = _adapter(lora_run.run_dir)
    assert sorted(exported) == sorted(adapter)
    for name, p in adapter.items():
        assert exported[name].numel() > 0, name  # the empty-adapter regression
        torch.testing.assert_close(exported[name], p, atol=1e-5, rtol=1e-4, msg=name)
    assert any(v.abs().max() > 0 for k, v in exported.items() if "lora_B" in k)  # B moved off 0


@pytest.mark.distributed
def test_adapter_and_merged_exports_give_the_same_logits(lora_run, model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sftscale.cli import main

    export = lora_run.run_dir / "export"
    adapter_cfg = json.loads((export / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(model_dir.resolve())  # used as it is
    assert not (export / "base").exists()
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, str(export / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(export / "merged"), dtype=torch.float32)
    ids = torch.randint(
        0, base.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        a = with_adapter(input_ids=ids, use_cache=False).logits
        b = merged.eval()(input_ids=ids, use_cache=False).logits
        plain = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        c = plain(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert (a - c).abs().max() > 1e-3  # the adapter changes the model
    # Offline, from the last checkpoint: the same adapter.
    offline = tmp_path / "offline"
    assert main(["export", str(lora_run.run_dir / "checkpoints"), "--out", str(offline)]) == 0
    from safetensors.torch import load_file

    again = load_file(str(offline / "adapter_model.safetensors"))
    for name, t in _adapter(lora_run.run_dir).items():
        torch.testing.assert_close(again[name], t, atol=0, rtol=0, msg=name)


@pytest.mark.distributed
def test_checkpoints_hold_the_adapter_not_the_model(lora_run, model_dir):
    from safetensors.torch import load_file

    ckpt = lora_run.run_dir / "checkpoints" / f"step_{STEPS:08d}"
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    adapter = sum(t.numel() for t in _adapter(lora_run.run_dir).values())
    model = sum(t.numel() for t in load_file(str(model_dir / "model.safetensors")).values())
    print(f"checkpoint {size} bytes; adapter {adapter} parameters, model {model}")
    # fp32 master + Adam's two moments of the adapter, plus DeepSpeed's metadata
    assert size < 12 * adapter + 200_000, (size, adapter)
    assert size < 12 * model / 5, (size, model)


@pytest.mark.distributed
def test_lora_resume_is_exact(lora_run, tmp_path, prepared_dir, model_dir, threshold0_template):
    """Killed while writing the step-8 checkpoint; the rerun resumes from step 4 and ends
    bitwise where the uninterrupted run ended."""
    cfg = _cfg(
        tmp_path,
        prepared_dir,
        model_dir,
        threshold0_template,
        "resumed",
        "checkpoint.export_merged=true",
    )
    path = tmp_path / "resumed.yaml"
    save_config(cfg, path)
    cmd = [sys.executable, "-m", "sftscale", "train", str(path), "--local"]
    crashed = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, CRASH_ENV: "8"}
    )
    assert crashed.returncode != 0
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and "at step 4" in again.stdout
    assert _losses(cfg) == _losses(lora_run)
    ours, base = _adapter(cfg.run_dir), _adapter(lora_run.run_dir)
    for name, t in base.items():
        assert torch.equal(ours[name], t), name


@pytest.mark.distributed
def test_lora_on_two_ray_workers_then_resumed_on_one(
    tmp_path, prepared_dir, model_dir, threshold0_template, lora_run
):
    """2 Ray workers (micro 2 x accum 1 x 2 ranks) train to step 8; one local worker (micro 2 x
    accum 2) resumes from the universal checkpoint. Same global batch: the losses stay within
    fp32 reduction-order tolerance of the single-worker run throughout."""
    from sftscale.launch import run

    cfg = _cfg(
        tmp_path,
        prepared_dir,
        model_dir,
        threshold0_template,
        "elastic",
        "scale.num_workers=2",
        "train.grad_accum=1",
        "train.max_steps=8",
    )
    run(cfg, local=False)
    cfg = _cfg(tmp_path, prepared_dir, model_dir, threshold0_template, "elastic")
    train_local_subprocess(cfg)
    rel = [abs(a - b) / abs(b) for a, b in zip(_losses(cfg), _losses(lora_run), strict=True)]
    assert len(rel) == STEPS and max(rel) <= 1e-5, rel
    for name, t in _adapter(lora_run.run_dir).items():
        torch.testing.assert_close(_adapter(cfg.run_dir)[name], t, atol=1e-5, rtol=1e-4)


def test_lora_config(prepared_dir, tmp_path):
    from sftscale.validate import validate_run

    cfg = load_config(None, [f"data.path={prepared_dir}", "model.lora.r=4", "model.lora.alpha=8"])
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.dropout) == (4, 8.0, 0.0)
    assert load_config(None, [f"data.path={prepared_dir}", "model.lora={}"]).model.lora.r == 16
    assert load_config(None, [f"data.path={prepared_dir}"]).model.lora is None
    with pytest.raises(ConfigError, match="model.lora.r: must be >= 1"):
        load_config(None, [f"data.path={prepared_dir}", "model.lora.r=0"])
    qlora = load_config(
        None,
        [f"data.path={prepared_dir}", "model.lora.qlora=true", f"logging.output_dir={tmp_path}"],
    )
    with pytest.raises(ConfigError, match="bitsandbytes on CUDA"):
        validate_run(qlora, world_size=1)


def test_unknown_target_module_names_the_layers():
    from transformers import AutoModelForCausalLM

    from sftscale.config import LoraConfig
    from sftscale.lora import add_adapters
    from sftscale.model import model_config

    model = AutoModelForCausalLM.from_config(model_config("tiny-llama", vocab_size=300))
    with pytest.raises(ValueError, match="qkv_proj name no Linear layer.*q_proj"):
        add_adapters(model, LoraConfig(target_modules=["qkv_proj"]), seed=0)


@pytest.mark.distributed
def test_resume_with_another_lora_config_is_refused(lora_run, tmp_path):
    from sftscale.launch import run

    save_config(lora_run, tmp_path / "same.yaml")
    changed = load_config(tmp_path / "same.yaml", ["model.lora.r=4"])
    with pytest.raises(ConfigError, match="model.lora.r: 8 in the checkpoint, 4 now"):
        run(changed, local=True)
