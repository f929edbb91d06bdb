"""Loading the tokenizer prepare works with: a Hugging Face tokenizer directory, or a bare
SentencePiece .model turned into one. Imports neither torch, ray nor deepspeed."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any


def load_tokenizer(path: str | Path) -> Any:
    """A local Hugging Face tokenizer directory, or a SentencePiece .model file (ValueError
    for anything else)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".model":
        return tokenizer_from_sentencepiece(path)
    if not path.is_dir():
        raise ValueError(
            f"--tokenizer {path} is neither a Hugging Face tokenizer directory nor a SentencePiece .model file"
        )
    named = _named_class(path)
    if named is not None:
        return named.from_pretrained(str(path), **_added_tokens(path))
    # heavy (transformers, torch): loaded only on the path that uses it
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _named_class(path: Path) -> Any:
    """The class AutoTokenizer would load a tokenizer-only directory with, when its
    tokenizer_config.json names one of transformers' tokenizer classes; None whenever
    AutoTokenizer would look further (a model's config.json beside it, remote code, a missing
    or unknown class), and then AutoTokenizer decides.

    The point is time: AutoTokenizer reads the model config, whose module imports torch
    (1-2 s of a prepare's serial start on 2 cores); the named class imports only its own module.
    It follows AutoTokenizer's rules for such a directory (transformers 5: the name without
    "Fast"; a LlamaTokenizer whose tokenizer.json is byte-level, and the Python backend, load as
    the generic fast class); tests/test_prepare.py holds it to AutoTokenizer's result, saved
    files included, on real tokenizers.
    """
    config_file = path / "tokenizer_config.json"
    if (path / "config.json").exists() or not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # AutoTokenizer says what is wrong with it
    name = config.get("tokenizer_class") if isinstance(config, dict) else None
    if not isinstance(name, str) or "auto_map" in config:
        return None
    # heavy (transformers): only once the directory names a class
    import transformers
    from transformers import PreTrainedTokenizerBase, TokenizersBackend

    base = name.removesuffix("Fast")
    byte_level = getattr(TokenizersBackend, "_tokenizer_json_has_byte_level", None)
    # decided before the class is looked up: importing it imports transformers.models, whose
    # index of every model's files costs ~0.5 s, and a byte-level one loads as the generic class
    if base == "LlamaTokenizer" and (byte_level is None or byte_level(str(path))):
        return None if byte_level is None else TokenizersBackend
    found = _model_tokenizer_class(transformers, base) or getattr(transformers, base, None)
    if not (isinstance(found, type) and issubclass(found, PreTrainedTokenizerBase)):
        return None
    if found.__name__ == "PythonBackend":
        return TokenizersBackend
    return found


def _model_tokenizer_class(transformers: Any, name: str) -> Any:
    """transformers' tokenizer class `name` of a model family (LlamaTokenizer, say), imported
    from its own file alone; None where transformers does not say which file (then the caller
    asks transformers for it).

    The point is time: `transformers.LlamaTokenizer` imports transformers.models first, whose
    index of every model's files costs 0.6-0.7 s of a prepare's serial start on 2 cores, where
    tokenization_llama.py takes 0.04 s. The module is registered under its own name, so a
    later `transformers.LlamaTokenizer` returns this very class (tests/test_tokenizer_load.py
    checks it, and that loading Mistral v3's tokenizer leaves transformers.models unimported).
    """
    where = getattr(transformers, "_class_to_module", {}).get(name)
    if not isinstance(where, str) or not where.startswith("models."):
        return None
    full = f"transformers.{where}"
    module = sys.modules.get(full)
    if module is None:
        file = Path(transformers.__file__).parent.joinpath(*where.split(".")).with_suffix(".py")
        spec = importlib.util.spec_from_file_location(full, file)
        if spec is None or spec.loader is None or not file.is_file():
            return None
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        try:
            spec.loader.exec_module(module)
        except Exception:  # transformers knows better: its own import path decides
            del sys.modules[full]
            return None
    return getattr(module, name, None)


