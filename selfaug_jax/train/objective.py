"""A method's training objective for one micro-batch: cross-entropy plus the method's loss terms.

``make_train_step(..., loss_fn=...)`` (``train/step.py``) accepts any function with :data:`LossFn`'s signature;
:func:`method_loss` is the default and reads the method's registry entry (:mod:`selfaug_jax.methods`):

    policy    = model_def.policy(trainable, frozen)                         # adapters on
    hidden    = policy.hidden_states(batch)                                 # [B, T, D]
    reference = model_def.reference(trainable, frozen)                      # stop-gradient, same step
    total     = CE + alpha * KL(p_ref || p_policy)[aligned positions]       # one fused chunked pass, never [B, T, V]
              + sum of the method's other terms

Two kinds of term:

* **logit terms** (:data:`LOGIT_TERMS`) align the policy's next-token distributions with the reference's on a set
  of positions. They are computed by the fused CE + KL loss (``loss.selfaug_loss_from_hidden``) in the same chunk
  loop as the cross-entropy; the table maps the term to the positions it aligns. A method has at most one.
* **additive terms** (:data:`ADDITIVE_TERMS`) are functions of a :class:`TermContext` returning their weighted
  value and metrics, added to the total. A term that needs per-layer features (:data:`TERM_TAPS`, e.g.
  ``features``) gets them from the forwards themselves: the reference runs first with the term's layer taps, and
  the policy's layer scan reduces its own taps against them (``selfaug_jax/models/taps.py``); the stacked per-layer
  results are ``TermContext.layer_taps``;
  a term that needs non-trained arrays computed once per run (e.g. the ``orth`` term's SVD bases of the base
  weights) registers a builder in :data:`TERM_CONSTANTS`; ``init_train_state`` stores its result in
  ``TrainState.constants[term]`` and the term reads ``ctx.constants[term]``.

``aux`` always holds ``ce``, ``kl``, ``n_target_tokens`` and ``n_aligned_tokens`` (both 0 for a method without a
logit term); additive terms add their own float scalars. Float entries are per-micro-batch values, int entries
token counts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from selfaug_jax import feature_loss
from selfaug_jax import loss as loss_lib
from selfaug_jax import orth_loss
from selfaug_jax.models.taps import LayerTaps

Batch = dict[str, jax.Array]
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
"""``loss_fn(model_def, config, trainable, frozen, batch, rng, normalizers) -> (total, aux)``.

