"""The LoRA branch's custom VJP and hashed 16-bit dropout masks (selfaug_jax/models/lora_matmul.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfaug_jax.models.lora_matmul import (
    dropout_keep_mask,
    dropout_threshold,
    effective_keep_scale,
    hashed_words,
    lora_update,
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


def _within(count, n, p, sigmas=5.0):
    """``count`` successes of ``n`` Bernoulli(p) trials lie within ``sigmas`` standard deviations of ``n p``."""
    return abs(count - n * p) < sigmas * np.sqrt(n * p * (1 - p))


def test_dropout_mask_rate_shape_and_determinism():
    rate = 0.05
    assert dropout_threshold(rate) == 3277  # round(0.05 * 65536)
    p_eff = 3277 / 65536
    assert effective_keep_scale(rate) == pytest.approx(1.0 / (1.0 - p_eff), rel=1e-12)
    key = jax.random.key(3)
    keep = np.asarray(dropout_keep_mask(key, (64, 32, 513), rate))  # 513 = 2 * 257 - 1: the halves are cut to size
    assert keep.shape == (64, 32, 513) and keep.dtype == bool
    assert _within(keep.size - keep.sum(), keep.size, p_eff)
    # both 16-bit draws of each word are used: the drop rate holds in each half of the last axis
    for part in (keep[..., :257], keep[..., 257:]):
        assert _within(part.size - part.sum(), part.size, p_eff)
    # the two draws of one word are independent: P(both dropped) ~ p^2 for its low and high half
    low, high = ~keep[..., :256], ~keep[..., 257:513]
    assert _within(np.sum(low & high), low.size, p_eff**2)
    np.testing.assert_array_equal(keep, np.asarray(dropout_keep_mask(key, (64, 32, 513), rate)))


def test_dropout_masks_are_independent_across_positions_and_keys():
    """Neighbouring elements (along the last axis, and the same column of neighbouring rows) and the masks of two
    keys agree as often as independent Bernoulli(p) draws do (p = 0.3 for power), within 5 sigma."""
    p = dropout_threshold(0.3) / 65536
    agree = p**2 + (1 - p) ** 2
    keep = np.asarray(dropout_keep_mask(jax.random.key(11), (256, 1024), 0.3))
    pairs = {
        "last axis": (keep[:, :-1], keep[:, 1:]),
        "rows": (keep[:-1], keep[1:]),
        "keys": (keep, np.asarray(dropout_keep_mask(jax.random.key(12), (256, 1024), 0.3))),
        "folded keys": (keep, np.asarray(dropout_keep_mask(jax.random.fold_in(jax.random.key(11), 1), (256, 1024),
                                                           0.3))),
    }
    for name, (u, v) in pairs.items():
        assert _within(np.sum(u == v), u.size, agree), name


def _mix32_reference(x: np.ndarray) -> np.ndarray:
    """lowbias32 in NumPy ``uint32`` arithmetic (multiplication wraps modulo 2**32)."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def test_hashed_words_are_the_keyed_hash_of_positions():
    """Element ``i`` (flat row-major) of a ``(2, 3, 7)`` draw is ``mix(mix(i ^ k0) ^ k1)`` with ``(k0, k1)`` two words
    drawn from the key, checked against a NumPy implementation; the 16-bit draws are uniform (chi-square)."""
    key = jax.random.key(5)
    words = np.asarray(hashed_words(key, (2, 3, 7)))
    k0, k1 = np.asarray(jax.random.bits(key, (2,), jnp.uint32))
    position = np.arange(42, dtype=np.uint32).reshape(2, 3, 7)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(words, _mix32_reference(_mix32_reference(position ^ k0) ^ k1))
    assert words.dtype == np.uint32 and len(set(words.ravel().tolist())) == 42
    raw = hashed_words(jax.random.PRNGKey(5), (2, 3, 7))  # a raw uint32 key with the same data
    np.testing.assert_array_equal(np.asarray(raw), words)
    many = np.asarray(hashed_words(jax.random.key(6), (1 << 19,)))
    for draws in (many & 0xFFFF, many >> 16):
        counts = np.bincount(draws >> 10, minlength=64)  # 64 bins of the 16-bit draw
        expected = draws.size / 64
        chi2 = float(np.sum((counts - expected) ** 2 / expected))
        assert chi2 < 130.0, chi2  # 63 degrees of freedom: P(chi2 > 130) < 1e-6
    with pytest.raises(ValueError, match="positions must fit in 32 bits"):
        jax.eval_shape(lambda kk: hashed_words(kk, (1 << 16, 1 << 16, 2)), key)
