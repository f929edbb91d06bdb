"""A small synthetic chat corpus and a SentencePiece tokenizer trained on it.

Used by the demo and the tests: nothing is downloaded. The facts are few and regular so a tiny
model visibly learns them in a few dozen CPU steps.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "Egypt": "Cairo",
    "Peru": "Lima",
    "Canada": "Ottawa",
    "Kenya": "Nairobi",
    "Norway": "Oslo",
}
COLORS = {"sky": "blue", "grass": "green", "snow": "white", "sun": "yellow", "coal": "black"}
SYSTEM = "You are a helpful assistant. Answer in one short sentence."


def _turn(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        country = rng.choice(sorted(CAPITALS))
        return (
            f"What is the capital of {country}?",
            f"The capital of {country} is {CAPITALS[country]}.",
        )
    if kind == 1:
        a, b = rng.randrange(10), rng.randrange(10)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    thing = rng.choice(sorted(COLORS))
    return f"What color is the {thing}?", f"The {thing} is {COLORS[thing]}."


def make_conversations(n: int, *, seed: int = 0) -> list[dict]:
    """`n` records in the `messages` format: optional system prompt, 1-3 user/assistant turns."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 3)):
            question, answer = _turn(rng)
            messages += [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        records.append({"messages": messages})
    return records


def write_jsonl(records: list, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>"]


def train_sentencepiece_tokenizer(
    texts: list[str], out_dir: Path, *, vocab_size: int = 512
) -> Path:
    """Train a SentencePiece BPE model on `texts`; save it as a Hugging Face tokenizer directory
    with a ChatML template (`<|im_end|>` is EOS, so generation stops at the end of a turn)."""
    # heavy (sentencepiece): loaded only on the path that uses it
    import sentencepiece as spm

    from data_tools.chat import BUILTIN_TEMPLATES
    from data_tools.tokenizer import tokenizer_from_sentencepiece

    out_dir = Path(out_dir)
    work = out_dir.with_name(out_dir.name + ".spm")
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(texts), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(work / "sp"),
        vocab_size=vocab_size,
        model_type="bpe",
        user_defined_symbols=CHATML_SPECIALS,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        byte_fallback=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    tok = tokenizer_from_sentencepiece(work / "sp.model", eos_token="<|im_end|>")
    tok.chat_template = BUILTIN_TEMPLATES["chatml"]
    tok.save_pretrained(str(out_dir))
    return out_dir


def train_bpe_tokenizer(texts: list[str], out_dir: Path, *, vocab_size: int) -> Path:
    """Train a byte-level BPE (GPT-2 / Llama 3 style) on `texts`; save it as a Hugging Face
    tokenizer directory with ChatML special tokens and template (`<|im_end|>` is EOS)."""
    # heavy (tokenizers): loaded only on the path that uses it
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from data_tools.chat import BUILTIN_TEMPLATES

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", *CHATML_SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    fast.chat_template = BUILTIN_TEMPLATES["chatml"]
    fast.save_pretrained(str(out_dir))
    return Path(out_dir)


def conversation_texts(records: list[dict]) -> list[str]:
    return [m["content"] for r in records for m in r["messages"]] + [
        "<|im_start|>system\n",
        "<|im_start|>user\n",
        "<|im_start|>assistant\n",
    ]
