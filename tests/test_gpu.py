"""GPU tier: runs only where CUDA is present (skipped on CPU machines and in CI)."""

import numpy as np
import pytest
import torch

from sftscale.data import collate
from sftscale.model import load_model

pytestmark = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@requires_cuda
@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_packed_row_equals_documents_alone_bf16(attn):
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn")
    torch.manual_seed(0)
    model = (
        load_model("tiny-llama", vocab_size=97, dtype=torch.bfloat16, attn_implementation=attn)
        .cuda()
        .eval()
    )
    rng = np.random.default_rng(0)
    lens = [70, 1, 120, 50]
    docs = [rng.integers(1, 97, n).astype(np.int32) for n in lens]
    row = (np.concatenate(docs), np.ones(sum(lens), np.int8), np.array(lens, np.int32))
    batch = collate([row], seq_len=256, pad_id=0).to("cuda")
    with torch.no_grad():
        packed = model(
            input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
        ).logits[0]
        start = 0
        for d in docs:
            alone = model(
                input_ids=torch.from_numpy(d.astype(np.int64))[None].cuda(), use_cache=False
            ).logits[0]
            # bf16: kernels may reduce in a different order for different lengths
            torch.testing.assert_close(
                packed[start : start + len(d)].float(), alone.float(), atol=3e-2, rtol=3e-2
            )
            start += len(d)


@requires_cuda
def test_peak_table_knows_this_gpu():
    from sftscale.flops import gpu_peak_flops

    name = torch.cuda.get_device_name()
    if not any(k in name for k in ("H100", "H200", "A100")):
        pytest.skip(f"{name} is not in the datasheet table; MFU uses a matmul probe there")
    assert gpu_peak_flops(name) > 1e14


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_ulysses_sp2_with_flash_attention_2_matches_sp1(tmp_path):
    """tests/scripts/sp_exactness.py on 2 GPUs (nccl, bf16): flash_attention_2 separates the
    documents of a packed row from the gathered position ids (varlen) under Ulysses SP=2."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("flash_attn")
    out = tmp_path / "sp.json"
    script = Path(__file__).parent / "scripts" / "sp_exactness.py"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
            str(out),
            "flash_attention_2",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    r = json.loads(out.read_text())
    assert abs(r["loss"]["sp2"] - r["loss"]["sp1"]) <= 2e-2 * abs(r["loss"]["sp1"])  # bf16
    assert r["grad_max_abs_diff"] <= 5e-2 * r["grad_max_abs"]
    later, first = r["probe"]["sp2"]
    assert first > 1e-2 and later <= 1e-3, r["probe"]
    assert r["quiet"]["finite"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_expert_parallel_on_two_gpus_matches_every_expert_on_every_gpu(tmp_path, prepared_dir):
    """tests/test_moe.py's CPU comparison on 2 GPUs (nccl, bf16): DeepSpeed AutoEP with its
    CUDA path (grouped GEMM, permutation) against ZeRO-3 with every expert on every GPU."""
    import json
    import os
    import subprocess

    from helpers import torchrun
    from sftscale.config import load_config, save_config

    losses = {}
    for ep in (1, 2):
        cfg = load_config(
            None,
            [
                "model.name_or_path=tiny-qwen3-moe",
                f"data.path={prepared_dir}",
                "deepspeed.precision=bf16",
                "scale.use_gpu=true",
                "scale.num_workers=2",
                f"scale.expert_parallel_size={ep}",
                "train.micro_batch_size=2",
                "train.max_steps=4",
                f"logging.output_dir={tmp_path}",
                f"logging.run_name=ep{ep}",
                "logging.tensorboard=false",
            ],
        )
        path = tmp_path / f"ep{ep}.yaml"
        save_config(cfg, path)
        env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
        cmd = torchrun("-m", "sftscale", "train", str(path))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
        lines = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
        losses[ep] = [json.loads(x)["loss"] for x in lines if '"loss"' in x]
    assert len(losses[2]) == 4
    for a, b in zip(losses[2], losses[1], strict=True):
        assert abs(a - b) <= 2e-2 * abs(b)  # bf16: kernels reduce in different orders
