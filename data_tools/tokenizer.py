"""Loading the tokenizer prepare works with: a Hugging Face tokenizer directory, or a bare
SentencePiece .model turned into one. Imports neither torch, ray nor deepspeed."""

from __future__ import annotations

import json
import shutil
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
        return named.from_pretrained(str(path))
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
    found = getattr(transformers, base, None)
    if not (isinstance(found, type) and issubclass(found, PreTrainedTokenizerBase)):
        return None
    if found.__name__ == "PythonBackend":
        return TokenizersBackend
    return found


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
