"""Tool calls and reasoning: records in the formats agent and reasoning datasets use go through
prepare, and the supervised spans decode to exactly the assistant's text and tool calls (and
reasoning per --reasoning); tool results and the tools list are context, not targets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_tools import schema
from data_tools.chat import Renderer
from data_tools.formats import BadRecord, normalize, tools_of
from data_tools.prepare import PrepareOptions, prepare
from data_tools.toolchat import ChatOptions, chat_documents

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
# OpenAI / Hugging Face form: arguments as JSON text, content None beside the call
TOOL_RECORD = {
    "tools": [WEATHER],
    "messages": [
        {"role": "user", "content": "What's the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 18}'},
        {"role": "assistant", "content": "It is 18 °C in Paris."},
    ],
}
# LLaMA-Factory's sharegpt form: a function_call turn, an observation, tools as JSON text
SHAREGPT_TOOL_RECORD = {
    "conversations": [
        {"from": "human", "value": "What's the weather in Paris?"},
        {
            "from": "function_call",
            "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        },
        {"from": "observation", "value": '{"temp_c": 18}'},
        {"from": "gpt", "value": "It is 18 °C in Paris."},
    ],
    "tools": json.dumps([WEATHER]),
}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
REASONING_RECORD = {  # reasoning_content, as Qwen3 / DeepSeek-R1 distillations carry it
    "messages": [
        {"role": "user", "content": "What is 17 times 3?"},
        {"role": "assistant", "reasoning_content": "17 * 3 = 51.", "content": "51"},
    ]
}
THINK_RECORD = {  # the same, inline, as OpenThoughts-style data carries it
    "messages": [
        {"role": "user", "content": "What is 17 times 3?"},
        {"role": "assistant", "content": "<think>\n17 * 3 = 51.\n</think>\n\n51"},
    ]
}


@pytest.fixture(scope="module")
def bpe_tokenizer(bpe_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bpe_tokenizer_dir)


def supervised_spans(out: Path, m: schema.Manifest) -> list[list[str]]:
    """Per document of the shards, its supervised runs decoded."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / schema.TOKENIZER_DIR)
    docs = []
    for s in m.shards:
        for row in schema.open_shard(out / s.file).to_pylist():
            at = 0
            for n in row["doc_lens"]:
                ids = np.array(row["input_ids"][at : at + n])
                mask = np.array(row["loss_mask"][at : at + n], dtype=bool)
                cuts = np.flatnonzero(np.diff(mask.astype(int))) + 1
                starts = np.r_[0, cuts]
                runs = np.split(ids, cuts)
                docs.append(
                    [tok.decode(r) for r, a in zip(runs, starts, strict=True) if mask[a]]
                    + [tok.decode(ids)]  # the whole document last
                )
                at += n
    return docs


def _prepare(tmp: Path, tok: Path, records: list[dict], **kw) -> tuple[schema.Manifest, Path]:
    src = tmp / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp / "out"
    options = PrepareOptions(seq_len=1024, chat_template="chatml", progress=False, **kw)
    return prepare([str(src)], tokenizer_path=str(tok), out_dir=str(out), options=options), out


@pytest.mark.parametrize("record", [TOOL_RECORD, SHAREGPT_TOOL_RECORD], ids=["hf", "sharegpt"])
def test_tool_calls_are_trained_tool_results_and_tools_are_not(bpe_tokenizer_dir, tmp_path, record):
    m, out = _prepare(tmp_path, bpe_tokenizer_dir, [record])
    assert m.quarantined_rows == 0
    [doc] = supervised_spans(out, m)
    *trained, whole = doc
    assert trained == [CALL_TEXT + "<|im_end|>\n", "It is 18 °C in Paris.<|im_end|>\n"]
    assert '<|im_start|>tool\n{"temp_c": 18}<|im_end|>' in whole  # in the context
    assert '"name": "get_weather", "description"' in whole  # the tools list, in the system turn


def test_tool_results_trained_on_request(bpe_tokenizer_dir, tmp_path):
    m, out = _prepare(tmp_path, bpe_tokenizer_dir, [TOOL_RECORD], train_tool_results=True)
    [doc] = supervised_spans(out, m)
    assert doc[:-1] == [  # the call and the result it gets: one supervised run
        CALL_TEXT + '<|im_end|>\n<|im_start|>tool\n{"temp_c": 18}<|im_end|>\n',
        "It is 18 °C in Paris.<|im_end|>\n",
    ]


