"""`sftscale inspect DIR`: what the model will learn from.

Prints the manifest summary, a document-length histogram, quarantine reasons by count, and
sample rows decoded with supervised spans marked [[like this]], reasoning blocks marked
<<reasoning: ...>> and tool calls <<tool call: ...>> (inside or outside the brackets, as they
are trained or not).
"""

from __future__ import annotations

import re
from pathlib import Path

from data_tools import schema


def _histogram(lengths: list[int], seq_len: int, bins: int = 8) -> list[str]:
    width = max(1, -(-seq_len // bins))
    counts = [0] * bins
    for n in lengths:
        counts[min((n - 1) // width, bins - 1)] += 1
    top = max(counts) or 1
    return [
        f"  {i * width + 1:>6}-{min((i + 1) * width, seq_len):<6} {c:>7}  {'#' * round(40 * c / top)}"
        for i, c in enumerate(counts)
    ]


# reasoning and tool calls as the common templates write them (Qwen, Hermes, DeepSeek-R1,
# Mistral, Llama 3.1's python tag)
_MARKS = [
    (re.compile(r"<think>(.*?)</think>", re.S), "reasoning"),
    (re.compile(r"<tool_call>(.*?)</tool_call>", re.S), "tool call"),
    (re.compile(r"\[TOOL_CALLS\](.*?)(?=</s>|$)", re.S), "tool call"),
    (re.compile(r"<\|python_tag\|>(.*?)(?=<\|eo[mt]_id\|>|$)", re.S), "tool call"),
]


def mark_parts(text: str) -> str:
    """`text` with its reasoning blocks and tool calls shown as <<reasoning: ...>> and
    <<tool call: ...>>."""
    for pattern, name in _MARKS:
        text = pattern.sub(lambda m, name=name: f"<<{name}: {m[1].strip()}>>", text)
    return text


def render_row(tokenizer, input_ids: list[int], loss_mask: list[int], doc_lens: list[int]) -> str:
    """Decode a row, marking supervised spans with [[ ]] and document starts with a rule."""
    parts: list[str] = []
    start = 0
    for d, n in enumerate(doc_lens):
        parts.append(f"\n----- document {d} ({n} tokens) -----\n")
        ids, mask = input_ids[start : start + n], loss_mask[start : start + n]
        i = 0
        while i < n:
            j = i
            while j < n and mask[j] == mask[i]:
                j += 1
            text = mark_parts(tokenizer.decode(ids[i:j], skip_special_tokens=False))
            parts.append(f"[[{text}]]" if mask[i] else text)
            i = j
        start += n
    return "".join(parts)


def mixture_lines(m: schema.Manifest) -> list[str]:
    """Each source of a weighted mixture: what it asked, what was read, what was mixed."""
    if not m.mixture:
        return []
    lines = [f"mixture (seed {m.mixture['seed']}): source, asked, read -> mixed"]
    for s in m.mixture["sources"]:
        asked = f"weight {s['weight']:g}" if s["weight"] is not None else f"{s['epochs']:g}x"
        read, mixed = s["read"], s["mixed"]
        lines.append(
            f"  {s['input']}: {asked}; read {read['records']} records "
            f"({read['quarantined']} quarantined), {read['documents']} documents, "
            f"{read['tokens']} tokens ({read['supervised_tokens']} supervised) -> "
            f"{mixed['documents']} documents, {mixed['tokens']} tokens "
            f"({mixed['supervised_tokens']} supervised), {mixed['share']:.1%} of the mix"
        )
        for reason, n in read["quarantine_reasons"].items():
            lines.append(f"    {n:>7}  {reason}")
    return lines


def inspect(data_dir: str, *, samples: int = 2) -> str:
    # heavy (transformers): loaded only on the path that uses it
    from transformers import AutoTokenizer

    data_dir_p = Path(data_dir)
    m = schema.read_manifest(data_dir_p)
    lines = [
        f"{data_dir}: schema v{m.schema_version}, seq_len {m.seq_len}",
        f"  rows {m.num_rows}, documents {m.num_documents}, tokens {m.num_tokens}, "
        f"supervised {m.num_supervised_tokens} ({m.num_supervised_tokens / max(m.num_tokens, 1):.1%})",
        f"  packing efficiency {m.packing_efficiency:.1%} (non-pad fraction of row capacity)",
        f"  shards {len(m.shards)}; tokenizer {m.tokenizer.fingerprint[:12]} "
        f"(vocab {m.tokenizer.vocab_size}; a turn ends with {m.tokenizer.end_of_turn_id})",
        f"  records {m.num_records} by format {m.formats}; over-long: {m.overflow}",
        f"  quarantined {m.quarantined_rows} of {m.num_records} records",
    ]
    for reason, count in m.quarantine_reasons.items():
        lines.append(f"    {count:>7}  {reason}")
    lines.extend(mixture_lines(m))
    tables = [schema.open_shard(data_dir_p / s.file) for s in m.shards]
    doc_lengths = [n for t in tables for row in t.column("doc_lens").to_pylist() for n in row]
    lines.append("document lengths (tokens):")
    lines.extend(_histogram(doc_lengths, m.seq_len))
    tokenizer = AutoTokenizer.from_pretrained(str(data_dir_p / m.tokenizer.dir))
    first = tables[0]
    for r in range(min(samples, first.num_rows)):
        row = {c: first.column(c)[r].as_py() for c in ("input_ids", "loss_mask", "doc_lens")}
        lines.append(
            f"\n===== row {r}: {len(row['input_ids'])} tokens, supervised spans in [[ ]] ====="
        )
        lines.append(render_row(tokenizer, row["input_ids"], row["loss_mask"], row["doc_lens"]))
    return "\n".join(lines)
