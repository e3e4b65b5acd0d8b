"""Uncertainty of evaluation numbers: seeded bootstrap intervals over items and paired bootstrap differences.

Every metric of the evaluation suite is a **ratio of per-item sums**, ``sum(num_i) / sum(den_i)`` over the items
``i`` of one evaluation set:

* a plain mean (EM, prompt-level IFEval, MC accuracy, collapse share): ``num_i`` = the item's score, ``den_i`` = 1;
* a pooled rate over units nested in items (instruction-level IFEval = passed instructions / instructions; per-token
  shift KL = sum of token KLs / tokens): ``num_i``, ``den_i`` = the item's sums; resampling whole items is the
  cluster bootstrap, which keeps the instructions (tokens) of one prompt together;
* a subset rate (refusal accuracy on unanswerable questions only): ``den_i`` = 1 on the subset, 0 elsewhere;
* a ratio of two models' means on the same items (response length relative to the base): ``num_i`` = the model's
  length, ``den_i`` = the base model's.

The bootstrap draws ``n_resamples`` index vectors of ``n`` items with replacement from
``numpy.random.default_rng(seed)`` (one ``[R, n]`` integer matrix, :func:`bootstrap_indices`) and recomputes the
ratio on each; the interval is the percentile interval at ``confidence`` (``numpy.quantile``, linear, of the R
estimates; Efron & Tibshirani 1993, ch. 13). A **paired** difference resamples the same item indices for both
methods, which is valid because every model is evaluated on the same items in the same order; its interval
"excludes 0" when both ends lie strictly on one side of 0. A resample whose denominator sums to 0 (possible for a
rare subset) is dropped and counted (``n_dropped``). With the same seed and ``n`` every metric and every pair sees
the same resamples.

Sizing: a proportion near ``p`` measured on ``n`` items has a normal-approximation 95% half-width of
``1.96 * sqrt(p (1 - p) / n)`` (:func:`proportion_half_width`); ``n >= 267`` keeps it at most 6 points for every
``p`` (:func:`items_for_half_width`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["BootstrapConfig", "Interval", "bootstrap_indices", "ratio_interval", "paired_difference",
           "proportion_half_width", "items_for_half_width"]

Z_95 = 1.959963984540054
"""Standard normal quantile at 0.975."""


@dataclasses.dataclass(frozen=True)
class BootstrapConfig:
    """Bootstrap settings.

    Attributes:
      n_resamples: bootstrap resamples R.
      confidence: coverage of the percentile interval.
      seed: seed of ``numpy.random.default_rng`` that draws the resampled indices.
    """

    n_resamples: int = 2000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_resamples < 1:
            raise ValueError(f"BootstrapConfig.n_resamples must be >= 1, got {self.n_resamples}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"BootstrapConfig.confidence must be in (0, 1), got {self.confidence}")


@dataclasses.dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval.

    Attributes:
      estimate: the statistic on all items.
      low / high: the percentile interval ends (NaN when no resample was usable).
      n: items.
      n_dropped: resamples left out because their denominator summed to 0.
    """

    estimate: float
    low: float
    high: float
    n: int
    n_dropped: int = 0

    @property
    def excludes_zero(self) -> bool:
        """Both ends strictly on one side of 0."""
        return bool(self.low > 0.0 or self.high < 0.0)

    def as_dict(self) -> dict[str, float | int | bool]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "n": self.n,
                "n_dropped": self.n_dropped, "excludes_zero": self.excludes_zero}


def bootstrap_indices(n_items: int, config: BootstrapConfig = BootstrapConfig()) -> np.ndarray:
    """``[n_resamples, n_items]`` int64 indices drawn with replacement (``default_rng(seed).integers``)."""
    if n_items < 1:
        raise ValueError(f"bootstrap_indices: need at least one item, got {n_items}")
    return np.random.default_rng(config.seed).integers(0, n_items, size=(config.n_resamples, n_items))


