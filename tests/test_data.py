import numpy as np
import pytest
import torch

from sftscale.data import (
    IGNORE_INDEX,
    PackedDataset,
    assign_ranks,
    collate,
    stream_rows,
)


def test_collate_positions_and_targets():
    ids = np.array([10, 11, 12, 20, 21], dtype=np.int32)
    mask = np.array([0, 1, 1, 0, 1], dtype=np.int8)
    doc_lens = np.array([3, 2], dtype=np.int32)
    b = collate([(ids, mask, doc_lens)], seq_len=8, pad_id=0)
    assert b.input_ids.tolist() == [[10, 11, 12, 20, 21, 0, 0, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    # 10->11 and 11->12 supervised; 12->20 crosses a document boundary; 20->21 supervised
    assert b.targets.tolist() == [[11, 12, IGNORE_INDEX, 21] + [IGNORE_INDEX] * 4]
    assert b.num_tokens == 5 and b.num_supervised == 3


def test_collate_rejects_overlong_rows():
    ids = np.arange(5, dtype=np.int32)
    with pytest.raises(ValueError, match="longer than seq_len"):
        collate([(ids, np.ones(5, np.int8), np.array([5], np.int32))], seq_len=4, pad_id=0)


def test_sample_stream_is_a_pure_function_and_ranks_partition_each_step():
    kw = dict(num_rows=50, seed=3, shuffle=True)
    e0, s0 = stream_rows(0, 12, **kw)
    assert np.array_equal(s0, stream_rows(0, 12, **kw)[1])
    # O(1) seek: a window in the middle equals the same slice of the whole stream
    epochs, rows = stream_rows(0, 150, **kw)
    e, r = stream_rows(37, 40, **kw)
    assert np.array_equal(r, rows[37:77]) and np.array_equal(e, epochs[37:77])
    # every epoch is a permutation: no row skipped or repeated, and each epoch reshuffles
    for k in range(3):
        assert sorted(rows[k * 50 : (k + 1) * 50].tolist()) == list(range(50))
    assert not np.array_equal(rows[:50], rows[50:100])
    assert epochs.tolist() == [0] * 50 + [1] * 50 + [2] * 50
    assert stream_rows(0, 50, num_rows=50, seed=3, shuffle=False)[1].tolist() == list(range(50))
    micro, _ = assign_ranks(s0, np.ones(12), world_size=2, micro_batch_size=3, grad_accum=2)
    parts = [np.concatenate(m) for m in micro]
    assert sorted(np.concatenate(parts).tolist()) == sorted(s0.tolist())


def test_reader_returns_the_written_rows(prepared_dir):
    from data_tools import schema

    ds = PackedDataset(prepared_dir)
    m = schema.read_manifest(prepared_dir)
    assert len(ds) == m.num_rows
    written = [r for s in m.shards for r in schema.open_shard(prepared_dir / s.file).to_pylist()]
    for i in (0, 39, 40, len(ds) - 1):  # across a shard boundary
        ids, mask, doc_lens = ds.row(i)
        assert ids.tolist() == written[i]["input_ids"]
        assert mask.tolist() == written[i]["loss_mask"]
        assert doc_lens.tolist() == written[i]["doc_lens"]


def test_assign_ranks_by_cost():
    rows = np.arange(8)
    costs = np.array([100, 1, 1, 1, 50, 50, 1, 1], dtype=float)
    micro, imbalance = assign_ranks(rows, costs, world_size=2, micro_batch_size=2, grad_accum=2)
    assert [len(m) for m in micro] == [2, 2] and all(len(b) == 2 for m in micro for b in m)
    loads = [sum(costs[np.concatenate(m)]) for m in micro]
    assert sorted(loads) == [102.0, 103.0]  # 100 alone with cheap rows; the two 50s together
    assert imbalance == pytest.approx(103 / 102.5 - 1)
    # a contiguous split would have put 100+1+1+1 on rank 0 and 50+50+1+1 on rank 1
    again, _ = assign_ranks(rows, costs, world_size=2, micro_batch_size=2, grad_accum=2)
    assert all(
        np.array_equal(a, b)
        for m, n in zip(micro, again, strict=True)
        for a, b in zip(m, n, strict=True)
    )


def test_collate_pads_to_the_longest_row_rounded_up():
    rows = [
        (np.arange(1, 6, dtype=np.int32), np.ones(5, np.int8), np.array([5], np.int32)),
        (np.arange(1, 12, dtype=np.int32), np.ones(11, np.int8), np.array([11], np.int32)),
    ]
    b = collate(rows, seq_len=64, pad_id=0, pad_to_multiple_of=8)
    assert b.input_ids.shape == (2, 16)  # longest row 11 -> 16
    full = collate(rows, seq_len=64, pad_id=0)
    assert full.input_ids.shape == (2, 64)
    # the same tokens, positions and targets, only less padding
    assert torch.equal(full.input_ids[:, :16], b.input_ids)
    assert torch.equal(full.targets[:, :16], b.targets)
    assert (full.targets[:, 16:] == IGNORE_INDEX).all()
    assert (b.num_tokens, b.num_supervised) == (full.num_tokens, full.num_supervised)
    # never beyond seq_len
    assert collate(rows, seq_len=12, pad_id=0, pad_to_multiple_of=8).input_ids.shape == (2, 12)


def test_cpu_micro_batches_take_few_lengths():
    """On a CPU (few_lengths) a micro-batch is padded to padded_length of its longest row, then
    to the multiple: unpacked documents in multiples of 8 positions met a new shape nearly every
    step, and the CPU's kernels kept memory for each (RSS grew 10 MB a step). The tokens,
    positions and targets are those of the exact padding, only longer."""
    from sftscale.lengths import padded_length

    def rows_of(n):
        return [(np.arange(1, n + 1, dtype=np.int32), np.ones(n, np.int8), np.array([n], np.int32))]

    lengths = set()
    for n in range(1, 1025):
        b = collate(rows_of(n), seq_len=1024, pad_id=0, pad_to_multiple_of=8, few_lengths=True)
        exact = collate(rows_of(n), seq_len=1024, pad_id=0, pad_to_multiple_of=8)
        width = b.input_ids.shape[1]
        assert width == min(1024, -(-padded_length(n) // 8) * 8) >= exact.input_ids.shape[1]
        assert torch.equal(b.input_ids[:, : exact.input_ids.shape[1]], exact.input_ids)
        assert torch.equal(b.targets[:, : exact.targets.shape[1]], exact.targets)
        assert (b.targets[:, exact.targets.shape[1] :] == IGNORE_INDEX).all()
        lengths.add(width)
    assert len(lengths) == 16  # 64..512 by 64, then 576..1024 by 64: not 128 multiples of 8
    # a sequence-parallel or tiled multiple still divides the length
    b = collate(rows_of(100), seq_len=1024, pad_id=0, pad_to_multiple_of=48, few_lengths=True)
    assert b.input_ids.shape[1] == 144  # 100 -> 128 -> the next multiple of 48
