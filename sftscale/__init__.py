"""sftscale: supervised fine-tuning of causal LMs on packed shards with Ray Train + DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
