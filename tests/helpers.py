"""Shared assertion: the Hugging Face export holds the trained weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def assert_export_matches_checkpoint(run_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from sftscale.cli import main

    export = run_dir / "export"
    assert (export / "config.json").is_file() and (export / "tokenizer_config.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32).eval()

    # The fp32 master weights, consolidated offline from the DeepSpeed checkpoint.
    fp32_dir = tmp_path / "from_checkpoint_fp32"
    assert (
        main(["export", str(run_dir / "checkpoints"), "--out", str(fp32_dir), "--dtype", "float32"])
        == 0
    )
    master = AutoModelForCausalLM.from_pretrained(str(fp32_dir), dtype=torch.float32).eval()

    # bf16 training keeps bf16 copies of the fp32 master weights: rounding the master gives
    # exactly the exported tensors. fp32 training exports the master weights themselves.
    bf16 = json.loads((export / "config.json").read_text()).get("dtype") == "bfloat16"
    exported = dict(reloaded.named_parameters())
    for name, p in master.named_parameters():
        expected = p.to(torch.bfloat16).float() if bf16 else p
        torch.testing.assert_close(exported[name], expected, atol=0, rtol=0)

    ids = torch.randint(
        0, reloaded.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        a = reloaded(input_ids=ids, use_cache=False).logits
        b = master(input_ids=ids, use_cache=False).logits
    # bf16 weight rounding (rel. 2^-8) bounds the logit difference
    torch.testing.assert_close(a, b, atol=5e-2, rtol=2e-2)

    # The offline export from the checkpoint (in the training dtype by default) equals the one
    # written at the end of training.
    default_dir = tmp_path / "from_checkpoint_default"
    assert main(["export", str(run_dir / "checkpoints"), "--out", str(default_dir)]) == 0
    assert json.loads((default_dir / "config.json").read_text())["dtype"] == (
        "bfloat16" if bf16 else "float32"
    )
    offline = AutoModelForCausalLM.from_pretrained(str(default_dir), dtype=torch.float32)
    for name, p in offline.named_parameters():
        torch.testing.assert_close(exported[name], p, atol=0, rtol=0)


def train_local_subprocess(cfg, *extra: str) -> None:
    """`sftscale train --local` in a fresh process, as a user runs it: DeepSpeed keeps
    process-global communication state, so one process runs one local training."""
    import subprocess
    import sys

    from sftscale.config import save_config

    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    path = cfg.run_dir.parent / f"{cfg.logging.run_name}.yaml"
    save_config(cfg, path)
    proc = subprocess.run(
        [sys.executable, "-m", "sftscale", "train", str(path), "--local", *extra],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def assert_sharded_export_loads(run_dir: Path, tmp_path: Path) -> None:
    """A small shard limit gives several safetensors files + index, loaded as one model."""
    from transformers import AutoModelForCausalLM

    from sftscale.export import export_from_checkpoint

    out = export_from_checkpoint(
        run_dir / "checkpoints",
        out_dir=tmp_path / "sharded",
        dtype=torch.float32,
        max_shard_bytes=40_000,
    )
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    whole = AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "from_checkpoint_fp32"), dtype=torch.float32
    )
    sharded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    for (name, a), (_, b) in zip(whole.named_parameters(), sharded.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def registered_checkpoint(s3, run: str, *, timeout: float) -> None:
    """Wait until Ray Train's controller has registered a checkpoint of the run on storage (its
    checkpoint manager snapshot names one): a worker killed earlier could take the only
    reported checkpoint with it, before the controller collected the report."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with s3.open_input_stream(f"{run}/checkpoint_manager_snapshot.json") as f:
                if b"step_0000" in f.read():
                    return
        except (OSError, FileNotFoundError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint of {run} was registered within {timeout} s")


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    """`python -m torch.distributed.run` with `nproc` ranks on a free port, then `args` (a
    script, or `-m module ...`)."""
    import sys

    from sftscale.launch import free_port

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(free_port()),
        *args,
    ]


# ranks of a CPU test share 2 cores; DeepSpeed picks its accelerator at import
RANK_ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
