"""Shared pieces of the SelfAug loss: option types, the position masks and the per-token CE / divergence terms.

Package-internal: :mod:`selfaug_jax.loss` (the dense ``[B, T, V]`` reference losses) and
:mod:`selfaug_jax.fused_loss` (the chunked from-hidden losses) both build on these, so the two implementations
share one definition of every formula:

* :func:`_shifted_targets_bt`: the Hugging Face causal-LM shift, ``target[:, t] = labels[:, t + 1]``.
* :func:`_align_mask_bt`: the positions whose distributions are aligned (``align`` / ``include_padding``; the
  semantics are documented in :mod:`selfaug_jax.loss`).
* :func:`_ce_per_token`: ``logsumexp(logits) - logits[target]`` per position.
* :func:`_divergence_per_token`: forward / reverse KL or the generalized JSD of GKD per position, from one stacked
  ``log_softmax`` of policy and reference.
* :func:`_ce_divergence_and_grad`: the CE and forward / reverse KL sums with their gradient w.r.t. the policy
  logits in closed form (the fused loss' fast precompute chunk).
* :func:`_safe_inverse` (``1 / max(count, 1)``: empty selections give 0, not NaN) and :func:`_compute_dtype`
  (float32, or float64 for float64 inputs).

The leading underscores mark these as not part of the public API: they take validated inputs (the public functions
call :mod:`selfaug_jax.loss_checks` first) and may change with the losses. The option types (``Direction``,
``Align``, ``GradMode``, ``HeadLayout``) and ``HEAD_LAYOUTS`` (the one definition of the LM-head layouts, also used
by ``DecoderLM.lm_head_weight``) are re-exported by :mod:`selfaug_jax.loss`.

Like :mod:`selfaug_jax.loss` this module imports only jax, numpy (through ``loss_checks``) and the standard library,
so the model code can import it without an import cycle.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from selfaug_jax.loss_checks import IGNORE_INDEX
from selfaug_jax.reductions import sum_last_axis

__all__ = ["Align", "Direction", "GradMode", "HEAD_LAYOUTS", "HeadLayout"]

Direction = Literal["forward", "reverse", "jsd"]
Align = Literal["prompt", "prompt_without_padding", "all", "response"]
GradMode = Literal["precompute", "remat"]
HeadLayout = Literal["dv", "vd"]
HEAD_LAYOUTS: tuple[str, ...] = ("dv", "vd")
"""The LM-head layouts: ``"dv"`` = ``[D, V]`` (a Linear kernel), ``"vd"`` = ``[V, D]`` (a tied embedding table as
stored). The fused loss' ``head_layout`` and ``DecoderLM.lm_head_weight(layout)`` accept exactly these."""


# ----------------------------------------------------------------------------------------------------------------
# Masks and per-token terms (shared by the unfused and the fused implementation).


def _shifted_targets_bt(labels_bt: jax.Array) -> jax.Array:
    """``target[:, t] = labels[:, t + 1]``; the last position has no target (HF causal-LM shift)."""
    pad_b1 = jnp.full((labels_bt.shape[0], 1), IGNORE_INDEX, dtype=labels_bt.dtype)
    return jnp.concatenate([labels_bt[:, 1:], pad_b1], axis=1)


def _align_mask_bt(labels_bt: jax.Array, attention_mask_bt: jax.Array | None, align: str,
                   include_padding: bool) -> jax.Array:
    """Boolean ``[B, T]`` mask of the positions whose distributions are aligned (logits at ``t`` predict ``t + 1``).

    ``"prompt"``: ``labels[t] == -100`` (unshifted, the released SelfAug code); ``"response"``: ``labels[t + 1] !=
    -100`` (shifted, the CE positions; LLaMA-Factory's ASFT); ``"all"``: every position.
    """
    if align == "all":
        mask_bt = jnp.ones(labels_bt.shape, dtype=bool)
    elif align == "response":
        mask_bt = _shifted_targets_bt(labels_bt) != IGNORE_INDEX
    else:
        mask_bt = labels_bt == IGNORE_INDEX
    if align == "prompt_without_padding" or not include_padding:
        mask_bt = mask_bt & (attention_mask_bt != 0)
    return mask_bt


