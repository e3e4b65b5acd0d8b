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
    if direction == "jsd" and beta == 0.0:
        direction = "forward"
    if direction == "jsd" and beta == 1.0:
        direction = "reverse"
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


def _safe_inverse(count: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """``1 / max(count, 1)``, so an empty selection gives a 0 term rather than NaN."""
    return 1.0 / jnp.maximum(count, 1).astype(dtype)


def _compute_dtype(*arrays: jax.Array) -> Any:
    """float32, or float64 when an input is float64 (``jax_enable_x64``): "upcast to (at least) float32"."""
    return jnp.result_type(jnp.float32, *(a.dtype for a in arrays))
