"""Chat records -> token ids + per-token loss mask.

Why the mask is exact: the rendered conversation is cut into segments at every assistant-turn
boundary *in text* (prompt | response | prompt | response ...), and each segment is tokenized
on its own. No token can straddle a prompt/response boundary, so a BPE merge across it can
never shift the mask by a token — and the ids are exactly what the model sees at inference,
where the prompt (ending in the generation header) is tokenized before the reply is generated.
The boundaries come from rendering prefixes of the conversation with the template, so no
`{% generation %}` markers are needed in it.

Imports neither torch, ray nor deepspeed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")

# Built-in templates for tokenizers that ship none. Each must render a conversation prefix as a
# textual prefix of the whole conversation (checked per record).
BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}


class BadRecord(ValueError):
    """A record that cannot be trained on; `reason` goes to the quarantine file."""


@dataclass
class TokenizedDoc:
    input_ids: list[int]
    loss_mask: list[int]

    @property
    def num_supervised(self) -> int:
        return sum(self.loss_mask)


def validate_messages(record: Any) -> list[dict[str, str]]:
    """Check a `messages` record; return its messages as plain {role, content} dicts."""
    if not isinstance(record, dict):
        raise BadRecord(f"record is a {type(record).__name__}, expected a JSON object")
    if "messages" not in record:
        raise BadRecord(f"no 'messages' field (fields: {sorted(record)[:8]})")
    messages = record["messages"]
    if not isinstance(messages, list):
        raise BadRecord(f"'messages' is a {type(messages).__name__}, expected a list")
    if not messages:
        raise BadRecord("empty conversation")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRecord(f"messages[{i}] is a {type(m).__name__}, expected an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise BadRecord(f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise BadRecord(
                f"messages[{i}].content is a {type(content).__name__}, expected a string"
            )
        if role == "system" and i != 0:
            raise BadRecord(f"messages[{i}] is a system message; only the first message may be one")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise BadRecord("no assistant turn: nothing to learn from")
    return out


def resolve_template(tokenizer: Any, name: str | None) -> str:
    """The chat template to render with: a named built-in, else the tokenizer's own."""
    if name:
        if name not in BUILTIN_TEMPLATES:
            raise ValueError(
                f"--chat-template {name!r} is not a built-in template ({', '.join(BUILTIN_TEMPLATES)})"
            )
        return BUILTIN_TEMPLATES[name]
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(
            "the tokenizer has no chat template: pass --chat-template "
            f"({', '.join(BUILTIN_TEMPLATES)}) or use a tokenizer that ships one"
        )
    if isinstance(template, dict):  # several named templates: the default one renders chats
        template = template.get("default") or next(iter(template.values()))
    return template


def _render(
    tokenizer: Any, template: str, messages: list[dict], *, add_generation_prompt: bool
) -> str:
    return tokenizer.apply_chat_template(
        messages,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def split_supervised_text(
    tokenizer: Any, template: str, messages: list[dict[str, str]]
) -> list[tuple[str, bool]]:
    """The rendered conversation as consecutive (text, supervised) segments.

    An assistant turn's segment runs from the end of the generation prompt before it to the end
    of the conversation rendered through that turn, so it includes the end-of-turn token.
    """
    full = _render(tokenizer, template, messages, add_generation_prompt=False)
    segments: list[tuple[str, bool]] = []
    pos = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, template, messages[:i], add_generation_prompt=True)
        through = _render(tokenizer, template, messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(through) and through.startswith(prompt) and len(prompt) >= pos):
            raise BadRecord(
                f"the chat template does not render messages[:{i}] as a prefix of the conversation; "
                "cannot locate the assistant turn"
            )
        if len(prompt) > pos:
            segments.append((full[pos : len(prompt)], False))
        segments.append((full[len(prompt) : len(through)], True))
        pos = len(through)
    if pos < len(full):
        segments.append((full[pos:], False))
    return segments


def tokenize_conversation(
    tokenizer: Any, template: str, messages: list[dict[str, str]]
) -> TokenizedDoc:
    ids: list[int] = []
    mask: list[int] = []
    for text, supervised in split_supervised_text(tokenizer, template, messages):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        mask.extend([int(supervised)] * len(piece))
    return TokenizedDoc(input_ids=ids, loss_mask=mask)