def _ce_per_token(logits_f32: jax.Array, targets: jax.Array) -> jax.Array:
    """``logsumexp(logits) - logits[target]`` per position; 0 where ``target == IGNORE_INDEX``."""
    valid = targets != IGNORE_INDEX
    safe = jnp.where(valid, targets, 0)
    picked = jnp.take_along_axis(logits_f32, safe[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits_f32, axis=-1) - picked
    return jnp.where(valid, nll, 0.0)


def _log_mixture_minus_logq(d: jax.Array, beta: float) -> jax.Array:
    """``log(beta * e^d + (1 - beta))`` for ``d = log p - log q``, i.e. ``log M - log q`` of ``M = beta p + (1-beta) q``.

    Written with ``log1p``/``expm1`` on the non-overflowing side of ``d = 0`` so that it is exactly 0 when ``p == q``
    and finite (with finite gradients; both ``where`` branches are safe) for any finite ``d``.
    """
    d_neg = jnp.minimum(d, 0.0)
    d_pos = jnp.maximum(d, 0.0)
    neg_branch = jnp.log1p(beta * jnp.expm1(d_neg))                      # d <= 0
    pos_branch = d_pos + jnp.log1p((1.0 - beta) * jnp.expm1(-d_pos))     # d > 0: e^d (beta + (1-beta) e^-d)
    return jnp.where(d > 0, pos_branch, neg_branch)


def _effective_direction(direction: str, beta: float) -> str:
    """The generalized JSD's end points are the two KLs: ``jsd`` at ``beta`` 0 is ``forward``, at 1 ``reverse``."""
    if direction == "jsd" and beta == 0.0:
        return "forward"
    if direction == "jsd" and beta == 1.0:
        return "reverse"
    return direction


def _divergence_per_token(logits_f32: jax.Array, ref_logits_f32: jax.Array, *, direction: str, beta: float,
                          temperature: float) -> jax.Array:
    """Per-position divergence between ``p_ref`` and ``p_policy`` over the last (vocabulary) axis."""
    ref_logits_f32 = jax.lax.stop_gradient(ref_logits_f32)
    if temperature != 1.0:
        logits_f32 = logits_f32 / temperature
        ref_logits_f32 = ref_logits_f32 / temperature
    # One log_softmax over both, stacked: the two normalisers are computed by the same kernel in the same order,
    # so identical logits give bit-identical log-probs (KL exactly 0 at step 0) even when the policy side is being
    # differentiated and XLA would otherwise fuse (and round) the two reductions differently.
    both = jax.nn.log_softmax(jnp.stack([logits_f32, ref_logits_f32]), axis=-1)
    logp, logr = both[0], both[1]                        # policy, reference
    direction = _effective_direction(direction, beta)
    if direction == "forward":                           # KL(ref || policy), released code
        return jnp.sum(jnp.exp(logr) * (logr - logp), axis=-1)
    if direction == "reverse":                           # KL(policy || ref), paper text
        return jnp.sum(jnp.exp(logp) * (logp - logr), axis=-1)
    # Generalized JSD, M = beta * p_ref + (1 - beta) * p_policy (GKD eq. 1; TRL generalized_jsd_loss).
    logm_minus_logp = _log_mixture_minus_logq(logr - logp, beta)
    logm_minus_logr = logm_minus_logp - (logr - logp)
    kl_ref_m = jnp.sum(jnp.exp(logr) * -logm_minus_logr, axis=-1)
    kl_pol_m = jnp.sum(jnp.exp(logp) * -logm_minus_logp, axis=-1)
    return beta * kl_ref_m + (1.0 - beta) * kl_pol_m


CLOSED_FORM_DIRECTIONS: tuple[str, ...] = ("forward", "reverse")
"""The divergences :func:`_ce_divergence_and_grad` writes in closed form (at temperature 1); the fused loss takes
the autodiff path (:func:`_ce_per_token` + :func:`_divergence_per_token` under ``jax.vjp``) for the others."""


def _ce_divergence_and_grad(logits_sbtv: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array,
                            ce_weight: jax.Array, kl_weight: jax.Array, *,
                            direction: str = "forward") -> tuple[jax.Array, jax.Array, jax.Array]:
    """CE sum, divergence sum and their weighted gradient w.r.t. the policy logits, in closed form, in few passes.

    The same numbers as ``sum(_ce_per_token(...))``, ``sum(where(mask, _divergence_per_token(...), 0))`` and
    ``jax.vjp`` of ``ce_weight * ce_sum + kl_weight * kl_sum`` (the fused loss' precompute chunk), at temperature 1
    and ``direction`` in :data:`CLOSED_FORM_DIRECTIONS`, up to float rounding. With ``p = softmax(z_policy)``,
    ``r = softmax(z_ref)`` and ``lp, lr`` their logs, per position:

    * CE: ``-lp[target]``; gradient ``p - onehot(target)``.
    * forward, ``KL(r || p) = sum r (lr - lp)`` (the released code): gradient ``p - r``.
    * reverse, ``KL(p || r) = sum p (lp - lr)``: gradient ``p * (lp - lr - KL(p || r))``.

    Autodiff of the reference formulas reads and writes every ``[tokens, V]`` intermediate of ``log_softmax``'s VJP
    and a separate ``logsumexp`` for the CE; here the normalisers are one max and one sum over the stacked logits
    and the gradient one elementwise pass (bench/README.md, session 11). The normalisers of policy and reference come
    from one reduction over the stacked array, as in :func:`_divergence_per_token`, so identical logits give
    bit-identical log-probabilities: the divergence is exactly 0 and adds exactly 0 to the gradient.

    Args:
      logits_sbtv: ``[S, B, T, V]`` float logits: ``S = 1`` the policy only (no alignment term), ``S = 2`` policy
        then reference (no gradient is computed for the reference).
      targets_bt: shifted targets, ``IGNORE_INDEX`` = no CE term.
      mask_bt: boolean, the aligned positions (ignored when ``S = 1``).
      ce_weight, kl_weight: scalars multiplying the CE sum and the divergence sum in the differentiated total.
      direction: ``"forward"`` or ``"reverse"``.

    Returns:
      ``(ce_sum, kl_sum, dlogits_btv)``: ``kl_sum`` is 0 when ``S = 1``; ``dlogits_btv`` has the policy logits'
      shape and dtype.
    """
    if direction not in CLOSED_FORM_DIRECTIONS:
        raise ValueError(f"_ce_divergence_and_grad: direction must be one of {CLOSED_FORM_DIRECTIONS}, "
                         f"got {direction!r}")
    # As jax.nn.log_softmax: shifted = z - max, log p = shifted - log(sum(exp(shifted))).
    zmax_sbt1 = jnp.max(logits_sbtv, axis=-1, keepdims=True)
    shifted_sbtv = logits_sbtv - zmax_sbt1
    # exp(shifted) once, shared by the normaliser and the probabilities (p = e / sum e). Two readers of an exp keep
    # it in its own vectorised loop fusion; with one reader XLA:CPU fused it into the YNNPACK reduction, which ran
    # the exponential ~10x slower per element (bench/README.md "Session 17").
    exp_sbtv = jnp.exp(shifted_sbtv)
    sumexp_sbt1 = jnp.sum(exp_sbtv, axis=-1, keepdims=True)
    logz_sbt1 = jnp.log(sumexp_sbt1)
    valid_bt = targets_bt != IGNORE_INDEX
    safe_bt = jnp.where(valid_bt, targets_bt, 0)
    # The target's logit is gathered from the logits themselves (no [B, T, V] log-prob buffer for the gather).
    picked_bt = jnp.take_along_axis(logits_sbtv[0], safe_bt[..., None], axis=-1)[..., 0]
    nll_bt = logz_sbt1[0, ..., 0] - (picked_bt - zmax_sbt1[0, ..., 0])
    ce_sum = jnp.sum(jnp.where(valid_bt, nll_bt, 0.0))
    logp_btv = shifted_sbtv[0] - logz_sbt1[0]
    p_btv = exp_sbtv[0] / sumexp_sbt1[0]
    onehot_btv = jax.lax.broadcasted_iota(safe_bt.dtype, p_btv.shape, p_btv.ndim - 1) == safe_bt[..., None]
    ce_w_bt1 = jnp.where(valid_bt, ce_weight, 0.0).astype(p_btv.dtype)[..., None]
    dlogits_btv = ce_w_bt1 * (p_btv - onehot_btv.astype(p_btv.dtype))
    if logits_sbtv.shape[0] == 1:
        return ce_sum, jnp.zeros((), ce_sum.dtype), dlogits_btv
    logr_btv = shifted_sbtv[1] - logz_sbt1[1]
    kl_w_bt1 = jnp.where(mask_bt, kl_weight, 0.0).astype(p_btv.dtype)[..., None]
    if direction == "forward":                           # KL(ref || policy)
        r_btv = exp_sbtv[1] / sumexp_sbt1[1]
        div_bt = sum_last_axis(r_btv * (logr_btv - logp_btv))
        dlogits_btv = dlogits_btv + kl_w_bt1 * (p_btv - r_btv)
    else:                                                # KL(policy || ref)
        div_bt = sum_last_axis(p_btv * (logp_btv - logr_btv))
        dlogits_btv = dlogits_btv + kl_w_bt1 * (p_btv * ((logp_btv - logr_btv) - div_bt[..., None]))
    kl_sum = jnp.sum(jnp.where(mask_bt, div_bt, 0.0))
    return ce_sum, kl_sum, dlogits_btv


def _safe_inverse(count: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """``1 / max(count, 1)``, so an empty selection gives a 0 term rather than NaN."""
    return 1.0 / jnp.maximum(count, 1).astype(dtype)


def _compute_dtype(*arrays: jax.Array) -> Any:
    """float32, or float64 when an input is float64 (``jax_enable_x64``): "upcast to (at least) float32"."""
    return jnp.result_type(jnp.float32, *(a.dtype for a in arrays))
