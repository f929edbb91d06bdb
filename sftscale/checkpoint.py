"""Checkpoints that survive crashes: atomic, complete, and resumable on another world size.

Layout under <run>/checkpoints/:

    step_00000040/            one checkpoint (a "tag")
        ...                   DeepSpeed's files: ZeRO-3 partitions of weights and optimizer state
        rng_rank{r}.pt        python / numpy / torch (CPU, CUDA) RNG states of rank r
        sftscale_state.json   step, stream position, world size, data fingerprint (rank 0)
    latest                    name of the newest complete checkpoint, written last
    hf_model/                 config + tokenizer, for `sftscale export`
<run>/ledger/upto_00000040.npy  (step, epoch, row) of every sample consumed since the previous
                              checkpoint: the proof that no sample is skipped or repeated

Atomicity: every rank writes into `.tmp-step_N/`; after a barrier rank 0 renames it to
`step_N/`, writes the ledger segment, and only then replaces `latest` (write + rename). A crash
at any point leaves `latest` naming the previous complete checkpoint. Old checkpoints beyond
`keep_last` are deleted after `latest` moves.

The learning-rate schedule is a pure function of the step and the data position of the step
and the stream position, so neither needs state of its own beyond these numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_tools.console import say
from data_tools.durable import atomic_write, fsync_dir, fsync_tree
from sftscale.config import Config, ConfigError
from sftscale.storage import RUN_FILES, carry_run_files

STATE_FILE = "sftscale_state.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
TAG_PATTERN = re.compile(r"step_\d{8}")
# Fault-injection point for the crash-during-checkpoint test: when set to a step number, the
# process kills itself after DeepSpeed has written that step's files and before the rename.
CRASH_ENV = "SFTSCALE_FAULT_KILL_DURING_CHECKPOINT"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def save_rng_state(tag_dir: Path, rank: int) -> None:
    """This rank's python, numpy and torch (CPU, CUDA) RNG states, as JSON and safetensors:
    nothing sftscale writes is loaded with pickle."""
    from safetensors.torch import save_file  # heavy (safetensors): only when saving

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    atomic_write(tag_dir / f"rng_rank{rank}.json", json.dumps(plain))
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": t for i, t in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, str(tag_dir / f"rng_rank{rank}.safetensors"))


def load_rng_state(tag_dir: Path, rank: int) -> bool:
    """Restore what save_rng_state wrote; False when this checkpoint has no such files (one
    written before they existed: its pickled RNG file is never loaded)."""
    from safetensors.torch import load_file  # heavy (safetensors): only when resuming

    plain_file, tensor_file = (
        tag_dir / f"rng_rank{rank}.json",
        tag_dir / f"rng_rank{rank}.safetensors",
    )
    if not (plain_file.is_file() and tensor_file.is_file()):
        return False
    plain = json.loads(plain_file.read_text())
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    tensors = load_file(str(tensor_file))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda{i}"] for i in range(len(tensors) - 1)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return True


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None. Half-written ones are invisible."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not TAG_PATTERN.fullmatch(name):  # `latest` names a step, never a path
        raise FileNotFoundError(
            f"{pointer} holds {name[:80]!r}, not a checkpoint name (step_NNNNNNNN); remove it or "
            "write the name of a checkpoint in that directory into it"
        )
    tag_dir = root / name
    if not (tag_dir / STATE_FILE).is_file():
        raise FileNotFoundError(f"{pointer} names {tag_dir.name}, which is incomplete or missing")
    return tag_dir


def read_state(tag_dir: Path) -> dict[str, Any]:
    return json.loads((tag_dir / STATE_FILE).read_text())


def save_checkpoint(
    engine,
    root: Path,
    *,
    state: dict[str, Any],
    ledger: np.ndarray | None,
    ledger_dir: Path,
    rank: int,
    keep_last: int,
    leader: bool | None = None,
    run_files: list[Path] = (),
) -> Path:
    """Collective: every rank must call it. Returns the checkpoint directory.

    leader: this process commits the checkpoint in `root` (default: rank 0, for a directory
        every rank shares). Where nodes share no disk, one rank per disk (elected by
        `storage.claim_directory`) commits that disk's copy, which holds its ranks' files.
    run_files: files or directories (metrics, ledger) rank 0 copies into the checkpoint
        (storage.carry_run_files) before it is committed, so that a checkpoint on object
        storage restores them too.
    """

    leader = rank == 0 if leader is None else leader
    step = state["step"]
    tag = tag_for(step)
    tmp_tag = TMP_PREFIX + tag
    if leader and (root / tmp_tag).exists():  # debris of an earlier crash at this step
        shutil.rmtree(root / tmp_tag)
    dist.barrier()
    # Frozen weights (LoRA's base) are not saved: they are reloaded from model.name_or_path,
    # so a LoRA checkpoint is about the adapters' size.
    engine.save_checkpoint(
        str(root),
        tag=tmp_tag,
        client_state={"sftscale": state},
        save_latest=False,
        exclude_frozen_parameters=True,
    )
    save_rng_state(root / tmp_tag, rank)
    if rank == 0 and run_files:  # into the uncommitted directory: renamed with it
        carry_run_files(list(run_files), root / tmp_tag)
        if ledger is not None:  # and this step's ledger segment, which the commit writes
            carried = root / tmp_tag / RUN_FILES / ledger_dir.name
            carried.mkdir(parents=True, exist_ok=True)
            np.save(carried / f"upto_{step:08d}.npy", ledger)
    dist.barrier()  # collective: every rank's files are on disk
    if os.environ.get(CRASH_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    final = root / tag
    if leader:  # the leader's effects: commit
        atomic_write(root / tmp_tag / STATE_FILE, json.dumps(state, indent=2) + "\n")
        fsync_tree(root / tmp_tag)  # DeepSpeed's files, the RNG, the run files: on disk
        if final.exists():
            shutil.rmtree(final)
        (root / tmp_tag).replace(final)
        fsync_dir(root)
        if ledger is not None:
            ledger_dir.mkdir(parents=True, exist_ok=True)
            tmp = ledger_dir / f".upto_{step:08d}.npy"
            with open(tmp, "wb") as f:
                np.save(f, ledger)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(ledger_dir / f"upto_{step:08d}.npy")
            fsync_dir(ledger_dir)
        atomic_write(root / LATEST, tag + "\n")
        _prune(root, keep_last=keep_last)
    dist.barrier()  # collective: nobody proceeds (or reports) before the commit
    return final


def _prune(root: Path, *, keep_last: int) -> None:
    """Keep the checkpoint `latest` names and the keep_last - 1 before it; a step directory
    newer than `latest` (an orphan of a crashed run) is not counted and never deletes it."""
    latest = latest_checkpoint(root)
    if latest is None:
        return
    tags = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name <= latest.name)
    for old in tags[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(root / f"universal-{old.name}", ignore_errors=True)  # its elastic-resume copy


def load_checkpoint(engine, tag_dir: Path, *, rank: int) -> dict[str, Any]:
    """Restore weights, optimizer state and this rank's RNG; return the sftscale state."""
    state = read_state(tag_dir)
    groups = own_group_settings(engine.optimizer)
    load_dir, _ = engine.load_checkpoint(
        str(tag_dir.parent),
        tag=tag_dir.name,
        load_optimizer_states=True,
        load_lr_scheduler_states=False,
        load_module_strict=not has_frozen(engine.module),  # frozen weights were not saved
    )
    if load_dir is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {tag_dir}")
    if engine.zero_nvme_offload_optimizer():
        restore_nvme_optimizer_state(engine, tag_dir)
    unshare_step_counters(engine.optimizer)
    restore_group_settings(engine.optimizer, groups)
    if state["world_size"] == _world_size() and not load_rng_state(tag_dir, rank):
        say(
            f"{tag_dir} holds no JSON/safetensors RNG state for rank {rank} (an older "
            "checkpoint; its pickled file is not loaded): random streams restart from the seed"
        )
    return state


