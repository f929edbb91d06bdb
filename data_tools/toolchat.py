"""Tool calls and reasoning: what the chat template is given, and what is supervised.

A messages record may hold tool messages (role "tool"), assistant `tool_calls`, a `tools` list
and reasoning (`reasoning_content`, or a `<think>...</think>` block opening the reply; both are
read as reasoning). The tokenizer's own template renders each part it knows (found in its
source: `tools`, `tool_calls`, a "tool" role, `reasoning_content`); a part it does not know, and
every part under a built-in template (--chat-template), is rendered as text first, the way
Hermes / Qwen2.5 write it (BUILTIN_* below):

    reasoning    <think>\\n{reasoning}\\n</think>\\n\\n{reply}
    tool call    {reply}\\n<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>
    tool result  a "tool" turn (a "user" turn for a template with no tool role), its content
                 <tool_response>\\n{content}\\n</tool_response>
    tools        a "# Tools" section with one JSON schema per line in <tools></tools>, at the
                 end of the system message (one is added when there is none)

What is trained: assistant turns (their text and tool calls, and reasoning per --reasoning:
train, mask = in the sequence but not supervised, drop = removed); not tool results (unless
--train-tool-results) nor the tools list. None of this is assumed of a template: after rendering,
every tool call's name and arguments, every tool result and every trained reasoning text must
be found where it belongs, else the record is quarantined saying what the template dropped.

A template that renders a conversation's history differently from its last turn (Qwen3 drops
the reasoning of turns before the last user message) cannot be cut into turns of one rendering;
such a record becomes one document per assistant turn, each the conversation through that turn
with only that turn supervised, as the model sees it when it writes that turn.

Imports neither torch, ray nor deepspeed.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any

from data_tools.chat import supervised_documents
from data_tools.formats import BadRecord

REASONING_MODES = ("train", "mask", "drop")
_THINK = re.compile(r"\s*<think>\n?(.*?)\n?</think>\s*", re.S)
_THINK_END = re.compile(r"</think>\s*")
BUILTIN_TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
BUILTIN_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags."
)


@dataclass(frozen=True)
class Support:
    """What a template renders itself."""

    tools: bool
    tool_calls: bool
    tool_role: bool
    reasoning: bool

    @classmethod
    def of(cls, template: str, *, builtin: str | None) -> Support:
        if builtin is not None:  # chatml and llama3 write any role; mistral user/assistant only
            return cls(False, False, builtin != "mistral", False)
        return cls(
            tools="tools" in template,
            tool_calls="tool_calls" in template,
            tool_role="'tool'" in template or '"tool"' in template,
            reasoning="reasoning_content" in template,
        )


@dataclass(frozen=True)
class ChatOptions:
    reasoning: str = "train"
    train_tool_results: bool = False


def has_extras(messages: list[dict], tools: list | None) -> bool:
    """Whether a normalized conversation holds more than roles and contents."""
    if tools:
        return True
    for m in messages:
        role = m["role"]
        if len(m) != 2 or role == "tool" or (role == "assistant" and "<think>" in m["content"]):
            return True
    return False


def for_template(
    messages: list[dict], tools: list | None, support: Support, options: ChatOptions
) -> tuple[list[dict], list | None]:
    """The messages (and tools) to hand the template: reasoning read from `<think>` blocks,
    dropped or kept per --reasoning, and every part the template does not render written as
    text."""
    out = []
    for m in copy.deepcopy(messages):
        if m["role"] == "assistant":
            think = _THINK.match(m["content"])
            if think and "reasoning_content" not in m:
                m["reasoning_content"], m["content"] = think[1], m["content"][think.end() :]
            if options.reasoning == "drop":
                m.pop("reasoning_content", None)
            elif "reasoning_content" in m and not support.reasoning:
                m["content"] = f"<think>\n{m.pop('reasoning_content')}\n</think>\n\n{m['content']}"
            if "tool_calls" in m and not support.tool_calls:
                m["content"] += "".join(
                    f"\n<tool_call>\n{_call_text(c)}\n</tool_call>" for c in m.pop("tool_calls")
                )
                m["content"] = m["content"].lstrip("\n")
        elif m["role"] == "tool" and not support.tool_role:
            m = {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
        out.append(m)
    if tools and not support.tools:
        section = BUILTIN_TOOLS_HEADER + "\n".join(map(_json, tools)) + BUILTIN_TOOLS_FOOTER
        if out[0]["role"] == "system":
            out[0]["content"] = (
                f"{out[0]['content']}\n\n{section}" if out[0]["content"] else section
            )
        else:
            out.insert(0, {"role": "system", "content": section})
        tools = None
    return out, tools


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _call_text(call: dict) -> str:
    fn = call["function"]
    return _json({"name": fn["name"], "arguments": fn["arguments"]})


def check_rendered(
    original: list[dict], tools: list | None, segments: list[tuple[str, bool]], options: ChatOptions
) -> None:
    """BadRecord when the rendering lost a part of the record or supervises it wrongly."""
    trained = "".join(t for t, s in segments if s)
    untrained = "".join(t for t, s in segments if not s)
    everything = trained + untrained
    for m in original:
        if m["role"] == "assistant":
            for call in m.get("tool_calls", []):
                fn = call["function"]
                if fn["name"] not in trained:
                    raise _lost(f"the tool call {fn['name']!r}", "in a trained span")
                for key in fn["arguments"]:
                    if key not in trained:
                        raise _lost(f"the argument {key!r} of tool call {fn['name']!r}", "")
            reasoning = _reasoning_of(m)
            if reasoning and options.reasoning == "train" and reasoning not in trained:
                raise _lost("the reasoning of an assistant turn", "in a trained span")
        if m["role"] == "tool" and m["content"].strip() and not _found(m["content"], everything):
            raise _lost("a tool result", "")
    for tool in tools or []:
        name = (tool.get("function") or tool).get("name")
        if isinstance(name, str) and name not in everything:
            raise _lost(f"the tool {name!r} of the tools list", "")


def _found(content: str, text: str) -> bool:
    """`content` in `text` as it is, or as a JSON string (Llama 3.1's template writes a tool
    result through tojson, which also escapes <, >, & and ')."""
    quoted = json.dumps(content, ensure_ascii=False)
    safe = quoted.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return any(form in text for form in (content, quoted, safe.replace("'", "\\u0027")))


def _reasoning_of(m: dict) -> str:
    if "reasoning_content" in m:
        return m["reasoning_content"].strip()
    think = _THINK.match(m["content"])
    return think[1].strip() if think else ""


def _lost(what: str, where: str) -> BadRecord:
    return BadRecord(
        f"the chat template does not render {what}{' ' + where if where else ''}: use a "
        "template that renders tool calls and reasoning, or --chat-template chatml, which "
        "writes them as text (docs/data.md)"
    )


def mask_reasoning(segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """--reasoning mask: the `<think>...</think>` opening a trained span (and the blanks after
    it) stays in the sequence, unsupervised."""
    out = []
    for text, supervised in segments:
        end = _THINK_END.search(text) if supervised and "<think>" in text else None
        if end is None:
            out.append((text, supervised))
            continue
        out += [(text[: end.end()], False), (text[end.end() :], True)]
    return [(t, s) for t, s in out if t]


def chat_documents(
    tokenizer: Any,
    render: Any,
    messages: list[dict],
    tools: list | None,
    *,
    mask: str,
    options: ChatOptions,
    builtin: str | None,
) -> list[list[tuple[str, bool]]]:
    """The documents (each a list of (text, supervised) segments) a messages record trains as."""
    if not has_extras(messages, tools):  # plain turns: the fast path, one rendering
        return supervised_documents(tokenizer, render, messages, mask=mask)
    support = Support.of(render.template, builtin=builtin)
    shown, shown_tools = for_template(messages, tools, support, options)
    docs = supervised_documents(
        tokenizer,
        render,
        shown,
        mask=mask,
        tools=shown_tools,
        train_tool_results=options.train_tool_results,
    )
    if options.reasoning == "mask":
        docs = [mask_reasoning(d) for d in docs]
    if mask != "all":
        check_rendered(messages, tools, [s for d in docs for s in d], options)
    return docs
