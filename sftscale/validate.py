"""Checks that need more than the config itself (the data manifest, the model, the templates).

They run in the driver before any worker starts, so a bad run fails in seconds with a message
that names the field and the fix, not minutes later inside a Ray worker.
"""

from __future__ import annotations

from pathlib import Path

from data_tools.schema import ShardFormatError, read_manifest
from sftscale.config import Config, ConfigError
from sftscale.ds_config import resolve_ds_config
from sftscale.model import PRESETS, is_preset


def validate_run(cfg: Config, *, world_size: int) -> dict:
    """Raise ConfigError for any setting that cannot work; return the data manifest."""
    try:
        manifest = read_manifest(cfg.data.path)
    except ShardFormatError as e:
        raise ConfigError(f"data.path: {e}") from e

    rows = manifest["num_rows"]
    need = cfg.global_batch_rows(world_size)
    if rows < need:
        raise ConfigError(
            f"train.micro_batch_size * train.grad_accum * scale.num_workers = {need} rows per step, "
            f"but data.path holds only {rows} rows; lower the batch or prepare more data"
        )

    vocab = manifest["tokenizer"]["vocab_size"]
    name = cfg.model.name_or_path
    if is_preset(name):
        positions = PRESETS[name]["max_position_embeddings"]
        model_vocab = PRESETS[name]["vocab_size"] or vocab
    else:
        from transformers import AutoConfig

        if not (Path(name) / "config.json").is_file():
            raise ConfigError(
                f"model.name_or_path: {name!r} is neither a preset ({', '.join(PRESETS)}) "
                "nor a local directory with a config.json"
            )
        mcfg = AutoConfig.from_pretrained(name)
        positions = getattr(mcfg, "max_position_embeddings", None) or manifest["seq_len"]
        model_vocab = mcfg.vocab_size
    if manifest["seq_len"] > positions:
        raise ConfigError(
            f"data.path: seq_len {manifest['seq_len']} exceeds the model's max_position_embeddings "
            f"{positions}; prepare the data with a shorter --seq-len"
        )
    if vocab > model_vocab:
        raise ConfigError(
            f"model.name_or_path: the data's tokenizer has {vocab} tokens but the model's vocabulary "
            f"has {model_vocab}; use the tokenizer the model was trained with"
        )
    if cfg.scale.use_gpu:
        import torch

        if not torch.cuda.is_available() and not cfg.scale.ray_address:
            raise ConfigError(
                "scale.use_gpu is true but this machine has no CUDA device; set it to false"
            )
    resolve_ds_config(cfg, world_size=world_size)  # raises on a bad template or batch arithmetic
    return manifest