GROUP_SETTINGS = ("name", "weight_decay", "betas", "eps")  # not lr: the loop sets it each step


def own_group_settings(optimizer) -> list[dict[str, Any]]:
    """Each parameter group's settings as this run built them (sftscale.optim.param_groups)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return [{k: g[k] for k in GROUP_SETTINGS if k in g} for g in inner.param_groups]


def restore_group_settings(optimizer, groups: list[dict[str, Any]]) -> None:
    """Put back each parameter group's own settings after a load. DeepSpeed's universal
    checkpoint load (an elastic resume) gives every group the first saved group's: weight decay
    on the norms and biases of the no-decay group, 4.5e-5 off in the loss two steps later (a
    tiny Llama, weight decay 0.1)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for group, own in zip(inner.param_groups, groups, strict=True):
        group.update(own)


def unshare_step_counters(optimizer) -> None:
    """Give every parameter's AdamW state its own step counter.

    DeepSpeed's universal-checkpoint load (stage3 `load_hp_checkpoint_state_from_checkpoint_dir_
    stage3`) puts one and the same `step` object into every sub-group's state. torch's AdamW
    keeps `step` as a tensor and advances it in place, once per sub-group it steps: a shared
    tensor then advances by the number of sub-groups each step, and the bias correction of every
    step after an elastic resume is wrong (losses 0.3-0.9% off an uninterrupted run). DeepSpeed's
    own Adam kernels keep an int and are not affected."""
    basic = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer under ZeRO's wrapper
    seen: set[int] = set()
    for state in basic.state.values():
        step = state.get("step")
        if torch.is_tensor(step):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(state["step"]))


