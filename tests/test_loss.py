"""Tests for selfaug_jax.loss against an independent float64 NumPy reference, the released code's torch ops,
the fused (hidden-state) implementation, and the objective's properties. Tiny shapes; runs in seconds."""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfaug_jax.loss import (IGNORE_INDEX, SelfAugLossConfig, selfaug_kl, selfaug_loss, selfaug_loss_from_hidden,
                              sft_loss_from_hidden, token_counts,
                              sft_loss)
from jaxpr_tools import dot_output_shapes

# ----------------------------------------------------------------------------------------------------------------
# Data: several sequences with different prompt lengths, -100 prompt prefixes, responses, -100 trailing padding.

B, T, V, D = 4, 13, 11, 16
PROMPT_LENS = (3, 6, 1, 9)      # -100 prefix per sequence
RESPONSE_LENS = (7, 4, 12, 2)   # real response tokens; the rest of T is -100 padding (attention 0)


def make_batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.full((B, T), IGNORE_INDEX, np.int64)
    mask = np.zeros((B, T), np.int64)
    for b, (p, r) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
        labels[b, p:p + r] = rng.integers(0, V, size=r)
        mask[b, :p + r] = 1
    logits = rng.normal(scale=2.0, size=(B, T, V))
    ref_logits = logits + rng.normal(scale=1.0, size=(B, T, V))
    return logits, ref_logits, labels, mask


# ----------------------------------------------------------------------------------------------------------------
# Independent float64 NumPy reference (written from the semantics, row by row, no code shared with the module).


def _np_log_softmax(x):
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def _np_divergence(pol_row, ref_row, direction, beta, temperature):
    lp = _np_log_softmax(pol_row / temperature)
    lr = _np_log_softmax(ref_row / temperature)
    p, r = np.exp(lp), np.exp(lr)
    if direction == "forward" or (direction == "jsd" and beta == 0.0):
        return float(np.sum(r * (lr - lp)))
    if direction == "reverse" or (direction == "jsd" and beta == 1.0):
        return float(np.sum(p * (lp - lr)))
    m = beta * r + (1.0 - beta) * p   # GKD eq. (1): JSD_beta = beta KL(ref||M) + (1-beta) KL(pol||M)
    return float(beta * np.sum(r * np.log(r / m)) + (1.0 - beta) * np.sum(p * np.log(p / m)))


def np_reference(logits, ref_logits, labels, mask, *, alpha=0.5, direction="forward", beta=0.5, temperature=1.0,
                 align="prompt", include_padding=True):
    logits, ref_logits = np.asarray(logits, np.float64), np.asarray(ref_logits, np.float64)
    ce_terms, kl_terms = [], []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            if t + 1 < labels.shape[1] and labels[b, t + 1] != IGNORE_INDEX:     # HF shift
                ce_terms.append(-_np_log_softmax(logits[b, t])[labels[b, t + 1]])
            selected = {"prompt": labels[b, t] == IGNORE_INDEX,
                        "prompt_without_padding": labels[b, t] == IGNORE_INDEX and mask[b, t] == 1,
                        "all": True}[align]
            if not include_padding and mask[b, t] == 0:
                selected = False
            if selected:
                kl_terms.append(_np_divergence(logits[b, t], ref_logits[b, t], direction, beta, temperature))
    ce = float(np.mean(ce_terms)) if ce_terms else 0.0
    kl = float(np.mean(kl_terms)) if kl_terms else 0.0
    return ce + alpha * kl, ce, kl, len(ce_terms), len(kl_terms)


OPTIONS = [
    dict(),
    dict(alpha=0.3),
    dict(direction="reverse"),
    dict(direction="jsd", beta=0.3),
    dict(direction="jsd", beta=0.0),
    dict(direction="jsd", beta=1.0),
    dict(temperature=0.7),
    dict(direction="reverse", temperature=2.0),
    dict(align="prompt_without_padding"),
    dict(align="all"),
    dict(align="all", include_padding=False),
    dict(include_padding=False, direction="jsd", beta=0.7, temperature=1.5),
]


def _rel(a, b):
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-30)


def _run_unfused(logits, ref_logits, labels, mask, opts):
    fn = jax.jit(functools.partial(selfaug_loss, **opts))
    return fn(jnp.asarray(logits), jnp.asarray(ref_logits), jnp.asarray(labels), attention_mask_bt=jnp.asarray(mask))


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_matches_numpy_reference_float64_and_float32(opts):
    logits, ref_logits, labels, mask = make_batch(1)
    want_total, want_ce, want_kl, want_nt, want_na = np_reference(logits, ref_logits, labels, mask, **opts)
    assert want_nt == sum(RESPONSE_LENS) - sum(1 for p in PROMPT_LENS if p == 0)
    assert want_kl > 1e-3 and want_ce > 1e-3
    with jax.enable_x64(True):
        total, aux = _run_unfused(logits, ref_logits, labels, mask, opts)
        assert total.dtype == jnp.float64
        for got, want in ((total, want_total), (aux["ce"], want_ce), (aux["kl"], want_kl)):
            assert _rel(got, want) <= 1e-6, (got, want)
        assert int(aux["n_target_tokens"]) == want_nt and int(aux["n_aligned_tokens"]) == want_na
    total32, aux32 = _run_unfused(logits.astype(np.float32), ref_logits.astype(np.float32),
                                  labels.astype(np.int32), mask, opts)
    assert total32.dtype == jnp.float32
    for got, want in ((total32, want_total), (aux32["ce"], want_ce), (aux32["kl"], want_kl)):
        assert _rel(got, want) <= 1e-5, (got, want)


