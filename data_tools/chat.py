"""Chat records -> token ids + per-token loss mask.

Why the mask is exact: the rendered conversation is cut into segments at every assistant-turn
boundary *in text* (prompt | response | prompt | response ...), and each segment is tokenized
on its own. No token can straddle a prompt/response boundary, so a BPE merge across it can
never shift the mask by a token — and the ids are exactly what the model sees at inference,
where the prompt (ending in the generation header) is tokenized before the reply is generated.
The boundaries come from rendering prefixes of the conversation with the template, so no
`{% generation %}` markers are needed in it. Rendering every prefix of every record is the
costly part, so it is done once per *sequence of roles* with placeholder contents (a
skeleton); a record then costs one rendering, and its boundaries are read off the skeleton
when filling in its contents reproduces that rendering exactly. Templates that edit contents
(trim, reformat) fail that check and fall back to rendering the record's prefixes.

Imports neither torch, ray nor deepspeed.
"""

from __future__ import annotations

import bisect
import itertools
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from data_tools.encode import Encoder
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


# Marker strings of the built-in templates that must each be one token: a tokenizer that lacks
# one gets it as a special token at prepare time (else `<|im_end|>` is spelled as six text
# pieces, and nothing stops generation). Mistral's turn ends with the tokenizer's own EOS.
TEMPLATE_MARKERS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "mistral": (),
}


def add_template_tokens(tokenizer: Any, name: str | None) -> list[str]:
    """Add the markers of built-in template `name` that are not single tokens of `tokenizer`
    as special tokens (new ids at the end of the vocabulary); return those added."""
    missing = [m for m in TEMPLATE_MARKERS.get(name or "", ()) if not _is_one_token(tokenizer, m)]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return missing


def _is_one_token(tokenizer: Any, text: str) -> bool:
    vocab = tokenizer.get_vocab()
    return text in vocab and tokenizer.encode(text, add_special_tokens=False) == [vocab[text]]


@dataclass(frozen=True)
class EndOfTurn:
    text: str  # what the template writes after an assistant reply, through the end of the turn
    token_id: int  # the single (special) token the reply ends with: the stop token


def end_of_turn(tokenizer: Any, template: str) -> EndOfTurn:
    """The token an assistant turn ends with under `template`, found the way masking sees it:
    the turn's segment (reply + closing text) tokenized on its own. ValueError when the closing
    text does not begin with one special token: a model trained on it could not stop."""
    render = Renderer(tokenizer, template)
    reply = "Sure."
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}]
    try:
        prompt = render(messages[:1], add_generation_prompt=True)
        through = render(messages, add_generation_prompt=False)
    except Exception as e:
        raise ValueError(f"the chat template cannot render a user/assistant exchange: {e}") from e
    segment = through[len(prompt) :] if through.startswith(prompt) else ""
    if reply not in segment:
        raise ValueError(
            "the chat template does not write an assistant reply verbatim after its "
            "generation prompt; cannot find where a turn ends"
        )
    # what the template writes before the reply (Qwen3: an empty <think> block) is part of
    # the turn; what it writes after it ends the turn
    before = segment[: segment.index(reply)]
    closing = segment[len(before) + len(reply) :]
    content_ids = tokenizer.encode(before + reply, add_special_tokens=False)
    ids = tokenizer.encode(segment, add_special_tokens=False)
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    if (
        closing
        and ids[: len(content_ids)] == content_ids
        and len(ids) > len(content_ids)
        and ids[len(content_ids)] in special
    ):
        return EndOfTurn(closing, ids[len(content_ids)])
    pieces = tokenizer.convert_ids_to_tokens(ids[len(content_ids) :]) if closing else []
    raise ValueError(
        f"the chat template ends an assistant turn with {closing!r}, which this tokenizer encodes "
        f"as {pieces} rather than one special token: a model trained on it learns to spell the "
        "end of its turn and nothing stops generation. Use a tokenizer that has the end-of-turn "
        f"marker as a special token, or --chat-template ({', '.join(TEMPLATE_MARKERS)}): their "
        "markers are added as special tokens when missing"
    )


@dataclass
class TokenizedDoc:
    input_ids: np.ndarray  # int32
    loss_mask: np.ndarray  # int8, 1 = supervised

    @property
    def num_supervised(self) -> int:
        return int(self.loss_mask.sum(dtype=np.int64))


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


