"""Best-fit-decreasing packing of documents into rows of `seq_len` tokens.

Documents are never split here: callers truncate or split over-long documents first. Pure
Python, no heavy imports; deterministic (ties broken by document index).
"""

from __future__ import annotations

import bisect


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
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, bin index), sorted; full bins dropped
    for doc in order:
        n = lengths[doc]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, b = free.pop(at)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(doc)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return bins
