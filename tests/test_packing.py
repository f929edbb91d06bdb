from hypothesis import given, settings
from hypothesis import strategies as st

from data_tools.pack import pack_best_fit_decreasing


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
