"""sftscale: supervised fine-tuning of causal LMs on packed shards with Ray Train + DeepSpeed ZeRO-3.

Module map (data preparation lives in data_tools/: formats, jsonstream, chat, encode,
tokenizer, mixture, pack, schema, prepare, outdir, durable, inspect, console, synthetic):

    cli          the `sftscale` command: prepare, inspect, train, plan, status, export, bench,
                 build-ops
    config       typed, strict run configuration (YAML + section.key=value overrides)
    resolve      the run resolved once (ResolvedRun): model config with its final vocabulary,
                 shape, precision, DeepSpeed config, layout, memory plan; the workers' check
    validate     checks that need the manifest, the model or a checkpoint; before any worker
    fit          will it fit: `sftscale plan` and the changes that make a run fit
    plan         the memory model: memory per rank, broken down
    devices      the GPU catalogue, this host's memory, the device a rank gets
    shape        ModelShape: the one representation of a model's sizes
    launch       how workers start: Ray Train TorchTrainer, or this process (local / torchrun)
    worker       a worker's setup (process group, data, engine, resume) and its Run
    train        the per-worker loop and its step: train_step -> log / eval / save -> export
    forward      what a step computes: rows per rank, a micro-batch's summed loss
    evaluate     held-out loss and perplexity
    engine       DeepSpeed in one place: process group, precision agreement, ZeRO-3 load,
                 deepspeed.initialize, bitwise-resumable CPU Adam
    precision    deepspeed.precision=auto: bf16 where the device computes it natively
    model        Hugging Face models unmodified: presets, loading, vocabulary growth
    lora         peft LoRA adapters on a ZeRO-3 base
    sequence_parallel  Ulysses SP (DeepSpeed ALST) and per-document attention on packed rows,
                 TiledMLP
    storage      every byte to object storage or a node's cache: remote (pyarrow.fs), the data
                 cache, disk leaders, run files, checkpoint downloads and uploads
    data         the shard reader: global order, rank assignment, collation, fingerprint
    loss         summed token cross-entropy in fp32, chunked; the LM head tiled into it
    optim        learning-rate schedule and parameter groups
    flops        model / hardware FLOPs and the measured device peak (MFU, HFU)
    metrics      metrics.jsonl / TensorBoard / W&B / MLflow, the throughput record
    checkpoint   atomic checkpoints, sample ledger, universal (elastic) conversion
    preemption   SIGTERM and the STOP file: checkpoint and stop at a step boundary
    heartbeat    per-rank heartbeats, `sftscale status`, stall watchdog, named collective timeouts
    jit_locks    DeepSpeed's JIT ops: which a run needs, built on first use; stale build locks removed
    export       streaming safetensors export, from the engine or a checkpoint
    export_run   the run's export: the full model, or LoRA's adapter, base and merged model
    ds_config    the one resolver of ds_configs/ templates (shipped in the package)
    demo         `make demo`: corpus -> tokenizer -> shards -> train -> reload -> generate
    bench        `sftscale bench`: throughput and memory against the Hugging Face Trainer

docs/architecture.md: the data flow, the boundaries and where to change what.
"""

__version__ = "0.1.0"