class Renderer:
    """Renders conversations with a chat template, compiled once.

    transformers' apply_chat_template re-validates and deep-copies the conversation on every
    call; masking renders every prefix of a conversation, so for plain {role, content} string
    messages we call the same compiled template (transformers' own jinja environment) directly.
    """

    def __init__(self, tokenizer: Any, template: str) -> None:
        self.tokenizer, self.template = tokenizer, template
        self._special = {
            k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)
        }
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            self._compiled = _compile_jinja_template(template)
        except ImportError:  # another transformers: take the public road
            self._compiled = None
        # jinja merges the template's globals (a ChainMap, iterated twice per render) into
        # every context; merged once here, a render costs a quarter of Template.render's time.
        # Same context: the globals under this call's variables, the same globals' names.
        self._globals = dict(self._compiled.globals) if self._compiled is not None else {}
        self._globals_keys = frozenset(self._globals)
        self._skeletons: dict[tuple[str, ...], _Skeleton | None] = {}

    def turn_bounds(
        self, messages: list[dict], turns: list[int], full: str
    ) -> list[tuple[int, int]] | None:
        """(end of the prompt before, end of the conversation through) each assistant turn in
        `turns`, as offsets into `full`, from the template's skeleton for this sequence of
        roles; None when the shortcut does not apply (the caller renders the prefixes).

        The skeleton is the template rendered, prefixes included, with a placeholder for every
        message's content; it is rendered once per sequence of roles. It applies when the
        template inserts contents verbatim, which is checked on every record: the skeleton
        with this record's contents filled in must equal `full`, the record's own rendering.
        """
        if not all(len(m) == 2 and isinstance(m.get("content"), str) for m in messages):
            return None
        roles = tuple(m["role"] for m in messages)
        if roles not in self._skeletons:
            if len(self._skeletons) >= 4096:  # bounded: unusual data falls back to prefixes
                return None
            self._skeletons[roles] = _Skeleton.build(self, roles)
        sk = self._skeletons[roles]
        if sk is None:
            return None
        if any(_PH_OPEN in m["content"] for m in messages):
            return None
        filled = [messages[slot]["content"] for slot in sk.slots]
        if sk.text % tuple(filled) != full:
            return None
        before = [0, *itertools.accumulate(map(len, filled))]  # content before each literal
        bounds = []
        for i in turns:
            (p_literal, p_at), (t_literal, t_at) = sk.prompt_end[i], sk.turn_end[i]
            bounds.append((p_at + before[p_literal], t_at + before[t_literal]))
        return bounds

    _shared: dict[tuple, Renderer] = {}

    @classmethod
    def shared(cls, tokenizer: Any, template: str) -> Renderer:
        """One renderer per (template, special tokens) in this process, so that its skeletons
        are built once and not per batch."""
        special = tuple(
            sorted((k, v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str))
        )
        key = (template, special)
        if key not in cls._shared:
            cls._shared[key] = cls(tokenizer, template)
        return cls._shared[key]

    def __call__(
        self, messages: list[dict], *, add_generation_prompt: bool, tools: list | None = None
    ) -> str:
        extra = {"tools": tools} if tools else {}
        if self._compiled is None or self._compiled.environment.is_async:
            return self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **extra,
            )
        compiled, env = self._compiled, self._compiled.environment
        context = env.context_class(
            env,
            {
                **self._globals,
                "messages": messages,
                "add_generation_prompt": add_generation_prompt,
                **self._special,
                **extra,
            },
            compiled.name,
            compiled.blocks,
        )
        context.globals_keys = set(self._globals_keys)
        try:
            return env.concat(compiled.root_render_func(context))
        except Exception:
            env.handle_exception()  # jinja's own traceback rewriting; raises
            raise


_PH_OPEN, _PH_CLOSE = "\ue000", "\ue001"  # private-use characters around placeholder numbers


