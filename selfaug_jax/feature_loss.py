"""The ``features`` loss term: align intermediate features of the policy to the reference's (SelfAug's Table 2).

Table 2 of SelfAug (arXiv 2509.03934) compares aligning the prompt-token *logits* (the method) with aligning
intermediate features: the attention projections' outputs Q, K, V, O, all four, the FFN output, and all layers. The
paper gives no distance; this project's reading (see /work/shared/BASELINES.md "Table 2"), every part an option of
:class:`FeatureLossConfig`:

* **positions**: the positions SelfAug aligns, exactly the prompt KL's selection (``loss.align`` and
  ``loss.include_padding`` of the step config; by default ``labels == -100``, padding included, as the released
  code), pooled over the micro-batch -- and with token-weighted accumulation divided by the whole batch's count of
  aligned positions, like the KL;
* **sites** (``site``): ``q`` / ``k`` / ``v`` / ``o`` = that projection's output (``q``/``k`` before the q/k-norm and
  RoPE), ``attn`` = all four (the mean of the four projections' distances, each projection weighted equally),
  ``ffn`` = the MLP's output (before the residual add), ``residual`` = the residual stream after each layer (the
  paper's "all layers");
* **distance** (``distance``): ``"mse"`` = mean over the feature axis of the squared difference (default), or
  ``"cosine"`` = ``1 - cos(f_policy, f_ref)`` per position, computed as ``0.5 * ||f_p/|f_p| - f_r/|f_r| ||^2`` (the
  same value, free of the cancellation of ``1 - cos`` near 0; written to be exactly 0 when the two vectors are
  bitwise equal, see :func:`_cosine_distance_bt`), float32 throughout;
* **layers** (``layers``): the mean over all layers by default, or over a list of layer indices (negative indices
  count from the last layer);
* **weight** (``weight``): ``total = CE + weight * distance``, 0.5 by default like SelfAug's alpha.

Written as a formula, with ``A`` the aligned positions, ``S`` the site's taps and ``Λ`` the selected layers::

    feature_distance = 1/|Λ| sum_{l in Λ} 1/|S| sum_{s in S} 1/|A| sum_{(b,t) in A} d(f_pol[l,s,b,t], f_ref[l,s,b,t])

The reference is the frozen base (``reference="base"``: the policy graph with its adapters multiplied by zero), so
at step 0 (LoRA ``B = 0``) the term is exactly 0 under per-layer remat (the training default; without remat XLA
fuses the linearised forward differently: ~1e-16, float32 rounding), as the prompt KL is.

Memory: the reference's taps of all layers (``[L, b, t, F]`` in the compute dtype, stop-gradient) are scan inputs
of the policy's layer scan, whose body computes this layer's masked distance sum; only one float32 scalar per layer
leaves the policy's scan, so the policy's taps are neither scan outputs nor kept for (or differentiated through)
anything outside the layer. At batch 4 x 256 on SmolLM2-135M (30 layers, D = 576, 9 heads and 3 KV heads of 64) the
reference's taps take ``30 * 4 * 256 * F`` values: 67.5 MiB for ``residual`` / ``ffn`` / ``o`` / ``q`` (F = 576),
22.5 MiB for ``k`` / ``v`` (F = 192), 180 MiB for ``attn`` (F = 1536) in float32 (half in bfloat16). XLA:CPU's
temporaries of the whole train step (``bench/feature_memory.py``, float32, remat ``dots``): ``lora`` 1503 MiB,
``selfaug`` 2178 MiB, ``selfaug-features`` with ``k`` 1526 MiB (+22.5: exactly the reference's taps), ``attn``
1683 MiB, ``residual`` 1706 MiB. The alternative where the policy's taps also leave its scan measured 1779 MiB for
``attn`` (more) but 1589 MiB for ``residual`` (less, on XLA:CPU; not analysed further); the in-scan design is kept
for its bound (no policy-side ``[L, b, t, F]`` tensor or cotangent, whatever the site).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Literal

import jax
import jax.numpy as jnp

from selfaug_jax import loss as loss_lib
from selfaug_jax.models.taps import LayerTaps, TapDict

if TYPE_CHECKING:  # objective.py imports this module
    from selfaug_jax.train.objective import TermContext

FeatureSite = Literal["q", "k", "v", "o", "attn", "ffn", "residual"]
FeatureDistance = Literal["mse", "cosine"]

# Config site -> the decoder taps it averages over (selfaug_jax/models/taps.py).
SITE_TAPS: dict[str, tuple[str, ...]] = {
    "q": ("q",),
    "k": ("k",),
    "v": ("v",),
    "o": ("o",),
    "attn": ("q", "k", "v", "o"),
    "ffn": ("ffn",),
    "residual": ("residual",),
}
DISTANCES = ("mse", "cosine")

# Norm floor of the cosine distance (a zero feature vector has distance 0.5 to a non-zero one, 0 to another zero).
_COSINE_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class FeatureLossConfig:
    """Options of the ``features`` term (the ``features:`` section of an experiment config).

    Attributes:
        site: ``q``, ``k``, ``v``, ``o``, ``attn`` (all four), ``ffn`` or ``residual`` (see the module docstring).
        distance: ``"mse"`` or ``"cosine"`` (``1 - cos``).
        weight: the term's weight in the total (SelfAug's alpha: 0.5).
        layers: layer indices to average over (negative = from the last layer); ``None``: all layers.
    """

    site: FeatureSite = "residual"
    distance: FeatureDistance = "mse"
    weight: float = 0.5
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.site not in SITE_TAPS:
            raise ValueError(f"features.site: {self.site!r} is not one of {', '.join(SITE_TAPS)}")
        if self.distance not in DISTANCES:
            raise ValueError(f"features.distance: {self.distance!r} is not one of {', '.join(DISTANCES)}")
        if not self.weight >= 0.0:
            raise ValueError(f"features.weight: {self.weight!r} must be >= 0")
        if self.layers is not None:
            if not self.layers:
                raise ValueError("features.layers: an empty list selects no layer; use null for all layers")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"features.layers: {list(self.layers)} repeats a layer")


def selected_layers(layers: tuple[int, ...] | None, num_layers: int) -> tuple[int, ...]:
    """The selected layer indices in ``[0, num_layers)`` (``None``: all); an index out of range raises."""
    if layers is None:
        return tuple(range(num_layers))
    bad = [i for i in layers if not -num_layers <= i < num_layers]
    if bad:
        raise ValueError(f"features.layers: {bad} out of range for a model with {num_layers} layers")
    out = tuple(i % num_layers for i in layers)
    if len(set(out)) != len(out):
        raise ValueError(f"features.layers: {list(layers)} names a layer twice for a model with {num_layers} layers")
    return out


def distance_bt(policy_btf: jax.Array, ref_btf: jax.Array, distance: str) -> jax.Array:
    """Per-position float32 distance ``[b, t]`` between two ``[b, t, F]`` feature tensors (module docstring)."""
    p = policy_btf.astype(jnp.float32)
    r = ref_btf.astype(jnp.float32)
    if distance == "mse":
        return jnp.mean(jnp.square(p - r), axis=-1)
    if distance == "cosine":
        return _cosine_distance_bt(p, r)
    raise ValueError(f"features.distance: {distance!r} is not one of {', '.join(DISTANCES)}")


def _cosine_distance_bt(p_btf: jax.Array, r_btf: jax.Array) -> jax.Array:
    """``1 - cos(p, r)`` per position, written so that it is exactly 0 whenever ``p == r`` bitwise.

    ``1 - cos = 0.5 * ||p/|p| - r/|r| ||^2`` (unit vectors: ``|u - w|^2 = 2 - 2 u.w``), and
    ``p/|p| - r/|r| = (p - r)/|p| - r (|p| - |r|) / (|p| |r|)`` with ``|p| - |r| = sum((p - r)(p + r)) / (|p| + |r|)``:
    every term carries a factor ``p - r``, so equal inputs give 0 however XLA rounds the two norms (the policy's are
    computed inside its layer scan, the reference's outside). A zero vector (norm <= eps) has direction 0: distance
    0.5 to a non-zero vector, 0 to another zero vector. Norms are floored (``sqrt(max(|x|^2, eps^2))``), so no NaN
    gradient at 0.
    """
    norm_p = jnp.sqrt(jnp.maximum(jnp.sum(p_btf * p_btf, axis=-1, keepdims=True), _COSINE_EPS**2))
    norm_r = jnp.sqrt(jnp.maximum(jnp.sum(r_btf * r_btf, axis=-1, keepdims=True), _COSINE_EPS**2))
    ok = (norm_p > _COSINE_EPS) & (norm_r > _COSINE_EPS)
    safe_p, safe_r = jnp.where(ok, norm_p, 1.0), jnp.where(ok, norm_r, 1.0)  # no huge values in the unused branch
    diff = p_btf - r_btf
    norm_gap = jnp.sum(diff * (p_btf + r_btf), axis=-1, keepdims=True) / (safe_p + safe_r)  # |p| - |r|
    exact = 0.5 * jnp.sum(jnp.square(diff / safe_p - r_btf * (norm_gap / (safe_p * safe_r))), axis=-1)
    plain = 0.5 * jnp.sum(jnp.square(p_btf / norm_p - r_btf / norm_r), axis=-1)  # a zero vector's direction is 0
    return jnp.where(ok[..., 0], exact, plain)


def layer_distance_sum(policy_taps: TapDict, ref_taps: TapDict, mask_bt: jax.Array, distance: str) -> jax.Array:
    """One layer's float32 scalar: the mean over the tapped sites of the sum over ``mask_bt`` of the distance."""
    sums = [jnp.sum(jnp.where(mask_bt, distance_bt(policy_taps[s], ref_taps[s], distance), 0.0))
            for s in policy_taps]
    return sum(sums[1:], sums[0]) / len(sums)


def _aligned_mask_bt(config: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """The prompt KL's own position selection (``loss.align``, ``loss.include_padding``)."""
    return loss_lib._align_mask_bt(batch["labels_bt"], batch["attention_mask_bt"], config.loss.align,
                                   config.loss.include_padding)


def tap_request(config: Any, batch: dict[str, jax.Array]) -> LayerTaps:
    """The taps this term needs (``objective.TERM_TAPS``): the site's taps in both forwards, and the per-layer
    masked distance sum computed inside the policy's layer scan against the reference's taps."""
    cfg: FeatureLossConfig = config.features
    mask_bt = _aligned_mask_bt(config, batch)

    def reduce(policy_taps: TapDict, ref_taps: TapDict) -> jax.Array:
        return layer_distance_sum(policy_taps, ref_taps, mask_bt, cfg.distance)

    return LayerTaps(SITE_TAPS[cfg.site], reduce)


def feature_term(ctx: "TermContext") -> tuple[jax.Array, dict[str, jax.Array]]:
    """The ``features`` additive term: ``(weight * feature_distance, {"feature_distance": unweighted value})``.

    ``ctx.layer_taps`` holds the ``[L]`` per-layer masked distance sums of :func:`tap_request`'s reduce. The sum is
    divided by the aligned-position count (``ctx.normalizers[1]`` with token-weighted accumulation, else this
    micro-batch's own; 0 positions give 0, never NaN) and averaged over the selected layers.
    """
    cfg: FeatureLossConfig = ctx.config.features
    sums_l = ctx.layer_taps
    layers = selected_layers(cfg.layers, sums_l.shape[0])
    total = jnp.sum(sums_l[jnp.asarray(layers, jnp.int32)]) / len(layers)
    if ctx.normalizers is not None:
        n_aligned = ctx.normalizers[1]
    else:
        n_aligned = jnp.sum(_aligned_mask_bt(ctx.config, ctx.batch), dtype=jnp.int32)
    value = total / jnp.maximum(n_aligned, 1).astype(total.dtype)
    return cfg.weight * value, {"feature_distance": value}
