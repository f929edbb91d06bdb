"""The baseline of `sftscale bench`: Hugging Face `Trainer` on the same model, data and
DeepSpeed config as sftscale's run of the same grid point.

Started by sftscale/bench/suite.py under torchrun, one process per rank:

    torchrun --standalone --nproc-per-node 2 -m sftscale.bench.hf_baseline SPEC.json

Shared with sftscale's run: the model (preset, random init from the same seed, dtype, attention
implementation, gradient checkpointing), the documents (the rows of a `prepare --packing none`
directory, one document each, from the same corpus and tokenizer), the DeepSpeed template
(ZeRO stage, buckets, offload, AdamW; its "auto" fields filled by Trainer from the same values),
the micro-batch size and the number of steps. Trainer's own: its data order (a seeded random
sampler), its default padding collator for labelled data (`DataCollatorForSeq2Seq`: pad to the
longest document of the micro-batch, labels padded with -100) and its loss. The documents are
handed to Trainer in sftscale's stream order (seeded permutation, `sftscale.data.stream_rows`)
and read sequentially, so its step s consumes the same documents as step s of sftscale's run on
the same unpacked directory: the padded comparison is on identical batches.

Throughput is measured like sftscale's: wall time from the end of the last warm-up step to
the end of the last step, tokens counted from the batches those steps consumed (all ranks).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    # after DS_ACCELERATOR is set: these load transformers and deepspeed
    from transformers import (
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
    )

    from sftscale.data import IGNORE_INDEX, PackedDataset, pad_token_id, stream_rows
    from sftscale.engine import init_distributed
    from sftscale.flops import doc_flops
    from sftscale.model import enable_gradient_checkpointing, load_model
    from sftscale.shape import ModelShape

    init_distributed()  # the same process group as sftscale's (gloo on CPU, NCCL on GPU)

    data = PackedDataset(spec["data_dir"])
    if data.manifest.options.get("packing") != "none":
        raise SystemExit(
            f"{spec['data_dir']}: the baseline needs unpacked rows (prepare --packing none)"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(data.tokenizer_dir))
    steps = spec["warmup_steps"] + spec["steps"]
    bf16 = spec["precision"] == "bf16"
    use_gpu = torch.cuda.is_available()
    args = training_arguments(spec, steps=steps, bf16=bf16, use_gpu=use_gpu)
    # After TrainingArguments: its DeepSpeed config makes transformers build the model inside
    # deepspeed.zero.Init under ZeRO-3, as sftscale does.
    torch.manual_seed(spec["seed"])
    model = load_model(
        spec["preset"],
        vocab_size=len(tokenizer),
        dtype=torch.bfloat16 if bf16 else torch.float32,
        attn_implementation=spec["attn_implementation"],
    )
    if spec["gradient_checkpointing"]:
        enable_gradient_checkpointing(model)  # the same call sftscale makes
    shape = ModelShape.of(model)

    _, order = stream_rows(
        0, len(data), num_rows=len(data), seed=spec["data_seed"], shuffle=spec["shuffle"]
    )

    class Documents(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int) -> dict:
            ids, mask, _ = data.row(int(order[i]))
            labels = np.where(mask == 1, ids, IGNORE_INDEX)  # the model shifts labels itself
            return {"input_ids": ids.tolist(), "labels": labels.tolist()}

    tokenizer.pad_token_id = pad_token_id(tokenizer)
    default_collator = DataCollatorForSeq2Seq(tokenizer, padding="longest")
    batches: list[tuple[int, int, float]] = []  # (tokens, supervised tokens, model FLOPs)

    def collator(features: list[dict]) -> dict:
        lengths = [len(f["input_ids"]) for f in features]
        supervised = sum(sum(1 for x in f["labels"][1:] if x != IGNORE_INDEX) for f in features)
        batches.append((sum(lengths), supervised, doc_flops(lengths, shape)))
        return default_collator(features)

    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if use_gpu:
                torch.cuda.synchronize()
            step_ends.append(time.perf_counter())

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Documents(),
        data_collator=collator,
        callbacks=[StepClock()],
    )
    trainer.train()
    engine = trainer.model_wrapped
    if not hasattr(engine, "zero_optimization_stage"):  # what was measured must be what we claim
        raise RuntimeError(f"Trainer did not run DeepSpeed (model is a {type(engine).__name__})")

    report(spec, engine, data, shape, batches, step_ends, steps=steps, bf16=bf16)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def training_arguments(spec: dict, *, steps: int, bf16: bool, use_gpu: bool):
    """The Trainer's arguments: the same optimizer, schedule inputs and DeepSpeed template."""
    # heavy (transformers): loaded only on the path that uses it
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=spec["out_dir"],
        per_device_train_batch_size=spec["micro_batch_size"],
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=spec["lr"],
        weight_decay=spec["weight_decay"],
        adam_beta1=spec["betas"][0],
        adam_beta2=spec["betas"][1],
        adam_epsilon=spec["eps"],
        max_grad_norm=spec["max_grad_norm"],
        bf16=bf16,
        deepspeed=spec["ds_template"],  # "auto" fields filled by Trainer from the values above
        seed=spec["seed"],
        data_seed=spec["seed"],
        save_strategy="no",
        report_to="none",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        train_sampling_strategy="sequential",  # Documents below is already in stream order
        use_cpu=not use_gpu,
    )


def report(spec, engine, data, shape, batches, step_ends, *, steps: int, bf16: bool) -> None:
    """Rank 0 writes the measured figures of the timed steps to spec["result"]. Collective."""

    # sftscale's modules load deepspeed: after DS_ACCELERATOR is set (main)
    from sftscale.flops import device_peak_flops
    from sftscale.metrics import peak_memory_bytes, peak_reserved_bytes, throughput

    w, n = spec["warmup_steps"], spec["steps"]
    if len(step_ends) != steps or len(batches) < steps:
        raise RuntimeError(f"expected {steps} steps, saw {len(step_ends)} ({len(batches)} batches)")
    measured = np.array(batches[w:steps], dtype=np.float64).sum(axis=0)
    dev = engine.device  # NCCL reduces only CUDA tensors
    totals = torch.tensor(
        [*measured, step_ends[-1] - step_ends[w - 1]], dtype=torch.float64, device=dev
    )
    memory = torch.tensor(
        [peak_memory_bytes(), peak_reserved_bytes()], dtype=torch.float64, device=dev
    )
    seconds = totals[3].clone()
    dist.all_reduce(totals)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    dist.all_reduce(memory, op=dist.ReduceOp.MAX)
    world = dist.get_world_size()
    if dist.get_rank() == 0:
        peak, peak_source = device_peak_flops(
            shape,
            rows=spec["micro_batch_size"] * data.seq_len,
            dtype=torch.bfloat16 if bf16 else torch.float32,
        )
        s = seconds.item()
        result = {
            **throughput(
                tokens=totals[0].item(),
                supervised=totals[1].item(),
                model_flops=totals[2].item(),
                seconds=s,
                world=world,
                peak_flops=peak,
                gradient_checkpointing=spec["gradient_checkpointing"],
            ),
            "step_time_s": s / n,
            "peak_memory_bytes": int(memory[0].item()),
            "peak_reserved_bytes": int(memory[1].item()),
            "peak_flops_source": peak_source,
            "world_size": world,
            "measured_steps": n,
            "tokens": int(totals[0].item()),
            "supervised_tokens": int(totals[1].item()),
            "zero_stage": engine.zero_optimization_stage(),
            "engine": type(engine).__name__,
        }
        Path(spec["result"]).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
