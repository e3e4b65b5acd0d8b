"""Bucketed padding, packing with segment ids, drop_remainder accounting, exact resumption."""

from __future__ import annotations

import json

import numpy as np
import pytest

from selfaug_jax.data import (
    IGNORE_INDEX,
    Batch,
    BatchConfig,
    BatchIterator,
    EpochSampler,
    TokenizedExample,
    bucket_length,
    iter_batches,
    pack_batch,
    pad_batch,
)


def ex(ex_id: str, n: int, n_prompt: int, start: int = 10) -> TokenizedExample:
    ids = np.arange(start, start + n, dtype=np.int32)
    labels = np.where(np.arange(n) < n_prompt, IGNORE_INDEX, ids).astype(np.int32)
    return TokenizedExample(id=ex_id, input_ids=ids, labels=labels)


def varied(n: int, seed: int = 0, lo: int = 3, hi: int = 30) -> list[TokenizedExample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(lo, hi))
        out.append(ex(f"e{i}", length, int(rng.integers(1, length)), start=100 * i))
    return out


def assert_batches_equal(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.example_ids == y.example_ids
        assert x.arrays().keys() == y.arrays().keys()
        for k in x.arrays():
            np.testing.assert_array_equal(x.arrays()[k], y.arrays()[k])


def test_bucket_length():
    assert [bucket_length(n, (8, 16, 32)) for n in (1, 8, 9, 32)] == [8, 8, 16, 32]
    with pytest.raises(ValueError, match="exceeds the largest bucket 32"):
        bucket_length(33, (8, 16, 32))
    with pytest.raises(ValueError, match="sorted, unique"):
        BatchConfig(batch_size=2, buckets=(16, 8))


def test_pad_batch_right_exact_values():
    b = pad_batch([ex("a", 3, 1), ex("b", 5, 2, start=50)], length=8, pad_id=0, batch_size=3)
    np.testing.assert_array_equal(b.input_ids_bt, [[10, 11, 12, 0, 0, 0, 0, 0],
                                                   [50, 51, 52, 53, 54, 0, 0, 0],
                                                   [0] * 8])
    np.testing.assert_array_equal(b.labels_bt, [[-100, 11, 12, -100, -100, -100, -100, -100],
                                                [-100, -100, 52, 53, 54, -100, -100, -100],
                                                [-100] * 8])
    np.testing.assert_array_equal(b.attention_mask_bt, [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0], [0] * 8])
    np.testing.assert_array_equal(b.positions_bt, [[0, 1, 2, 0, 0, 0, 0, 0], [0, 1, 2, 3, 4, 0, 0, 0], [0] * 8])
    assert b.segment_ids_bt is None and b.example_ids == (("a",), ("b",), ())
    assert all(v.dtype == np.int32 for v in b.arrays().values())
    assert set(b.arrays()) == {"input_ids_bt", "labels_bt", "attention_mask_bt", "positions_bt"}
    assert (b.num_examples, b.num_tokens, b.num_target_tokens) == (2, 8, 5)


