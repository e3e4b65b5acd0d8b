"""``selfaug_jax/models/swiglu.py``: the float32 SwiGLU product and its hand-written backward, against float64 NumPy
and against autodiff of the same formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfaug_jax.models.swiglu import swiglu


def _inputs(dtype, shape=(2, 5, 96), seed=0):
    rng = np.random.default_rng(seed)
    gate = jnp.asarray(rng.standard_normal(shape) * 3.0, dtype)  # wide range: sigmoid's tails both ways
    up = jnp.asarray(rng.standard_normal(shape), dtype)
    cot = jnp.asarray(rng.standard_normal(shape), dtype)
    return gate, up, cot


def _f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _reference_f64(gate, up, cot):
    """Value and both input gradients of ``sum(cot * silu(gate) * up)`` in float64."""
    g, u, c = _f64(gate), _f64(up), _f64(cot)
    s = 1.0 / (1.0 + np.exp(-g))
    return g * s * u, c * u * (s + g * s * (1.0 - s)), c * g * s


def _value_and_grads(fn, gate, up, cot):
    out, vjp = jax.vjp(fn, gate, up)
    return (out, *vjp(cot))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_values_and_gradients_are_the_float64_ones_rounded_once(dtype):
    """Every output is the float64 value rounded to the compute dtype, up to float32 arithmetic (a bf16 result is
    at most one bf16 ulp away: computed in float32, rounded once)."""
    gate, up, cot = _inputs(dtype)
    got = _value_and_grads(swiglu, gate, up, cot)
    for name, x, want in zip(("value", "d_gate", "d_up"), got, _reference_f64(gate, up, cot)):
        assert x.dtype == dtype, name
        x = _f64(x)
        if dtype == jnp.float32:
            np.testing.assert_allclose(x, want, rtol=2e-6, atol=1e-6, err_msg=name)
        else:
            # one bf16 rounding of an (almost) exact value: relative error <= 2^-8, with a little float32 slack
            err = np.abs(x - want) / np.maximum(np.abs(want), 1e-30)
            assert float(np.max(np.where(np.abs(want) > 1e-6, err, 0.0))) <= 2.0 ** -8 * 1.01, name


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradients_match_autodiff_of_the_same_formula(dtype):
    """The custom VJP gives autodiff's gradients of the float32 formula (what the MLP computed before it)."""
    gate, up, cot = _inputs(dtype, seed=1)

    def autodiff_formula(g, u):
        return (jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(g.dtype)

    ours = _value_and_grads(swiglu, gate, up, cot)
    theirs = _value_and_grads(autodiff_formula, gate, up, cot)
    np.testing.assert_array_equal(np.asarray(ours[0], np.float32), np.asarray(theirs[0], np.float32))
    for a, b in zip(ours[1:], theirs[1:]):
        if dtype == jnp.float32:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
        else:  # the same float32 values rounded once: equal, or one bf16 ulp apart where float32 sums differ
            a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
            assert np.mean(a32 == b32) > 0.98
            np.testing.assert_allclose(a32, b32, rtol=2.0 ** -7, atol=0)


def test_jit_and_grad_through_a_remat_block():
    """Under ``jax.checkpoint`` and ``jit`` (the decoder's setting) the gradient is the eager one."""
    gate, up, _ = _inputs(jnp.float32, shape=(3, 7), seed=2)

    def loss(g, u):
        return jnp.sum(jax.checkpoint(swiglu)(g, u) ** 2)

    eager = jax.grad(loss, argnums=(0, 1))(gate, up)
    jitted = jax.jit(jax.grad(loss, argnums=(0, 1)))(gate, up)
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
