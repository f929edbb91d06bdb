"""The synthetic corpus and tokenizer the benchmarks share.

Conversations of 1-4 user/assistant turns (half with a system prompt) whose turn lengths are
lognormal (median ~40 words, sigma 1.0, capped at 1500 words); a byte-level BPE tokenizer
trained on a sample of them, with a ChatML template.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "it",
    "was",
    "for",
    "on",
    "are",
    "as",
    "with",
    "his",
    "they",
    "at",
    "be",
    "this",
    "from",
    "have",
    "or",
    "by",
    "one",
    "had",
    "not",
    "but",
    "what",
    "all",
    "were",
    "when",
    "we",
    "there",
    "can",
    "an",
    "your",
    "which",
    "their",
    "said",
    "if",
    "do",
    "will",
    "each",
    "about",
    "how",
    "up",
    "out",
    "them",
    "then",
    "she",
    "many",
    "some",
    "so",
    "these",
    "would",
    "other",
    "into",
    "has",
    "more",
    "her",
    "two",
    "like",
    "him",
    "see",
    "time",
    "could",
    "no",
    "make",
    "than",
    "first",
    "been",
    "its",
    "who",
    "now",
    "people",
    "my",
    "made",
    "over",
    "did",
    "down",
    "only",
    "way",
    "find",
    "use",
    "may",
    "water",
    "long",
    "little",
    "very",
    "after",
    "words",
    "called",
    "just",
    "where",
    "most",
    "know",
    "get",
    "through",
    "back",
    "much",
    "before",
    "go",
    "good",
    "new",
    "write",
    "our",
]


def make_corpus(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            messages = (
                [{"role": "system", "content": "You are a helpful assistant."}]
                if rng.random() < 0.5
                else []
            )
            for _ in range(int(rng.integers(1, 5))):
                for role in ("user", "assistant"):
                    k = int(min(1500, max(1, rng.lognormal(mean=np.log(40), sigma=1.0))))
                    messages.append({"role": role, "content": " ".join(rng.choice(WORDS, size=k))})
            f.write(json.dumps({"messages": messages}) + "\n")


def make_tokenizer(corpus: Path, out: Path) -> None:
    # heavy (sentencepiece, tokenizers behind it): only when a tokenizer is trained
    from data_tools.synthetic import train_bpe_tokenizer

    texts = [
        m["content"]
        for line in corpus.read_text().splitlines()[:2000]
        for m in json.loads(line)["messages"]
    ]
    train_bpe_tokenizer(texts, out, vocab_size=4000)