@pytest.mark.parametrize("record", [REASONING_RECORD, THINK_RECORD], ids=["field", "inline"])
@pytest.mark.parametrize(
    "mode, trained, in_context",
    [
        ("train", ["<think>\n17 * 3 = 51.\n</think>\n\n51<|im_end|>\n"], True),
        ("mask", ["51<|im_end|>\n"], True),
        ("drop", ["51<|im_end|>\n"], False),
    ],
)
def test_reasoning_per_flag(bpe_tokenizer_dir, tmp_path, record, mode, trained, in_context):
    m, out = _prepare(tmp_path, bpe_tokenizer_dir, [record], reasoning=mode)
    [doc] = supervised_spans(out, m)
    assert doc[:-1] == trained
    assert ("17 * 3 = 51." in doc[-1]) == in_context


# A template that renders reasoning only in the turns after the last user message, as Qwen3's
# does: one rendering of a two-exchange conversation cannot be cut into its turns.
HISTORY_DROPPING = (
    "{%- set ns = namespace(last=0) -%}"
    "{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}{% endif %}{% endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{{ '<|im_start|>assistant\n' }}"
    "{%- if m.reasoning_content and loop.index0 > ns.last %}{{ '<think>\n' + m.reasoning_content + '\n</think>\n\n' }}{% endif -%}"
    "{{ m.content + '<|im_end|>\n' }}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif -%}"
)


def test_a_template_that_drops_earlier_reasoning_gives_one_document_per_turn(bpe_tokenizer):
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "reasoning_content": "two and two", "content": "4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "reasoning_content": "three and three", "content": "6"},
    ]
    render = Renderer(bpe_tokenizer, HISTORY_DROPPING)
    docs = chat_documents(
        bpe_tokenizer, render, messages, None, mask="assistant", options=ChatOptions(), builtin=None
    )
    trained = [[t for t, s in d if s] for d in docs]
    assert trained == [
        ["<think>\ntwo and two\n</think>\n\n4<|im_end|>\n"],
        ["<think>\nthree and three\n</think>\n\n6<|im_end|>\n"],
    ]
    assert "two and two" not in "".join(t for t, _ in docs[1])  # as the template shows history


def test_a_template_that_loses_a_tool_call_is_refused(bpe_tokenizer):
    # mentions tool_calls (so it is trusted to render them) but writes nothing for them
    lossy = (
        "{% for m in messages %}{% if m.tool_calls %}{% endif %}"
        "{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    _, messages = normalize(TOOL_RECORD)
    with pytest.raises(BadRecord, match="does not render the tool call 'get_weather'"):
        chat_documents(
            bpe_tokenizer,
            Renderer(bpe_tokenizer, lossy),
            messages,
            tools_of(TOOL_RECORD),
            mask="assistant",
            options=ChatOptions(),
            builtin=None,
        )


@pytest.mark.parametrize(
    "messages, reason",
    [
        (
            [
                {"role": "user", "content": "x"},
                {"role": "tool", "content": "r"},
                {"role": "assistant", "content": "y"},
            ],
            "no assistant turn before it calls a tool",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}],
                },
            ],
            "arguments that are not JSON",
        ),
        (
            [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "content": "y",
                    "tool_calls": [{"function": {"arguments": {}}}],
                },
            ],
            "has no function name",
        ),
    ],
)
def test_bad_tool_records_are_quarantined_with_a_reason(messages, reason):
    with pytest.raises(BadRecord, match=reason):
        normalize({"messages": messages})


def test_inspect_shows_tool_calls_and_reasoning(bpe_tokenizer_dir, tmp_path):
    from data_tools.inspect import inspect

    record = {
        "messages": [
            *TOOL_RECORD["messages"][:3],
            {"role": "assistant", "reasoning_content": "It said 18.", "content": "18 °C."},
        ],
        "tools": [WEATHER],
    }
    _, out = _prepare(tmp_path, bpe_tokenizer_dir, [record], reasoning="mask")
    text = inspect(str(out), samples=1)
    assert (
        '[[<<tool call: {"name": "get_weather", "arguments": {"city": "Paris"}}>><|im_end|>' in text
    )
    assert "<<reasoning: It said 18.>>\n\n[[18 °C.<|im_end|>" in text  # masked: outside [[ ]]