def test_standalone_terms_and_counts_match_reference():
    logits, ref_logits, labels, mask = make_batch(2)
    _, want_ce, want_kl, want_nt, want_na = np_reference(logits, ref_logits, labels, mask)
    lg, rl = jnp.asarray(logits, jnp.float32), jnp.asarray(ref_logits, jnp.float32)
    lb = jnp.asarray(labels, jnp.int32)
    assert _rel(sft_loss(lg, lb), want_ce) <= 1e-5
    assert _rel(selfaug_kl(lg, rl, lb), want_kl) <= 1e-5
    # Counts by hand: KL rows = all -100 positions (prompt + padding, incl. the last prompt position);
    # CE targets = response tokens (none at t=0 since every prompt is non-empty).
    assert want_na == B * T - sum(RESPONSE_LENS)
    assert want_nt == sum(RESPONSE_LENS)
    # The last prompt position predicts the first response token: it is in both CE and KL.
    b, p = 0, PROMPT_LENS[0]
    one = np.full((1, T), IGNORE_INDEX, np.int32)
    one[0, p] = labels[b, p]
    _, aux = selfaug_loss(lg[b:b + 1], rl[b:b + 1], jnp.asarray(one))
    assert int(aux["n_target_tokens"]) == 1 and int(aux["n_aligned_tokens"]) == T - 1
    want_row_ce = -_np_log_softmax(logits[b, p - 1])[labels[b, p]]
    assert _rel(aux["ce"], want_row_ce) <= 1e-5


