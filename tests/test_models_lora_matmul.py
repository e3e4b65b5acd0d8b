"""The LoRA branch's custom VJP and 16-bit dropout masks (selfaug_jax/models/lora_matmul.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfaug_jax.models.lora_matmul import (
    dropout_keep_mask,
    dropout_threshold,
    effective_keep_scale,
    lora_update,
    random_words,
)


def _reference(x, a, b, keep, scale, keep_scale):
    """The float64 NumPy formula ``((x * keep * keep_scale) @ a @ b) * scale`` and its gradients for a cotangent g."""
    x, a, b = (np.asarray(v, np.float64) for v in (x, a, b))
    m = np.ones_like(x) if keep is None else np.asarray(keep, np.float64) * keep_scale
    xd = (x * m).reshape(-1, x.shape[-1])
    return xd, m.reshape(xd.shape), a, b


@pytest.mark.parametrize("with_dropout", [False, True])
def test_lora_update_value_and_grads_match_float64_formula(with_dropout):
    kx, ka, kb, kg, km = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(kx, (2, 5, 6), jnp.float32)
    a = jax.random.normal(ka, (6, 3), jnp.float32)
    b = jax.random.normal(kb, (3, 4), jnp.float32)
    g = jax.random.normal(kg, (2, 5, 4), jnp.float32)
    keep = dropout_keep_mask(km, x.shape, 0.3) if with_dropout else None
    scale, keep_scale = 2.0, effective_keep_scale(0.3) if with_dropout else 1.0

    y, vjp = jax.vjp(lambda x, a, b: lora_update(x, a, b, keep, scale, keep_scale), x, a, b)
    dx, da, db = vjp(g)

    xd, m, a64, b64 = _reference(x, a, b, keep, scale, keep_scale)
    g64 = np.asarray(g, np.float64).reshape(-1, 4)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 4), xd @ a64 @ b64 * scale, rtol=1e-5, atol=1e-5)
    gs = g64 * scale
    np.testing.assert_allclose(np.asarray(db), (xd @ a64).T @ gs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(da), xd.T @ (gs @ b64.T), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx).reshape(-1, 6), (gs @ b64.T @ a64.T) * m, rtol=1e-5, atol=1e-5)
    if with_dropout:
        assert not np.all(np.asarray(keep))  # some elements really dropped, and their input gradient is 0
        assert np.all(np.asarray(dx)[~np.asarray(keep)] == 0.0)


def test_dropout_mask_rate_shape_and_determinism():
    rate = 0.05
    assert dropout_threshold(rate) == 3277  # round(0.05 * 65536)
    p_eff = 3277 / 65536
    assert effective_keep_scale(rate) == pytest.approx(1.0 / (1.0 - p_eff), rel=1e-12)
    key = jax.random.key(3)
    keep = np.asarray(dropout_keep_mask(key, (64, 32, 513), rate))  # 513 = 4 * 129 - 3: the quarters are cut to size
    assert keep.shape == (64, 32, 513) and keep.dtype == bool
    n = keep.size
    dropped = n - keep.sum()
    sigma = np.sqrt(n * p_eff * (1 - p_eff))
    assert abs(dropped - n * p_eff) < 5 * sigma
    # all four 16-bit draws of each hash are used: the drop rate holds in each quarter of the last axis
    for q in range(4):
        part = keep[..., q * 129:(q + 1) * 129]
        m = part.size
        assert abs((m - part.sum()) - m * p_eff) < 5 * np.sqrt(m * p_eff * (1 - p_eff))
    # draws from one hash are independent: P(both dropped) ~ p^2 for the low and high half of a word
    both = np.mean(~keep[..., :129] & ~keep[..., 129:258])
    assert abs(both - p_eff**2) < 5 * np.sqrt(p_eff**2 / keep[..., :129].size)
    np.testing.assert_array_equal(keep, np.asarray(dropout_keep_mask(key, (64, 32, 513), rate)))
    assert not np.array_equal(keep, np.asarray(dropout_keep_mask(jax.random.key(4), (64, 32, 513), rate)))


def test_random_words_are_threefry_of_positions():
    """Element (i, j, k) of a ``(2, 3, 7)`` draw is Threefry-2x32 of the counter ``(k, 3 i + j)`` under two words
    drawn from the key (both output words kept), checked against ``jax.extend.random.threefry_2x32``."""
    from jax.extend.random import threefry_2x32

    key = jax.random.key(5)
    first, second = random_words(key, (2, 3, 7))
    k = np.asarray(jax.random.bits(key, (2,), jnp.uint32))
    cols = np.broadcast_to(np.arange(7, dtype=np.uint32), (2, 3, 7)).ravel()
    rows = np.broadcast_to(np.arange(6, dtype=np.uint32).reshape(2, 3, 1), (2, 3, 7)).ravel()
    expected = np.asarray(threefry_2x32(k, np.concatenate([cols, rows])))  # hashes (cols[i], rows[i]) pairs
    np.testing.assert_array_equal(np.asarray(first).ravel(), expected[:42])
    np.testing.assert_array_equal(np.asarray(second).ravel(), expected[42:])
    assert len(set(expected.tolist())) == 84  # 84 distinct words (a 32-bit collision here: a 1e-6 event)
    raw_first, _ = random_words(jax.random.PRNGKey(5), (2, 3, 7))  # a raw uint32 key with the same data
    np.testing.assert_array_equal(np.asarray(raw_first), np.asarray(first))
    with pytest.raises(ValueError, match="wider than 32 bits"):
        jax.eval_shape(lambda kk: random_words(kk, (1 << 16, 1 << 16, 2)), key)
