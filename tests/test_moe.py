"""Mixtures of experts (sftscale.moe, docs/moe.md): shapes counted as transformers builds them,
FLOPs of the active experts, the balance loss per document, ZeRO-3 runs that match a plain
fp32 PyTorch loop, ranks that route to disjoint experts, resume and export."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import reference_run

from helpers import RANK_ENV, torchrun, train_local_subprocess
from sftscale.config import ConfigError, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]
MOE_PRESETS = [
    "tiny-qwen3-moe",
    "tiny-mixtral",
    "tiny-deepseek-v3",
    "qwen3-30b-a3b",
    "mixtral-8x7b",
    "deepseek-v3-16b",
]


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _extra_configs():
    """Layouts the presets do not cover: Qwen2-MoE's gated shared expert with dense layers,
    DeepSeek latent attention with a query LoRA and biases."""
    from transformers import AutoConfig

    small = dict(hidden_size=64, num_attention_heads=4, vocab_size=500, num_hidden_layers=3)
    return [
        AutoConfig.for_model(
            "qwen2_moe",
            **small,
            num_key_value_heads=2,
            intermediate_size=128,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=96,
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=2,
            mlp_only_layers=[0],
        ),
        AutoConfig.for_model(
            "deepseek_v3",
            **small,
            num_key_value_heads=4,
            intermediate_size=128,
            moe_intermediate_size=32,
            n_routed_experts=8,
            n_shared_experts=2,
            num_experts_per_tok=3,
            first_k_dense_replace=1,
            q_lora_rank=24,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=8,
            n_group=1,
            topk_group=1,
            attention_bias=True,
        ),
    ]


def test_shapes_count_what_transformers_builds():
    """Total, largest and active parameters from the config alone (the planner's view) equal
    the counts on the model transformers builds: active = every matmul parameter but the
    input embedding, with the routed experts' weights counted top_k / experts."""
    from sftscale.model import model_config
    from sftscale.shape import ModelShape

    configs = [model_config(n, vocab_size=1000) for n in MOE_PRESETS] + _extra_configs()
    for config in configs:
        model = _meta_model(config)
        shape = ModelShape.from_config(config)
        params = dict(model.named_parameters())
        assert shape.total_params == sum(p.numel() for p in params.values()), config.model_type
        assert shape.largest_param == max(p.numel() for p in params.values())
        routed = sum(p.numel() for n, p in params.items() if ".mlp.experts." in n)
        embedding = model.get_input_embeddings().weight.numel()
        active = shape.total_params - embedding - routed + routed * shape.top_k // shape.experts
        assert shape.active_matmul_params == active, config.model_type
    # Qwen3-30B-A3B: 30.5B parameters, 3.3B active with the embedding (3.0B of matmuls)
    q = ModelShape.from_config(model_config("qwen3-30b-a3b", vocab_size=0))
    assert round(q.total_params / 1e9, 1) == 30.5
    assert 3.3e9 <= q.active_matmul_params + q.embed < 3.4e9


def test_flops_count_the_experts_a_token_runs():
    from sftscale.flops import doc_flops
    from sftscale.model import model_config
    from sftscale.shape import ModelShape

    s = ModelShape.from_config(model_config("mixtral-8x7b", vocab_size=0))
    n = 1000
    assert (
        doc_flops([n], s) == 6.0 * s.active_matmul_params * n + 6.0 * s.n_layers * s.hidden * n * n
    )
    assert s.active_matmul_params < 0.3 * s.matmul_params  # 2 of 8 experts


@pytest.mark.parametrize("preset", ["tiny-qwen3-moe", "tiny-mixtral", "tiny-deepseek-v3"])
def test_balance_loss_is_per_document(preset):
    """A document's balance loss is transformers' own for it alone; a packed row's is the sum
    of its documents' (padding counts nowhere), whatever else shares the row."""
    from transformers import AutoModelForCausalLM
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from sftscale.data import collate
    from sftscale.model import model_config
    from sftscale.moe import RouterTap, routing_of

    torch.manual_seed(0)
    config = model_config(preset, vocab_size=300)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    routing = routing_of(config, None)
    tap = RouterTap(routing).attach(model)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 300, size=n) for n in (7, 12, 5)]

    def run(rows, seq_len):
        batch = collate(
            [
                (np.concatenate(r), np.ones(sum(map(len, r)), np.int8), np.array(list(map(len, r))))
                for r in rows
            ],
            seq_len=seq_len,
            pad_id=0,
        )
        with torch.no_grad(), tap.recording():
            out = model(
                input_ids=batch.input_ids,
                position_ids=batch.position_ids,
                use_cache=False,
                output_router_logits=not routing.sigmoid,
            )
        return out, *tap.balance(batch)

    alone = [run([[d]], len(d)) for d in docs]
    if not routing.sigmoid:  # transformers' function is the softmax routers' loss
        for d, (out, loss, _) in zip(docs, alone, strict=True):
            want = load_balancing_loss_func(out.router_logits, routing.experts, routing.top_k)
            torch.testing.assert_close(loss, len(d) * want, rtol=1e-6, atol=0)
    _, packed, counts = run([docs[:2], docs[2:]], 24)  # two rows, the second one padded
    torch.testing.assert_close(packed, sum(x[1] for x in alone), rtol=1e-6, atol=0)
    assert torch.equal(counts, sum(x[2] for x in alone))
    layers = counts.shape[0]
    assert counts.sum() == routing.top_k * layers * sum(map(len, docs))


