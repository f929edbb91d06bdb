import random

from hypothesis import given, settings
from hypothesis import strategies as st

from data_tools.pack import pack, pack_best_fit_decreasing


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.integers(1, 300),
    data=st.data(),
)
def test_packing_invariants(capacity, data):
    lengths = data.draw(st.lists(st.integers(1, capacity), max_size=120))
    bins = pack_best_fit_decreasing(lengths, capacity)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))  # every document exactly once
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    assert all(b for b in bins)
    # best fit never opens a bin that an earlier one could have held: the two least full
    # bins together would overflow
    fills = sorted(sum(lengths[i] for i in b) for b in bins)
    if len(fills) >= 2:
        assert fills[0] + fills[1] > capacity


def test_best_fit_beats_first_fit_example():
    # 6,5,4,3,2 into 10: best fit gives [6,4], [5,3,2]
    bins = pack_best_fit_decreasing([6, 5, 4, 3, 2], 10)
    assert sorted(sorted([6, 5, 4, 3, 2][i] for i in b) for b in bins) == [[2, 3, 5], [4, 6]]


def test_deterministic():
    lengths = [5, 3, 5, 3, 2, 2, 7]
    assert pack_best_fit_decreasing(lengths, 8) == pack_best_fit_decreasing(lengths, 8)


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(1, 300), data=st.data())
def test_pack_keeps_every_document_in_bounded_rows_never_more_than_best_fit(capacity, data):
    lengths = data.draw(st.lists(st.integers(1, capacity), max_size=120))
    bins = pack(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(b and sum(lengths[i] for i in b) <= capacity for b in bins)
    assert len(bins) <= len(pack_best_fit_decreasing(lengths, capacity))
    assert len(bins) >= -(-sum(lengths) // capacity)


def test_refill_reaches_the_bound_where_best_fit_does_not():
    # best fit decreasing: [4, 4], [3, 3, 3], [3]; the bound, 2 rows: [4, 3, 3] twice
    lengths = [4, 4, 3, 3, 3, 3]
    assert len(pack_best_fit_decreasing(lengths, 10)) == 3
    assert sorted(sorted(lengths[i] for i in b) for b in pack(lengths, 10)) == [[3, 3, 4]] * 2


def test_refill_gives_up_within_its_effort_and_keeps_best_fit():
    rng = random.Random(0)
    lengths = [rng.randint(410, 1229) for _ in range(3000)]  # uniform 0.2-0.6 of a row
    bfd = pack_best_fit_decreasing(lengths, 2048)
    assert pack(lengths, 2048, effort=10) == bfd
    better = pack(lengths, 2048)
    bound = -(-sum(lengths) // 2048)
    assert len(bfd) / bound > 1.01 and len(better) / bound < 1.005  # 1.0167 -> 1.0029 measured


def test_prepare_carries_a_windows_least_full_rows_into_the_next(
    corpus_path, sp_tokenizer_dir, tmp_path
):
    """300 conversations packed 20 at a time: the rows stay at the bound, not one partly empty
    row per window."""
    from data_tools.prepare import PrepareOptions, prepare

    options = PrepareOptions(seq_len=256, rows_per_shard=1000, window=20)
    m = prepare(
        [str(corpus_path)],
        tokenizer_path=str(sp_tokenizer_dir),
        out_dir=str(tmp_path / "w"),
        options=options,
    )
    whole = prepare(
        [str(corpus_path)],
        tokenizer_path=str(sp_tokenizer_dir),
        out_dir=str(tmp_path / "one"),
        options=PrepareOptions(seq_len=256, rows_per_shard=1000),
    )
    assert (
        m.num_tokens == whole.num_tokens and m.num_supervised_tokens == whole.num_supervised_tokens
    )
    bound = -(-m.num_tokens // 256)
    assert m.num_rows == whole.num_rows == bound, (m.num_rows, whole.num_rows, bound)


def _best_fit_decreasing_by_pairs(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing written plainly, (room, bin) pairs in a sorted list: the reference
    the packer's encoded form must equal bin for bin (shards are byte-identical across
    releases only if it does)."""
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []
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


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.data())
def test_best_fit_decreasing_is_the_plain_algorithm(capacity, data):
    lengths = data.draw(st.lists(st.integers(1, capacity), max_size=300))
    assert pack_best_fit_decreasing(lengths, capacity) == _best_fit_decreasing_by_pairs(
        lengths, capacity
    )


def test_best_fit_decreasing_is_the_plain_algorithm_at_scale():
    rng = random.Random(4)
    lengths = [rng.choice([rng.randint(1, 60), rng.randint(1, 4096)]) for _ in range(20_000)]
    assert pack_best_fit_decreasing(lengths, 4096) == _best_fit_decreasing_by_pairs(lengths, 4096)
