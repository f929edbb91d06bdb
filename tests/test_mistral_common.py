"""Tool calls against Mistral's own encoder, token for token (issue #31): mistral-common 1.13.1
(fetched with pip, never committed; run in a subprocess, tests/scripts/mistral_common_encode.py)
encodes each conversation with its v3 instruct tokenizer, and prepare, on the same SentencePiece
model converted to a Hugging Face tokenizer with a chat template of Mistral's v3 format, must
write the same ids with exactly the assistant turns supervised (their text or tool calls and the
closing </s>, as the encoder writes them); tool results, the tools list and the prompts are not.

v3 puts the tools list and the system prompt in the last user message, so a conversation's
history is rendered unlike its last turn once a user message follows: prepare then writes one
document per assistant turn (the conversation through it, that turn alone supervised), each
compared with mistral-common's encoding of the conversation through that turn.

Also: mistral-common's own chat template for this model (convert_tokenizer_to_chat_template)
through prepare matches its encoder too, except on JSON tool results, which that template writes
as a JSON string where the encoder writes the parsed JSON.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from test_tool_calls import WEATHER

from data_tools import schema
from data_tools.prepare import PrepareOptions, prepare
from data_tools.tokenizer import tokenizer_from_sentencepiece
from pypi_files import mistral_common_site, mistral_sentencepiece_model

SCRIPT = Path(__file__).resolve().parent / "scripts" / "mistral_common_encode.py"

# Mistral's v3 instruct format (InstructTokenizerV3 with its SentencePiece model) as a chat
# template. Each text piece follows a control token with a space, which the converted tokenizer
# encodes as the "▁" SentencePiece prefixes a text encoded on its own. A JSON tool result: the
# encoder parses it and writes it back with json.dumps, which no template can do, so one that
# starts with { or [ is written as it is (equal when the record spells it as json.dumps does).
V3_TEMPLATE = """\
{{- bos_token -}}
{%- set ns = namespace(system='', last_user=-1, tools=[]) -%}
{%- for m in messages -%}
  {%- if m.role == 'system' -%}{%- set ns.system = m.content -%}
  {%- elif m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- for t in tools or [] -%}
  {%- set ns.tools = ns.tools + [{'type': 'function', 'function': {'name': t.function.name,
      'description': t.function.description or '', 'parameters': t.function.parameters}}] -%}
{%- endfor -%}
{%- for m in messages -%}
  {%- if m.role == 'user' -%}
    {%- if loop.index0 == ns.last_user and ns.tools -%}
      {{- '[AVAILABLE_TOOLS] ' + ns.tools | tojson + '[/AVAILABLE_TOOLS]' -}}
    {%- endif -%}
    {{- '[INST] ' -}}
    {%- if loop.index0 == ns.last_user and ns.system -%}{{- ns.system + '\n\n' -}}{%- endif -%}
    {{- m.content + '[/INST]' -}}
  {%- elif m.role == 'assistant' -%}
    {%- if m.tool_calls -%}
      {{- '[TOOL_CALLS] [' -}}
      {%- for c in m.tool_calls -%}
        {{- '{"name": ' + c.function.name | tojson + ', "arguments": ' -}}
        {{- c.function.arguments | tojson -}}
        {%- if c.id and c.id != 'null' -%}{{- ', "id": ' + c.id | tojson -}}{%- endif -%}
        {{- '}' if loop.last else '}, ' -}}
      {%- endfor -%}
      {{- ']' -}}
    {%- else -%}
      {{- ' ' + m.content.rstrip(' ') -}}
    {%- endif -%}
    {{- eos_token -}}
  {%- elif m.role == 'tool' -%}
    {%- set c = m.content -%}
    {%- if c[:1] in ['{', '['] or (c | int | string) == c or (c | float | string) == c -%}
      {%- set shown = c -%}
    {%- else -%}
      {%- set shown = c | tojson -%}
    {%- endif -%}
    {{- '[TOOL_RESULTS] {"content": ' + shown + ', "call_id": ' + m.tool_call_id | tojson -}}
    {{- '}[/TOOL_RESULTS]' -}}
  {%- endif -%}
{%- endfor -%}
"""

LOCAL_TIME = {
    "type": "function",
    "function": {
        "name": "local_time",
        "description": "The local time in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def _call(call_id: str, name: str, arguments: dict) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# A system prompt, two tools, a call (arguments as a JSON object), its JSON result, the answer,
# then a second exchange in Chinese with characters the vocabulary lacks (byte fallback).
TOOL_CONVERSATION = {
    "tools": [WEATHER, LOCAL_TIME],
    "messages": [
        {"role": "system", "content": "You are a concise travel assistant."},
        {"role": "user", "content": "What's the weather in Paris right now?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [_call("call00001", "get_weather", {"city": "Paris"})],
        },
        {
            "role": "tool",
            "tool_call_id": "call00001",
            "content": '{"temp_c": 18, "sky": "clear"}',
        },
        {"role": "assistant", "content": "It is 18 °C with a clear sky in Paris."},
        {"role": "user", "content": "请用中文再说一遍，好吗？𠀋🦜"},
        {"role": "assistant", "content": "巴黎现在18°C，晴朗。☀️🦜"},
    ],
}
# One user message (so one rendering cut into turns, one document): two calls in one turn,
# results as text and as a number.
PARALLEL_CALLS = {
    "tools": [WEATHER, LOCAL_TIME],
    "messages": [
        {"role": "user", "content": "Weather and local time in Tokyo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                _call("call00002", "get_weather", {"city": "Tokyo"}),
                _call("call00003", "local_time", {"city": "Tokyo"}),
            ],
        },
        {"role": "tool", "tool_call_id": "call00002", "content": "Light rain, 12 °C"},
        {"role": "tool", "tool_call_id": "call00003", "content": "2130"},
        {"role": "assistant", "content": "Light rain at 12 °C; it is 21:30 there."},
    ],
}
RECORDS = {"tool-conversation": TOOL_CONVERSATION, "parallel-calls": PARALLEL_CALLS}


@dataclass(frozen=True)
class Expected:
    """A document prepare should write: its ids, and its supervised runs in order."""

    ids: list[int]
    supervised: list[list[int]]


def _through_each_turn(record: dict) -> list[dict]:
    """The conversation through each of its assistant turns."""
    messages = record["messages"]
    return [
        {"messages": messages[: i + 1], "tools": record.get("tools")}
        for i, m in enumerate(messages)
        if m["role"] == "assistant"
    ]


@pytest.fixture(scope="module")
def mistral_common() -> dict:
    """mistral-common's encodings, by record: {"whole": the conversation, "turns": through
    each assistant turn}, and its own chat template for the v3 model."""
    site = mistral_common_site()
    model = mistral_sentencepiece_model()
    conversations = []
    for record in RECORDS.values():
        conversations += [{"messages": record["messages"], "tools": record["tools"]}]
        conversations += _through_each_turn(record)
    job = {"model": str(model), "conversations": conversations}
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["instruct_tokenizer"] == "InstructTokenizerV3"
    encodings, by_record = iter(out["encodings"]), {}
    for name, record in RECORDS.items():
        whole = next(encodings)
        by_record[name] = {
            "whole": whole,
            "turns": [next(encodings) for _ in _through_each_turn(record)],
        }
    return {"encodings": by_record, "template": out["template"]}


def per_turn_documents(encodings: dict) -> list[Expected]:
    """One document per assistant turn: the conversation through it, that turn supervised."""
    return [Expected(e["tokens"], e["turns"][-1:]) for e in encodings["turns"]]


def one_document(encodings: dict) -> list[Expected]:
    """The conversation as one document, every assistant turn supervised."""
    whole = encodings["whole"]
    return [Expected(whole["tokens"], whole["turns"])]


def converted_tokenizer(out: Path, template: str) -> Path:
    """The v3 SentencePiece model as a Hugging Face tokenizer directory with `template`."""
    tok = tokenizer_from_sentencepiece(mistral_sentencepiece_model())
    tok.save_pretrained(out)
    (out / "chat_template.jinja").write_text(template)
    return out


def _prepare(tmp: Path, tok: Path, record: dict) -> tuple[schema.Manifest, Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    src = tmp / "in.jsonl"
    src.write_text(json.dumps(record) + "\n")
    options = PrepareOptions(seq_len=4096, progress=False)
    m = prepare([str(src)], tokenizer_path=str(tok), out_dir=str(tmp / "out"), options=options)
    return m, tmp / "out"


def documents(out: Path, m: schema.Manifest) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) of every document in the shards."""
    docs = []
    for s in m.shards:
        for row in schema.open_shard(out / s.file).to_pylist():
            at = 0
            for n in row["doc_lens"]:
                docs.append((row["input_ids"][at : at + n], row["loss_mask"][at : at + n]))
                at += n
    return docs


