"""The cluster path on CPU: Ray Train (V2) TorchTrainer, 2 workers, DeepSpeed ZeRO-3 bf16, gloo."""

import json

import pytest

from helpers import assert_export_matches_checkpoint
from sftscale.config import load_config
from sftscale.launch import run


@pytest.mark.distributed
def test_two_ray_workers_zero3(tmp_path, prepared_dir):
    cfg = load_config(
        None,
        [
            "model.name_or_path=tiny-llama",
            f"data.path={prepared_dir}",
            "optim.lr=5e-3",
            "optim.warmup_steps=2",
            "train.micro_batch_size=2",
            "train.grad_accum=2",
            "train.max_steps=12",
            "scale.num_workers=2",
            f"logging.output_dir={tmp_path / 'runs'}",
            "logging.run_name=ray",
        ],
    )
    run(cfg, local=False)
    run_dir = tmp_path / "runs" / "ray"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 12
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-3:]) / 3
    assert last < first - 0.5, [r["loss"] for r in records]
    # both ranks wrote their ZeRO-3 partitions
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    shards = sorted(p.name for p in (run_dir / "checkpoints" / tag).iterdir())
    assert sum("zero_pp_rank_" in s and "optim_states" in s for s in shards) == 2, shards
    assert_export_matches_checkpoint(run_dir, tmp_path)