``config`` is the step's ``StepConfig``; ``rng`` the dropout key (``None`` in evaluation); ``normalizers`` the
``(targets, aligned)`` token counts to divide sums by for token-weighted accumulation, or ``None`` for this
micro-batch's own counts (the released code). When the state carries term constants (``TrainState.constants``
non-empty) the step also passes them as the keyword ``constants=``; a loss function for methods without such terms
never receives it."""


@dataclasses.dataclass(frozen=True)
class TermContext:
    """What an additive loss term may look at (one micro-batch, inside the traced step)."""

    model_def: Any
    config: Any
    trainable: Any
    frozen: Any
    batch: Batch
    hidden_btd: jax.Array
    ref_hidden_btd: jax.Array | None
    normalizers: tuple[jax.Array, jax.Array] | None
    layer_taps: Any = None  # the policy scan's per-layer outputs for a term of TERM_TAPS (stacked [L, ...])
    constants: dict[str, Any] | None = None

    @property
    def batch_share(self) -> float:
        """This micro-batch's share of a per-batch (not per-token) term, e.g. a weight penalty: the step averages
        micro-batch totals in ``"mean"`` accumulation (share 1) and sums them in ``"token"`` accumulation (share
        ``1 / grad_accum_steps``), so the term counts once per optimizer step either way."""
        if getattr(self.config, "accum_normalization", "mean") == "token":
            return 1.0 / self.config.grad_accum_steps
        return 1.0


# logit term -> the ``align`` value of the fused loss (a function of the step config, so options can choose).
LOGIT_TERMS: dict[str, Callable[[Any], str]] = {
    "prompt_kl": lambda config: config.loss.align,
    # ASFT's positions (LLaMA-Factory asft_loss_func): logits predicting a response token, labels[t + 1] != -100.
    "response_kl": lambda config: "response",
}

# additive term -> fn(TermContext) -> (weighted value, {metric: float scalar}).
ADDITIVE_TERMS: dict[str, Callable[[TermContext], tuple[jax.Array, dict[str, jax.Array]]]] = {
    "features": feature_loss.feature_term,
    "orth": orth_loss.orth_term,
}

# additive term -> fn(step config, batch) -> the LayerTaps its forwards need: ``sites`` are tapped in the reference's
# layer scan, and ``reduce(policy taps, reference taps)`` runs per layer in the policy's (at most one such term).
TERM_TAPS: dict[str, Callable[[Any, Batch], LayerTaps]] = {
    "features": feature_loss.tap_request,
}

# term -> fn(model with adapters, Method, StepConfig | None) -> pytree of arrays, computed once by init_train_state.
TERM_CONSTANTS: dict[str, Callable[[Any, Any, Any], Any]] = {
    "orth": orth_loss.orth_constants,
}


def term_constants(model, spec, config) -> dict[str, Any]:
    """``{term: constants}`` for the terms of ``spec`` that have a :data:`TERM_CONSTANTS` builder (else ``{}``)."""
    return {t: TERM_CONSTANTS[t](model, spec, config) for t in spec.terms if t in TERM_CONSTANTS}


def logit_align(spec, config) -> str | None:
    """The ``align`` of the method's logit term (``None`` without one): the positions its KL is averaged over,
    e.g. for the aligned-token normaliser of token-weighted accumulation."""
    logit_term, _ = _split_terms(spec.terms)
    return None if logit_term is None else LOGIT_TERMS[logit_term](config)


def _split_terms(terms: tuple[str, ...]) -> tuple[str | None, tuple[str, ...]]:
    logit = [t for t in terms if t in LOGIT_TERMS]
    other = tuple(t for t in terms if t not in LOGIT_TERMS)
    unknown = [t for t in other if t not in ADDITIVE_TERMS]
    if unknown:
        raise ValueError(f"unknown loss term(s) {unknown}; known: {sorted(LOGIT_TERMS) + sorted(ADDITIVE_TERMS)}")
    if len(logit) > 1:
        raise ValueError(f"at most one logit-alignment term per method, got {logit}")
    if sum(t in TERM_TAPS for t in other) > 1:
        raise ValueError(f"at most one layer-tap term per method, got {[t for t in other if t in TERM_TAPS]}")
    return (logit[0] if logit else None), other


def method_loss(model_def, config, trainable, frozen, batch: Batch, rng, normalizers, *, constants=None):
    """The default :data:`LossFn`: CE plus the terms of ``model_def.spec`` (see the module docstring).

    ``constants``: ``TrainState.constants`` (``{term: pytree}``), for the terms that need them."""
    spec = model_def.spec
    logit_term, additive = _split_terms(spec.terms)
    kwargs = dict(
        attention_mask=batch["attention_mask_bt"],
        positions=batch.get("positions_bt"),
        segment_ids=batch.get("segment_ids_bt"),
    )
    policy = model_def.policy(trainable, frozen)
    reference = model_def.reference(trainable, frozen) if spec.uses_reference else None
    tapped = [TERM_TAPS[t](config, batch) for t in additive if t in TERM_TAPS]
    ref_hidden_btd = layer_taps = None
    if not tapped:
        hidden_btd = policy.hidden_states(batch["input_ids_bt"], dropout_rng=rng, **kwargs)
    else:  # the reference first: its taps are scan inputs of the policy's forward (only the reductions leave it)
        ref_hidden_btd, ref_taps = jax.lax.stop_gradient(reference.hidden_states(
            batch["input_ids_bt"], taps=LayerTaps(tapped[0].sites), **kwargs))
        hidden_btd, layer_taps = policy.hidden_states(
            batch["input_ids_bt"], dropout_rng=rng, taps=dataclasses.replace(tapped[0], xs=ref_taps), **kwargs)
    # The head in its stored layout ([V, D] for a tied embedding): the fused loss contracts it as it is, with no
    # transposed copy of the table (selfaug_jax/fused_loss.py, head_layout).
    layout = policy.lm_head_layout
    head = policy.lm_head_weight(layout)
    if spec.uses_lora:
        # The head is frozen (LoRA never adapts it; it is derived from `frozen`, which is not differentiated): under
        # stop_gradient the fused loss's custom VJP sees it unperturbed and skips the head-gradient matmuls.
        head = jax.lax.stop_gradient(head)
    cfg = config.loss
    n_target, n_aligned = normalizers if normalizers is not None else (None, None)
    if reference is not None and ref_hidden_btd is None:
        ref_hidden_btd = jax.lax.stop_gradient(reference.hidden_states(batch["input_ids_bt"], **kwargs))
    if logit_term is not None:
        # reference="base" (LoRA with the adapters off): the reference's head *is* the policy's frozen head (the
        # same `frozen` leaf; LoRA never adapts it), so the fused loss is told so (ref_lm_head_dv=None) and projects
        # the stacked policy and reference hidden states with one matmul per chunk instead of two, with one head
        # operand in its chunk loop (bench/README.md, session 12). reference="copy" (full fine-tuning) trains the
        # policy's head: the frozen copy's head is passed on its own.
        shared_head = spec.reference == "base"
        ref_head = None if shared_head else jax.lax.stop_gradient(reference.lm_head_weight(layout))
        fused = dict(cfg.fused_kwargs(), align=LOGIT_TERMS[logit_term](config))
        total, aux = loss_lib.selfaug_loss_from_hidden(
            hidden_btd,
            ref_hidden_btd,
            head,
            batch["labels_bt"],
            ref_lm_head_dv=ref_head,
            attention_mask_bt=batch["attention_mask_bt"],
            num_target_tokens=n_target,
            num_aligned_tokens=n_aligned,
            head_layout=layout,
            **fused,
        )
    else:
        total, aux = loss_lib.sft_loss_from_hidden(
            hidden_btd,
            head,
            batch["labels_bt"],
            num_target_tokens=n_target,
            head_layout=layout,
            **cfg.chunking_kwargs(),
        )
    aux = dict(aux)
    if additive:
        ctx = TermContext(model_def, config, trainable, frozen, batch, hidden_btd, ref_hidden_btd, normalizers,
                          layer_taps, constants)
        for name in additive:
            value, metrics = ADDITIVE_TERMS[name](ctx)
            total = total + value
            aux.update(metrics)
    return total, aux