def restore_nvme_optimizer_state(engine, tag_dir: Path) -> None:
    """The AdamW state DeepSpeed 0.19 leaves behind when the optimizer lives on NVMe.

    Its `load_checkpoint` copies the saved swap files (fp32 weights, moments) back into the
    swap folder but skips its ZeRO checkpoint, and the optimizer then starts every sub-group
    afresh: zero moments that overwrite the restored files at the first step, and step 1 for
    AdamW's bias correction. Here, per sub-group, from this rank's ZeRO checkpoint file:
    - swapped sub-groups: the step count, and the moments registered with the swapper under the
      names of the restored files, so its next swap-in reads them (one sub-group at a time, as
      in training: never all moments in memory at once);
    - sub-groups too small to swap (< 1 MiB): their moments, step and fp32 weights, which only
      that file holds (in host RAM while training).
    Same world size only: the swap files are this rank's partitions."""
    zero = engine.optimizer
    adam = zero.optimizer  # the torch optimizer (DeepSpeedCPUAdam) under the ZeRO wrapper
    saved = torch.load(
        engine._get_zero_ckpt_name(str(tag_dir.parent), tag_dir.name),
        map_location="cpu",
        weights_only=False,
    )["optimizer_state_dict"]
    states = saved["optimizer_state_dict"]["state"]
    flats = zero.fp32_partitioned_groups_flat
    # the saved state's order: each param group's sub-groups (stage3 _set_fp32_optimizer_param_groups)
    order = [
        i
        for g in range(len(adam.param_groups))
        for i in range(len(flats))
        if zero.sub_group_to_group_id[i] == g
    ]
    for index, sub_group in enumerate(order):
        state, flat = states.get(index), flats[sub_group]
        if state is None:  # not stepped yet when saved
            continue
        if zero._swappable_optimizer_subgroup(sub_group):
            info = zero.optimizer_swapper.swap_params_info[flat.ds_id]
            if info.has_state_tensors:  # the swapper knows this sub-group's moments already
                adam.state[flat]["step"] = state["step"]
                continue
            moments = {}
            for name in ("exp_avg", "exp_avg_sq"):
                placeholder = torch.empty(0, dtype=flat.dtype)
                placeholder.ds_id = f"{name}-{flat.ds_id}"  # the swap file it is read from
                moments[name] = placeholder
            info.add_state_tensors(list(moments.values()))
            adam.state[flat] = {"step": state["step"], **moments}
        else:
            adam.state[flat] = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
            flat.data.copy_(saved["fp32_flat_groups"][sub_group])
            zero._reassign_or_swap_out_partitioned_parameters(sub_group)  # into the partitions
    # Weights below the persistence threshold (norms, biases) stay gathered whole on every rank
    # and the forward reads that copy, gathered when DeepSpeed's load ended; the partitions just
    # written are re-gathered, as after an optimizer step (on 2 ranks the norms were otherwise
    # read stale: 0.004 off, losses 5e-4 off an uninterrupted run from the first step resumed)
    persistent = zero.persistent_parameters
    if persistent:
        persistent[0].partition(persistent)
        persistent[0].all_gather(persistent)


