"""Loading from a local Hugging Face directory under ZeRO-3 partitions parameters as they load."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.distributed
def test_local_model_loads_partitioned(tmp_path):
    from transformers import AutoModelForCausalLM

    from sftscale.model import model_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config("tiny-llama", vocab_size=300))
    model.save_pretrained(str(tmp_path / "m"))
    out = tmp_path / "report.json"
    script = Path(__file__).parent / "scripts" / "zero_init_load.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--standalone",
            str(script),
            str(tmp_path / "m"),
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, "\n".join(
        line for line in proc.stderr.splitlines() if "Warning" not in line
    )[-6000:]
    for rank in (0, 1):
        report = json.loads(Path(f"{out}.rank{rank}").read_text())
        assert report["params"] > 10
        assert report["partitioned"], f"rank {rank} materialized a parameter whole"
        assert report["equal"], f"rank {rank}: gathered weights differ from the saved ones"
