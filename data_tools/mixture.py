"""Weighted mixtures of sources.

    sftscale prepare web.jsonl:0.7 "code/*.jsonl:0.3" ...        # token shares
    sftscale prepare big.jsonl:1x gold.jsonl:3x ...               # epochs of each source
    sftscale prepare --mixture mix.yaml ...                       # the same, from a file

A source is one input (a file, a directory, or a glob: all its files are one source) with a
weight or a number of epochs after its last ':'. Weights are shares of the mixture's tokens:
the source that runs out first is used once, whole, and the others are sampled to their share
(no source is repeated to reach a weight: ask for epochs for that). Epochs repeat a source
(2x: every document twice; 0.5x: half of its tokens). A mixture has weights or epochs, not both.

Sampling is per document and deterministic from --seed: a source's whole copies first, then
documents in a seeded random order until its target tokens are met; the chosen documents of all
sources are then interleaved in a seeded random order and packed. The same inputs, options and
seed give byte-identical shards.

mix.yaml:
    seed: 0                 # optional; --seed wins when given
    sources:
      - {path: web.jsonl, weight: 0.7}
      - {path: "code/*.jsonl", weight: 0.3}

Imports neither torch, ray nor deepspeed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_SPEC = re.compile(r"(?P<path>.+):(?P<value>\d+(?:\.\d*)?|\.\d+)(?P<x>x?)")


class MixtureError(ValueError):
    """A mixture that cannot be made; the message says what to change."""


@dataclass(frozen=True)
class Source:
    input: str  # a path, directory or glob: one source
    weight: float | None = None
    epochs: float | None = None

    @property
    def spec(self) -> str:
        if self.weight is not None:
            return f"weight {self.weight:g}"
        return f"{self.epochs:g} epochs" if self.epochs is not None else "as read"


def parse_inputs(inputs: list[str]) -> list[Source]:
    """Inputs with an optional `:weight` or `:Nx` suffix. A suffix is read only when what is
    before it exists or is a glob, so a file whose name ends in ':1' is still a file."""
    sources = []
    for item in inputs:
        m = _SPEC.fullmatch(item)
        if m is None or (Path(item).exists() and not Path(m["path"]).exists()):
            sources.append(Source(item))
            continue
        value = float(m["value"])
        if value <= 0:
            raise MixtureError(f"{item}: a weight or a number of epochs must be > 0")
        sources.append(
            Source(m["path"], epochs=value) if m["x"] else Source(m["path"], weight=value)
        )
    mixed = [s for s in sources if s.weight is not None or s.epochs is not None]
    if mixed and len(mixed) != len(sources):
        plain = [s.input for s in sources if s not in mixed]
        raise MixtureError(
            f"a mixture needs a weight (path:0.3) or epochs (path:2x) for every source; "
            f"none given for {', '.join(plain[:3])}"
        )
    if any(s.weight is not None for s in mixed) and any(s.epochs is not None for s in mixed):
        raise MixtureError(
            "a mixture has weights (token shares) or epochs (repeats), not both: for a source "
            "repeated inside a weighted mix, give every source epochs instead"
        )
    return sources


def read_mixture_file(path: str) -> tuple[list[str], int | None]:
    """(inputs with their suffixes, seed or None) from a mixture YAML file; paths are relative
    to the file."""
    # heavy-ish (yaml): loaded only on the path that uses it
    import yaml

    where = Path(path)
    try:
        doc = yaml.safe_load(where.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise MixtureError(f"--mixture {path}: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("sources"), list):
        raise MixtureError(f"--mixture {path}: expected a mapping with a list under 'sources'")
    inputs = []
    for i, s in enumerate(doc["sources"]):
        keys = set(s) if isinstance(s, dict) else set()
        if (
            "path" not in keys
            or len(keys & {"weight", "epochs"}) != 1
            or keys - {"path", "weight", "epochs"}
        ):
            raise MixtureError(
                f"--mixture {path}: sources[{i}] must be {{path, weight}} or {{path, epochs}}"
            )
        p = Path(str(s["path"]))
        p = p if p.is_absolute() else where.parent / p
        value = s.get("weight", s.get("epochs"))
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise MixtureError(f"--mixture {path}: sources[{i}]: a number, got {value!r}")
        inputs.append(f"{p}:{value}{'x' if 'epochs' in s else ''}")
    seed = doc.get("seed")
    if seed is not None and not isinstance(seed, int):
        raise MixtureError(f"--mixture {path}: seed must be an integer")
    return inputs, seed


def targets(sources: list[Source], tokens: list[int]) -> list[float]:
    """Tokens to take from each source (`tokens`: what each holds, as read)."""
    if any(s.epochs is not None for s in sources):
        return [s.epochs * n for s, n in zip(sources, tokens, strict=True)]
    total_weight = sum(s.weight for s in sources)
    shares = [s.weight / total_weight for s in sources]
    empty = [s.input for s, n in zip(sources, tokens, strict=True) if n == 0]
    if empty:
        raise MixtureError(f"source {empty[0]} has no document left after quarantine")
    size = min(n / share for n, share in zip(tokens, shares, strict=True))
    return [share * size for share in shares]


def select(lengths: np.ndarray, target: float, rng: np.random.Generator) -> np.ndarray:
    """Document indices (repeats allowed) whose lengths sum as near `target` as documents
    allow: whole copies, then documents in a random order up to the rest."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    copies = int(target // total)
    rest = target - copies * total
    order = rng.permutation(len(lengths))
    cum = np.cumsum(lengths[order])
    k = int(np.searchsorted(cum, rest))
    if k < len(cum) and cum[k] - rest < rest - (cum[k - 1] if k else 0):
        k += 1  # the document that crosses the target brings the total nearer to it
    return np.concatenate([np.tile(np.arange(len(lengths)), copies), order[:k]])