def test_pad_batch_left():
    b = pad_batch([ex("a", 3, 1)], length=5, pad_id=7, padding_side="left")
    np.testing.assert_array_equal(b.input_ids_bt, [[7, 7, 10, 11, 12]])
    np.testing.assert_array_equal(b.labels_bt, [[-100, -100, -100, 11, 12]])
    np.testing.assert_array_equal(b.attention_mask_bt, [[0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(b.positions_bt, [[0, 0, 0, 1, 2]])


def test_pack_batch_segments_positions_labels():
    b = pack_batch([[ex("a", 3, 1), ex("b", 4, 2, start=50)], [ex("c", 2, 1, start=80)]], length=9, batch_size=3)
    np.testing.assert_array_equal(b.input_ids_bt[0], [10, 11, 12, 50, 51, 52, 53, 0, 0])
    np.testing.assert_array_equal(b.segment_ids_bt, [[1, 1, 1, 2, 2, 2, 2, 0, 0],
                                                     [1, 1, 0, 0, 0, 0, 0, 0, 0],
                                                     [0] * 9])
    np.testing.assert_array_equal(b.positions_bt[0], [0, 1, 2, 0, 1, 2, 3, 0, 0])
    np.testing.assert_array_equal(b.labels_bt[0], [-100, 11, 12, -100, -100, 52, 53, -100, -100])
    np.testing.assert_array_equal(b.attention_mask_bt, (b.segment_ids_bt > 0).astype(np.int32))
    assert b.example_ids == (("a", "b"), ("c",), ())
    with pytest.raises(ValueError, match="first label must be -100"):
        pack_batch([[TokenizedExample("x", np.array([1, 2], np.int32), np.array([1, 2], np.int32))]], length=4)


def test_packed_rows_contain_each_example_exactly():
    """Everything the model-side packing test needs: per segment, the same ids/labels/positions
    as the example padded alone."""
    exs = varied(40, seed=1)
    batches = list(iter_batches(exs, BatchConfig(batch_size=3, buckets=(64,), pack=True, drop_remainder=False)))
    by_id = {e.id: e for e in exs}
    seen = []
    for b in batches:
        assert b.shape == (3, 64) and b.segment_ids_bt is not None
        for r, row_ids in enumerate(b.example_ids):
            for k, ex_id in enumerate(row_ids, start=1):
                sel = b.segment_ids_bt[r] == k
                e = by_id[ex_id]
                alone = pad_batch([e], length=64)
                np.testing.assert_array_equal(b.input_ids_bt[r][sel], e.input_ids)
                np.testing.assert_array_equal(b.labels_bt[r][sel], e.labels)
                np.testing.assert_array_equal(b.positions_bt[r][sel], alone.positions_bt[0][:len(e)])
                assert np.flatnonzero(sel).tolist() == list(range(np.flatnonzero(sel)[0],
                                                                 np.flatnonzero(sel)[0] + len(e)))
                seen.append(ex_id)
    assert sorted(seen) == sorted(by_id)  # every example exactly once (no remainder dropped)
    # packing is denser than one example per row
    n_tokens = sum(len(e) for e in exs)
    assert sum(b.num_tokens for b in batches) == n_tokens
    assert len(batches) * 3 < len(exs)


def test_bucketed_iteration_and_drop_remainder_counts():
    exs = varied(10, seed=2, lo=3, hi=40)
    cfg = BatchConfig(batch_size=4, buckets=(8, 16, 32, 64))
    it = iter_batches(exs, cfg, num_epochs=2, shuffle=True, seed=0)
    batches = list(it)
    assert len(batches) == 4 and it.stats.n_dropped_remainder == 4
    for b in batches:
        longest = max(len(next(e for e in exs if e.id == i[0])) for i in b.example_ids)
        assert b.shape == (4, bucket_length(longest, cfg.buckets))
    assert it.stats.n_batches == 4 and it.stats.n_examples == 16
    assert sum(it.stats.bucket_counts.values()) == 4 and set(it.stats.bucket_counts) <= {8, 16, 32, 64}
    assert 0 < it.stats.padding_fraction < 1
    keep = iter_batches(exs, BatchConfig(batch_size=4, buckets=(64,), drop_remainder=False))
    kb = list(keep)
    assert len(kb) == 3 and kb[-1].example_ids[2:] == ((), ()) and kb[-1].shape == (4, 64)
    assert keep.stats.n_dropped_remainder == 0 and keep.stats.n_examples == 10


def test_too_long_error_or_skip_counted():
    exs = [ex("ok1", 5, 1), ex("long", 40, 1), ex("ok2", 6, 1)]
    with pytest.raises(ValueError, match="example 'long' has 40 tokens > row length 16"):
        list(iter_batches(exs, BatchConfig(batch_size=1, buckets=(8, 16))))
    it = iter_batches(exs, BatchConfig(batch_size=1, buckets=(8, 16), on_too_long="skip"))
    assert [b.example_ids for b in it] == [(("ok1",),), (("ok2",),)]
    assert it.stats.n_too_long == 1
    pit = iter_batches(exs, BatchConfig(batch_size=1, buckets=(16,), pack=True, on_too_long="skip",
                                        drop_remainder=False))
    assert [b.example_ids for b in pit] == [(("ok1", "ok2"),)] and pit.stats.n_too_long == 1


def test_max_segments_per_row():
    exs = [ex(f"s{i}", 3, 1) for i in range(6)]
    b = next(iter_batches(exs, BatchConfig(batch_size=2, buckets=(32,), pack=True, max_segments_per_row=2)))
    assert b.example_ids == (("s0", "s1"), ("s2", "s3"))


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_resume_from_saved_state_yields_identical_batches(pack):
    exs = varied(37, seed=3)
    cfg = BatchConfig(batch_size=3, buckets=(16, 32, 48), pack=pack, pack_length=48)

    def make() -> BatchIterator:
        return BatchIterator(EpochSampler(exs, seed=9, num_epochs=3), cfg)

    reference = list(make())
    it = make()
    head = [next(it) for _ in range(5)]
    state = json.loads(json.dumps(it.state))
    assert set(state) == {"epoch", "index", "seed", "num_examples", "shuffle"}
    resumed = make()
    resumed.set_state(state)
    assert_batches_equal(head + list(resumed), reference)
    # a packed batch that left an example for later did not consume it
    if pack:
        ids = [i for b in reference for row in b.example_ids for i in row]
        assert len(ids) + make_dropped(exs, cfg) == 3 * 37


def make_dropped(exs, cfg) -> int:
    it = BatchIterator(EpochSampler(exs, seed=9, num_epochs=3), cfg)
    list(it)
    return it.stats.n_dropped_remainder