@dataclass
class _Skeleton:
    """A template's rendering of one sequence of roles with placeholder contents.

    A record fits it when `text % contents` (its literals with a %s for each content, in
    `slots` order) is the record's own rendering. A turn's bounds are (k, at): `at` characters
    of literals and every content of the first k slots before it.
    """

    text: str  # the literals, "%" escaped, with "%s" where a content goes
    slots: list[int]  # the message whose content fills each %s, in order
    prompt_end: dict[int, tuple[int, int]]  # assistant index -> where its prompt ends
    turn_end: dict[int, tuple[int, int]]  # assistant index -> where its turn ends

    @classmethod
    def build(cls, render: Renderer, roles: tuple[str, ...]) -> _Skeleton | None:
        messages = [
            {"role": r, "content": f"{_PH_OPEN}{k}{_PH_CLOSE}"} for k, r in enumerate(roles)
        ]
        try:
            full = render(messages, add_generation_prompt=False)
            prompts, throughs = {}, {}
            for i, r in enumerate(roles):
                if r == "assistant":
                    prompt = render(messages[:i], add_generation_prompt=True)
                    through = render(messages[: i + 1], add_generation_prompt=False)
                    if not (full.startswith(through) and through.startswith(prompt)):
                        return None
                    prompts[i], throughs[i] = len(prompt), len(through)
        except Exception:  # the template rejects this shape: the prefix path will say why
            return None
        split = re.split(f"{_PH_OPEN}(\\d+){_PH_CLOSE}", full)
        literals, slots = split[0::2], [int(n) for n in split[1::2]]
        if any(slot >= len(roles) for slot in slots):
            return None
        # skeleton offset of each literal's start, and the literal characters before it
        starts, literal_before, at = [], [0], 0
        for k, literal in enumerate(literals):
            starts.append(at)
            at += len(literal) + (len(f"{_PH_OPEN}{slots[k]}{_PH_CLOSE}") if k < len(slots) else 0)
            literal_before.append(literal_before[-1] + len(literal))

        def mark(offset: int) -> tuple[int, int] | None:
            k = bisect.bisect_right(starts, offset) - 1
            within = offset - starts[k]
            return None if within > len(literals[k]) else (k, literal_before[k] + within)

        prompt_end = {i: mark(o) for i, o in prompts.items()}
        turn_end = {i: mark(o) for i, o in throughs.items()}
        if None in (*prompt_end.values(), *turn_end.values()):
            return None  # a turn bound inside a content: this shape takes the prefix path
        text = "%s".join(literal.replace("%", "%%") for literal in literals)
        return cls(text, slots, prompt_end, turn_end)


def split_supervised_text(
    tokenizer: Any,
    template: str | Renderer,
    messages: list[dict[str, str]],
    *,
    mask: str = "assistant",
    tools: list | None = None,
    train_tool_results: bool = False,
) -> list[tuple[str, bool]]:
    """The rendered conversation as consecutive (text, supervised) segments.

    An assistant turn's segment runs from the end of the generation prompt before it to the end
    of the conversation rendered through that turn, so it includes the end-of-turn token.
    mask: "assistant" supervises every assistant turn, "last" only the last one, "all" the
    whole conversation (prompts included). `tools` go to the template; with
    `train_tool_results`, tool messages are supervised too (from the end of the conversation
    before them to the end of the conversation through them).
    """
    if mask not in MASK_MODES:
        raise ValueError(f"mask {mask!r} is not one of {', '.join(MASK_MODES)}")
    render = template if isinstance(template, Renderer) else Renderer(tokenizer, template)
    full = render(messages, add_generation_prompt=False, tools=tools)
    if mask == "all":
        return [(full, True)]
    trained = ("assistant", "tool") if train_tool_results else ("assistant",)
    turns = [i for i, m in enumerate(messages) if m["role"] in trained]
    if mask == "last":
        turns = [i for i in turns if messages[i]["role"] == "assistant"][-1:]
    simple = tools is None and not train_tool_results
    bounds = render.turn_bounds(messages, turns, full) if simple else None
    if bounds is None:  # render every prefix
        bounds = []
        for i in turns:
            assistant = messages[i]["role"] == "assistant"
            prompt = render(messages[:i], add_generation_prompt=assistant, tools=tools)
            # the conversation through its last message is `full`, already rendered
            through = (
                full
                if i == len(messages) - 1
                else render(messages[: i + 1], add_generation_prompt=False, tools=tools)
            )
            if not (full.startswith(through) and through.startswith(prompt)):
                raise BadRecord(
                    f"the chat template does not render messages[:{i}] as a prefix of the conversation; "
                    "cannot locate the assistant turn"
                )
            bounds.append((len(prompt), len(through)))
    segments: list[tuple[str, bool]] = []
    pos = 0
    for i, (prompt_end, turn_end) in zip(turns, bounds, strict=True):
        if prompt_end < pos:
            raise BadRecord(
                f"the chat template renders messages[:{i}] before the end of the previous turn; "
                "cannot locate the assistant turn"
            )
        if prompt_end > pos:
            segments.append((full[pos:prompt_end], False))
        segments.append((full[prompt_end:turn_end], True))
        pos = turn_end
    if pos < len(full):
        segments.append((full[pos:], False))
    return segments


