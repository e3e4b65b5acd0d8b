"""selfaug_jax.eval.stats: bootstrap intervals against explicit NumPy references and closed forms."""

import math

import numpy as np
import pytest

from selfaug_jax.eval.stats import (BootstrapConfig, bootstrap_indices, items_for_half_width, paired_difference,
                                    proportion_half_width, ratio_interval)


def _reference_ratio_interval(num, den, n_resamples, seed, confidence):
    """A plain loop: resample items, recompute sum(num)/sum(den), take the percentiles."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(n_resamples, len(num)))
    est = []
    for row in idx:
        est.append(sum(num[i] for i in row) / sum(den[i] for i in row))
    tail = (1 - confidence) / 2
    return np.quantile(np.array(est, np.float64), [tail, 1 - tail])


def test_bootstrap_indices_are_seeded_and_in_range():
    cfg = BootstrapConfig(n_resamples=50, seed=3)
    a, b = bootstrap_indices(17, cfg), bootstrap_indices(17, cfg)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (50, 17) and a.min() >= 0 and a.max() <= 16
    assert not np.array_equal(a, bootstrap_indices(17, BootstrapConfig(n_resamples=50, seed=4)))


def test_ratio_interval_matches_loop_reference():
    rng = np.random.default_rng(0)
    num = rng.integers(0, 4, size=40).astype(float)
    den = rng.integers(1, 5, size=40).astype(float)
    cfg = BootstrapConfig(n_resamples=300, seed=7, confidence=0.9)
    iv = ratio_interval(num, den, cfg)
    lo, hi = _reference_ratio_interval(num, den, 300, 7, 0.9)
    assert iv.estimate == pytest.approx(num.sum() / den.sum(), abs=1e-15)
    assert iv.low == pytest.approx(lo, abs=1e-12) and iv.high == pytest.approx(hi, abs=1e-12)
    assert iv.n == 40 and iv.n_dropped == 0


def test_mean_interval_of_a_proportion_matches_the_normal_approximation():
    n = 400
    values = np.array([1.0] * 120 + [0.0] * 280)  # p = 0.3
    iv = ratio_interval(values, config=BootstrapConfig(n_resamples=4000, seed=1))
    half = proportion_half_width(0.3, n)  # 4.49 points
    assert iv.estimate == pytest.approx(0.3)
    assert (iv.high - iv.low) / 2 == pytest.approx(half, rel=0.08)
    assert iv.low < 0.3 < iv.high


def test_constant_items_give_a_degenerate_interval():
    iv = ratio_interval([0.25] * 10)
    assert (iv.estimate, iv.low, iv.high) == (0.25, 0.25, 0.25)
    assert iv.excludes_zero


def test_paired_difference_exact_cases():
    rng = np.random.default_rng(2)
    b = rng.random(30)
    same = paired_difference(b, b)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0) and not same.excludes_zero
    shifted = paired_difference(b + 1.0, b)  # every resample differs by exactly 1 (paired)
    assert shifted.low == pytest.approx(1.0) and shifted.high == pytest.approx(1.0) and shifted.excludes_zero


def test_paired_difference_matches_loop_reference_and_is_narrower_than_unpaired():
    rng = np.random.default_rng(5)
    base = rng.random(200)
    a = (base + 0.05 * rng.standard_normal(200) > 0.45).astype(float)
    b = (base > 0.5).astype(float)
    cfg = BootstrapConfig(n_resamples=500, seed=11)
    iv = paired_difference(a, b, config=cfg)
    idx = np.random.default_rng(11).integers(0, 200, size=(500, 200))
    ref = np.quantile(a[idx].mean(1) - b[idx].mean(1), [0.025, 0.975])
    assert iv.low == pytest.approx(ref[0], abs=1e-12) and iv.high == pytest.approx(ref[1], abs=1e-12)
    assert iv.estimate == pytest.approx(a.mean() - b.mean())
    # the unpaired interval (independent resamples) is wider for these correlated items
    ia, ib = np.random.default_rng(1).integers(0, 200, (500, 200)), np.random.default_rng(2).integers(0, 200, (500, 200))
    unpaired = np.quantile(a[ia].mean(1) - b[ib].mean(1), [0.025, 0.975])
    assert iv.high - iv.low < unpaired[1] - unpaired[0]


def test_subset_ratio_drops_empty_resamples_and_counts_them():
    num = np.array([1.0, 0, 0, 0, 0])
    den = np.array([1.0, 0, 0, 0, 0])  # only item 0 is in the subset
    iv = ratio_interval(num, den, BootstrapConfig(n_resamples=1000, seed=0))
    expected_dropped = int(np.sum(~(np.random.default_rng(0).integers(0, 5, (1000, 5)) == 0).any(1)))
    assert iv.n_dropped == expected_dropped > 0
    assert (iv.low, iv.high) == (1.0, 1.0)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="paired_difference: a has 3 items but b has 2"):
        paired_difference([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="item 1 is not finite"):
        ratio_interval([0.0, math.nan])
    with pytest.raises(ValueError, match="denominator sums to 0"):
        ratio_interval([1.0, 2.0], [0.0, 0.0])


def test_sizing_closed_forms():
    assert items_for_half_width(0.06) == 267
    assert proportion_half_width(0.5, 267) <= 0.06 < proportion_half_width(0.5, 266)
    assert proportion_half_width(0.5, 200) == pytest.approx(1.959963984540054 * math.sqrt(0.25 / 200))
