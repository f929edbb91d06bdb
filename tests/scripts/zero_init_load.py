"""Run under torchrun (2 ranks): load a local HF model under ZeRO-3 and report how it is held.

python -m torch.distributed.run --nproc-per-node 2 tests/scripts/zero_init_load.py MODEL_DIR OUT_JSON
"""

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers.integrations import HfDeepSpeedConfig  # noqa: E402

from sftscale.model import load_model  # noqa: E402


def main(model_dir: str, out_json: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "train_batch_size": world,
        "zero_optimization": {"stage": 3},
    }
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841  (transformers reads it through a weakref)
    model = load_model(model_dir, vocab_size=0, dtype=torch.float32)
    report = {"partitioned": True, "equal": True, "params": 0}
    saved = load_file(os.path.join(model_dir, "model.safetensors"))
    for name, p in model.named_parameters():
        report["params"] += 1
        # ZeRO-3 keeps only this rank's slice (ds_tensor); the parameter itself is empty.
        expected = -(-p.ds_numel // world)
        report["partitioned"] &= (
            hasattr(p, "ds_id") and p.numel() == 0 and p.ds_tensor.numel() == expected
        )
        with deepspeed.zero.GatheredParameters([p]):
            report["equal"] &= torch.equal(p.data, saved[name])
    with open(f"{out_json}.rank{rank}", "w") as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()
    # DeepSpeed's communication backend keeps a reference to the gloo group, whose threads can
    # then be torn down in the wrong order at interpreter exit (SIGABRT, seen now and then on a
    # loaded 2-core machine). The work is done and reported; leave without the teardown.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
