"""A packed row (segment ids, restarted positions) gives the same per-token logits as its examples run alone."""

import jax.numpy as jnp
import numpy as np

from selfaug_jax.data.batching import pack_batch, pad_batch
from selfaug_jax.data.schema import TokenizedExample
from selfaug_jax.models import load_pretrained
from torch_reference import make_tiny_hf_model


def _example(i, n, prompt):
    ids = np.random.default_rng(i).integers(1, 128, n).astype(np.int32)
    labels = ids.copy()
    labels[:prompt] = -100
    return TokenizedExample(id=f"ex{i}", input_ids=ids, labels=labels)


def test_packed_logits_equal_separate_logits(tmp_path):
    for name in ("llama3-untied", "mistral"):  # mistral: the sliding window must also respect segments
        make_tiny_hf_model(name, tmp_path / name)
        model = load_pretrained(tmp_path / name)
        examples = [_example(0, 9, 4), _example(1, 13, 6), _example(2, 7, 3)]
        packed = pack_batch([examples[:2], examples[2:]], length=32).arrays()
        assert packed["segment_ids_bt"][0, :22].tolist() == [1] * 9 + [2] * 13
        packed_logits = np.asarray(model(jnp.asarray(packed["input_ids_bt"]),
                                         attention_mask=jnp.asarray(packed["attention_mask_bt"]),
                                         positions=jnp.asarray(packed["positions_bt"]),
                                         segment_ids=jnp.asarray(packed["segment_ids_bt"])))
        # default positions derived from segment ids equal the batch's explicit positions
        implicit = np.asarray(model(jnp.asarray(packed["input_ids_bt"]),
                                    segment_ids=jnp.asarray(packed["segment_ids_bt"])))
        np.testing.assert_array_equal(implicit[packed["attention_mask_bt"] > 0],
                                      packed_logits[packed["attention_mask_bt"] > 0])
        spans = {0: (0, 0, 9), 1: (0, 9, 22), 2: (1, 0, 7)}
        for i, ex in enumerate(examples):
            alone = pad_batch([ex], length=16).arrays()
            alone_logits = np.asarray(model(jnp.asarray(alone["input_ids_bt"]),
                                            attention_mask=jnp.asarray(alone["attention_mask_bt"])))
            row, start, end = spans[i]
            np.testing.assert_allclose(packed_logits[row, start:end], alone_logits[0, : end - start],
                                       atol=1e-5, rtol=0)
