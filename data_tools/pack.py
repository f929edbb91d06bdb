"""Packing documents into rows of `capacity` tokens: best-fit decreasing, then, when that
leaves more rows than the bound ceil(tokens / capacity), a refill of the rows it left with free
room (each row filled by an exact subset sum), kept when it needs fewer rows.

Documents are never split here: callers truncate or split over-long documents first. Pure
Python, no heavy imports; deterministic (ties broken by document and row index).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable


def pack_best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group document indices into bins whose lengths sum to at most `capacity`.

    Each document, longest first, goes into the open bin with the least room that still fits it
    (best fit), else into a new bin. O(n log n) searches over a sorted list of free space.
    Returns bins in creation order, each a list of document indices in insertion order.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    for i, n in enumerate(lengths):
        if not 1 <= n <= capacity:
            raise ValueError(f"document {i} has length {n}, outside [1, {capacity}]")
    # longest first, ties by index (the sort is stable)
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    bins: list[list[int]] = []
    # free room of the open bins as room * scale + bin index, sorted: one int compares faster
    # than a (room, bin) pair; full bins dropped
    scale = len(lengths) + 1
    free: list[int] = []
    for doc in order:
        n = lengths[doc]
        at = bisect.bisect_left(free, n * scale)  # the least room that fits, lowest bin first
        if at < len(free):
            room, b = divmod(free.pop(at), scale)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(doc)
        if room > n:
            bisect.insort(free, (room - n) * scale + b)
    return bins


def pack(lengths: list[int], capacity: int, *, effort: int = 4_000_000) -> list[list[int]]:
    """Best-fit decreasing; if that left more bins than the bound ceil(sum(lengths) / capacity),
    the documents of the bins it left with free room go through `refill`, whose bins are kept
    if they are fewer. `effort` bounds refill's work (subset-sum steps), so a corpus whose
    optimum is above the bound costs a bounded time."""
    bins = pack_best_fit_decreasing(lengths, capacity)
    if len(bins) <= -(-sum(lengths) // capacity):
        return bins
    loads = [sum(lengths[d] for d in b) for b in bins]
    open_ = [b for b, load in zip(bins, loads, strict=True) if load < capacity]
    refilled = refill([d for b in open_ for d in b], lengths, capacity, effort=effort)
    if refilled is None or len(refilled) >= len(open_):
        return bins
    return [b for b, load in zip(bins, loads, strict=True) if load == capacity] + refilled


def refill(
    docs: list[int], lengths: list[int], capacity: int, *, effort: int
) -> list[list[int]] | None:
    """Bins filled one at a time, each as full as the documents left allow: the longest
    document left, then the multiset of the others' lengths that fills the remaining room best
    (an exact subset sum over the distinct lengths left, longer ones tried first, stopping at
    the first exact fill), so short documents stay for the rooms only they can fill. None when
    it would take more than `effort` subset-sum steps."""
    by_length: dict[int, list[int]] = {}
    for d in sorted(docs, key=lambda d: (lengths[d], -d)):
        by_length.setdefault(lengths[d], []).append(d)  # popped from the end: lowest index first
    present = sorted(by_length)  # the distinct lengths left, ascending
    bins = []

    def take(n: int) -> int:
        left = by_length[n]
        doc = left.pop()
        if not left:
            present.pop(bisect.bisect_left(present, n))
        return doc

    while present:
        first = take(present[-1])
        room = capacity - lengths[first]
        steps = (  # each length as often as it is left and fits, longest first; lazily
            n
            for n in reversed(present[: bisect.bisect_right(present, room)])
            for _ in range(min(len(by_length[n]), room // n))
        )
        chosen, used = _fill(room, steps)
        effort -= used
        if effort < 0:
            return None
        bins.append([first, *(take(n) for n in chosen)])
    return bins


def _fill(room: int, sizes: Iterable[int]) -> tuple[list[int], int]:
    """A sub-multiset of `sizes` (longest first) with the largest sum <= room, as a list of
    sizes, and the number of sizes it examined (it stops at an exact fill). Bit s of `reach` is
    set when some subset of the sizes examined so far sums to s."""
    mask = (1 << (room + 1)) - 1
    reach, before, seen = 1, [], []
    for n in sizes:
        before.append(reach)
        seen.append(n)
        reach |= (reach << n) & mask
        if (reach >> room) & 1:  # an exact fill: nothing can do better
            break
    total = reach.bit_length() - 1
    chosen = []
    for k in range(len(seen) - 1, -1, -1):
        if total and not (before[k] >> total) & 1:  # total needs size k
            chosen.append(seen[k])
            total -= seen[k]
    return chosen, len(seen)