def supervised_documents(
    tokenizer: Any,
    render: Renderer,
    messages: list[dict],
    *,
    mask: str,
    tools: list | None = None,
    train_tool_results: bool = False,
) -> list[list[tuple[str, bool]]]:
    """The documents a conversation trains as: itself, cut into turns; or, when its template
    renders history unlike a last turn (Qwen3 drops earlier reasoning and writes an empty
    <think> block in the last turn only) so that one rendering cannot be cut into turns, one
    document per assistant turn: the conversation through it, that turn alone supervised, as
    the model sees it when it writes that turn."""
    try:
        return [
            split_supervised_text(
                tokenizer,
                render,
                messages,
                mask=mask,
                tools=tools,
                train_tool_results=train_tool_results,
            )
        ]
    except BadRecord:
        if mask == "all":
            raise
    ends = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if mask == "last":
        ends = ends[-1:]
    return [
        split_supervised_text(tokenizer, render, messages[: i + 1], mask="last", tools=tools)
        for i in ends
    ]


def tokenize_segments(tokenizer: Any, docs: list[list[tuple[str, bool]]]) -> list[TokenizedDoc]:
    """Tokenize the segments of many documents in one batched call (data_tools.encode for fast
    tokenizers), each segment on its own so no token crosses a prompt/response boundary.

    The batch's ids and mask are built as two flat arrays; each document gets views of them."""
    texts = [text for segments in docs for text, _ in segments]
    # a document's later segments are tokenized as they are inside the whole text: no prefix
    # space or U+2581 where the tokenizer puts one at a text's start
    continued = [k > 0 for segments in docs for k in range(len(segments))]
    if not texts:
        ids_list = []
    elif getattr(tokenizer, "is_fast", False):  # the fast tokenizer's own ids, sooner
        ids_list = Encoder.of(tokenizer)(texts, continued)
    else:
        ids_list = tokenizer(texts, add_special_tokens=False)["input_ids"]
    lengths = np.fromiter(map(len, ids_list), dtype=np.int64, count=len(ids_list))
    ids = np.fromiter(
        itertools.chain.from_iterable(ids_list), dtype=np.int32, count=int(lengths.sum())
    )
    supervised = np.fromiter(
        (s for segments in docs for _, s in segments), dtype=np.int8, count=len(texts)
    )
    mask = np.repeat(supervised, lengths)
    # token offset of each segment's start (and of the end), then of each document's
    token_at = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=token_at[1:])
    segment_at = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum([len(segments) for segments in docs], out=segment_at[1:])
    bounds = token_at[segment_at].tolist()
    return [TokenizedDoc(ids[a:b], mask[a:b]) for a, b in itertools.pairwise(bounds)]


def tokenize_conversation(
    tokenizer: Any,
    template: str | Renderer,
    messages: list[dict[str, str]],
    *,
    mask: str = "assistant",
) -> TokenizedDoc:
    return tokenize_segments(
        tokenizer, [split_supervised_text(tokenizer, template, messages, mask=mask)]
    )[0]


def text_segments(text: str) -> list[tuple[str, bool]]:
    """Continued pretraining: the whole text supervised (EOS is appended after tokenizing)."""
    return [(text, True)]


def close_text_doc(tokenizer: Any, doc: TokenizedDoc) -> TokenizedDoc:
    """EOS ends a pretraining document (supervised: the model learns where documents end)."""
    if tokenizer.eos_token_id is not None:
        return TokenizedDoc(
            input_ids=np.append(doc.input_ids, np.int32(tokenizer.eos_token_id)),
            loss_mask=np.append(doc.loss_mask, np.int8(1)),
        )
    return doc
