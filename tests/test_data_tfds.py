"""tfds array_record store of tokenized examples (no TensorFlow) and the resumable epoch sampler."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest

from selfaug_jax.data import (
    BUILDER_NAME,
    BatchConfig,
    BatchIterator,
    EpochSampler,
    TokenizedExample,
    load_tfds_source,
    write_tfds_dataset,
)


def _examples(n: int, prefix: str = "ex", seed: int = 0) -> list[TokenizedExample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(4, 40))
        ids = rng.integers(3, 49152, size=length).astype(np.int32)
        labels = np.full(length, -100, np.int32)
        p = int(rng.integers(1, length))
        labels[p:] = ids[p:]
        out.append(TokenizedExample(id=f"{prefix}-{i}", input_ids=ids, labels=labels,
                                    meta={"prompt_length": p, "alt_ans": [f"a{i}", "ü"], "split": i % 2}))
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    train, val = _examples(23), _examples(5, "val", seed=1)
    d = write_tfds_dataset({"train": train, "validation": val}, tmp_path_factory.mktemp("tfds"), name="unit",
                           metadata={"tokenizer": "SmolLM2-135M-Instruct", "stats": {"n_skipped": 1}})
    return d, train, val


def test_roundtrip_without_tensorflow(dataset):
    d, train, val = dataset
    assert d.parts[-3:] == (BUILDER_NAME, "unit", "1.0.0")
    assert sorted(p.name for p in d.glob("*.array_record*")) == [
        f"{BUILDER_NAME}-train.array_record-00000-of-00001",
        f"{BUILDER_NAME}-validation.array_record-00000-of-00001"]
    src = load_tfds_source(d, "train")
    assert len(src) == 23 and len(load_tfds_source(d, "validation")) == 5
    for i, ex in enumerate(train):  # order preserved, exact values and dtypes
        got = src[i]
        assert got.id == ex.id and got.meta == ex.meta
        assert got.input_ids.dtype == np.int32 and got.labels.dtype == np.int32
        np.testing.assert_array_equal(got.input_ids, ex.input_ids)
        np.testing.assert_array_equal(got.labels, ex.labels)
    assert [e.id for e in src.__getitems__([5, 0, 22])] == ["ex-5", "ex-0", "ex-22"]
    assert src.metadata == {"tokenizer": "SmolLM2-135M-Instruct", "stats": {"n_skipped": 1}}
    with pytest.raises(KeyError, match="no split 'test'"):
        load_tfds_source(d, "test")
    # nothing here imported TensorFlow, and it is not installed
    assert "tensorflow" not in sys.modules
    assert importlib.util.find_spec("tensorflow") is None


def test_tfds_data_source_api(dataset):
    import tensorflow_datasets as tfds

    d, train, _ = dataset
    src = tfds.data_source(f"{BUILDER_NAME}/unit", data_dir=str(d.parents[2]), split="train")
    assert len(src) == 23 and src[3]["id"] == b"ex-3"
    np.testing.assert_array_equal(src[3]["labels"], train[3].labels)
    assert "tensorflow" not in sys.modules


def test_if_exists(dataset, tmp_path):
    d, _, _ = dataset
    with pytest.raises(FileExistsError, match="already exists"):
        write_tfds_dataset({"train": _examples(2)}, d.parents[2], name="unit")
    out = write_tfds_dataset({"train": _examples(3, "a")}, tmp_path, name="x")
    out2 = write_tfds_dataset({"train": _examples(2, "b")}, tmp_path, name="x", if_exists="overwrite")
    assert out == out2 and [load_tfds_source(out2)[i].id for i in range(2)] == ["b-0", "b-1"]
    assert len(load_tfds_source(out2)) == 2


def test_epoch_sampler_deterministic_shuffle_per_epoch(dataset):
    d, _, _ = dataset
    src = load_tfds_source(d, "train")
    s = EpochSampler(src, seed=3, num_epochs=2)
    ids = [e.id for e in s]
    assert len(ids) == 46
    e0, e1 = ids[:23], ids[23:]
    assert sorted(e0) == sorted(e1) == sorted(f"ex-{i}" for i in range(23))  # each epoch is a permutation
    assert e0 != e1                                                           # reshuffled per epoch
    assert e0 == [f"ex-{i}" for i in np.random.default_rng([3, 0]).permutation(23)]
    assert [e.id for e in EpochSampler(src, seed=3, num_epochs=1)] == e0       # same seed, same order
    assert [e.id for e in EpochSampler(src, seed=4, num_epochs=1)] != e0
    assert [e.id for e in EpochSampler(src, shuffle=False, num_epochs=1)] == [f"ex-{i}" for i in range(23)]


def test_sampler_state_json_roundtrip_resumes_exactly(dataset):
    d, _, _ = dataset
    src = load_tfds_source(d, "train")
    full = [e.id for e in EpochSampler(src, seed=11, num_epochs=3)]
    s = EpochSampler(src, seed=11, num_epochs=3)
    head = [next(s).id for _ in range(30)]
    state = json.loads(json.dumps(s.state))
    assert state == {"epoch": 1, "index": 7, "seed": 11, "num_examples": 23, "shuffle": True}
    r = EpochSampler(src, seed=11, num_epochs=3)
    r.set_state(state)
    assert head + [e.id for e in r] == full
    with pytest.raises(ValueError, match="seed=11"):
        EpochSampler(src, seed=12).set_state(state)


def test_batch_iterator_over_tfds_resumes_with_identical_batches(dataset):
    d, _, _ = dataset
    cfg = BatchConfig(batch_size=4, buckets=(16, 32, 48), pad_id=0)
    it = BatchIterator(EpochSampler(load_tfds_source(d, "train"), seed=5, num_epochs=3), cfg)
    for _ in range(7):  # stop mid-epoch 1 (5 batches of 4 per epoch, 3 dropped)
        next(it)
    state = json.loads(json.dumps(it.state))
    expected = list(it)
    resumed = BatchIterator(EpochSampler(load_tfds_source(d, "train"), seed=5, num_epochs=3), cfg)
    resumed.set_state(state)
    got = list(resumed)
    assert len(got) == len(expected) == 8
    for a, b in zip(got, expected):
        assert a.example_ids == b.example_ids
        for k, v in a.arrays().items():
            np.testing.assert_array_equal(v, b.arrays()[k])
    assert it.stats.n_dropped_remainder == 9 and it.stats.n_batches == 15


def test_end_to_end_crag_fixture_to_batches(tmp_path):
    """CRAG fixture -> real tokenizer masks -> array_record -> resumable sampler -> packed batches."""
    from pathlib import Path

    from test_data_schema_prompts import default_tokenizer

    from selfaug_jax.data import PromptConfig, read_crag_task1, tokenize_examples

    tok = default_tokenizer()
    crag = Path(__file__).parent / "fixtures" / "data" / "crag_task_1_sample.jsonl.bz2"
    exs = list(read_crag_task1(crag, split="validation", document_source="page", max_page_chars=400))
    tokenized, stats = tokenize_examples(exs, tok, PromptConfig(max_length=160))
    assert stats.n_kept == 2 and stats.n_truncated >= 1 and stats.n_skipped == 0
    d = write_tfds_dataset({"train": tokenized}, tmp_path, name="crag", metadata={"prompt_stats": stats.as_dict()})
    src = load_tfds_source(d)
    assert src.metadata["prompt_stats"]["n_kept"] == 2
    batch = next(BatchIterator(EpochSampler(src, seed=0, num_epochs=1),
                               BatchConfig(batch_size=1, buckets=(320,), pack=True, pad_id=tok.pad_token_id)))
    assert sorted(batch.example_ids[0]) == sorted(e.id for e in exs)
    for k, ex_id in enumerate(batch.example_ids[0], start=1):
        sel = batch.segment_ids_bt[0] == k
        target = tok.decode(batch.labels_bt[0][sel][batch.labels_bt[0][sel] != -100])
        assert target == next(e.answer for e in exs if e.id == ex_id) + "<|im_end|>"
    assert "tensorflow" not in sys.modules