class Spill:
    """The documents of every source, on disk while the sources are read (a mixture is chosen
    only once every source's tokens are known): ids and masks appended to flat files per
    source, lengths in memory. Read back memory-mapped."""

    def __init__(self, directory: Path, n_sources: int) -> None:
        directory.mkdir()
        self.dir = directory
        self._out = [
            (open(directory / f"{k}.ids", "wb"), open(directory / f"{k}.mask", "wb"))  # noqa: SIM115 (closed in done)
            for k in range(n_sources)
        ]
        self._lengths: list[list[int]] = [[] for _ in range(n_sources)]
        self._supervised: list[list[int]] = [[] for _ in range(n_sources)]

    def add(self, source: int, pieces: list[tuple[np.ndarray, np.ndarray]]) -> None:
        ids_file, mask_file = self._out[source]
        for ids, mask in pieces:
            ids_file.write(np.asarray(ids, dtype=np.int32).tobytes())
            mask_file.write(np.asarray(mask, dtype=np.int8).tobytes())
            self._lengths[source].append(len(ids))
            self._supervised[source].append(int(np.count_nonzero(mask)))

    def done(self) -> None:
        for ids_file, mask_file in self._out:
            ids_file.close()
            mask_file.close()
        self.lengths = [np.array(x, dtype=np.int64) for x in self._lengths]
        self.supervised = [np.array(x, dtype=np.int64) for x in self._supervised]
        self._starts = [np.concatenate([[0], np.cumsum(x)]) for x in self.lengths]
        self._maps = [
            (
                np.memmap(self.dir / f"{k}.ids", dtype=np.int32, mode="r") if len(x) else None,
                np.memmap(self.dir / f"{k}.mask", dtype=np.int8, mode="r") if len(x) else None,
            )
            for k, x in enumerate(self.lengths)
        ]

    def document(self, source: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self._starts[source][index], self._starts[source][index + 1]
        ids, mask = self._maps[source]
        return np.array(ids[a:b]), np.array(mask[a:b])
