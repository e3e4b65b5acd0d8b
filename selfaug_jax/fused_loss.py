"""The fused SelfAug loss: from final hidden states and LM-head weight(s), chunked over tokens, never ``[B, T, V]``.

:func:`selfaug_loss_from_hidden` (and :func:`sft_loss_from_hidden`, its CE-only form) give the same values and
gradients as the dense reference losses of :mod:`selfaug_jax.loss` (:func:`~selfaug_jax.loss.selfaug_loss`,
:func:`~selfaug_jax.loss.sft_loss`; the semantics -- labels, CE and KL positions, options -- are documented there)
without materialising the logits: a ``lax.scan`` over token chunks projects both heads per chunk and takes a
per-chunk (full-vocab) log-softmax, so peak temporary memory is ``O(chunk_size x V)``. With
``grad_mode="precompute"`` (default) the gradients w.r.t. the policy hidden states and LM head are accumulated
inside the same chunk loop (a ``jax.custom_vjp``; the technique of Liger-Kernel's fused linear cross-entropy), so
value+grad costs the same four ``[N, D] x [D, V]`` matmuls as the unfused loss -- three when the head is not
differentiated (a frozen head, or one passed under ``stop_gradient``: the VJP's ``symbolic_zeros`` tell it, and it
skips the ``[D, V]`` gradient). ``grad_mode="remat"`` instead differentiates through a rematerialised
(``jax.checkpoint``) scan body: it recomputes both projections in the backward pass (six matmuls) but supports
higher-order and forward-mode differentiation.

The precompute chunk (``closed_form=True``, default) writes CE, the forward / reverse KL and their gradient w.r.t.
the policy logits in closed form (:func:`~selfaug_jax.loss_primitives._ce_divergence_and_grad`): one max, one
``exp`` and one sum over the stacked policy / reference logits, one matrix-vector sum for the divergence, one
elementwise pass for the gradient. When policy and reference share the head (every LoRA method), a single
``[2, B, t, D] x [D, V]`` matmul writes the stacked logits, so nothing copies two ``[B, t, V]`` arrays into one.
Autodiff of the per-token formulas (``closed_form=False``, and always for JSD, a temperature other than 1 or
``grad_mode="remat"``) reads and writes several more ``[B, t, V]`` intermediates. Measured on the 2-core CPU VM
(bench/README.md, session 11; 5 interleaved rounds, fresh process per arm): the SmolLM2 ``selfaug`` 4 x 256 step
with ``chunk_size=256`` (the new default) took 0.76-1.00x (median 0.86x) the time of the autodiff chunk at 512
tokens (the previous default); losses equal to 6 digits. The ``lora`` step (CE only, answer positions) was unchanged.

Skipping unweighted positions (``skip_unweighted=True``, the default; ``loss.skip_unweighted``): a position counts only
if it has a CE target or is aligned, so a chunk holding none is not projected at all (a ``lax.cond`` in the scan
body gives its zero sums and zero hidden gradient). When only the answer positions count -- every method without
an alignment term (``lora``, ``sft``, ...) and ``align="response"`` -- each sequence's weighted positions are first
moved to its front (a stable per-row reorder along T, never across the batch; the hidden gradient comes back through
the inverse reorder as a gather, not a scatter) and the loop steps in ``chunk_size / 4``-token chunks, so only
``ceil(longest answer / chunk)`` chunks are projected. The prompt-aligning choices weigh nearly every position and
keep their layout; they skip only chunks that are unweighted in place (a padded tail). Values equal the unskipped
ones up to float summation order. Measured on the shared 2-core CPU box under load (``python bench/loss_skip.py``:
SmolLM2's tied head D=576 V=49152, 4 x 256 with the last 25% answer, value+grad, arms interleaved in one process):
the CE-only loss 1.74 -> 0.48 CPU s, SelfAug's 3.23 -> 3.33 (noise: 3.23 -> 3.20 in another round). Whole train
step, both arms' steps interleaved in one process (bench/results/skip_unweighted_cpu.jsonl): quiet, ``lora``
13.51 -> 12.90 CPU s and 7.23 -> 6.83 s wall per step (-4.5% / -5.5%; under load: 14.26 -> 13.75, 14.54 -> 14.13 CPU
s), ``selfaug`` 17.86 -> 17.65 CPU s under load (unchanged; identical losses).

The functions are pure, jit-able, use static shapes and never sync with the host inside traced code; options are
Python values (static under ``jax.jit``). :mod:`selfaug_jax.loss` re-exports both functions, so
``from selfaug_jax.loss import selfaug_loss_from_hidden`` keeps working. This module builds on
:mod:`selfaug_jax.loss_primitives` (the per-token terms shared with the dense losses), :mod:`selfaug_jax.chunking`
and :mod:`selfaug_jax.loss_checks`, never on :mod:`selfaug_jax.loss` itself (no import cycle), and imports only
jax, numpy and the standard library.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from selfaug_jax.chunking import permute_time, selected_first, take_time, to_chunks
from selfaug_jax.loss_checks import (
    IGNORE_INDEX,
    check_fused_options,
    check_labels,
    check_logits,
    check_mask,
    check_options,
)
from selfaug_jax.loss_primitives import (
    HEAD_LAYOUTS,
    Align,
    Direction,
    GradMode,
    HeadLayout,
    CLOSED_FORM_DIRECTIONS,
    _align_mask_bt,
    _ce_divergence_and_grad,
    _ce_per_token,
    _compute_dtype,
    _divergence_per_token,
    _effective_direction,
    _safe_inverse,
    _shifted_targets_bt,
)

__all__ = ["SKIP_SPLIT", "selfaug_loss_from_hidden", "sft_loss_from_hidden"]


SKIP_SPLIT = 4
"""With ``skip_unweighted`` and answer-only weights, each ``chunk_size`` chunk is split into this many scan steps
(the unit of skipping): 64 tokens at the default 256. The ``lora`` step (answer-only) took the same time with 512 and
256-token chunks in session 11's interleaved A/B (bench/README.md)."""