def test_matches_released_code_torch_ops():
    """Default options == the released code: HF CE + KLDivLoss('batchmean')(log_softmax(policy)[m], softmax(ref)[m])."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    logits, ref_logits, labels, mask = make_batch(3)
    lt = torch.tensor(logits, dtype=torch.float32)
    rt = torch.tensor(ref_logits, dtype=torch.float32)
    yt = torch.tensor(labels)
    ce = F.cross_entropy(lt[:, :-1].reshape(-1, V), yt[:, 1:].reshape(-1), ignore_index=-100)
    m = yt == -100
    kl = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(lt, -1)[m], F.softmax(rt, -1)[m])
    want = float(ce + 0.5 * kl)
    total, aux = selfaug_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(ref_logits, jnp.float32),
                              jnp.asarray(labels, jnp.int32))
    assert _rel(total, want) <= 1e-5 and _rel(aux["ce"], float(ce)) <= 1e-5 and _rel(aux["kl"], float(kl)) <= 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Fused (hidden-state) implementation vs unfused, under jit.


def make_hidden(seed: int, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(B, T, D))
    rh = h + 0.5 * rng.normal(size=(B, T, D))
    w = rng.normal(scale=0.5, size=(D, V))
    rw = w + 0.2 * rng.normal(size=(D, V))
    return tuple(jnp.asarray(x, dtype) for x in (h, rh, w, rw))


def _grad_rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("grad_mode", ["precompute", "remat"])
@pytest.mark.parametrize("chunk_size,opts,separate_ref_head", [
    (512, dict(), False),                                     # one chunk covering everything
    (10, dict(), True),                                        # chunk_t=3: T=13 is not a multiple
    (1, dict(direction="reverse", alpha=0.3), False),          # one position per step
    (7, dict(direction="jsd", beta=0.4, temperature=1.3), True),
    (9, dict(align="all", include_padding=False), False),
])
def test_fused_matches_unfused_values_and_grads(grad_mode, chunk_size, opts, separate_ref_head):
    h, rh, w, rw = make_hidden(4)
    _, _, labels, mask = make_batch(4)
    labels, mask = jnp.asarray(labels, jnp.int32), jnp.asarray(mask, jnp.int32)
    ref_w = rw if separate_ref_head else w

    def unfused(h, w):
        return selfaug_loss(jnp.einsum("btd,dv->btv", h, w), jnp.einsum("btd,dv->btv", rh, ref_w), labels,
                            attention_mask_bt=mask, **opts)

    def fused(h, w):
        return selfaug_loss_from_hidden(h, rh, w, labels, ref_lm_head_dv=rw if separate_ref_head else None,
                                        chunk_size=chunk_size, grad_mode=grad_mode, attention_mask_bt=mask, **opts)

    (vu, au), gu = jax.jit(jax.value_and_grad(unfused, argnums=(0, 1), has_aux=True))(h, w)
    (vf, af), gf = jax.jit(jax.value_and_grad(fused, argnums=(0, 1), has_aux=True))(h, w)
    assert float(au["kl"]) > 1e-3
    assert _rel(vf, vu) <= 1e-5 and _rel(af["ce"], au["ce"]) <= 1e-5 and _rel(af["kl"], au["kl"]) <= 1e-5
    assert int(af["n_target_tokens"]) == int(au["n_target_tokens"])
    assert int(af["n_aligned_tokens"]) == int(au["n_aligned_tokens"])
    for a, b in zip(gf, gu):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert _grad_rel(a, b) <= 1e-4
    # The value-only (non-differentiated) path gives the same numbers.
    vf_only, _ = jax.jit(fused)(h, w)
    assert _rel(vf_only, vu) <= 1e-5


@pytest.mark.parametrize("grad_mode", ["precompute", "remat"])
@pytest.mark.parametrize("separate_ref_head", [False, True])
def test_head_layout_vd_equals_dv(grad_mode, separate_ref_head):
    """A [V, D] head (head_layout="vd", a tied embedding as stored) gives the [D, V] head's values, and its gradient
    is the [D, V] gradient transposed, for the fused SelfAug loss and the fused CE."""
    h, rh, w, rw = make_hidden(4)
    _, _, labels, mask = make_batch(4)
    labels, mask = jnp.asarray(labels, jnp.int32), jnp.asarray(mask, jnp.int32)

    def loss(h, w, layout):
        ref = None if not separate_ref_head else (rw if layout == "dv" else rw.T)
        return selfaug_loss_from_hidden(h, rh, w, labels, ref_lm_head_dv=ref, chunk_size=7, grad_mode=grad_mode,
                                        attention_mask_bt=mask, head_layout=layout)

    (v_dv, a_dv), (gh_dv, gw_dv) = jax.jit(jax.value_and_grad(
        lambda h, w: loss(h, w, "dv"), argnums=(0, 1), has_aux=True))(h, w)
    (v_vd, a_vd), (gh_vd, gw_vd) = jax.jit(jax.value_and_grad(
        lambda h, w: loss(h, w, "vd"), argnums=(0, 1), has_aux=True))(h, w.T)
    assert float(a_dv["kl"]) > 1e-3
    assert _rel(v_vd, v_dv) <= 1e-6 and _rel(a_vd["kl"], a_dv["kl"]) <= 1e-6
    assert gw_vd.shape == w.T.shape
    assert _grad_rel(gh_vd, gh_dv) <= 1e-5 and _grad_rel(gw_vd.T, gw_dv) <= 1e-5
    ce_dv, _ = sft_loss_from_hidden(h, w, labels, chunk_size=5)
    ce_vd, _ = sft_loss_from_hidden(h, w.T, labels, chunk_size=5, head_layout="vd")
    assert _rel(ce_vd, ce_dv) <= 1e-6
    with pytest.raises(ValueError, match=r"\[V, D=\d+\] \(head_layout='vd'\)"):
        selfaug_loss_from_hidden(h, rh, w, labels, head_layout="vd")
    with pytest.raises(ValueError, match="head_layout must be one of"):
        selfaug_loss_from_hidden(h, rh, w, labels, head_layout="dvv")


@pytest.mark.parametrize("with_kl", [True, False])
def test_frozen_head_gets_no_gradient_work(with_kl):
    """A head that is not differentiated (closed over, or under stop_gradient) costs no [D, V] gradient matmuls in
    the precompute chunk loop, and the hidden-state gradient is unchanged."""
    h, rh, w, _ = make_hidden(9)
    _, _, labels, mask = make_batch(9)
    labels = jnp.asarray(labels, jnp.int32)

    def fused(h, w):
        return selfaug_loss_from_hidden(h, rh if with_kl else None, w, labels, chunk_size=10)[0]

    def unfused(h):
        logits = jnp.einsum("btd,dv->btv", h, w)
        if not with_kl:
            return sft_loss(logits, labels)
        return selfaug_loss(logits, jnp.einsum("btd,dv->btv", rh, w), labels)[0]

    g_both = jax.grad(fused, argnums=(0, 1))
    g_closed = jax.grad(lambda h: fused(h, w))
    g_stopped = jax.grad(lambda h, w: fused(h, jax.lax.stop_gradient(w)), argnums=(0, 1))
    dv = (D, V)
    assert dv in dot_output_shapes(jax.make_jaxpr(g_both)(h, w))  # a trainable head does get them
    assert dv not in dot_output_shapes(jax.make_jaxpr(g_closed)(h))
    assert dv not in dot_output_shapes(jax.make_jaxpr(g_stopped)(h, w))
    want = jax.grad(unfused)(h)
    assert _grad_rel(jax.jit(g_closed)(h), want) <= 1e-4
    gh, gw = jax.jit(g_stopped)(h, w)
    assert _grad_rel(gh, want) <= 1e-4 and float(jnp.max(jnp.abs(gw))) == 0.0


@pytest.mark.parametrize("direction,with_ref", [("forward", True), ("reverse", True), ("forward", False)])
def test_closed_form_chunk_equals_autodiff_float64(direction, with_ref):
    """_ce_divergence_and_grad (the fast precompute chunk) equals jax.vjp of the reference per-token formulas to
    float64 rounding: CE sum, divergence sum over the mask, and the weighted policy-logit gradient."""
    from selfaug_jax.loss_primitives import (_ce_divergence_and_grad, _ce_per_token, _divergence_per_token,
                                             _shifted_targets_bt)
    logits, ref_logits, labels, _ = make_batch(11)
    with jax.enable_x64(True):
        z, zr = jnp.asarray(logits * 3, jnp.float64), jnp.asarray(ref_logits * 3, jnp.float64)
        targets = _shifted_targets_bt(jnp.asarray(labels))
        mask = jnp.asarray(labels == IGNORE_INDEX)
        w_ce, w_kl = jnp.float64(0.3), jnp.float64(0.07)

        def terms(lg):
            ce = jnp.sum(_ce_per_token(lg, targets))
            if not with_ref:
                return w_ce * ce, (ce, jnp.float64(0.0))
            div = _divergence_per_token(lg, zr, direction=direction, beta=0.5, temperature=1.0)
            kl = jnp.sum(jnp.where(mask, div, 0.0))
            return w_ce * ce + w_kl * kl, (ce, kl)

        (_, (ce_want, kl_want)), g_want = jax.value_and_grad(terms, has_aux=True)(z)
        stacked = jnp.stack([z, zr]) if with_ref else z[None]
        ce, kl, g = jax.jit(functools.partial(_ce_divergence_and_grad, direction=direction))(
            stacked, targets, mask, w_ce, w_kl)
        assert g.shape == z.shape and g.dtype == jnp.float64
        assert abs(float(ce) - float(ce_want)) <= 1e-12 * abs(float(ce_want))
        assert abs(float(kl) - float(kl_want)) <= 1e-12 * max(abs(float(kl_want)), 1.0)
        assert float(kl_want) > 0.1 if with_ref else float(kl) == 0.0
        assert float(jnp.max(jnp.abs(g - g_want))) <= 1e-13
    with pytest.raises(ValueError, match="direction must be one of"):
        _ce_divergence_and_grad(jnp.zeros((2, 1, 2, 3)), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), bool),
                                1.0, 1.0, direction="jsd")


@pytest.mark.parametrize("opts", [dict(), dict(direction="reverse", alpha=0.3), dict(direction="jsd", beta=1.0),
                                  dict(align="response")])
@pytest.mark.parametrize("separate_ref_head", [False, True])
def test_closed_form_precompute_equals_autodiff_chunk(opts, separate_ref_head):
    """The precompute loop's closed-form chunk (default) and its autodiff chunk (closed_form=False) give the same
    values and gradients; with a shared head, policy and reference are projected by one [2, B, t, V] matmul."""
    h, rh, w, rw = make_hidden(12)
    _, _, labels, mask = make_batch(12)
    labels, mask = jnp.asarray(labels, jnp.int32), jnp.asarray(mask, jnp.int32)

    def fused(h, w, closed):
        return selfaug_loss_from_hidden(h, rh, w, labels, ref_lm_head_dv=rw if separate_ref_head else None,
                                        chunk_size=8, attention_mask_bt=mask, closed_form=closed, **opts)

    grad = {c: jax.value_and_grad(lambda h, w, c=c: fused(h, w, c), argnums=(0, 1), has_aux=True) for c in (0, 1)}
    (v0, a0), g0 = jax.jit(grad[0])(h, w)
    (v1, a1), g1 = jax.jit(grad[1])(h, w)
    assert float(a0["kl"]) > 1e-3
    assert _rel(v1, v0) <= 1e-5 and _rel(a1["ce"], a0["ce"]) <= 1e-5 and _rel(a1["kl"], a0["kl"]) <= 1e-5
    for a, b in zip(g1, g0):
        assert _grad_rel(a, b) <= 1e-5
    stacked_dots = [s for s in dot_output_shapes(jax.make_jaxpr(grad[1])(h, w)) if len(s) == 4 and s[-1] == V]
    assert bool(stacked_dots) != separate_ref_head


@pytest.mark.parametrize("opts", [dict(), dict(direction="reverse")])
def test_closed_form_gradient_step0_kl_is_exactly_zero(opts):
    """Differentiated (the train step's path), a reference equal to the policy gives KL exactly 0 and total == CE."""
    h, _, w, _ = make_hidden(13)
    _, _, labels, _ = make_batch(13)
    lb = jnp.asarray(labels, jnp.int32)
    (total, aux), _ = jax.jit(jax.value_and_grad(
        lambda h_: selfaug_loss_from_hidden(h_, h, w, lb, chunk_size=6, **opts), has_aux=True))(h)
    assert float(aux["kl"]) == 0.0 and float(total) == float(aux["ce"]) > 0.0


def test_fused_float64_matches_numpy_reference():
    h, rh, w, _ = make_hidden(5)
    _, _, labels, mask = make_batch(5)
    with jax.enable_x64(True):
        h64, rh64, w64 = (jnp.asarray(np.asarray(x), jnp.float64) for x in (h, rh, w))
        want = np_reference(np.asarray(h64 @ w64), np.asarray(rh64 @ w64), labels, mask, direction="jsd", beta=0.6)
        total, aux = selfaug_loss_from_hidden(h64, rh64, w64, jnp.asarray(labels), chunk_size=5, direction="jsd",
                                              beta=0.6)
        assert total.dtype == jnp.float64
        assert _rel(total, want[0]) <= 1e-6 and _rel(aux["kl"], want[2]) <= 1e-6


# ----------------------------------------------------------------------------------------------------------------
# Properties.


@pytest.mark.parametrize("opts", [dict(), dict(direction="reverse"), dict(direction="jsd", beta=0.3),
                                  dict(temperature=0.5), dict(align="all")])
def test_reference_equal_to_policy_gives_exact_zero(opts):
    logits, _, labels, mask = make_batch(6)
    lg, lb = jnp.asarray(logits, jnp.float32), jnp.asarray(labels, jnp.int32)
    total, aux = jax.jit(functools.partial(selfaug_loss, **opts))(lg, lg, lb)
    assert float(aux["kl"]) == 0.0
    assert float(total) == float(aux["ce"]) == float(sft_loss(lg, lb))
    h, _, w, _ = make_hidden(6)
    total_f, aux_f = selfaug_loss_from_hidden(h, h, w, lb, chunk_size=6, **opts)
    assert float(aux_f["kl"]) == 0.0 and float(total_f) == float(aux_f["ce"]) > 0.0


def test_no_gradient_into_reference():
    logits, ref_logits, labels, _ = make_batch(7)
    lg, rl, lb = jnp.asarray(logits, jnp.float32), jnp.asarray(ref_logits, jnp.float32), jnp.asarray(labels)
    for opts in (dict(), dict(direction="reverse"), dict(direction="jsd", beta=0.5)):
        g_ref = jax.grad(lambda r: selfaug_loss(lg, r, lb, **opts)[0])(rl)
        assert float(jnp.max(jnp.abs(g_ref))) == 0.0
        assert float(jnp.max(jnp.abs(jax.grad(lambda l: selfaug_loss(l, rl, lb, **opts)[0])(lg)))) > 1e-4
    h, rh, w, rw = make_hidden(7)
    for grad_mode in ("precompute", "remat"):
        g = jax.grad(lambda rh_, rw_: selfaug_loss_from_hidden(h, rh_, w, lb, ref_lm_head_dv=rw_, chunk_size=8,
                                                               grad_mode=grad_mode)[0], argnums=(0, 1))(rh, rw)
        assert float(jnp.max(jnp.abs(g[0]))) == 0.0 and float(jnp.max(jnp.abs(g[1]))) == 0.0


@pytest.mark.parametrize("grad_mode", ["precompute", "remat"])
def test_bfloat16_inputs_give_finite_loss_and_grads(grad_mode):
    logits, ref_logits, labels, _ = make_batch(8)
    lg, rl = jnp.asarray(logits * 30, jnp.bfloat16), jnp.asarray(ref_logits * 30, jnp.bfloat16)  # large logits
    lb = jnp.asarray(labels, jnp.int32)
    for opts in (dict(), dict(direction="reverse"), dict(direction="jsd", beta=0.2)):
        (v, aux), g = jax.value_and_grad(lambda l: selfaug_loss(l, rl, lb, **opts), has_aux=True)(lg)
        assert v.dtype == jnp.float32 and g.dtype == jnp.bfloat16
        assert np.isfinite(float(v)) and float(aux["kl"]) > 0 and bool(jnp.all(jnp.isfinite(g)))
    h, rh, w, _ = make_hidden(8, jnp.bfloat16)
    (v, _), (gh, gw) = jax.jit(jax.value_and_grad(
        lambda h_, w_: selfaug_loss_from_hidden(h_ * 8, rh * 8, w_, lb, chunk_size=8, grad_mode=grad_mode),
        argnums=(0, 1), has_aux=True))(h, w)
    assert gh.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
    assert np.isfinite(float(v)) and bool(jnp.all(jnp.isfinite(gh))) and bool(jnp.all(jnp.isfinite(gw)))
    assert float(jnp.max(jnp.abs(gh.astype(jnp.float32)))) > 0


def test_empty_selections_give_zero_not_nan():
    logits, ref_logits, _, _ = make_batch(9)
    lg, rl = jnp.asarray(logits, jnp.float32), jnp.asarray(ref_logits, jnp.float32)
    no_targets = jnp.full((B, T), IGNORE_INDEX, jnp.int32)              # all prompt: CE empty
    total, aux = selfaug_loss(lg, rl, no_targets)
    assert float(aux["ce"]) == 0.0 and int(aux["n_target_tokens"]) == 0 and int(aux["n_aligned_tokens"]) == B * T
    assert _rel(total, 0.5 * float(aux["kl"])) <= 1e-6
    no_prompt = jnp.asarray(np.random.default_rng(0).integers(0, V, (B, T)), jnp.int32)   # nothing to align
    h, rh, w, _ = make_hidden(9)
    for fn in (lambda l: selfaug_loss(l, rl, no_prompt),
               lambda l: selfaug_loss_from_hidden(h, rh, w, no_prompt, chunk_size=4)):
        (v, aux), g = jax.value_and_grad(fn, has_aux=True)(lg)
        assert float(aux["kl"]) == 0.0 and int(aux["n_aligned_tokens"]) == 0 and int(aux["n_target_tokens"]) > 0
        assert np.isfinite(float(v)) and bool(jnp.all(jnp.isfinite(g)))
    (v, aux), (gh, gw) = jax.value_and_grad(
        lambda h_, w_: selfaug_loss_from_hidden(h_, rh, w_, no_targets, align="prompt_without_padding",
                                                attention_mask_bt=jnp.zeros((B, T), jnp.int32)),
        argnums=(0, 1), has_aux=True)(h, w)
    assert float(v) == 0.0 and int(aux["n_target_tokens"]) == 0 and int(aux["n_aligned_tokens"]) == 0
    assert float(jnp.max(jnp.abs(gh))) == 0.0 and float(jnp.max(jnp.abs(gw))) == 0.0


def test_padding_options_change_what_is_aligned():
    logits, ref_logits, labels, mask = make_batch(10)
    args = (jnp.asarray(logits, jnp.float32), jnp.asarray(ref_logits, jnp.float32), jnp.asarray(labels))
    n_prompt = sum(PROMPT_LENS)
    counts = {}
    for name, opts in {"prompt": dict(), "no_pad": dict(include_padding=False),
                       "pwp": dict(align="prompt_without_padding"), "all": dict(align="all"),
                       "all_no_pad": dict(align="all", include_padding=False)}.items():
        counts[name] = int(selfaug_loss(*args, attention_mask_bt=jnp.asarray(mask), **opts)[1]["n_aligned_tokens"])
    assert counts == {"prompt": B * T - sum(RESPONSE_LENS), "no_pad": n_prompt, "pwp": n_prompt, "all": B * T,
                      "all_no_pad": n_prompt + sum(RESPONSE_LENS)}


# ----------------------------------------------------------------------------------------------------------------
# Bad input and config.


def test_bad_input_raises_clear_errors():
    logits, ref_logits, labels, _ = make_batch(11)
    lg, rl, lb = jnp.asarray(logits, jnp.float32), jnp.asarray(ref_logits, jnp.float32), jnp.asarray(labels)
    with pytest.raises(ValueError, match="direction"):
        selfaug_loss(lg, rl, lb, direction="backward")
    with pytest.raises(ValueError, match="beta"):
        selfaug_kl(lg, rl, lb, direction="jsd", beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        selfaug_loss(lg, rl, lb, temperature=0.0)
    with pytest.raises(ValueError, match="attention_mask_bt"):
        selfaug_loss(lg, rl, lb, include_padding=False)
    with pytest.raises(ValueError, match="ref_logits_btv shape"):
        selfaug_loss(lg, rl[:, :-1], lb)
    with pytest.raises(ValueError, match="labels_bt shape"):
        sft_loss(lg, lb[:, :-1])
    bad = np.array(labels)
    bad[2, 5] = V
    with pytest.raises(ValueError, match=r"labels_bt\[2, 5\] = 11"):
        selfaug_loss(lg, rl, jnp.asarray(bad))
    with pytest.raises(ValueError, match=r"attention_mask_bt\[0, 0\]"):
        selfaug_kl(lg, rl, lb, include_padding=False, attention_mask_bt=jnp.full((B, T), 2))
    h, rh, w, _ = make_hidden(11)
    with pytest.raises(ValueError, match="lm_head_dv must have shape"):
        selfaug_loss_from_hidden(h, rh, w.T, lb)
    with pytest.raises(ValueError, match="chunk_size"):
        selfaug_loss_from_hidden(h, rh, w, lb, chunk_size=0)
    with pytest.raises(ValueError, match="grad_mode"):
        selfaug_loss_from_hidden(h, rh, w, lb, grad_mode="fast")


def test_config_round_trip_and_validation():
    cfg = SelfAugLossConfig(alpha=0.3, direction="jsd", beta=0.2, chunk_size=4)
    logits, ref_logits, labels, _ = make_batch(12)
    h, rh, w, _ = make_hidden(12)
    lb = jnp.asarray(labels)
    got = selfaug_loss_from_hidden(h, rh, w, lb, **cfg.fused_kwargs())[0]
    want = selfaug_loss(h @ w, rh @ w, lb, **cfg.loss_kwargs())[0]
    assert _rel(got, want) <= 1e-5
    assert SelfAugLossConfig().loss_kwargs() == dict(alpha=0.5, direction="forward", beta=0.5, temperature=1.0,
                                                     align="prompt", include_padding=True)
    with pytest.raises(ValueError, match="alpha"):
        SelfAugLossConfig(alpha=-1.0)
    with pytest.raises(ValueError, match="align"):
        SelfAugLossConfig(align="middle")


# ----------------------------------------------------------------------------------------------------------------
# CE-only fused loss, token counts, and global normalisers (used by the train step's accumulation).


@pytest.mark.parametrize("grad_mode", ["precompute", "remat"])
def test_sft_loss_from_hidden_matches_unfused_ce(grad_mode):
    h, _, w, _ = make_hidden(5)
    _, _, labels, _ = make_batch(5)
    labels = jnp.asarray(labels, jnp.int32)

    def unfused(h, w):
        return sft_loss(jnp.einsum("btd,dv->btv", h, w), labels)

    def fused(h, w):
        return sft_loss_from_hidden(h, w, labels, chunk_size=10, grad_mode=grad_mode)[0]

    vu, gu = jax.jit(jax.value_and_grad(unfused, argnums=(0, 1)))(h, w)
    vf, gf = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(h, w)
    assert _rel(vf, vu) <= 1e-5
    for a, b in zip(gf, gu):
        assert _grad_rel(a, b) <= 1e-4
    _, aux = sft_loss_from_hidden(h, w, labels)
    assert float(aux["kl"]) == 0.0 and int(aux["n_aligned_tokens"]) == 0
    assert int(aux["n_target_tokens"]) == int(np.sum(np.asarray(labels)[:, 1:] != IGNORE_INDEX))


def test_token_counts_and_global_normalisers_sum_to_the_big_batch_loss():
    h, rh, w, _ = make_hidden(6)
    _, _, labels, mask = make_batch(6)
    labels, mask = jnp.asarray(labels, jnp.int32), jnp.asarray(mask, jnp.int32)
    n_t, n_a = token_counts(labels, mask, align="prompt", include_padding=True)
    assert int(n_t) == int(np.sum(np.asarray(labels)[:, 1:] != IGNORE_INDEX))
    assert int(n_a) == int(np.sum(np.asarray(labels) == IGNORE_INDEX))
    n_t2, n_a2 = token_counts(labels, mask, include_padding=False)
    assert int(n_a2) == int(np.sum((np.asarray(labels) == IGNORE_INDEX) & (np.asarray(mask) != 0)))
    big, big_aux = selfaug_loss_from_hidden(h, rh, w, labels, attention_mask_bt=mask, chunk_size=16)
    halves = [slice(0, B // 2), slice(B // 2, B)]
    parts = [selfaug_loss_from_hidden(h[s], rh[s], w, labels[s], attention_mask_bt=mask[s], chunk_size=16,
                                      num_target_tokens=n_t, num_aligned_tokens=n_a) for s in halves]
    assert _rel(sum(p[0] for p in parts), big) <= 1e-6
    assert _rel(sum(p[1]["kl"] for p in parts), big_aux["kl"]) <= 1e-6
    assert _rel(sum(p[1]["ce"] for p in parts), big_aux["ce"]) <= 1e-6


# ----------------------------------------------------------------------------------------------------------------
# skip_unweighted: chunks without a weighted (CE target or aligned) position are not projected. Rows whose weighted
# positions lie in different places (right padding, left padding, two answer segments, none at all), so a wrong
# reorder, a wrong inverse reorder of the hidden gradient or a wrongly skipped chunk changes values or gradients.


def make_skip_batch():
    labels = np.full((B, T), IGNORE_INDEX, np.int64)
    mask = np.ones((B, T), np.int64)
    rng = np.random.default_rng(21)
    labels[0, 3:7] = rng.integers(0, V, 4)              # right-padded: prompt 3, answer 4, padding 6
    mask[0, 7:] = 0
    labels[1, 8:] = rng.integers(0, V, 5)               # left-padded: padding 5, prompt 3, answer 5 (to the end)
    mask[1, :5] = 0
    labels[2, 2:5] = rng.integers(0, V, 3)              # two turns: answers at 2..4 and 7..9, padding 10..12
    labels[2, 7:10] = rng.integers(0, V, 3)
    mask[2, 10:] = 0
    # row 3: prompt only (no target: no weight without an alignment term)
    return jnp.asarray(labels, jnp.int32), jnp.asarray(mask, jnp.int32)


SKIP_CASES = [  # (reference hidden?, options): CE only (reorder), ASFT's response KL (reorder), prompt KL (no reorder)
    (False, dict()),
    (True, dict(align="response", direction="reverse")),
    (True, dict(include_padding=False)),
    (True, dict(align="prompt_without_padding", alpha=0.3)),
]


# chunk_size 8 / 20: scan chunks of 1 / 2 positions per row (chunk_t / SKIP_SPLIT), boundaries inside the weighted
# region; the prompt-aligning cases keep chunk_t = 2 / 5.
@pytest.mark.parametrize("grad_mode,chunk_size,case,layouts", [
    ("precompute", 8, 0, ("dv", "vd")), ("precompute", 20, 0, ("dv",)), ("remat", 8, 0, ("vd",)),
    ("precompute", 8, 1, ("dv", "vd")), ("precompute", 20, 1, ("dv",)), ("remat", 20, 1, ("dv",)),
    ("precompute", 8, 2, ("vd",)), ("precompute", 20, 3, ("dv",)),
])
def test_skip_unweighted_matches_unfused_and_unskipped(grad_mode, chunk_size, case, layouts):
    with_ref, opts = SKIP_CASES[case]
    h, rh, w, _ = make_hidden(21)
    labels, mask = make_skip_batch()
    n_t = 20   # an explicit CE denominator (as token-weighted accumulation passes it) flows through unchanged

    def unfused(h, w):
        logits = jnp.einsum("btd,dv->btv", h, w)
        if not with_ref:
            return sft_loss(logits, labels) * (15.0 / n_t)   # 15 targets in this batch; scaled to denominator n_t
        return selfaug_loss(logits, jnp.einsum("btd,dv->btv", rh, w), labels, attention_mask_bt=mask, **opts)[0]

    def fused(h, w, skip, layout="dv"):
        head = w if layout == "dv" else w.T
        if not with_ref:
            return sft_loss_from_hidden(h, head, labels, chunk_size=chunk_size, grad_mode=grad_mode,
                                        num_target_tokens=n_t, head_layout=layout, skip_unweighted=skip)[0]
        return selfaug_loss_from_hidden(h, rh, head, labels, chunk_size=chunk_size, grad_mode=grad_mode,
                                        attention_mask_bt=mask, head_layout=layout, skip_unweighted=skip,
                                        **opts)[0]

    assert int(token_counts(labels)[0]) == 15
    vu, gu = jax.jit(jax.value_and_grad(unfused, argnums=(0, 1)))(h, w)
    v_off, g_off = jax.jit(jax.value_and_grad(lambda h, w: fused(h, w, False), argnums=(0, 1)))(h, w)
    for layout in layouts:
        v_on, g_on = jax.jit(jax.value_and_grad(lambda h, w: fused(h, w, True, layout), argnums=(0, 1)))(h, w)
        assert _rel(v_on, vu) <= 1e-5 and _rel(v_on, v_off) <= 1e-6
        for a, b, c in zip(g_on, gu, g_off):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert _grad_rel(a, b) <= 1e-4 and _grad_rel(a, c) <= 1e-5
    if not with_ref:   # CE only: the gradient is exactly 0 at every position without a target
        no_target = np.asarray(jnp.concatenate([labels[:, 1:], jnp.full((B, 1), IGNORE_INDEX, jnp.int32)], axis=1)
                               == IGNORE_INDEX)
        assert float(jnp.max(jnp.abs(g_on[0][no_target]))) == 0.0


@pytest.mark.parametrize("grad_mode", ["precompute", "remat"])
@pytest.mark.parametrize("with_ref", [False, True])
def test_skipped_chunks_are_not_projected(grad_mode, with_ref):
    """Every row has exactly chunk_t = 3 weighted positions, in different places; after the reorder they fill chunk
    0 and the other chunks are skipped. NaN hidden states at the unweighted positions therefore never reach the
    result -- while a projected NaN row gives NaN gradients (0 * NaN in the softmax backward), as the unskipped
    control shows."""
    h, rh, w, _ = make_hidden(22)
    rng = np.random.default_rng(22)
    labels = np.full((B, T), IGNORE_INDEX, np.int64)
    for b, start in enumerate((10, 1, 5, 7)):          # targets at start-1 .. start+1
        labels[b, start:start + 3] = rng.integers(0, V, 3)
    labels = jnp.asarray(labels, jnp.int32)
    weighted = np.asarray(jnp.concatenate([labels[:, 1:], jnp.full((B, 1), IGNORE_INDEX)], axis=1) != IGNORE_INDEX)
    assert weighted.sum(axis=1).tolist() == [3, 3, 3, 3]
    nan_h = jnp.where(jnp.asarray(weighted)[..., None], h, jnp.nan)
    opts = dict(align="response") if with_ref else {}

    def fused(h, skip):
        return selfaug_loss_from_hidden(h, nan_h if with_ref else None, w, labels, chunk_size=12, grad_mode=grad_mode,
                                        skip_unweighted=skip, **opts)[0]

    def unfused(h):  # the same loss on clean hidden states
        logits = jnp.einsum("btd,dv->btv", h, w)
        if not with_ref:
            return sft_loss(logits, labels)
        return selfaug_loss(logits, jnp.einsum("btd,dv->btv", jnp.where(jnp.isnan(nan_h), 0.0, nan_h), w), labels,
                            **opts)[0]

    v, g = jax.jit(jax.value_and_grad(lambda h: fused(h, True)))(nan_h)
    vu, gu = jax.jit(jax.value_and_grad(unfused))(h)
    assert np.isfinite(float(v)) and _rel(v, vu) <= 1e-5
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g[~weighted]))) == 0.0
    assert _grad_rel(g, gu) <= 1e-4
    _, g_off = jax.jit(jax.value_and_grad(lambda h: fused(h, False)))(nan_h)
    assert not bool(jnp.all(jnp.isfinite(g_off)))


def test_skip_unweighted_empty_batch_bf16_and_config():
    h, rh, w, _ = make_hidden(23)
    no_targets = jnp.full((B, T), IGNORE_INDEX, jnp.int32)
    (v, aux), (gh, gw) = jax.jit(jax.value_and_grad(
        lambda h_, w_: sft_loss_from_hidden(h_, w_, no_targets, chunk_size=8), argnums=(0, 1), has_aux=True))(h, w)
    assert float(v) == 0.0 and int(aux["n_target_tokens"]) == 0
    assert float(jnp.max(jnp.abs(gh))) == 0.0 and float(jnp.max(jnp.abs(gw))) == 0.0
    # bfloat16 hidden states and head: skipping changes only the summation order.
    labels, mask = make_skip_batch()
    hb, wb = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    for ref in (None, rh.astype(jnp.bfloat16)):
        runs = [jax.jit(jax.value_and_grad(lambda h_, w_, s=skip: selfaug_loss_from_hidden(
            h_, ref, w_, labels, chunk_size=8, align="response", skip_unweighted=s)[0], argnums=(0, 1)))(hb, wb)
            for skip in (True, False)]
        (v_on, g_on), (v_off, g_off) = runs
        assert g_on[0].dtype == jnp.bfloat16 and _rel(v_on, v_off) <= 1e-5
        for a, b in zip(g_on, g_off):
            assert _grad_rel(a.astype(jnp.float32), b.astype(jnp.float32)) <= 1e-2
    assert SelfAugLossConfig().skip_unweighted is True
    assert SelfAugLossConfig(skip_unweighted=False).fused_kwargs()["skip_unweighted"] is False
    # the fused-only fields reach the CE-only loss too (the CE-only methods' path in train/objective.py)
    chunking = SelfAugLossConfig(chunk_size=64, skip_unweighted=False).chunking_kwargs()
    assert chunking == dict(chunk_size=64, grad_mode="precompute", skip_unweighted=False)
    assert set(chunking) <= set(inspect.signature(sft_loss_from_hidden).parameters)
    with pytest.raises(TypeError, match="skip_unweighted must be a bool"):
        SelfAugLossConfig(skip_unweighted="yes")


# ----------------------------------------------------------------------------------------------------------------
# Module layout: loss.py (API + dense) / fused_loss.py / loss_primitives.py.


def test_loss_module_reexports_the_split_modules_without_an_import_cycle():
    """``selfaug_jax.loss`` still offers every public name (the fused losses are the very objects of
    ``fused_loss``; the option types and ``HEAD_LAYOUTS`` those of ``loss_primitives``), ``fused_loss`` and the
    decoder import without ``selfaug_jax.loss`` (no cycle), and the decoder checks the one ``HEAD_LAYOUTS``."""
    import subprocess
    import sys
    from pathlib import Path

    import selfaug_jax.loss as loss_mod
    from selfaug_jax import fused_loss, loss_primitives
    from selfaug_jax.models import decoder

    assert all(hasattr(loss_mod, name) for name in loss_mod.__all__)
    for name in fused_loss.__all__:
        assert getattr(loss_mod, name) is getattr(fused_loss, name)
    for name in loss_primitives.__all__:
        assert getattr(loss_mod, name) is getattr(loss_primitives, name)
    assert decoder.HEAD_LAYOUTS is loss_primitives.HEAD_LAYOUTS == ("dv", "vd")
    code = ("import sys, selfaug_jax.fused_loss, selfaug_jax.models.decoder; "
            "print(sorted(m for m in ('selfaug_jax.loss', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