def has_frozen(module: torch.nn.Module) -> bool:
    return any(not p.requires_grad for p in module.parameters())


def _world_size() -> int:

    return dist.get_world_size()


def truncate_ledger(ledger_dir: Path, *, step: int) -> None:
    """Drop ledger segments of steps after `step` (work lost in a crash, to be redone)."""
    for f in ledger_dir.glob("upto_*.npy"):
        if int(f.stem.split("_")[1]) > step:
            f.unlink()


def read_ledger(ledger_dir: Path) -> np.ndarray:
    """All (step, epoch, row) entries of the run, in step order."""
    parts = [np.load(f) for f in sorted(ledger_dir.glob("upto_*.npy"))]
    return np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)


def universal_checkpoint(tag_dir: Path, *, leader: bool) -> Path:
    """Collective. DeepSpeed's universal (world-size-independent) form of a checkpoint, made
    once by the leader (rank 0, or one rank per disk where nodes share no disk) beside
    it; loading it needs `"checkpoint": {"load_universal": true}`."""

    out = tag_dir.parent / f"universal-{tag_dir.name}"
    if leader and not (out / STATE_FILE).is_file():
        from deepspeed.checkpoint import ds_to_universal

        tmp = tag_dir.parent / f"{TMP_PREFIX}universal-{tag_dir.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(
            input_folder=str(tag_dir),
            output_folder=str(tmp),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=False,
        )
        ds_to_universal.main(args)
        for f in tag_dir.glob("rng_rank*.pt"):
            shutil.copy2(f, tmp / f.name)
        shutil.copy2(tag_dir / STATE_FILE, tmp / STATE_FILE)
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
    dist.barrier()  # collective: the conversion is on disk for every rank
    return out


def check_expert_layout(state: dict, cfg: Config, *, world: int, checkpoint: Path) -> bool:
    """Whether the checkpoint's expert layout differs from this run's; it is then loaded
    through DeepSpeed's universal form, as for another world size (AutoEP's experts are
    consolidated and split again). Between expert parallelism on (any size >= 2) and off the
    parameters have other names (transformers' fused experts, AutoEP's w1/w2/w3): refused."""
    saved, ep = state.get("expert_parallel_size", 1), cfg.scale.expert_parallel_size
    if (saved == 1) == (ep == 1):
        return saved != ep
    want = "scale.expert_parallel_size=1" if saved == 1 else "a scale.expert_parallel_size >= 2"
    raise ConfigError(
        f"checkpoint {checkpoint} was saved by {state['world_size']} ranks with "
        f"scale.expert_parallel_size={saved}; this run has {world} ranks with {ep}. A checkpoint "
        "resumes with expert parallelism on or off as it was saved: resume it with "
        f"{want}, or choose another logging.run_name to start a new run"
    )


def lora_state(cfg: Config) -> dict[str, Any] | None:
    """What a checkpoint records of model.lora (what must not change on resume)."""
    if cfg.model.lora is None:
        return None
    lora = dataclasses.asdict(cfg.model.lora)
    return {**lora, "target_modules": sorted(lora["target_modules"])}