def _added_tokens(path: Path) -> dict[str, Any]:
    """The added tokens of a directory whose tokenizer_config.json leaves them out (as
    transformers 5 saves a fast tokenizer), read from the head of its tokenizer.json, as a
    keyword for from_pretrained; {} for any other directory, which loads as it is.

    Without them, from_pretrained parses the whole tokenizer.json in Python just to read its
    "added_tokens" (0.47 s for DeepSeek-V3's, in prepare's serial start) before the Rust
    tokenizer parses it again. tokenizers writes that key fourth, after three small ones, so
    only those are parsed here; in any other order, whatever comes before it is parsed too.
    Where from_pretrained would also read added_tokens.json or special_tokens_map.json, it is
    left to do so. tests/test_tokenizer_load.py holds the result to AutoTokenizer's."""
    file = path / "tokenizer.json"
    if any((path / name).exists() for name in ("added_tokens.json", "special_tokens_map.json")):
        return {}
    try:
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        if "added_tokens_decoder" in config or not file.is_file():
            return {}
        found = _top_level_value(file.read_text(encoding="utf-8"), "added_tokens")
    except (OSError, UnicodeDecodeError, ValueError):
        return {}  # from_pretrained says what is wrong
    if not isinstance(found, list) or not all(
        isinstance(t, dict) and isinstance(t.get("id"), int) for t in found
    ):
        return {}
    # light (tokenizers): transformers' own dependency, imported by the caller already
    from tokenizers import AddedToken

    decoder = {}
    for token in found:
        fields = {k: v for k, v in token.items() if k != "id"}
        try:
            decoder[token["id"]] = AddedToken(**fields)
        except TypeError:
            return {}
    return {"added_tokens_decoder": decoder}


def _top_level_value(text: str, key: str) -> Any:
    """The value of `key` in the JSON object `text`, parsing only the members before it
    (ValueError if `text` does not start as a JSON object; None if the key is not found)."""
    parse = json.JSONDecoder().raw_decode
    at = _after_space(text, 0)
    if text[at : at + 1] != "{":
        raise ValueError("not a JSON object")
    at = _after_space(text, at + 1)
    while text[at : at + 1] == '"':
        name, at = parse(text, at)
        at = _after_space(text, at)
        if text[at : at + 1] != ":":
            raise ValueError(f"no ':' after {name!r}")
        value, at = parse(text, _after_space(text, at + 1))
        if name == key:
            return value
        at = _after_space(text, at)
        if text[at : at + 1] != ",":
            return None
        at = _after_space(text, at + 1)
    return None


def _after_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\n\r":
        at += 1
    return at


def tokenizer_from_sentencepiece(model_file: Path, *, eos_token: str | None = None) -> Any:
    """A Hugging Face (Llama-class) tokenizer for a SentencePiece model: its own special pieces,
    no BOS/EOS added when encoding, a prefix space only where the model adds one; `eos_token`
    overrides the model's EOS piece (a chat tokenizer's end of turn, say)."""
    # heavy (sentencepiece): loaded only on the path that uses it
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(model_file))

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "legacy": False,
        "add_prefix_space": proto.normalizer_spec.add_dummy_prefix,
        "bos_token": piece(sp.bos_id()),
        "eos_token": eos_token or piece(sp.eos_id()),
        "unk_token": piece(sp.unk_id()),
        "pad_token": piece(sp.pad_id()),
    }
    # transformers 5 builds a working tokenizer from a .model only when loading a directory
    # (LlamaTokenizer(vocab_file=...) silently returns empty ids).
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy2(model_file, Path(tmp) / "tokenizer.model")
        (Path(tmp) / "tokenizer_config.json").write_text(
            json.dumps({k: v for k, v in config.items() if v is not None})
        )
        return AutoTokenizer.from_pretrained(tmp)