def _answer_only(with_kl: bool, align: str) -> bool:
    """Whether only the answer (CE-target) positions carry weight (static): no alignment term, or ``align="response"``.

    Then ``skip_unweighted`` moves each sequence's weighted positions to its front and steps in finer chunks, so
    every chunk past the longest answer is skipped. The prompt-aligning choices weigh nearly every position (all but
    the last answer token; padding too unless excluded): they keep the positions and chunks as they are and skip
    only the chunks that are unweighted in place (e.g. a padded tail).
    """
    return not with_kl or align == "response"


def selfaug_loss_from_hidden(hidden_btd: jax.Array, ref_hidden_btd: jax.Array | None, lm_head_dv: jax.Array,
                             labels_bt: jax.Array, *, ref_lm_head_dv: jax.Array | None = None,
                             chunk_size: int = 256, grad_mode: GradMode = "precompute", alpha: float = 0.5,
                             direction: Direction = "forward", beta: float = 0.5, temperature: float = 1.0,
                             align: Align = "prompt", include_padding: bool = True,
                             attention_mask_bt: jax.Array | None = None,
                             num_target_tokens: jax.Array | int | None = None,
                             num_aligned_tokens: jax.Array | int | None = None,
                             head_layout: HeadLayout = "dv", skip_unweighted: bool = True,
                             closed_form: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Memory-efficient SelfAug loss from final hidden states; same values/gradients as :func:`selfaug_loss`.

    The logits are ``hidden @ lm_head`` computed in float32 (``preferred_element_type``; float64 for float64
    inputs), one chunk of positions at a time inside a ``lax.scan``: peak temporary memory is a few
    ``[B * chunk_t, V]`` float32 buffers (plus, when differentiating the head with ``grad_mode="precompute"``, the
    ``[D, V]`` float32 head-gradient accumulator) instead of several ``[B, T, V]`` ones. The default ``chunk_size=256``
    keeps value+grad at the Qwen2.5-0.5B shape (D=896, V=151936) near 0.84 GB of temporaries, 1/65 of the unfused
    loss (1.62 GB at 512; ``bench/loss_memory.py``, bench/results/loss_memory_session11_chunk*_cpu.md).

    Args:
      hidden_btd: ``[B, T, D]`` policy final hidden states (after the final norm; any float dtype).
      ref_hidden_btd: ``[B, T, D]`` reference final hidden states; no gradient flows into them.
      lm_head_dv: ``[D, V]`` policy LM-head weight (``embed.T`` when tied).
      labels_bt: ``[B, T]`` labels, ``-100`` = no target.
      ref_lm_head_dv: ``[D, V]`` reference LM head; ``None`` = ``lm_head_dv`` (LoRA leaves the head untouched).
        No gradient flows into it.
      chunk_size: approximate number of tokens projected per scan step: each step takes
        ``chunk_t = ceil(chunk_size / B)`` positions of every sequence (the batch axis is never split, so batch
        sharding is preserved). ``T`` need not be a multiple of ``chunk_t``.
      grad_mode: ``"precompute"`` (gradients accumulated in the forward chunk loop via ``jax.custom_vjp``; fastest,
        first-order reverse-mode only) or ``"remat"`` (autodiff through a ``jax.checkpoint``-ed scan body).
      alpha, direction, beta, temperature, align, include_padding, attention_mask_bt: as in :func:`selfaug_loss`.
      num_target_tokens, num_aligned_tokens: optional denominators for the CE / KL sums instead of this batch's own
        counts -- e.g. the counts of a whole accumulated batch (:func:`token_counts`), so that summing the
        micro-batch losses gives the big-batch loss. ``aux`` then holds the partial (micro-batch) terms.
      skip_unweighted: skip the chunks holding no position with a CE target or an aligned KL position (see the
        module docstring); ``False`` projects every position as before.
      head_layout: ``"dv"`` (default): both heads are ``[D, V]``; ``"vd"``: both are ``[V, D]``, e.g. a tied
        embedding table passed as stored (``DecoderLM.lm_head_layout``). The chunk loop's matmuls then contract the
        table's own axis: a ``[D, V]`` view made by transposing outside the loop is a loop operand that XLA:CPU
        materialises as a transposed copy for the whole step (113 MB for SmolLM2's fp32 table; bench/README.md,
        session 6). Values are the same; the head gradient comes back in the head's layout.
      closed_form: with ``grad_mode="precompute"``, temperature 1 and CE only or a forward / reverse KL (JSD with
        ``beta`` 0 or 1 included), each chunk takes the CE, the divergence and the policy-logit gradient in closed
        form (:func:`~selfaug_jax.loss_primitives._ce_divergence_and_grad`) from *one* projection of the stacked
        policy and reference hidden states when they share the head: no autodiff of ``log_softmax``, no separate
        ``logsumexp`` for the CE, no copy stacking two logit arrays. ``False`` keeps the autodiff chunk (for A/B
        measurements; same values up to float rounding). Other options always take the autodiff chunk.

    Returns:
      ``(total, aux)`` exactly as :func:`selfaug_loss`. Gradients flow to ``hidden_btd`` and ``lm_head_dv`` only.
      With ``ref_hidden_btd=None`` there is no alignment term (plain CE; see :func:`sft_loss_from_hidden`).
    """
    where = "selfaug_loss_from_hidden"
    with_kl = ref_hidden_btd is not None
    if not with_kl:
        ref_hidden_btd = hidden_btd  # placeholder of the right shape: never projected (dead code for XLA)
        alpha = 0.0
    check_options(alpha=alpha, direction=direction, beta=beta, temperature=temperature, align=align,
                  include_padding=include_padding, where=where)
    check_fused_options(chunk_size, grad_mode, where=where, skip_unweighted=skip_unweighted)
    for name, x in (("hidden_btd", hidden_btd), ("ref_hidden_btd", ref_hidden_btd)):
        check_logits(x, name, where)
    if ref_hidden_btd.shape != hidden_btd.shape:
        raise ValueError(f"{where}: ref_hidden_btd shape {ref_hidden_btd.shape} != hidden_btd shape "
                         f"{hidden_btd.shape}")
    b, t, d = hidden_btd.shape
    if head_layout not in HEAD_LAYOUTS:
        raise ValueError(f"{where}: head_layout must be one of {HEAD_LAYOUTS}, got {head_layout!r}")
    d_axis = head_layout.index("d")
    heads = (lm_head_dv,) if ref_lm_head_dv is None else (lm_head_dv, ref_lm_head_dv)
    for name, w in zip(("lm_head_dv", "ref_lm_head_dv"), heads):
        if getattr(w, "ndim", None) != 2 or w.shape[d_axis] != d:
            want = f"[D={d}, V]" if head_layout == "dv" else f"[V, D={d}] (head_layout='vd')"
            raise ValueError(f"{where}: {name} must have shape {want}; got {getattr(w, 'shape', None)}")
        if not jnp.issubdtype(w.dtype, jnp.floating):
            raise TypeError(f"{where}: {name} must be a floating array, got dtype {w.dtype}")
    vocab = lm_head_dv.shape[1 - d_axis]
    if len(heads) == 2 and ref_lm_head_dv.shape != lm_head_dv.shape:
        raise ValueError(f"{where}: ref_lm_head_dv shape {ref_lm_head_dv.shape} != lm_head_dv shape "
                         f"{lm_head_dv.shape}")
    check_labels(labels_bt, (b, t), vocab, where)
    check_mask(attention_mask_bt, (b, t), align=align, include_padding=include_padding, where=where)

    targets_bt = _shifted_targets_bt(labels_bt)
    mask_bt = _align_mask_bt(labels_bt, attention_mask_bt, align, include_padding)
    n_target = jnp.sum(targets_bt != IGNORE_INDEX, dtype=jnp.int32)
    n_aligned = jnp.sum(mask_bt, dtype=jnp.int32)
    dtype = _compute_dtype(hidden_btd, ref_hidden_btd, *heads)
    inv_target = _safe_inverse(n_target if num_target_tokens is None else num_target_tokens, dtype)
    inv_aligned = _safe_inverse(n_aligned if num_aligned_tokens is None else num_aligned_tokens, dtype)
    inv = (inv_target, inv_aligned)

    chunk_t = min(t, max(1, -(-chunk_size // b)))
    sparse = skip_unweighted and _answer_only(with_kl, align)
    if sparse:
        chunk_t = -(-chunk_t // SKIP_SPLIT)
    ref_hidden_btd = jax.lax.stop_gradient(ref_hidden_btd)
    active_c = None  # per chunk: does it hold a weighted position (None: every chunk is computed)
    if skip_unweighted:
        weight_bt = targets_bt != IGNORE_INDEX
        if with_kl:
            weight_bt = weight_bt | mask_bt
        if sparse:
            perm_bt, dest_bt = selected_first(weight_bt)
            hidden_btd = permute_time(hidden_btd, perm_bt, dest_bt)
            ref_hidden_btd = permute_time(ref_hidden_btd, perm_bt, dest_bt) if with_kl else hidden_btd
            targets_bt, mask_bt, weight_bt = (take_time(x, perm_bt) for x in (targets_bt, mask_bt, weight_bt))
        active_c = jnp.any(to_chunks(weight_bt, chunk_t, False), axis=(1, 2))
    h_cbtd = to_chunks(hidden_btd, chunk_t)
    rh_cbtd = to_chunks(ref_hidden_btd, chunk_t)
    tgt_cbt = to_chunks(targets_bt, chunk_t, IGNORE_INDEX)
    msk_cbt = to_chunks(mask_bt, chunk_t, False)
    div_kw = dict(direction=direction, beta=beta, temperature=temperature)

    hl = head_layout  # einsum subscripts of the head: "dv" or "vd"
    direction = _effective_direction(direction, beta)  # JSD at beta 0 / 1 is a KL: closed form too
    closed = (closed_form and grad_mode == "precompute" and temperature == 1.0
              and (not with_kl or direction in CLOSED_FORM_DIRECTIONS))

    def project_stacked(h_btd: jax.Array, rh_btd: jax.Array, hs) -> jax.Array:
        """``[S, B, T, V]`` logits: the policy's (``S = 1``), or policy and reference (``S = 2``). A shared head
        projects the stacked hidden states in one matmul, which writes the stacked logits directly."""
        if not with_kl:
            return project(h_btd, hs[0])[None]
        if len(hs) == 1:
            both_sbtd = jnp.stack([h_btd, rh_btd.astype(h_btd.dtype)])
            return jnp.einsum(f"sbtd,{hl}->sbtv", both_sbtd, hs[0], preferred_element_type=dtype)
        return jnp.stack([project(h_btd, hs[0]), project(rh_btd, hs[1])])

    def closed_terms(h_c, rh_c, hs, tgt_c, msk_c, inv):
        """(CE sum, KL sum, d total / d policy logits) of one chunk in closed form."""
        return _ce_divergence_and_grad(project_stacked(h_c, rh_c, hs), tgt_c, msk_c, inv[0], alpha * inv[1],
                                       direction=direction)

    def project(h_btd: jax.Array, w_dv: jax.Array) -> jax.Array:
        return jnp.einsum(f"btd,{hl}->btv", h_btd, w_dv, preferred_element_type=dtype)

    def chunk_terms(logits_btv, ref_logits_btv, tgt_bt, msk_bt, inv):
        """(weighted total, (CE sum, KL sum)) of one chunk from its float32 logits; ``inv`` = 1/counts."""
        ce_sum = jnp.sum(_ce_per_token(logits_btv, tgt_bt))
        if not with_kl:
            return ce_sum * inv[0], (ce_sum, jnp.zeros((), ce_sum.dtype))
        div_bt = _divergence_per_token(logits_btv, ref_logits_btv, **div_kw)
        kl_sum = jnp.sum(jnp.where(msk_bt, div_bt, 0.0))
        return ce_sum * inv[0] + alpha * kl_sum * inv[1], (ce_sum, kl_sum)

    def ref_logits_of(rh_btd, hs):
        if not with_kl:
            return None
        return jax.lax.stop_gradient(project(rh_btd, jax.lax.stop_gradient(hs[-1])))

    zero = jnp.zeros((), dtype)

    def combine(ce_sum, kl_sum, inv):
        # Same formula as the unfused loss (ce + alpha * kl), so e.g. total == ce exactly when kl == 0.
        return ce_sum * inv[0] + alpha * (kl_sum * inv[1])

    def if_active(act, live, dead, *operands):
        """``live(*operands)`` for a chunk with a weighted position, else ``dead(*operands)`` (its zero result)."""
        if act is None:
            return live(*operands)
        return jax.lax.cond(act, live, dead, *operands)

    def value_scan(h, rh, hs, tgt, msk, act, inv):
        """(CE sum, KL sum) over all chunks; differentiable (used by grad_mode="remat" and as the primal)."""
        def body(carry, xs):
            h_c, rh_c, tgt_c, msk_c, act_c = xs

            def live():
                if closed:  # the gradient output is dead code here (XLA drops it)
                    return closed_terms(h_c, rh_c, hs, tgt_c, msk_c, inv)[:2]
                _, sums = chunk_terms(project(h_c, hs[0]), ref_logits_of(rh_c, hs), tgt_c, msk_c, inv)
                return sums
            ce_s, kl_s = if_active(act_c, live, lambda: (zero, zero))
            return (carry[0] + ce_s, carry[1] + kl_s), None
        if grad_mode == "remat":
            body = jax.checkpoint(body)
        sums, _ = jax.lax.scan(body, (zero, zero), (h, rh, tgt, msk, act))
        return sums

    if grad_mode == "remat":
        ce_sum, kl_sum = value_scan(h_cbtd, rh_cbtd, heads, tgt_cbt, msk_cbt, active_c, inv)
        total = combine(ce_sum, kl_sum, inv)
    else:
        @jax.custom_vjp
        def fused(h, rh, hs, tgt, msk, act, inv):
            ce_s, kl_s = value_scan(h, rh, hs, tgt, msk, act, inv)
            return combine(ce_s, kl_s, inv), ce_s, kl_s

        def fused_fwd(h, rh, hs, tgt, msk, act, inv):
            # symbolic_zeros=True: every leaf arrives as CustomVJPPrimal(value, perturbed). An input that is not
            # being differentiated (a frozen LM head -- every LoRA method, e.g. SmolLM2's tied embedding -- or a
            # head passed under stop_gradient) gets no gradient work: no [D, V] accumulator, no per-chunk
            # h^T @ dlogits matmul, independent of whether XLA would find the dead loop carry.
            want_dh, want_dw = h.perturbed, hs[0].perturbed
            h, rh, hs, tgt, msk, act, inv = jax.tree.map(lambda p: p.value, (h, rh, hs, tgt, msk, act, inv),
                                                         is_leaf=lambda x: isinstance(x, CustomVJPPrimal))
            w_dv = hs[0]

            def body(carry, xs):
                ce_acc, kl_acc, dw_acc = carry
                h_c, rh_c, tgt_c, msk_c, act_c = xs

                def live(dw_acc):
                    if closed:
                        ce_s, kl_s, dlogits_btv = closed_terms(h_c, rh_c, hs, tgt_c, msk_c, inv)
                    else:
                        ref_c = ref_logits_of(rh_c, hs)
                        _, vjp_fn, (ce_s, kl_s) = jax.vjp(lambda lg: chunk_terms(lg, ref_c, tgt_c, msk_c, inv),
                                                            project(h_c, w_dv), has_aux=True)
                        (dlogits_btv,) = vjp_fn(jnp.ones((), dtype))
                    dh_c = None
                    if want_dh:
                        # With a 16-bit head the chunk's dlogits are rounded to the head's dtype for this matmul
                        # (float32 accumulation), as autograd does for a bf16 torch lm_head: multiplying float32
                        # dlogits would promote the whole [D, V] head to a float32 copy (2.2 GB at Qwen2.5-7B's
                        # D x V), which XLA keeps live for the step (docs/SCALING.md section 7). Float32 / float64
                        # heads: unchanged.
                        dl_btv = dlogits_btv.astype(w_dv.dtype) if jnp.finfo(w_dv.dtype).bits < 32 else dlogits_btv
                        dh_c = jnp.einsum(f"btv,{hl}->btd", dl_btv, w_dv, preferred_element_type=dtype)
                        dh_c = dh_c.astype(h.dtype)
                    if want_dw:
                        dw_acc = dw_acc + jnp.einsum(f"btd,btv->{hl}", h_c, dlogits_btv, preferred_element_type=dtype)
                    return ce_s, kl_s, dw_acc, dh_c

                def dead(dw_acc):  # no weighted position: zero sums, zero hidden gradient, head gradient unchanged
                    return zero, zero, dw_acc, (jnp.zeros(h_c.shape, h.dtype) if want_dh else None)

                ce_s, kl_s, dw_acc, dh_c = if_active(act_c, live, dead, dw_acc)
                return (ce_acc + ce_s, kl_acc + kl_s, dw_acc), dh_c

            init = (zero, zero, jnp.zeros(w_dv.shape, dtype) if want_dw else None)
            (ce_s, kl_s, dw), dh = jax.lax.scan(body, init, (h, rh, tgt, msk, act))
            dw = None if dw is None else dw.astype(w_dv.dtype)
            return (combine(ce_s, kl_s, inv), ce_s, kl_s), (dh, dw)

        def fused_bwd(res, cotangents):
            dh, dw = res
            g = cotangents[0]  # the CE / KL sums are returned with stop_gradient: their cotangents are zero
            if isinstance(g, SymbolicZero):
                g = jnp.zeros((), dtype)
            d_h = None if dh is None else g.astype(dh.dtype) * dh
            d_heads = (None if dw is None else g.astype(dw.dtype) * dw,) + (None,) * (len(heads) - 1)
            return d_h, None, d_heads, None, None, None, None

        fused.defvjp(fused_fwd, fused_bwd, symbolic_zeros=True)
        total, ce_sum, kl_sum = fused(h_cbtd, rh_cbtd, heads, tgt_cbt, msk_cbt, active_c, inv)

    ce = jax.lax.stop_gradient(ce_sum) * inv_target
    kl = jax.lax.stop_gradient(kl_sum) * inv_aligned
    aux = dict(ce=ce, kl=kl, n_target_tokens=n_target, n_aligned_tokens=n_aligned if with_kl else jnp.int32(0))
    return total, aux


def sft_loss_from_hidden(hidden_btd: jax.Array, lm_head_dv: jax.Array, labels_bt: jax.Array, *,
                         chunk_size: int = 256, grad_mode: GradMode = "precompute",
                         num_target_tokens: jax.Array | int | None = None,
                         head_layout: HeadLayout = "dv",
                         skip_unweighted: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Memory-efficient :func:`sft_loss` from hidden states (the ``lora`` / ``sft`` baselines); never builds [B,T,V].

    Returns ``(ce, aux)`` with the same ``aux`` keys as :func:`selfaug_loss` (``kl`` = 0, ``n_aligned_tokens`` = 0).
    ``num_target_tokens``, ``head_layout`` and ``skip_unweighted`` as in :func:`selfaug_loss_from_hidden`.
    """
    return selfaug_loss_from_hidden(hidden_btd, None, lm_head_dv, labels_bt, chunk_size=chunk_size,
                                    grad_mode=grad_mode, num_target_tokens=num_target_tokens,
                                    head_layout=head_layout, skip_unweighted=skip_unweighted)
