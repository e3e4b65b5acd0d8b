"""The SelfAug objective: SFT cross-entropy + alignment of the prompt-token logits to the original model.

SelfAug (arXiv 2509.03934) fine-tunes with LoRA and adds a KL term that keeps the fine-tuned ("policy") model's
next-token distributions on the *input* (prompt) tokens close to those of the original ("reference") model. This
module reproduces the released implementation (USTC-StarTeam/SelfAug, ``Code/modeling_qwen2.py``) exactly:

* **Labels** follow the Hugging Face convention: ``-100`` marks positions without a target. Prompt tokens (system
  prompt, chat template, retrieved documents, question, assistant header) and padding are ``-100``; response
  tokens and the end-of-turn token keep their ids.
* **CE** is the standard HF causal-LM loss, ``logits[:, :-1]`` against ``labels[:, 1:]``, averaged over all targets
  ``!= -100`` of the micro-batch (pooled, not per sequence).
* **KL** is taken at the *unshifted* positions ``t`` with ``labels[t] == -100``, using the logits at ``t`` (which
  predict ``t + 1``): ``KL(p_ref || p_policy) = sum_v p_ref (log p_ref - log p_policy)`` over the full vocabulary at
  temperature 1, averaged over the selected positions pooled over the micro-batch (torch ``KLDivLoss('batchmean')``
  applied to the selected rows). The last prompt position is therefore in both CE and KL, and ``-100``-labelled
  padding is aligned too (the released code ignores ``attention_mask``). Both logit tensors are upcast to float32
  (float64 inputs under ``jax_enable_x64`` stay float64) and ``p_ref`` carries no gradient.
* **total** = ``CE + alpha * KL`` with ``alpha = 0.5`` (hard-coded in the released code; the paper recommends
  0.3 to 0.5).

Options beyond the released code (the defaults above are unchanged by them):

* ``direction="reverse"``: ``KL(p_policy || p_ref)``, the direction the paper's text writes.
* ``direction="jsd"`` with ``beta``: the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024,
  arXiv 2306.13649, eq. 1), with the convention of TRL's ``GKDTrainer.generalized_jsd_loss``:
  ``JSD_beta = beta * KL(p_ref || M) + (1 - beta) * KL(p_policy || M)`` with ``M = beta * p_ref + (1 - beta) *
  p_policy``; ``beta = 0`` is exactly the forward KL and ``beta = 1`` exactly the reverse KL (for ``0 < beta < 1``
  the value is a JSD, which shrinks like ``beta * KL`` near the ends, so the endpoints are special-cased as in TRL).
* ``temperature``: both distributions of the alignment term are ``softmax(logits / temperature)`` (no ``T**2``
  rescaling; the CE term always uses the raw logits).
* ``align``: which positions are aligned: ``"prompt"`` (labels == -100, the default), ``"prompt_without_padding"``
  (also requires ``attention_mask_bt == 1``), ``"all"`` (every position) or ``"response"``: the positions ``t``
  whose logits predict a response token, ``labels[t + 1] != -100`` -- exactly the CE positions, as LLaMA-Factory's
  ASFT aligns them (``asft_loss_func`` in ``train/trainer_utils.py`` shifts logits, reference logits and labels
  together and keeps ``shift_labels != -100``). ``"prompt"`` and ``"response"`` together cover every non-padding
  position, and share one: the last prompt position, whose logits predict the first response token.
  ``include_padding=False`` removes ``attention_mask_bt == 0`` positions from any choice.

A batch with no target (or no aligned) position gives 0 for that term, never NaN; ``aux`` reports the counts.

Two implementations with the same values and gradients:

* :func:`selfaug_loss` (and :func:`sft_loss`, :func:`selfaug_kl`) take materialised ``[B, T, V]`` logits; they are
  defined here and are the reference the fused loss is tested against.
* :func:`selfaug_loss_from_hidden` (and :func:`sft_loss_from_hidden`) take final hidden states and the LM-head
  weight(s) and never materialise ``[B, T, V]``: a ``lax.scan`` over token chunks with the gradients accumulated in
  the same loop (``grad_mode``) and the chunks without a weighted position skipped (``skip_unweighted``). They live
  in :mod:`selfaug_jax.fused_loss` (whose docstring has the details and measurements) and are re-exported here.

Module layout: this module (the user-facing API: :class:`SelfAugLossConfig`, the dense losses, :func:`token_counts`,
and the re-exports) builds on :mod:`selfaug_jax.loss_primitives` (option types, masks and per-token terms shared by
both implementations), :mod:`selfaug_jax.fused_loss`, :mod:`selfaug_jax.loss_checks` (input validation) and,
through the fused loss, :mod:`selfaug_jax.chunking`.

All functions are pure, jit-able, use static shapes and never sync with the host inside traced code. Options are
Python values (static under ``jax.jit``). These modules import only jax, numpy and the standard library.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from selfaug_jax.fused_loss import SKIP_SPLIT, selfaug_loss_from_hidden, sft_loss_from_hidden  # noqa: F401 (re-export)
from selfaug_jax.loss_checks import (
    IGNORE_INDEX,
    check_fused_options,
    check_labels,
    check_logits,
    check_logits_pair,
    check_options,
)
from selfaug_jax.loss_primitives import (  # noqa: F401 (the types and HEAD_LAYOUTS are re-exported)
    HEAD_LAYOUTS,
    Align,
    Direction,
    GradMode,
    HeadLayout,
    _align_mask_bt,
    _ce_per_token,
    _compute_dtype,
    _divergence_per_token,
    _safe_inverse,
    _shifted_targets_bt,
)

__all__ = [
    "IGNORE_INDEX",
    "SelfAugLossConfig",
    "sft_loss",
    "selfaug_kl",
    "selfaug_loss",
    "selfaug_loss_from_hidden",
    "sft_loss_from_hidden",
    "token_counts",
]


@dataclasses.dataclass(frozen=True)
class SelfAugLossConfig:
    """All options of the SelfAug loss in one place (e.g. for an experiment YAML).

    ``selfaug_loss(..., **cfg.loss_kwargs())`` and ``selfaug_loss_from_hidden(..., **cfg.fused_kwargs())`` apply it.
    The defaults are the released code's: forward KL(ref || policy), alpha 0.5, temperature 1, prompt positions
    including padding.
    """

    alpha: float = 0.5
    direction: Direction = "forward"
    beta: float = 0.5
    temperature: float = 1.0
    align: Align = "prompt"
    include_padding: bool = True
    chunk_size: int = 256
    grad_mode: GradMode = "precompute"
    # The fused loss skips the vocabulary projections (and gradient matmuls) of chunks holding no position with a CE
    # target or an aligned KL position, after moving each sequence's weighted positions to its front: the CE-only
    # methods (lora, sft, ...) project only their answer tokens. Same values up to float summation order.
    skip_unweighted: bool = True

    def __post_init__(self) -> None:
        check_options(alpha=self.alpha, direction=self.direction, beta=self.beta, temperature=self.temperature,
                      align=self.align, include_padding=self.include_padding, where="SelfAugLossConfig")
        check_fused_options(self.chunk_size, self.grad_mode, where="SelfAugLossConfig",
                            skip_unweighted=self.skip_unweighted)

    def loss_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`selfaug_loss` (everything except the fused-only fields)."""
        return dict(alpha=self.alpha, direction=self.direction, beta=self.beta, temperature=self.temperature,
                    align=self.align, include_padding=self.include_padding)

    def chunking_kwargs(self) -> dict[str, Any]:
        """The fused-only fields (how the vocabulary projection is chunked and differentiated): keyword arguments
        of both :func:`selfaug_loss_from_hidden` and :func:`sft_loss_from_hidden`."""
        return dict(chunk_size=self.chunk_size, grad_mode=self.grad_mode, skip_unweighted=self.skip_unweighted)

    def fused_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`selfaug_loss_from_hidden`."""
        return dict(self.loss_kwargs(), **self.chunking_kwargs())


# ----------------------------------------------------------------------------------------------------------------
# Unfused API: materialised [B, T, V] logits.


def sft_loss(logits_btv: jax.Array, labels_bt: jax.Array) -> jax.Array:
    """Hugging Face causal-LM cross-entropy: ``logits[:, :-1]`` vs ``labels[:, 1:]``.

    Args:
      logits_btv: ``[B, T, V]`` policy logits (any float dtype; upcast to float32).
      labels_bt: ``[B, T]`` integer labels, ``-100`` = no target.

    Returns:
      Float32 scalar: mean negative log-likelihood over all targets ``!= -100`` of the batch (pooled over
      sequences); 0 when there is no target.
    """
    check_logits(logits_btv, "logits_btv", "sft_loss")
    check_labels(labels_bt, tuple(logits_btv.shape[:2]), logits_btv.shape[2], "sft_loss")
    targets_bt = _shifted_targets_bt(labels_bt)
    dtype = _compute_dtype(logits_btv)
    nll_bt = _ce_per_token(logits_btv.astype(dtype), targets_bt)
    return jnp.sum(nll_bt) * _safe_inverse(jnp.sum(targets_bt != IGNORE_INDEX), dtype)


def selfaug_kl(logits_btv: jax.Array, ref_logits_btv: jax.Array, labels_bt: jax.Array, *,
               direction: Direction = "forward", beta: float = 0.5, temperature: float = 1.0,
               align: Align = "prompt", include_padding: bool = True,
               attention_mask_bt: jax.Array | None = None) -> jax.Array:
    """SelfAug alignment term: mean divergence over the aligned (by default: prompt, ``labels == -100``) positions.

    Args:
      logits_btv: ``[B, T, V]`` policy (fine-tuned) logits.
      ref_logits_btv: ``[B, T, V]`` reference (original-model) logits; no gradient flows into them.
      labels_bt: ``[B, T]`` labels (``-100`` = prompt / padding), used *unshifted*.
      direction: ``"forward"`` = KL(ref || policy) (released code), ``"reverse"`` = KL(policy || ref) (paper text),
        ``"jsd"`` = generalized JSD with ``beta`` (0 = forward, 1 = reverse).
      beta: JSD mixing weight of the reference, only used by ``direction="jsd"``.
      temperature: both distributions are ``softmax(logits / temperature)``.
      align: ``"prompt"`` (``labels[t] == -100``), ``"prompt_without_padding"``, ``"all"`` or ``"response"``
        (``labels[t + 1] != -100``: the positions predicting a response token, as ASFT) positions.
      include_padding: ``False`` drops positions with ``attention_mask_bt == 0``.
      attention_mask_bt: ``[B, T]`` 1 = real token, 0 = padding; needed only by the padding-excluding options.

    Returns:
      Float32 scalar: the divergence averaged over the selected positions pooled over the batch ("batchmean" of
      the selected rows); 0 when no position is selected.
    """
    where = "selfaug_kl"
    check_options(alpha=0.0, direction=direction, beta=beta, temperature=temperature, align=align,
                  include_padding=include_padding, where=where)
    check_logits_pair(logits_btv, ref_logits_btv, labels_bt, attention_mask_bt, align=align,
                      include_padding=include_padding, where=where)
    mask_bt = _align_mask_bt(labels_bt, attention_mask_bt, align, include_padding)
    dtype = _compute_dtype(logits_btv, ref_logits_btv)
    div_bt = _divergence_per_token(logits_btv.astype(dtype), ref_logits_btv.astype(dtype),
                                   direction=direction, beta=beta, temperature=temperature)
    return jnp.sum(jnp.where(mask_bt, div_bt, 0.0)) * _safe_inverse(jnp.sum(mask_bt), dtype)


def selfaug_loss(logits_btv: jax.Array, ref_logits_btv: jax.Array, labels_bt: jax.Array, *, alpha: float = 0.5,
                 direction: Direction = "forward", beta: float = 0.5, temperature: float = 1.0,
                 align: Align = "prompt", include_padding: bool = True,
                 attention_mask_bt: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SelfAug objective ``CE + alpha * KL`` from materialised logits.

    Args:
      logits_btv, ref_logits_btv, labels_bt: as in :func:`selfaug_kl` (the CE uses the HF shift of :func:`sft_loss`).
      alpha: weight of the alignment term (released code: 0.5).
      direction, beta, temperature, align, include_padding, attention_mask_bt: see :func:`selfaug_kl`.

    Returns:
      ``(total, aux)``: float32 (float64 for float64 inputs) scalar total, and ``aux`` with ``ce`` and ``kl`` and int32
      ``n_target_tokens`` (CE targets) and ``n_aligned_tokens`` (KL positions). ``aux`` values are for monitoring
      and carry no gradient (differentiate :func:`sft_loss` / :func:`selfaug_kl` for the parts).
    """
    where = "selfaug_loss"
    check_options(alpha=alpha, direction=direction, beta=beta, temperature=temperature, align=align,
                  include_padding=include_padding, where=where)
    check_logits_pair(logits_btv, ref_logits_btv, labels_bt, attention_mask_bt, align=align,
                      include_padding=include_padding, where=where)

    dtype = _compute_dtype(logits_btv, ref_logits_btv)
    logits_f32 = logits_btv.astype(dtype)
    targets_bt = _shifted_targets_bt(labels_bt)
    mask_bt = _align_mask_bt(labels_bt, attention_mask_bt, align, include_padding)
    n_target = jnp.sum(targets_bt != IGNORE_INDEX, dtype=jnp.int32)
    n_aligned = jnp.sum(mask_bt, dtype=jnp.int32)
    ce = jnp.sum(_ce_per_token(logits_f32, targets_bt)) * _safe_inverse(n_target, dtype)
    div_bt = _divergence_per_token(logits_f32, ref_logits_btv.astype(dtype), direction=direction,
                                   beta=beta, temperature=temperature)
    kl = jnp.sum(jnp.where(mask_bt, div_bt, 0.0)) * _safe_inverse(n_aligned, dtype)
    total = ce + alpha * kl
    aux = dict(ce=jax.lax.stop_gradient(ce), kl=jax.lax.stop_gradient(kl), n_target_tokens=n_target,
               n_aligned_tokens=n_aligned)
    return total, aux


# ----------------------------------------------------------------------------------------------------------------
# Denominators for token-weighted accumulation (shared by both implementations; the fused losses are re-exported
# from selfaug_jax.fused_loss at the top of this module).


def token_counts(labels_bt: jax.Array, attention_mask_bt: jax.Array | None = None, *, align: Align = "prompt",
                 include_padding: bool = True) -> tuple[jax.Array, jax.Array]:
    """``(n_target_tokens, n_aligned_tokens)`` (int32) of a batch: the CE and KL denominators of the loss.

    Use them as ``num_target_tokens`` / ``num_aligned_tokens`` of every micro-batch of an accumulated batch to get
    token-weighted (big-batch-equivalent) accumulation.
    """
    targets_bt = _shifted_targets_bt(labels_bt)
    mask_bt = _align_mask_bt(labels_bt, attention_mask_bt, align, include_padding)
    return jnp.sum(targets_bt != IGNORE_INDEX, dtype=jnp.int32), jnp.sum(mask_bt, dtype=jnp.int32)
