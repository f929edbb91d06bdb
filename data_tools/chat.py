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

from data_tools.formats import BadRecord

MASK_MODES = ("assistant", "last", "all")

# Built-in templates for tokenizers that ship none. Each must render a conversation prefix as a
# textual prefix of the whole conversation (checked per record).
BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # Mistral instruct: a system prompt is folded into the first user turn.
    "mistral": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}"
        "{{ '[INST] ' }}"
        "{% if loop.index0 == 1 and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
        "{{ message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
}


@dataclass
class TokenizedDoc:
    input_ids: list[int]
    loss_mask: list[int]

    @property
    def num_supervised(self) -> int:
        return sum(self.loss_mask)


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
    tokenizer: Any, template: str, messages: list[dict[str, str]], *, mask: str = "assistant"
) -> list[tuple[str, bool]]:
    """The rendered conversation as consecutive (text, supervised) segments.

    An assistant turn's segment runs from the end of the generation prompt before it to the end
    of the conversation rendered through that turn, so it includes the end-of-turn token.
    mask: "assistant" supervises every assistant turn, "last" only the last one, "all" the
    whole conversation (prompts included).
    """
    if mask not in MASK_MODES:
        raise ValueError(f"mask {mask!r} is not one of {', '.join(MASK_MODES)}")
    full = _render(tokenizer, template, messages, add_generation_prompt=False)
    if mask == "all":
        return [(full, True)]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if mask == "last":
        turns = turns[-1:]
    segments: list[tuple[str, bool]] = []
    pos = 0
    for i in turns:
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
    tokenizer: Any, template: str, messages: list[dict[str, str]], *, mask: str = "assistant"
) -> TokenizedDoc:
    ids: list[int] = []
    loss_mask: list[int] = []
    for text, supervised in split_supervised_text(tokenizer, template, messages, mask=mask):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        loss_mask.extend([int(supervised)] * len(piece))
    return TokenizedDoc(input_ids=ids, loss_mask=loss_mask)


def tokenize_text(tokenizer: Any, text: str) -> TokenizedDoc:
    """Continued pretraining: every token supervised; EOS closes the document when there is one."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    return TokenizedDoc(input_ids=ids, loss_mask=[1] * len(ids))
