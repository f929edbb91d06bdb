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
    # heavy (transformers): loaded only on the path that uses it
    from transformers import AutoTokenizer

    path = Path(path)
    if path.is_file() and path.suffix == ".model":
        return tokenizer_from_sentencepiece(path)
    if not path.is_dir():
        raise ValueError(
            f"--tokenizer {path} is neither a Hugging Face tokenizer directory nor a SentencePiece .model file"
        )
    return AutoTokenizer.from_pretrained(str(path))


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