def test_what_moe_does_not_support_is_refused_before_any_worker():
    from sftscale.model import model_config
    from sftscale.validate import _check_experts

    moe, dense = (
        model_config("tiny-qwen3-moe", vocab_size=100),
        model_config("tiny-llama", vocab_size=100),
    )
    base = ["data.path=/d", "model.name_or_path=tiny-qwen3-moe"]
    with pytest.raises(ConfigError, match="sequence parallelism is not supported for mixtures"):
        _check_experts(load_config(None, [*base, "scale.sequence_parallel_size=2"]), moe)
    with pytest.raises(ConfigError, match="train.mlp_tiles=0"):
        _check_experts(load_config(None, [*base, "train.mlp_tiles=2"]), moe)
    with pytest.raises(ConfigError, match="has no experts"):
        _check_experts(load_config(None, [*base, "model.router_aux_loss_coef=0.1"]), dense)
    with pytest.raises(ConfigError, match="must be >= 0"):
        load_config(None, [*base, "model.router_aux_loss_coef=-1"])
    ep = [*base, "scale.num_workers=6"]
    with pytest.raises(ConfigError, match=r"4 experts and the 6 workers; use one of \[1, 2\]"):
        _check_experts(load_config(None, [*ep, "scale.expert_parallel_size=3"]), moe)
    with pytest.raises(ConfigError, match="scale.min_workers=0"):
        _check_experts(
            load_config(None, [*ep, "scale.expert_parallel_size=2", "scale.min_workers=2"]), moe
        )


def test_a_mixture_of_experts_sftscale_does_not_know_is_refused():
    """Its experts would be counted as dense parameters and its routers never balanced."""
    from transformers import AutoConfig

    from sftscale.validate import _check_experts

    gpt_oss = AutoConfig.for_model("gpt_oss", num_hidden_layers=2, num_local_experts=4)
    cfg = load_config(None, ["data.path=/d"])
    with pytest.raises(ConfigError, match="'gpt_oss', which sftscale does not support yet"):
        _check_experts(cfg, gpt_oss)


def test_an_expert_parallel_checkpoint_resumes_with_expert_parallelism_on(tmp_path):
    """Another expert-parallel size or world goes through DeepSpeed's universal checkpoint;
    between on and off the parameters have other names: refused, saying what to set."""
    from sftscale.checkpoint import check_expert_layout

    def cfg(ep):
        return load_config(None, ["data.path=/d", f"scale.expert_parallel_size={ep}"])

    saved = {"world_size": 4, "expert_parallel_size": 2}
    assert not check_expert_layout(saved, cfg(2), world=4, checkpoint=tmp_path)
    assert not check_expert_layout(saved, cfg(2), world=2, checkpoint=tmp_path)  # elastic
    assert check_expert_layout(saved, cfg(4), world=4, checkpoint=tmp_path)
    assert not check_expert_layout({"world_size": 4}, cfg(1), world=2, checkpoint=tmp_path)
    with pytest.raises(ConfigError, match="resume it with a scale.expert_parallel_size >= 2"):
        check_expert_layout(saved, cfg(1), world=4, checkpoint=tmp_path)
    with pytest.raises(ConfigError, match="resume it with scale.expert_parallel_size=1,"):
        check_expert_layout({"world_size": 4}, cfg(2), world=4, checkpoint=tmp_path)