def _as_items(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values, np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D sequence of per-item values, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: item {int(np.flatnonzero(~np.isfinite(arr))[0])} is not finite")
    return arr


def _ratios(num_n: np.ndarray, den_n: np.ndarray, idx_rn: np.ndarray) -> np.ndarray:
    """Per-resample ``sum(num) / sum(den)`` (NaN where the denominator sums to 0)."""
    num_r, den_r = num_n[idx_rn].sum(axis=1), den_n[idx_rn].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den_r != 0, num_r / np.where(den_r != 0, den_r, 1.0), np.nan)


def _interval(estimate: float, samples_r: np.ndarray, n: int, confidence: float) -> Interval:
    ok = samples_r[np.isfinite(samples_r)]
    dropped = int(samples_r.size - ok.size)
    if ok.size == 0:
        return Interval(estimate, math.nan, math.nan, n, dropped)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(ok, [tail, 1.0 - tail])
    return Interval(estimate, float(low), float(high), n, dropped)


def _check_den(num_n: np.ndarray, den: Sequence[float] | np.ndarray | None, name: str) -> np.ndarray:
    den_n = np.ones_like(num_n) if den is None else _as_items(den, f"{name} den")
    if den_n.shape != num_n.shape:
        raise ValueError(f"{name}: num has {num_n.size} items but den has {den_n.size}")
    if den_n.sum() == 0:
        raise ValueError(f"{name}: the denominator sums to 0 over all items (empty subset)")
    return den_n


def ratio_interval(num: Sequence[float] | np.ndarray, den: Sequence[float] | np.ndarray | None = None,
                   config: BootstrapConfig = BootstrapConfig(), *, name: str = "ratio_interval") -> Interval:
    """``sum(num) / sum(den)`` (the mean of ``num`` when ``den`` is None) with its bootstrap interval over items."""
    num_n = _as_items(num, name)
    den_n = _check_den(num_n, den, name)
    idx_rn = bootstrap_indices(num_n.size, config)
    return _interval(float(num_n.sum() / den_n.sum()), _ratios(num_n, den_n, idx_rn), num_n.size, config.confidence)


def paired_difference(num_a: Sequence[float] | np.ndarray, num_b: Sequence[float] | np.ndarray,
                      den_a: Sequence[float] | np.ndarray | None = None,
                      den_b: Sequence[float] | np.ndarray | None = None,
                      config: BootstrapConfig = BootstrapConfig(), *, name: str = "paired_difference") -> Interval:
    """``ratio(a) - ratio(b)`` on the same items, both recomputed on each resample of item indices.

    ``a`` and ``b`` must be aligned item by item (the same evaluation set in the same order).
    """
    na, nb = _as_items(num_a, f"{name} a"), _as_items(num_b, f"{name} b")
    if na.shape != nb.shape:
        raise ValueError(f"{name}: a has {na.size} items but b has {nb.size}; a paired difference needs the same "
                         "items in the same order")
    da, db = _check_den(na, den_a, f"{name} a"), _check_den(nb, den_b, f"{name} b")
    idx_rn = bootstrap_indices(na.size, config)
    diff_r = _ratios(na, da, idx_rn) - _ratios(nb, db, idx_rn)
    estimate = float(na.sum() / da.sum() - nb.sum() / db.sum())
    return _interval(estimate, diff_r, na.size, config.confidence)


def proportion_half_width(p: float, n: int, z: float = Z_95) -> float:
    """Normal-approximation half-width ``z * sqrt(p (1 - p) / n)`` of a proportion ``p`` measured on ``n`` items."""
    if n < 1 or not 0.0 <= p <= 1.0:
        raise ValueError(f"proportion_half_width: need n >= 1 and 0 <= p <= 1, got n={n}, p={p}")
    return z * math.sqrt(p * (1.0 - p) / n)


def items_for_half_width(half_width: float, p: float = 0.5, z: float = Z_95) -> int:
    """Smallest ``n`` with ``proportion_half_width(p, n) <= half_width`` (267 for 0.06 at p = 0.5)."""
    if not 0.0 < half_width < 1.0:
        raise ValueError(f"items_for_half_width: half_width must be in (0, 1), got {half_width}")
    return max(1, math.ceil(z * z * p * (1.0 - p) / (half_width * half_width)))