def supervised_runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    """The maximal runs of supervised ids, in order."""
    flags = np.asarray(mask, dtype=bool)
    cuts = np.flatnonzero(np.diff(flags.astype(np.int8))) + 1
    starts = np.r_[0, cuts].tolist()
    ends = [*cuts.tolist(), len(ids)]
    return [list(ids[a:b]) for a, b in zip(starts, ends, strict=True) if flags[a]]


def compare(
    docs: list[tuple[list[int], list[int]]], expected: list[Expected], *, pieces
) -> list[str]:
    """What differs between the documents prepare wrote and those expected (nothing: []): each
    expected document must be one written document's ids, token for token, with its supervised
    runs exactly those expected, and no other document written. `pieces` names ids."""
    problems, left, missing = [], list(docs), []
    for k, want in enumerate(expected):
        match = next((d for d in left if list(d[0]) == want.ids), None)
        if match is None:
            missing.append(k)
            continue
        left.remove(match)
        runs = supervised_runs(*match)
        if runs != want.supervised:
            problems.append(
                f"document {k}: supervised {[pieces(r) for r in runs]}, expected "
                f"{[pieces(r) for r in want.supervised]}"
            )
    for k in missing:  # against the written documents that matched none
        want = expected[k].ids
        near = max(left, key=lambda d: _common_prefix(d[0], want), default=([], []))
        at = _common_prefix(near[0], want)
        problems.append(
            f"document {k}: no document has its ids; the nearest differs at token {at}: "
            f"{pieces(list(near[0][at : at + 6]))} where mistral-common has "
            f"{pieces(want[at : at + 6])} (after {pieces(want[max(0, at - 6) : at])})"
        )
    if len(docs) != len(expected):
        problems.append(f"{len(docs)} documents written, {len(expected)} expected")
    return problems


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


