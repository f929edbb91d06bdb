"""`sftscale prepare`: raw SFT records -> tokenized, loss-masked, packed Arrow shards + manifest.

    sftscale prepare data/*.jsonl more.parquet hf_dir/ --tokenizer TOK --seq-len 4096 --out prepared/ \
        [--format auto] [--chat-template chatml] [--mask assistant|last|all] \
        [--overflow truncate|split|quarantine] [--num-proc 8] [--engine local|ray]

Pipeline (streaming; memory stays flat as the corpus grows):

    read records (file, line) -> batches -> [workers] normalize format, render the chat
    template, tokenize + loss mask, handle over-long documents -> in input order, a window of
    documents -> best-fit-decreasing packing -> rows -> shards of --rows-per-shard rows

Workers are local processes (--num-proc) or Ray Data tasks (--engine ray); results come back in
input order, so the output is byte-identical for the same inputs and options whatever the
engine or the number of workers. Bad records go to quarantine.jsonl with their source, line and
reason as they are met; nothing is dropped silently.

Imports neither torch, ray (except for --engine ray) nor deepspeed.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import json
import multiprocessing as mp
import operator
import os
import pickle
import select as io_select
import shutil
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_tools import pack as packing
from data_tools import schema
from data_tools.chat import (
    MASK_MODES,
    Renderer,
    add_template_tokens,
    close_text_doc,
    end_of_turn,
    resolve_template,
    text_segments,
    tokenize_segments,
)
from data_tools.console import ProgressBar
from data_tools.encode import Encoder, RankedPlan, ranked_plan
from data_tools.formats import (
    FORMATS,
    MAX_RECORD_BYTES,
    BadRecord,
    InputError,
    RawJSON,
    detect_format,
    expand_inputs,
    iter_records,
    normalize,
    parse,
    tools_of,
)
from data_tools.mixture import MixtureError, Source, Spill, parse_inputs, select, targets
from data_tools.outdir import OutputError, new_output
from data_tools.tokenizer import load_tokenizer
from data_tools.toolchat import REASONING_MODES, ChatOptions, chat_documents

OVERFLOW_MODES = ("truncate", "split", "quarantine")
ENGINES = ("local", "ray")
PACKING_MODES = ("bfd", "none")
BATCH = 256  # records per unit of work


class PrepareError(RuntimeError):
    """The job as a whole cannot go on (bad arguments, unreadable input, too many bad rows)."""


@dataclass
class PrepareOptions:
    seq_len: int
    chat_template: str | None = None
    format: str | None = None  # None: detect per record
    mask: str = "assistant"
    overflow: str = "truncate"
    rows_per_shard: int = 10_000
    max_bad_fraction: float = 1.0
    keep_empty_replies: bool = False  # False: an empty/whitespace assistant turn is quarantined
    num_proc: int = 1
    engine: str = "local"
    window: int = 50_000  # documents packed together; bounds memory
    packing: str = "bfd"  # bfd: best-fit decreasing; none: one document per row (padding baselines)
    # Bounds per record, each a quarantine reason: its size as read, its messages (rendering a
    # new sequence of roles costs one template rendering per assistant turn), its tokens.
    max_record_bytes: int = MAX_RECORD_BYTES
    max_turns: int = 1024
    max_doc_tokens: int = 1 << 20
    reasoning: str = "train"  # reasoning spans: train, mask (kept, not supervised) or drop
    train_tool_results: bool = False  # tool results supervised too
    seed: int = 0  # a mixture's sampling (data_tools.mixture)
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.seq_len >= 2, f"--seq-len must be >= 2, got {self.seq_len}"),
            (
                self.format is None or self.format in FORMATS,
                f"--format must be auto or one of {', '.join(FORMATS)}",
            ),
            (self.mask in MASK_MODES, f"--mask must be one of {', '.join(MASK_MODES)}"),
            (
                self.overflow in OVERFLOW_MODES,
                f"--overflow must be one of {', '.join(OVERFLOW_MODES)}",
            ),
            (self.rows_per_shard >= 1, "--rows-per-shard must be >= 1"),
            (0 <= self.max_bad_fraction <= 1, "--max-bad-fraction must be in [0, 1]"),
            (self.num_proc >= 1, "--num-proc must be >= 1"),
            (self.engine in ENGINES, f"--engine must be one of {', '.join(ENGINES)}"),
            (self.window >= 1, "--window must be >= 1"),
            (self.packing in PACKING_MODES, f"--packing must be one of {', '.join(PACKING_MODES)}"),
            (self.max_record_bytes >= 1, "--max-record-bytes must be >= 1"),
            (
                self.reasoning in REASONING_MODES,
                f"--reasoning must be one of {', '.join(REASONING_MODES)}",
            ),
            (self.max_turns >= 2, "--max-turns must be >= 2"),
            (self.max_doc_tokens >= 1, "--max-doc-tokens must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise PrepareError(message)


# ---- tokenizer ---------------------------------------------------------------------------------


def stop_tokens(tokenizer: Any, template: str, name: str | None) -> dict[str, Any]:
    """Make the template's end of turn one special token and the tokenizer's EOS.

    A built-in template's markers that the tokenizer lacks become special tokens (TRL's
    clone_chat_template and Axolotl do the same; training grows the model's embeddings to fit).
    The token a turn ends with becomes the tokenizer's eos_token, and the EOS ids a model
    should stop at are the end-of-turn token then the tokenizer's own EOS (a list, as Llama 3
    lists them); training writes them to the export's generation_config.json. ValueError
    when a turn would not end in one special token.
    """
    added = add_template_tokens(tokenizer, name)
    eot = end_of_turn(tokenizer, template)
    eos = [eot.token_id]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id != eot.token_id:
        eos.append(tokenizer.eos_token_id)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eot.token_id)
    return {"added_tokens": added, "end_of_turn_id": eot.token_id, "eos_token_ids": eos}


def tokenizer_fingerprint(tokenizer: Any, template: str) -> str:
    """Hash of vocabulary (token -> id, added tokens included) and chat template."""
    h = hashlib.sha256()
    # sorted by token alone: tokens are unique, so the order of sorting the pairs, in half the
    # time (0.2 s of a prepare's serial end for DeepSeek-V3's 129,000 tokens)
    pairs = sorted(tokenizer.get_vocab().items(), key=operator.itemgetter(0))
    h.update(json.dumps(pairs, ensure_ascii=False).encode())
    h.update(template.encode())
    return h.hexdigest()


# ---- per-record work (runs in worker processes) --------------------------------------------------

_WORKER: dict[str, Any] = {}


def worker_tokenizer(tokenizer_dir: str | Path) -> Any:
    """The tokenizer a worker loads from the copy saved beside the shards. A fast tokenizer
    (tokenizer.json) loads as the generic fast class: ids from the same Rust tokenizer, template
    and special tokens from the same files, and no model-class import (which pulls in torch:
    ~2 s per worker). Anything else loads as the main process loaded it."""
    generic = _copy_class(tokenizer_dir)
    if generic is not None:
        return generic.from_pretrained(str(tokenizer_dir))
    # heavy (transformers): loaded only on the path that uses it
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def _copy_class(tokenizer_dir: str | Path) -> Any:
    """The class worker_tokenizer loads the copy with when it names one: the generic fast class
    where there is a tokenizer.json; None where AutoTokenizer decides."""
    if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        return None
    # heavy (transformers): loaded only on the path that uses it (imported by then anyway)
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast


def _init_worker(options: dict, tokenizer_dir: str, saved: Any = None) -> None:
    """What a worker holds: the tokenizer loaded from the copy saved beside the shards (so its
    ids are the data's), the template that copy carries, the options.

    `saved`: the object the copy was just saved from, taken instead of a load when the copy
    would load as its very class (the generic fast class, as DeepSeek-V3's and Llama 3.1's
    load): the same Rust tokenizer, special tokens and template, written by this class and read
    back by it. That load cost 0.75 s of DeepSeek-V3's serial start, and freeing the copy 0.3 s
    more. tests/test_tokenizer_load.py holds the two to the same pipeline, tokens, template and
    ids on real tokenizers; another class (LlamaTokenizer, Qwen2Tokenizer: the copy loads as the
    generic one) is always loaded from the copy."""
    if saved is not None and type(saved) is _copy_class(tokenizer_dir):
        tok = saved
    else:
        tok = worker_tokenizer(tokenizer_dir)
    _WORKER.update(options=PrepareOptions(**options), tokenizer=tok, template=tok.chat_template)


def _release_worker_state() -> None:
    """This process's share of the workers' state freed, the encoder included (which the
    tokenizer would keep alive when it is this process's own)."""
    if "tokenizer" in _WORKER:
        Encoder.forget(_WORKER["tokenizer"])
    _WORKER.clear()


def _process_batch(items: list[tuple[str, int, str, Any]]) -> list[dict]:
    return process_records(items, _WORKER["tokenizer"], _WORKER["template"], _WORKER["options"])


def _process_shipped(items: list[tuple[str, int, str, Any]]) -> tuple[list[dict], Any, Any]:
    """`_process_batch` in a worker process, its results made cheap to send: every piece's ids
    and mask joined into one array each (their lengths stay in the results), since unpickling
    two arrays per document cost the main process more than a worker's whole batch of
    pickling (0.76 CPU-s per 34,000 documents)."""
    results = _process_batch(items)
    ids, masks = [], []
    for r in results:
        if r["ok"]:
            ids += [i for i, _ in r["pieces"]]
            masks += [m for _, m in r["pieces"]]
            r["pieces"] = [len(i) for i, _ in r["pieces"]]
    if not ids:
        return results, None, None
    return results, np.concatenate(ids), np.concatenate(masks)


def _unship(shipped: tuple[list[dict], Any, Any]) -> list[dict]:
    """The results `_process_shipped` sent, each piece a view of the joined arrays."""
    results, ids, masks = shipped
    at = 0
    for r in results:
        if r["ok"]:
            pieces = []
            for n in r["pieces"]:
                pieces.append((ids[at : at + n], masks[at : at + n]))
                at += n
            r["pieces"] = pieces
    return results


class _Workers:
    """The local engine's worker processes (none for one process), started once the tokenizer
    is saved. On Linux the main process loads the workers' tokenizer and forks them: they start
    with it loaded and transformers imported (spawned, each spent ~1 s importing and ~0.7 s
    loading DeepSeek-V3's tokenizer on 2 cores, beside the main process's own loading). Only
    when the main process runs no Python thread but its own: its other threads are then
    numpy's BLAS pool and pyarrow's allocator, both fork-safe. Elsewhere, or with threads,
    they are spawned and load it themselves.

    A worker that dies (the out-of-memory killer, a signal) fails the run with a PrepareError
    naming the batch: a process pool's executor notices, where multiprocessing.Pool waited for
    its task for ever. Workers are ended, running or not, when the block ends."""

    IN_FLIGHT = 2  # batches per worker submitted ahead: memory stays flat, no worker waits

    def __init__(self, options: PrepareOptions, tokenizer_dir: str, loaded: _Tokenizer) -> None:
        self.pool: ProcessPoolExecutor | None = None
        # the pool's own table of its processes, held here: once shut down or broken, the pool
        # forgets it, and spawned workers join it one per task until there are num_proc (a copy
        # taken at the first task missed the second worker, left running after the run)
        self.processes: dict = {}
        self.num_proc = options.num_proc
        # a thread of the caller's own (an application embedding prepare) could hold a lock
        # the forked copy would wait on for ever: then spawn
        fork = _Aside.forkable()
        if options.num_proc == 1 or fork:
            _init_worker(asdict(options), tokenizer_dir, loaded.tokenizer)
            # the workers' encoder, built once and forked with them, from the plan made at the
            # start (when it fits this tokenizer)
            Encoder.of(_WORKER["tokenizer"], loaded.plan.result())
        if options.num_proc > 1:
            # forked (all at once, before the executor starts its thread) or spawned
            self.pool = ProcessPoolExecutor(
                options.num_proc,
                mp_context=mp.get_context("fork" if fork else "spawn"),
                initializer=None if fork else _init_worker,
                initargs=() if fork else (asdict(options), tokenizer_dir),
            )
            self.processes = self.pool._processes

    def map(self, batches: Iterator[list]) -> Iterator[list[dict]]:
        """Each batch's results, in input order."""
        if self.pool is None:
            yield from map(_process_batch, batches)
            return
        pending: deque = deque()
        for batch in batches:
            pending.append((batch[0][:2], self.pool.submit(_process_shipped, batch)))
            if len(pending) > self.IN_FLIGHT * self.num_proc:
                # the workers are forked and busy: this process frees its share of their state
                # (their encoder; the copy of the tokenizer where it loaded one: 0.2-0.3 s for
                # DeepSeek-V3's, which the end spent otherwise) while it waits
                _release_worker_state()
                yield self._result(*pending.popleft())
        # no other task will come: each worker exits once it has no more, and frees its memory
        # while this process handles the last results (not after, on its time)
        self.pool.shutdown(wait=False)
        _release_worker_state()
        while pending:
            yield self._result(*pending.popleft())

    @staticmethod
    def _result(first: tuple[str, int], future: Future) -> list[dict]:
        try:
            return _unship(future.result())
        except BrokenProcessPool as e:
            source, line = first
            raise PrepareError(
                f"a worker process ended abruptly (killed by a signal, or out of memory) while "
                f"preparing a batch of records, the first unfinished from {source} line {line}; "
                f"nothing was written. If memory ran out, lower --num-proc or --max-record-bytes"
            ) from e

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            processes = list(self.processes.values())
            for process in processes:  # running or not: a failed run does not wait
                if process.is_alive():
                    process.terminate()
            self.pool.shutdown(wait=True)
            for process in processes:
                process.join()
        _release_worker_state()


def process_records(items, tokenizer, template: str, options: PrepareOptions) -> list[dict]:
    """Records -> documents (lists of (ids, mask) pieces) or quarantine entries, in order.

    Two passes: render every record into (text, supervised) segments, then tokenize all
    segments of the batch in one call (record by record if that call fails, so a text the
    tokenizer rejects costs only its own record).
    """
    render = Renderer.shared(tokenizer, template)
    chat = ChatOptions(options.reasoning, options.train_tool_results)
    out: list[dict] = []
    pending: list[tuple[int, str, list]] = []  # (index in out, kind, documents' segments)
    for source, line, raw, record in items:
        try:
            if isinstance(record, BadRecord):
                raise record
            record = parse(RawJSON(raw) if record is None else record)
            kind, value = normalize(
                record, options.format, keep_empty_replies=options.keep_empty_replies
            )
            if kind == "messages" and len(value) > options.max_turns:
                raise BadRecord(
                    f"too many turns: {len(value)} messages > --max-turns {options.max_turns}"
                )
            documents = (
                [text_segments(value)]
                if kind == "text"
                else chat_documents(
                    tokenizer,
                    render,
                    value,
                    tools_of(record),
                    mask=options.mask,
                    options=chat,
                    builtin=options.chat_template,
                )
            )
            fmt = "text" if kind == "text" else (options.format or detect_format(record))
            out.append({"ok": True, "format": fmt, "source": source, "line": line, "raw": raw})
            pending.append((len(out) - 1, kind, documents))
        except BadRecord as e:
            out.append(_bad(source, line, raw, str(e)))
        except Exception as e:  # a record the template rejects must not end the job
            out.append(_bad(source, line, raw, f"cannot render: {type(e).__name__}: {e}"))
    batch = [segments for _, _, documents in pending for segments in documents]
    try:
        tokenized: list = tokenize_segments(tokenizer, batch)
    except Exception:  # e.g. tokenizers' TypeError on a string UTF-8 cannot encode
        tokenized = []
        for segments in batch:
            try:
                tokenized += tokenize_segments(tokenizer, [segments])
            except Exception as e:
                tokenized.append(BadRecord(f"cannot tokenize: {type(e).__name__}: {e}"))
    at = 0
    for i, kind, documents in pending:
        r, docs = out[i], tokenized[at : at + len(documents)]
        at += len(documents)
        try:
            fitted = []
            for doc in docs:
                if isinstance(doc, BadRecord):
                    raise doc
                fitted.append(
                    _fit(close_text_doc(tokenizer, doc) if kind == "text" else doc, options)
                )
            r.update(
                pieces=[p for f in fitted for p in f["pieces"]],
                overflow=next((f["overflow"] for f in fitted if f["overflow"]), None),
                unsupervised_pieces=sum(f["unsupervised_pieces"] for f in fitted),
            )
        except BadRecord as e:
            out[i] = _bad(r["source"], r["line"], r["raw"], str(e))
        for key in ("source", "line", "raw"):
            out[i].pop(key, None) if out[i]["ok"] else None
    return out


def _bad(source: str, line: int, raw: str, reason: str) -> dict:
    return {"ok": False, "source": source, "line": line, "reason": reason, "raw": raw}


def _quarantine_line(r: dict) -> str:
    """A quarantine.jsonl line, readable UTF-8 when it can be; a line holding a lone surrogate
    (a \\ud800 escape, a byte that is not UTF-8) is written with JSON escapes instead, which
    read back to the same strings, since a UTF-8 file cannot hold it."""
    entry = {k: r[k] for k in ("source", "line", "reason", "raw")}
    line = json.dumps(entry, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(entry)
    return line + "\n"


def _fit(doc, options: PrepareOptions) -> dict:
    """Fit a document to seq_len per --overflow; pieces without a supervised token are dropped
    (and counted): they would cost compute and teach nothing."""
    n, overflow = len(doc.input_ids), None
    if n > options.max_doc_tokens:
        raise BadRecord(f"too many tokens: {n} > --max-doc-tokens {options.max_doc_tokens}")
    if n <= options.seq_len:
        pieces = [(doc.input_ids, doc.loss_mask)]
    elif options.overflow == "quarantine":
        raise BadRecord(f"too long: {n} tokens > seq_len {options.seq_len}")
    elif options.overflow == "truncate":
        pieces, overflow = (
            [(doc.input_ids[: options.seq_len], doc.loss_mask[: options.seq_len])],
            "truncated",
        )
    else:  # split into consecutive documents of at most seq_len tokens
        step = options.seq_len
        pieces = [
            (doc.input_ids[i : i + step], doc.loss_mask[i : i + step]) for i in range(0, n, step)
        ]
        overflow = "split"
    kept = [(i, m) for i, m in pieces if m.any()]
    if not kept:
        raise BadRecord("zero supervised tokens (after fitting the document to seq_len)")
    return {"pieces": kept, "overflow": overflow, "unsupervised_pieces": len(pieces) - len(kept)}


# ---- engines: results in input order ----------------------------------------------------------


def _batches(
    paths: list[Path], source_hashes: list[dict], max_bytes: int, starts: list[int]
) -> Iterator[list[tuple]]:
    """Batches of records of every path in turn; `starts` gets the number of the first record
    of each path as it is read."""

    def items():
        n = 0
        for path in paths:
            starts.append(n)
            h = hashlib.sha256()
            for rec in iter_records(path, max_bytes):
                h.update(rec.raw.encode("utf-8", "replace"))
                h.update(b"\n")
                # a line not parsed yet travels once: as `raw`, with None for the record
                record = (
                    None if type(rec.record) is RawJSON and rec.record == rec.raw else rec.record
                )
                yield (rec.source, rec.line, rec.raw, record)
                n += 1
            source_hashes.append({"path": str(path), "sha256": h.hexdigest()})

    it = items()
    while batch := list(itertools.islice(it, BATCH)):
        yield batch


def _run_local(
    batches: Iterator[list], tokenizer_dir: Path, options: PrepareOptions, loaded: _Tokenizer
) -> Iterator[list[dict]]:
    with _Workers(options, str(tokenizer_dir), loaded) as workers:
        yield from workers.map(batches)


def _encode_record(rec: Any) -> Any:
    """JSON-safe form of a record for Ray Data (unparsed lines and read errors marked)."""
    if isinstance(rec, BadRecord):
        return {"__bad__": str(rec)}
    if isinstance(rec, RawJSON):
        return {"__raw__": str(rec)}
    return rec


def _decode_record(rec: Any) -> Any:
    if isinstance(rec, dict) and set(rec) == {"__bad__"}:
        return BadRecord(rec["__bad__"])
    if isinstance(rec, dict) and set(rec) == {"__raw__"}:
        return RawJSON(rec["__raw__"])
    return rec


class _RayTokenize:
    """Ray Data map_batches UDF: one tokenizer per actor."""

    def __init__(self, tokenizer_dir: str, options: dict) -> None:
        self.tok = worker_tokenizer(tokenizer_dir)
        self.options = PrepareOptions(**options)

    def __call__(self, batch: dict) -> dict:
        items = [
            (s, n, raw, _decode_record(rec)) for s, n, raw, rec in map(json.loads, batch["item"])
        ]
        results = process_records(items, self.tok, self.tok.chat_template, self.options)
        for r in results:
            if r["ok"]:
                r["pieces"] = [(i.tolist(), m.tolist()) for i, m in r["pieces"]]
        return {"result": [json.dumps(r) for r in results]}


def _run_ray(
    batches: Iterator[list], tokenizer_dir: Path, options: PrepareOptions, loaded: _Tokenizer
) -> Iterator[list[dict]]:
    """The same per-record work on Ray Data (a running cluster, or a local Ray); the driver
    streams records in windows and packs in input order. (Its actors load the copy and build
    their own encoders: `loaded` is for this host's processes.)"""

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # heavy (ray): loaded only on the path that uses it
    import ray

    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    try:
        for group in iter(lambda: list(itertools.islice(batches, options.num_proc * 8)), []):
            encoded = [
                json.dumps([s, n, raw, _encode_record(rec)])
                for batch in group
                for s, n, raw, rec in batch
            ]
            ds = ray.data.from_items([{"item": x} for x in encoded]).map_batches(
                _RayTokenize,
                fn_constructor_args=(str(tokenizer_dir), asdict(options)),
                batch_size=BATCH,
                concurrency=options.num_proc,
            )
            results = [json.loads(r["result"]) for r in ds.iter_rows()]
            for r in results:
                if r["ok"]:
                    r["pieces"] = [
                        (np.array(i, np.int32), np.array(m, np.int8)) for i, m in r["pieces"]
                    ]
            yield results
    finally:
        ray.shutdown()


# ---- the pipeline ---------------------------------------------------------------------------


class _Shards:
    """Packs windows of documents and writes full shards as they fill. The documents of a
    window's rows with free room (up to MAX_CARRIED_ROWS) are packed again with the next window
    (`carried`), so a window's end leaves no half-empty row behind; `close` packs the last."""

    MAX_CARRIED_ROWS = 64

    def __init__(self, out: Path, options: PrepareOptions) -> None:
        self.out, self.options = out, options
        self.rows: dict[str, list] = {"input_ids": [], "loss_mask": [], "doc_lens": []}
        self.shards: list[schema.ShardInfo] = []
        self.num_rows = 0
        self.carried: list[tuple[np.ndarray, np.ndarray]] = []

    def pack(self, docs: list[tuple[np.ndarray, np.ndarray]], *, last: bool = False) -> None:
        if self.options.packing == "none":
            bins = [[i] for i in range(len(docs))]
        else:
            docs = self.carried + docs
            lengths = [len(d[0]) for d in docs]
            bins = packing.pack(lengths, self.options.seq_len)
            self.carried = []
            if not last:
                bins = self._carry(bins, lengths, docs)
        for b in bins:
            self.rows["input_ids"].append(np.concatenate([docs[i][0] for i in b]))
            self.rows["loss_mask"].append(np.concatenate([docs[i][1] for i in b]))
            self.rows["doc_lens"].append(np.array([len(docs[i][0]) for i in b], dtype=np.int32))
            self.num_rows += 1
            if len(self.rows["input_ids"]) == self.options.rows_per_shard:
                self.flush()

    def _carry(self, bins: list[list[int]], lengths: list[int], docs: list) -> list[list[int]]:
        """Keeps back the documents of the rows with free room, least full first, at most
        MAX_CARRIED_ROWS of them; returns the rows to write now."""
        cap = self.options.seq_len
        loads = [sum(lengths[d] for d in b) for b in bins]
        open_rows = sorted((load, k) for k, load in enumerate(loads) if load < cap)
        held = {k for _, k in open_rows[: self.MAX_CARRIED_ROWS]}
        self.carried = [docs[d] for k in sorted(held) for d in bins[k]]
        return [b for k, b in enumerate(bins) if k not in held]

    def close(self) -> None:
        """Packs the documents still carried, then writes the last shard."""
        if self.carried:
            self.pack([], last=True)
        self.flush()

    def flush(self) -> None:
        if not self.rows["input_ids"]:
            return
        name = schema.shard_name(len(self.shards))
        schema.write_shard(self.out / name, self.rows)
        self.shards.append(
            schema.ShardInfo(
                file=name,
                bytes=(self.out / name).stat().st_size,
                sha256=schema.file_sha256(self.out / name),
                num_rows=len(self.rows["input_ids"]),
                num_tokens=int(sum(map(len, self.rows["input_ids"]))),
                num_supervised_tokens=int(
                    sum(int(m.sum(dtype=np.int64)) for m in self.rows["loss_mask"])
                ),
                max_token_id=max(
                    (int(np.max(r)) for r in self.rows["input_ids"] if len(r)), default=-1
                ),
                max_doc_tokens=max((int(np.max(d)) for d in self.rows["doc_lens"]), default=0),
            )
        )
        self.rows = {k: [] for k in self.rows}


def prepare(
    inputs: list[str], *, tokenizer_path: str, out_dir: str, options: PrepareOptions
) -> schema.Manifest:
    """Run the pipeline; return the manifest."""
    try:
        sources = parse_inputs(inputs)
        paths, path_source = [], []
        for k, source in enumerate(sources):
            found = expand_inputs([source.input])
            paths += found
            path_source += [k] * len(found)
    except (InputError, MixtureError) as e:
        raise PrepareError(str(e)) from e
    read_from = _Inputs(paths, sources, path_source)
    # the slow part of building the workers' encoder, made from the tokenizer's own file on the
    # idle core while this process imports transformers and loads it (~1 s for DeepSeek-V3)
    with _Aside(_encoder_plan, str(tokenizer_path), here=_no_plan) as plan:
        try:
            tokenizer = load_tokenizer(tokenizer_path)
            template = resolve_template(tokenizer, options.chat_template)
            tokens = stop_tokens(tokenizer, template, options.chat_template)
        except ValueError as e:
            raise PrepareError(str(e)) from e
        # needed only at the end: it yields the core to the plan's child and to the workers
        with _Aside(tokenizer_fingerprint, tokenizer, template, nice=10) as fingerprint:
            loaded = _Tokenizer(tokenizer, template, tokens, str(tokenizer_path), fingerprint, plan)
            return _stage(read_from, out_dir, loaded, options)


def _encoder_plan(tokenizer_path: str) -> RankedPlan | None:
    """The RankedPlan of the tokenizer.json in `tokenizer_path` (loaded by tokenizers alone:
    no transformers import), or None."""
    file = Path(tokenizer_path) / "tokenizer.json"
    if not file.is_file():
        return None
    # light (tokenizers): transformers' own dependency, no more
    from tokenizers import Tokenizer

    return ranked_plan(Tokenizer.from_file(str(file)))


def _no_plan(tokenizer_path: str) -> None:
    """Without a plan from a child, the encoder makes its own."""


class _Aside:
    """fn(*args), computed in a forked child while this process goes on, on the core that is
    idle meanwhile: the plan of the workers' encoder while the start imports transformers and
    loads the tokenizer (~1 s for DeepSeek-V3's 128,000 tokens), its fingerprint while the
    tokenizer is saved and loaded again (0.3-0.5 s). Where forking is not safe (not Linux, or
    the caller runs threads of its own: see _Workers) or the child fails, `here(*args)` (fn
    unless told) is computed here when asked for; a child that has sent nothing WAIT seconds
    after it is asked for is ended. The child is reaped by `result`; one never asked for is
    ended when the block ends. Its value comes back pickled through a pipe: from our own fork,
    and length-checked, so a child killed half way is a failed child."""

    WAIT = 60.0  # seconds for a child that has not sent its value when asked: then it is ended

    def __init__(
        self,
        fn: Callable[..., Any],
        *args: Any,
        here: Callable[..., Any] | None = None,
        nice: int = 0,
    ) -> None:
        self.fn, self.args, self.here = fn, args, here or fn
        self.value: Any = None
        self.done = False
        self.pid, self.fd = 0, -1
        if self.forkable():
            read, write = os.pipe()
            self.pid = os.fork()
            if self.pid == 0:  # the child: compute, send, and leave without cleanup of any kind
                try:
                    os.close(read)
                    os.nice(nice)
                    data = pickle.dumps(fn(*args))
                    with os.fdopen(write, "wb") as pipe:
                        pipe.write(len(data).to_bytes(8, "little") + data)
                finally:
                    os._exit(0)
            os.close(write)
            self.fd = read

    @staticmethod
    def forkable() -> bool:
        """Linux, and no Python thread but this one (a thread of the caller's could hold a lock
        the forked copy would wait on for ever)."""
        return sys.platform == "linux" and threading.active_count() == 1

    def __enter__(self) -> _Aside:
        return self

    def __call__(self) -> Any:
        return self.result()

    def result(self) -> Any:
        if not self.done:
            sent = self._reap()
            self.value = pickle.loads(sent) if sent else self.here(*self.args)
            self.done = True
        return self.value

    def _reap(self) -> bytes:
        """What the child sent (b"" if nothing whole), the child ended and reaped."""
        data, fd, self.fd = b"", self.fd, -1
        if fd >= 0:
            with os.fdopen(fd, "rb") as pipe:
                deadline = time.monotonic() + self.WAIT
                while io_select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    chunk = pipe.read1(1 << 20)
                    if not chunk:
                        break
                    data += chunk
        pid, self.pid = self.pid, 0
        whole = len(data) >= 8 and int.from_bytes(data[:8], "little") == len(data) - 8
        if pid:
            if not whole:  # stuck or failed: it must not hold prepare's end
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        return data[8:] if whole else b""

    def __exit__(self, *exc: object) -> None:
        self._end()

    def __del__(self) -> None:
        self._end()

    def _end(self) -> None:
        """A child never asked for (the block ended, by an error say) is ended now."""
        pid, fd, self.pid, self.fd = self.pid, self.fd, 0, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        if pid:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)


@dataclass(frozen=True)
class _Tokenizer:
    tokenizer: Any
    template: str  # the chat template the data is rendered with
    tokens: dict  # stop_tokens: added tokens, end of turn, EOS ids
    source: str  # --tokenizer as given
    fingerprint: _Aside  # gives tokenizer_fingerprint(tokenizer, template)
    plan: _Aside  # gives the workers' encoder's RankedPlan, or None


def _stage(
    inputs: _Inputs, out_dir: str, loaded: _Tokenizer, options: PrepareOptions
) -> schema.Manifest:
    """Everything into a new directory that replaces `out_dir` only when whole."""
    tokenizer = loaded.tokenizer
    try:
        with new_output(Path(out_dir), log=_say if options.progress else _quiet) as staged:
            # The tokenizer travels with the shards, template included, so training and export
            # use exactly the ids the data was made with; the workers' tokenizer is this copy.
            tokenizer.chat_template = loaded.template
            save_tokenizer(tokenizer, staged / schema.TOKENIZER_DIR)
            try:
                return _write(inputs, staged, loaded, options)
            except PrepareError as e:
                raise PrepareError(f"{e}{_keep_quarantine(staged, Path(out_dir))}") from None
    except OutputError as e:
        raise PrepareError(str(e)) from e


def save_tokenizer(tokenizer: Any, out: Path) -> None:
    """`save_pretrained`, and the added tokens written into tokenizer_config.json as
    `added_tokens_decoder` when it left them out (transformers 5 does for a fast tokenizer):
    without them, every load of the copy parses the whole tokenizer.json in Python just to read
    its added tokens (0.2-0.3 s for a 129,000-token vocabulary, in the serial start of each
    prepare and of each training worker). The entries are the same tokens, same flags, and the
    loader reads them first; tests/test_tokenizer_load.py holds the copy to the plain save, loaded
    either way."""
    tokenizer.save_pretrained(str(out))
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if "added_tokens_decoder" not in config and (out / "tokenizer.json").is_file():
        config["added_tokens_decoder"] = {
            str(i): t.__getstate__() for i, t in sorted(tokenizer.added_tokens_decoder.items())
        }
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")


def _keep_quarantine(staged: Path, out: Path) -> str:
    """Keep the bad records of a prepare that writes no output beside `out`; say where."""
    found = staged / schema.QUARANTINE_NAME
    if not found.is_file() or not found.stat().st_size:
        return ""
    kept = out.with_name(f"{out.name}.{schema.QUARANTINE_NAME}")
    found.replace(kept)
    return f". Nothing was written to {out}; the bad records are in {kept}"


def _say(message: str) -> None:
    print(f"prepare: {message}", flush=True)


def _quiet(message: str) -> None:
    pass


@dataclass(frozen=True)
class _Inputs:
    paths: list[Path]  # every file, in order
    sources: list[Source]  # what the command line named (a mixture when weighted)
    path_source: list[int]  # the source of each path

    @property
    def mixing(self) -> bool:
        return any(s.weight is not None or s.epochs is not None for s in self.sources)


def _write(
    inputs: _Inputs, out: Path, loaded: _Tokenizer, options: PrepareOptions
) -> schema.Manifest:
    """Tokenize, pack and write shards, quarantine and manifest into the new directory `out`."""
    tok_dir = out / schema.TOKENIZER_DIR
    source_hashes: list[dict] = []
    shards = _Shards(out, options)
    counts, reasons, formats, mix = _tokenize_and_pack(
        inputs, tok_dir, options, shards, source_hashes, loaded
    )

    n, bad = counts["records"], counts["bad"]
    if n == 0:
        raise PrepareError(f"no records in {', '.join(map(str, inputs.paths))}")
    if bad / n > options.max_bad_fraction:
        raise PrepareError(
            f"{bad} of {n} records are bad ({bad / n:.1%} > --max-bad-fraction "
            f"{options.max_bad_fraction:.1%}); reasons: {dict(reasons.most_common(5))}"
        )
    if not shards.shards:
        raise PrepareError(f"every record was quarantined; reasons: {dict(reasons.most_common(5))}")

    num_tokens = sum(s.num_tokens for s in shards.shards)
    source_hash = hashlib.sha256("".join(s["sha256"] for s in source_hashes).encode()).hexdigest()
    manifest = schema.Manifest(
        schema_version=schema.SCHEMA_VERSION,
        seq_len=options.seq_len,
        num_rows=shards.num_rows,
        num_documents=counts["documents"],
        num_tokens=num_tokens,
        num_supervised_tokens=sum(s.num_supervised_tokens for s in shards.shards),
        packing_efficiency=num_tokens / (shards.num_rows * options.seq_len),
        num_records=n,
        quarantined_rows=bad,
        quarantine_reasons=dict(sorted(reasons.items())),
        formats=dict(sorted(formats.items())),
        overflow={
            "truncated": counts["truncated"],
            "split": counts["split"],
            "split_pieces_without_supervision": counts["unsupervised_pieces"],
        },
        tokenizer=schema.TokenizerInfo(
            fingerprint=loaded.fingerprint.result(),
            vocab_size=len(loaded.tokenizer),
            base_vocab_size=loaded.tokenizer.vocab_size,
            dir=schema.TOKENIZER_DIR,
            source=loaded.source,
            files={f.name: schema.file_sha256(f) for f in sorted(tok_dir.iterdir()) if f.is_file()},
            **loaded.tokens,
        ),
        sources={"sha256": source_hash, "files": source_hashes},
        options={
            k: v for k, v in asdict(options).items() if k not in ("num_proc", "engine", "progress")
        },
        shards=shards.shards,
        mixture=mix,
    )
    schema.write_manifest(out, manifest)
    return manifest


def _tokenize_and_pack(
    inputs: _Inputs,
    tok_dir: Path,
    options: PrepareOptions,
    shards: _Shards,
    source_hashes: list,
    loaded: _Tokenizer,
) -> tuple[Counter, Counter, Counter, dict | None]:
    """Read, tokenize and mask every record, quarantine the bad ones with their reason, and
    pack the documents window by window into `shards` (a mixture: once every source is read).
    Returns (counts, reasons, formats, the mixture's account or None)."""
    engine = _run_ray if options.engine == "ray" else _run_local
    counts, reasons, formats = Counter(), Counter(), Counter()
    per_source = [Counter() for _ in inputs.sources]  # records, bad, and reasons per source
    spill = Spill(shards.out / ".mixture", len(inputs.sources)) if inputs.mixing else None
    window: list[tuple[np.ndarray, np.ndarray]] = []
    starts: list[int] = []  # the number of each path's first record
    batches = _batches(inputs.paths, source_hashes, options.max_record_bytes, starts)

    def source_of(record: int) -> int:
        return inputs.path_source[bisect.bisect_right(starts, record) - 1]

    bar = ProgressBar(desc="prepare", unit=" records", enabled=options.progress, rate="tokens")
    try:
        with (
            open(shards.out / schema.QUARANTINE_NAME, "w", encoding="utf-8") as quarantine,
            contextlib.closing(engine(batches, tok_dir, options, loaded)) as processed,
        ):  # closing: the workers end here, whatever ends the loop
            for results in processed:
                for r in results:
                    k = source_of(counts["records"]) if spill is not None else 0
                    counts["records"] += 1
                    per_source[k]["records"] += 1
                    if not r["ok"]:
                        reason = r["reason"].split(":")[0]
                        counts["bad"] += 1
                        reasons[reason] += 1
                        per_source[k]["bad"] += 1
                        per_source[k][f"reason:{reason}"] += 1
                        quarantine.write(_quarantine_line(r))
                        continue
                    formats[r["format"]] += 1
                    counts["documents"] += len(r["pieces"])
                    counts[r["overflow"] or "fit"] += 1
                    counts["unsupervised_pieces"] += r["unsupervised_pieces"]
                    bar.update(0, counted=sum(len(p[0]) for p in r["pieces"]))
                    if spill is not None:
                        spill.add(k, r["pieces"])
                        continue
                    window.extend(r["pieces"])
                    if len(window) >= options.window:
                        shards.pack(window)
                        window = []
                bar.update(len(results))
            if window:
                shards.pack(window, last=True)
    except InputError as e:
        raise PrepareError(str(e)) from e
    finally:
        bar.close()
    mix = None
    if spill is not None:
        mix = _mix(spill, inputs.sources, per_source, options, shards)
        counts["documents"] = sum(s["mixed"]["documents"] for s in mix["sources"])
    shards.close()
    return counts, reasons, formats, mix


def _mix(
    spill: Spill,
    sources: list[Source],
    per_source: list[Counter],
    options: PrepareOptions,
    shards: _Shards,
) -> dict:
    """Choose each source's documents (data_tools.mixture), pack them interleaved in a seeded
    order, and return the mixture's account for the manifest."""
    spill.done()
    try:
        read = [int(x.sum()) for x in spill.lengths]
        try:
            wanted = targets(sources, read)
        except MixtureError as e:
            raise PrepareError(str(e)) from e
        chosen = [
            select(spill.lengths[k], wanted[k], np.random.default_rng([options.seed, k]))
            for k in range(len(sources))
        ]
        pairs = np.concatenate(
            [np.stack([np.full(len(c), k), c], axis=1) for k, c in enumerate(chosen)]
        )
        order = np.random.default_rng([options.seed, len(sources)]).permutation(len(pairs))
        for at in range(0, len(order), options.window):
            shards.pack(
                [spill.document(int(k), int(i)) for k, i in pairs[order[at : at + options.window]]],
                last=at + options.window >= len(order),
            )
    finally:
        shutil.rmtree(spill.dir)
    total = sum(int(spill.lengths[k][c].sum()) for k, c in enumerate(chosen)) or 1
    return {
        "seed": options.seed,
        "sources": [
            {
                "input": s.input,
                "weight": s.weight,
                "epochs": s.epochs,
                "read": {
                    "records": per_source[k]["records"],
                    "quarantined": per_source[k]["bad"],
                    "quarantine_reasons": {
                        key.split(":", 1)[1]: n
                        for key, n in sorted(per_source[k].items())
                        if key.startswith("reason:")
                    },
                    "documents": len(spill.lengths[k]),
                    "tokens": read[k],
                    "supervised_tokens": int(spill.supervised[k].sum()),
                },
                "mixed": {
                    "documents": len(chosen[k]),
                    "tokens": int(spill.lengths[k][chosen[k]].sum()),
                    "supervised_tokens": int(spill.supervised[k][chosen[k]].sum()),
                    "share": int(spill.lengths[k][chosen[k]].sum()) / total,
                },
            }
            for k, s in enumerate(sources)
        ],
    }


def summary_line(m: schema.Manifest) -> str:
    tok = m.tokenizer
    return (
        f"{m.num_documents} documents -> {m.num_rows} rows of {m.seq_len} "
        f"({m.num_tokens} tokens, {m.num_supervised_tokens} supervised, "
        f"packing efficiency {m.packing_efficiency:.1%}); "
        f"quarantined {m.quarantined_rows} of {m.num_records} records"
        + (f" {m.quarantine_reasons}" if m.quarantined_rows else "")
        + (f"; added special tokens {tok.added_tokens}" if tok.added_tokens else "")
        + (
            "; mixed "
            + ", ".join(f"{s['input']} {s['mixed']['share']:.1%}" for s in m.mixture["sources"])
            if m.mixture
            else ""
        )
        + (
            f"; a turn ends with token {tok.end_of_turn_id}"
            if tok.end_of_turn_id is not None
            else ""
        )
    )