# ---- runs: ZeRO-3 against a plain fp32 PyTorch loop --------------------------------------

STEPS = 8
COEF = 0.05  # larger than the preset's 0.01 so the balance loss moves the weights visibly


@pytest.fixture(scope="module")
def moe_model_dir(tmp_path_factory, sp_tokenizer):
    from transformers import AutoModelForCausalLM

    from sftscale.model import model_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        model_config("tiny-qwen3-moe", vocab_size=len(sp_tokenizer))
    )
    out = tmp_path_factory.mktemp("moe_model")
    model.save_pretrained(str(out))
    return out


def _cfg(root, prepared_dir, model_dir, name, *, micro, accum, workers=1, extra=()):
    return load_config(
        None,
        [
            f"model.name_or_path={model_dir}",
            f"model.router_aux_loss_coef={COEF}",
            f"data.path={prepared_dir}",
            "deepspeed.precision=fp32",
            "optim.lr=3e-3",
            "optim.warmup_steps=2",
            "optim.weight_decay=0.1",
            f"train.micro_batch_size={micro}",
            f"train.grad_accum={accum}",
            f"train.max_steps={STEPS}",
            f"scale.num_workers={workers}",
            "checkpoint.every_n_steps=4",
            f"logging.output_dir={root}",
            f"logging.run_name={name}",
            "logging.tensorboard=false",
            *extra,
        ],
    )


def _records(cfg):
    lines = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def _export(cfg):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(cfg.run_dir / "export"), dtype=torch.float32)


@pytest.fixture(scope="module")
def moe_reference(tmp_path_factory, prepared_dir, moe_model_dir):
    cfg = _cfg(tmp_path_factory.mktemp("ref"), prepared_dir, moe_model_dir, "ref", micro=4, accum=1)
    return reference_run(str(moe_model_dir), cfg, world_size=1, balance_coef=COEF)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, prepared_dir, moe_model_dir):
    """1 rank, micro-batch 2, 2 accumulation steps, activation checkpointing."""
    cfg = _cfg(tmp_path_factory.mktemp("one"), prepared_dir, moe_model_dir, "one", micro=2, accum=2)
    train_local_subprocess(cfg)
    return cfg


def _assert_matches(cfg, reference):
    ref_losses, ref_weights = reference
    records = _records(cfg)
    losses = [r["loss"] for r in records]
    rel = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True))
    print(f"{cfg.logging.run_name}: max relative loss difference to the reference {rel:.2e}")
    assert len(losses) == STEPS and rel <= 1e-5
    model = _export(cfg)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, ref_weights[name], atol=1e-5, rtol=1e-4, msg=name)
    for r in records:  # top_k slots per token and MoE layer, all counted
        assert r["balance_loss"] > 0 and sum(r["expert_tokens"]) % (2 * 2) == 0
        assert len(r["expert_tokens"]) == 4 and r["expert_imbalance"] >= 0
    return records, model


@pytest.mark.distributed
def test_one_rank_with_accumulation_matches_the_reference(one_rank, moe_reference, sp_tokenizer):
    _, model = _assert_matches(one_rank, moe_reference)
    # the export is a Hugging Face MoE directory that reloads and generates
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    ids = torch.tensor([sp_tokenizer("hello there").input_ids])
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def _command(cfg, ranks: int) -> list[str]:
    """`sftscale train` of `cfg`: --local in this process's image, or under torchrun."""
    path = cfg.run_dir.parent / f"{cfg.logging.run_name}.yaml"
    save_config(cfg, path)
    if ranks == 1:
        return [sys.executable, "-m", "sftscale", "train", str(path), "--local"]
    return torchrun("-m", "sftscale", "train", str(path), nproc=ranks)