@pytest.fixture(scope="module")
def v3_tokenizer(tmp_path_factory) -> Path:
    return converted_tokenizer(tmp_path_factory.mktemp("mistral-v3"), V3_TEMPLATE)


@pytest.fixture(scope="module")
def pieces(v3_tokenizer):
    # heavy (transformers): the test module's own tokenizer, to name ids in messages
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(v3_tokenizer).convert_ids_to_tokens


@pytest.mark.parametrize(
    ("name", "expect"),
    [("tool-conversation", per_turn_documents), ("parallel-calls", one_document)],
)
def test_prepare_writes_mistral_commons_ids_and_supervises_its_assistant_turns(
    mistral_common, v3_tokenizer, pieces, tmp_path, name, expect
):
    m, out = _prepare(tmp_path, v3_tokenizer, RECORDS[name])
    assert m.quarantined_rows == 0
    docs = documents(out, m)
    assert compare(docs, expect(mistral_common["encodings"][name]), pieces=pieces) == []
    # what that means, read back: the calls and replies are trained, results and tools are not
    trained = [pieces(r) for ids, mask in docs for r in supervised_runs(ids, mask)]
    assert all(run[-1] == "</s>" and "[INST]" not in run for run in trained)
    untrained = [t for ids, mask in docs for t, s in zip(pieces(ids), mask, strict=True) if not s]
    assert {"[AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"} <= set(untrained)
    assert sum(run[0] == "[TOOL_CALLS]" for run in trained) == 1
    if name == "tool-conversation":  # byte fallback: 𠀋 and 🦜 are not in the vocabulary
        assert {"<0xF0>", "<0x9F>", "<0xA6>", "<0x9C>"} <= {t for run in trained for t in run}
        assert len(docs) == 3


def test_comparison_flags_a_one_token_difference(mistral_common, v3_tokenizer, pieces, tmp_path):
    """Negative control: one id changed, or the mask one token longer, is reported."""
    m, out = _prepare(tmp_path, v3_tokenizer, TOOL_CONVERSATION)
    expected = per_turn_documents(mistral_common["encodings"]["tool-conversation"])
    docs = documents(out, m)
    assert compare(docs, expected, pieces=pieces) == []
    changed = copy.deepcopy(docs)
    ids, mask = changed[0]
    at = len(ids) // 2
    ids[at] = ids[at] + 1
    [problem] = compare(changed, expected, pieces=pieces)
    assert f"differs at token {at}" in problem
    longer = copy.deepcopy(docs)
    ids, mask = longer[0]
    first = mask.index(1)
    mask[first - 1] = 1  # the token before the turn (the end of the prompt) supervised too
    [problem] = compare(longer, expected, pieces=pieces)
    assert "supervised" in problem


def test_mistral_commons_own_template_through_prepare(mistral_common, pieces, tmp_path):
    """mistral-common's own chat template for the v3 model, rendered by prepare, gives its
    encoder's ids, except for a JSON tool result: the template writes {"content": "{\\"temp_c\\":
    18, ...}"} (a JSON string) where the encoder writes {"content": {"temp_c": 18, ...}}."""
    tok = converted_tokenizer(tmp_path / "tok", mistral_common["template"])
    encodings = mistral_common["encodings"]
    m, out = _prepare(tmp_path / "parallel", tok, PARALLEL_CALLS)
    assert m.quarantined_rows == 0
    expected = one_document(encodings["parallel-calls"])
    assert compare(documents(out, m), expected, pieces=pieces) == []
    m, out = _prepare(tmp_path / "json-result", tok, TOOL_CONVERSATION)
    assert m.quarantined_rows == 0
    expected = per_turn_documents(encodings["tool-conversation"])
    problems = compare(documents(out, m), expected, pieces=pieces)
    # the first turn (before any result) matches; the two after the JSON result differ there
    assert [p.split(":")[0] for p in problems] == ["document 1", "document 2"]
    quoted, parsed = """['▁"', '{\\\\', '"', 'temp'""", """has ['▁{"', 'temp'"""
    assert all(quoted in p and parsed in p for p in problems), problems
