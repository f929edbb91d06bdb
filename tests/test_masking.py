"""The loss mask, checked token by token against what each assistant turn should teach."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_tools.chat import (
    BUILTIN_TEMPLATES,
    Renderer,
    resolve_template,
    split_supervised_text,
    tokenize_conversation,
)
from data_tools.formats import BadRecord, normalize

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of Peru?"},
    {"role": "assistant", "content": "The capital of Peru is Lima."},
    {"role": "user", "content": "What is 2 plus 5?"},
    {"role": "assistant", "content": "2 plus 5 is 7."},
]


def _spans(ids, mask):
    """Maximal runs of supervised token ids."""
    runs, cur = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def test_supervised_tokens_are_exactly_the_assistant_turns(any_tokenizer):
    sp_tokenizer = any_tokenizer
    template = resolve_template(sp_tokenizer, None)
    doc = tokenize_conversation(sp_tokenizer, template, CONVERSATION)
    assert len(doc.input_ids) == len(doc.loss_mask)
    spans = _spans(doc.input_ids, doc.loss_mask)
    assert len(spans) == 2
    end = sp_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for span, turn in zip(spans, [CONVERSATION[2], CONVERSATION[4]], strict=True):
        # each supervised span is the reply, its end-of-turn token, and the newline after it
        assert sp_tokenizer.decode(span) == turn["content"] + "<|im_end|>\n"
        assert end in span
    # the unsupervised remainder holds every prompt, including the generation header
    text = sp_tokenizer.decode(
        [i for i, m in zip(doc.input_ids, doc.loss_mask, strict=True) if not m]
    )
    assert text.count("<|im_start|>assistant\n") == 2
    assert "Be brief." in text and "capital of Peru?" in text


def test_ids_match_inference_tokenization_of_the_prompt(any_tokenizer):
    sp_tokenizer = any_tokenizer
    """The ids before a reply are exactly what the tokenizer gives the generation prompt."""
    template = resolve_template(sp_tokenizer, None)
    doc = tokenize_conversation(sp_tokenizer, template, CONVERSATION[:3])
    prompt = sp_tokenizer.apply_chat_template(
        CONVERSATION[:2], chat_template=template, tokenize=False, add_generation_prompt=True
    )
    prompt_ids = sp_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    first_supervised = doc.loss_mask.tolist().index(1)
    assert doc.input_ids[:first_supervised].tolist() == prompt_ids


def test_segments_cover_the_rendered_text(sp_tokenizer):
    template = BUILTIN_TEMPLATES["chatml"]
    segments = split_supervised_text(sp_tokenizer, template, CONVERSATION)
    full = sp_tokenizer.apply_chat_template(CONVERSATION, chat_template=template, tokenize=False)
    assert "".join(t for t, _ in segments) == full
    assert [s for _, s in segments] == [False, True, False, True]


@pytest.mark.parametrize(
    "record, reason",
    [
        ([1, 2], "expected a JSON object"),
        ({"text": "x"}, "no 'messages'"),
        ({"messages": []}, "empty conversation"),
        ({"messages": "hi"}, "expected a list"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role 'robot'"),
        ({"messages": [{"role": "user", "content": 3}]}, "content is a int"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "system", "content": "y"},
                    {"role": "assistant", "content": "z"},
                ]
            },
            "only the first message",
        ),
    ],
)
def test_bad_records_are_rejected_with_a_reason(record, reason):
    with pytest.raises(BadRecord, match=reason):
        normalize(record, "messages")


def test_missing_template_is_a_clear_error(sp_tokenizer):
    import copy

    tok = copy.deepcopy(sp_tokenizer)
    tok.chat_template = None
    with pytest.raises(ValueError, match="--chat-template"):
        resolve_template(tok, None)
    assert resolve_template(tok, "chatml") == BUILTIN_TEMPLATES["chatml"]
    with pytest.raises(ValueError, match="not a built-in"):
        resolve_template(tok, "nope")


@pytest.mark.parametrize(
    "mask, expected",
    [
        ("last", ["2 plus 5 is 7.<|im_end|>\n"]),
        ("assistant", ["The capital of Peru is Lima.<|im_end|>\n", "2 plus 5 is 7.<|im_end|>\n"]),
    ],
)
def test_mask_modes(any_tokenizer, mask, expected):
    template = resolve_template(any_tokenizer, None)
    doc = tokenize_conversation(any_tokenizer, template, CONVERSATION, mask=mask)
    assert [any_tokenizer.decode(s) for s in _spans(doc.input_ids, doc.loss_mask)] == expected


def test_mask_all_supervises_everything(any_tokenizer):
    template = resolve_template(any_tokenizer, None)
    doc = tokenize_conversation(any_tokenizer, template, CONVERSATION, mask="all")
    assert all(doc.loss_mask) and len(doc.input_ids) > 20


@pytest.mark.parametrize("name", ["llama3", "mistral", "chatml"])
def test_builtin_templates_locate_every_turn(sp_tokenizer, name):
    template = resolve_template(sp_tokenizer, name)
    segments = split_supervised_text(sp_tokenizer, template, CONVERSATION)
    supervised = [t for t, s in segments if s]
    assert len(supervised) == 2
    assert supervised[0].startswith("The capital of Peru is Lima.")
    assert supervised[1].startswith("2 plus 5 is 7.")
    full = sp_tokenizer.apply_chat_template(CONVERSATION, chat_template=template, tokenize=False)
    assert "".join(t for t, _ in segments) == full
    if name == "mistral":  # the system prompt is folded into the first user turn
        assert "[INST] Be brief.\n\nWhat is the capital of Peru? [/INST]" in full


class _PrefixOnly(Renderer):
    """The reference path: every prefix rendered, no skeleton."""

    def turn_bounds(self, messages, turns, full):
        return None


TRIMMING = (  # a template that edits contents: the skeleton check must refuse it
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


PERCENT = (  # literals with "%" in them: the skeleton's format string must escape them
    "{% for message in messages %}"
    "{{ '%s|' + message['role'] + ' 100%%\n' + message['content'] + '%|' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '%s|assistant 100%%\n' }}{% endif %}"
)


@pytest.mark.parametrize("name", [*BUILTIN_TEMPLATES, "trimming", "percent"])
@given(
    system=st.booleans(),
    turns=st.lists(
        st.tuples(st.text("ab%s\n ", max_size=20), st.text(max_size=20)), min_size=1, max_size=4
    ),
    mask=st.sampled_from(["assistant", "last"]),
)
@settings(max_examples=40, deadline=None)
def test_skeleton_shortcut_gives_the_segments_of_rendering_every_prefix(
    sp_tokenizer, name, system, turns, mask
):
    template = {"trimming": TRIMMING, "percent": PERCENT}.get(name) or BUILTIN_TEMPLATES[name]
    messages = [{"role": "system", "content": "Be brief. "}] if system else []
    for user, reply in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    fast = Renderer(sp_tokenizer, template)
    try:
        expected = split_supervised_text(
            sp_tokenizer, _PrefixOnly(sp_tokenizer, template), messages, mask=mask
        )
    except BadRecord:
        with pytest.raises(BadRecord):
            split_supervised_text(sp_tokenizer, fast, messages, mask=mask)
        return
    assert split_supervised_text(sp_tokenizer, fast, messages, mask=mask) == expected


def test_skeleton_shortcut_is_taken_for_verbatim_templates_only(sp_tokenizer):
    messages = CONVERSATION
    turns = [2, 4]
    chatml = Renderer(sp_tokenizer, BUILTIN_TEMPLATES["chatml"])
    full = chatml(messages, add_generation_prompt=False)
    assert chatml.turn_bounds(messages, turns, full) is not None
    percent = Renderer(sp_tokenizer, PERCENT)
    full = percent(messages, add_generation_prompt=False)
    assert percent.turn_bounds(messages, turns, full) is not None
    trimming = Renderer(sp_tokenizer, TRIMMING)
    padded = [{**m, "content": f" {m['content']} "} for m in messages]
    assert (
        trimming.turn_bounds(padded, turns, trimming(padded, add_generation_prompt=False)) is None
    )
    # contents that contain the placeholder characters never take the shortcut
    odd = [{**m, "content": m["content"] + "\ue000"} for m in messages]
    assert chatml.turn_bounds(odd, turns, chatml(odd, add_generation_prompt=False)) is None


GLOBALS = (  # a template that uses jinja's and transformers' globals and the special tokens
    "{% set ns = namespace(n=0) %}{{ bos_token }}"
    "{% for message in messages %}{% set ns.n = ns.n + 1 %}"
    "{% if message['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
    "{{ ns.n ~ ':' ~ message['role'] ~ '|' ~ message['content'] ~ eos_token }}"
    "{% endfor %}{% for i in range(tools | length if tools else 0) %}{{ tools[i] | tojson }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant|' }}{% endif %}"
)


@pytest.mark.parametrize("name", [*BUILTIN_TEMPLATES, "globals"])
@pytest.mark.parametrize("prompt", [False, True])
def test_renderer_renders_what_apply_chat_template_renders(sp_tokenizer, name, prompt):
    """The renderer's own context (globals merged once) gives transformers' public rendering,
    tools and special tokens included; a template's raise_exception still raises."""
    template = GLOBALS if name == "globals" else BUILTIN_TEMPLATES[name]
    render = Renderer(sp_tokenizer, template)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    for extra in ({}, {"tools": tools}):
        expected = sp_tokenizer.apply_chat_template(
            CONVERSATION,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=prompt,
            **extra,
        )
        assert render(CONVERSATION, add_generation_prompt=prompt, **extra) == expected
    if name == "globals":
        with pytest.raises(Exception, match="no tools here") as raised:
            render([{"role": "tool", "content": "x"}], add_generation_prompt=False)
        with pytest.raises(type(raised.value)):
            sp_tokenizer.apply_chat_template(
                [{"role": "tool", "content": "x"}], chat_template=template, tokenize=False
            )