def _train(cfg, ranks: int) -> str:
    proc = subprocess.run(
        _command(cfg, ranks),
        capture_output=True,
        text=True,
        env={**os.environ, **RANK_ENV},
        timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc.stdout


def _run_until_stopped(cfg, ranks: int) -> str:
    """Run `cfg` (or resume it) and ask it to stop once it logged a step more (the STOP file,
    as a scheduler's trap does): it checkpoints and leaves. Returns its output."""
    out = cfg.run_dir.parent / f"{cfg.logging.run_name}.out"
    before = len(_records(cfg)) if (cfg.run_dir / "metrics.jsonl").exists() else 0
    with open(out, "w") as log:
        env = {**os.environ, **RANK_ENV}
        proc = subprocess.Popen(_command(cfg, ranks), stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:
            if (cfg.run_dir / "metrics.jsonl").exists() and len(_records(cfg)) > before:
                (cfg.run_dir / "STOP").touch()
                break
            time.sleep(0.05)
        proc.wait(timeout=600)
    text = out.read_text()
    # stopped on request (143: a scheduler requeues it), after its checkpoint
    assert proc.returncode != 0 and "preempted: checkpoint at step" in text, text[-3000:]
    assert _records(cfg)[-1]["step"] < STEPS, "the run finished before it was stopped"
    return text


def _stop_and_resume(cfg, ranks: int) -> None:
    _run_until_stopped(cfg, ranks)
    assert "resumed from" in _train(cfg, ranks)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, prepared_dir, moe_model_dir):
    """2 ranks x micro-batch 2 x no accumulation, the experts on every rank (ZeRO-3 only)."""
    cfg = _cfg(
        tmp_path_factory.mktemp("two"),
        prepared_dir,
        moe_model_dir,
        "two",
        micro=2,
        accum=1,
        workers=2,
    )
    assert "ZeRO-3 leaf modules: Qwen3MoeSparseMoeBlock" in _train(cfg, 2)
    return cfg


@pytest.mark.distributed
def test_two_ranks_match_the_reference_and_one_rank(two_ranks, moe_reference, one_rank):
    """The same loss, balance loss and update as 1 rank accumulating twice and the
    single-process loop (the balance loss is normalized by the step's tokens, across ranks
    and micro-steps)."""
    two, _ = _assert_matches(two_ranks, moe_reference)
    one = _records(one_rank)
    for a, b in zip(two, one, strict=True):
        assert abs(a["balance_loss"] - b["balance_loss"]) <= 1e-6 * b["balance_loss"]
        assert a["expert_tokens"] == b["expert_tokens"]


@pytest.mark.distributed
def test_stopped_and_resumed_moe_run_is_exact(tmp_path, prepared_dir, moe_model_dir, one_rank):
    cfg = _cfg(tmp_path, prepared_dir, moe_model_dir, "stopped", micro=2, accum=2)
    _stop_and_resume(cfg, 1)
    assert [r["loss"] for r in _records(cfg)] == [r["loss"] for r in _records(one_rank)]
    assert [r["balance_loss"] for r in _records(cfg)] == [
        r["balance_loss"] for r in _records(one_rank)
    ]
    a, b = dict(_export(cfg).named_parameters()), dict(_export(one_rank).named_parameters())
    for name, p in a.items():
        assert torch.equal(p, b[name]), name


@pytest.mark.distributed
def test_expert_parallel_matches_and_resumes(tmp_path, prepared_dir, moe_model_dir, two_ranks):
    """DeepSpeed AutoEP on CPU/gloo: 2 ranks each holding 2 of the 4 experts (tokens sent with
    all_to_all), stopped and resumed on the same layout, stopped again and finished on 4 ranks
    of 1 expert each (DeepSpeed's universal checkpoint), match the same run with every expert
    on every rank (weight decay on: the resume keeps each parameter group's own); the export
    is the model's own Hugging Face layout. Expert parallelism off is refused."""
    from transformers import AutoModelForCausalLM

    from sftscale.validate import validate_run

    def ep(size, ranks):
        extra = [f"scale.expert_parallel_size={size}"]
        return _cfg(
            tmp_path,
            prepared_dir,
            moe_model_dir,
            "ep",
            micro=4 // ranks,
            accum=1,
            workers=ranks,
            extra=extra,
        )

    cfg = ep(2, 2)
    assert "expert parallel: groups of 2 ranks, 2 experts each" in _run_until_stopped(cfg, 2)
    assert "resumed from" in _run_until_stopped(cfg, 2)  # the same layout
    with pytest.raises(ConfigError, match="with a scale.expert_parallel_size >= 2"):
        validate_run(ep(1, 4), world_size=4)  # refused before any rank starts
    out = _train(ep(4, 4), 4)
    assert "saved by 2 worker(s), now 4" in out and "groups of 4 ranks, 1 experts each" in out
    cfg = ep(4, 4)
    for a, b in zip(_records(cfg), _records(two_ranks), strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * b["loss"]
        assert abs(a["balance_loss"] - b["balance_loss"]) <= 1e-5 * b["balance_loss"]
        assert a["expert_tokens"] == b["expert_tokens"]
    model, info = AutoModelForCausalLM.from_pretrained(
        str(cfg.run_dir / "export"), dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info
    want = dict(_export(two_ranks).named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, want[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.distributed
def test_ranks_routing_to_disjoint_experts_finish(tmp_path):
    """Rank 0's tokens reach experts {0, 1}, rank 1's {2, 3, 4, 5}; with transformers' eager
    experts (a loop over the experts that received tokens) the ranks' ZeRO-3 traces differ.
    Marked as leaf modules (what the training loop does), the run finishes; unmarked (the
    negative control; DeepSpeed's own default list emptied), DeepSpeed fails it."""
    script = ROOT / "tests/scripts/moe_disjoint_routing.py"
    env = {**os.environ, **RANK_ENV}
    results = {}
    for mode in ("leaf", "no-leaf"):
        out = tmp_path / mode
        out.mkdir()
        cmd = torchrun(str(script), str(out), mode, "eager")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
            results[mode] = (proc.returncode, proc.stdout + proc.stderr)
        except subprocess.TimeoutExpired as e:  # a hang is the failure mode too
            results[mode] = (None, str(e.stdout or "") + str(e.stderr or ""))
        routed = [json.loads((out / f"rank{r}.json").read_text())["experts"] for r in (0, 1)]
        assert routed == [[0, 1], [2, 3, 4, 5]], routed
        results[mode] += (sorted(p.name for p in out.glob("*.done")),)
    rc, log, done = results["leaf"]
    assert rc == 0 and done == ["rank0.done", "rank1.done"], log[-4000:]
    rc, log, done = results["no-leaf"]
    assert rc != 0 and not done, log[-4000:]
    assert rc is None or "disagreement" in log, log[-4000:]


@pytest.mark.distributed
@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-deepseek-v3"])
def test_other_moe_families_train_and_export(tmp_path, prepared_dir, sp_tokenizer, preset):
    """Mixtral and DeepSeek-V3 (sigmoid routing, a shared expert, a dense first layer, its
    experts' score bias a persistent buffer) train on 2 ranks and export a directory that
    transformers loads whole and generates from."""
    from transformers import AutoModelForCausalLM

    cfg = load_config(
        None,
        [
            f"model.name_or_path={preset}",
            f"data.path={prepared_dir}",
            "deepspeed.precision=fp32",
            "train.max_steps=3",
            "scale.num_workers=2",
            f"logging.output_dir={tmp_path}",
            "logging.run_name=run",
            "logging.tensorboard=false",
        ],
    )
    out = _train(cfg, 2)
    assert "mixture of experts: 4 experts, top 2" in out
    records = _records(cfg)
    assert len(records) == 3 and all(sum(r["expert_tokens"]) > 0 for r in records)
    model, info = AutoModelForCausalLM.from_pretrained(
        str(cfg.run_dir / "export"), dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info
    ids = torch.tensor([sp_tokenizer("hello there").input_ids])
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]
    if preset == "tiny-deepseek-v3":  # a persistent buffer: exported, not left to its init
        from safetensors import safe_open

        files = (cfg.run_dir / "export").glob("*.safetensors")
        keys = set().union(*(safe_open(str(f), "pt").keys() for f in files))
        assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys


def test_an_expert_parallel_checkpoint_is_not_exported_offline_into_a_wrong_layout(tmp_path):
    from sftscale.export import export_from_checkpoint

    root = tmp_path / "checkpoints"
    (root / "hf_model").mkdir(parents=True)
    (root / "step_00000004").mkdir()
    (root / "step_00000004" / "sftscale_state.json").write_text('{"expert_parallel_size": 2}')
    (root / "latest").write_text("step_00000004\n")
    with pytest.raises(ValueError, match="expert_parallel_size=2; exporting such a checkpoint"):
        export_from_checkpoint(root, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
