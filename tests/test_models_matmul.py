"""``selfaug_jax/models/matmul.py``: float32-accumulated einsums whose bfloat16 backward pass keeps bfloat16 operands,
checked against float64 NumPy, against autodiff, and through the decoder's remat policies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jaxpr_tools import dot_eqns, dot_operand_dtypes

from selfaug_jax.models import DecoderLM, ModelConfig, attention_kernels
from selfaug_jax.models.matmul import einsum_f32
from selfaug_jax.models.remat import ATTENTION_MATMUL_NAME, PROJECTION_NAME

BF16_EPS = 2.0**-8  # bfloat16's relative rounding error bound (8 significand bits)


def _bf16(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)


def _f64(x):
    return np.asarray(x, np.float64)


def test_float32_operands_take_the_plain_einsum():
    rng = np.random.default_rng(0)
    x, w = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, 3, 4), (4, 5)))
    jaxpr = str(jax.make_jaxpr(lambda x, w: einsum_f32("bti,io->bto", x, w))(x, w))
    assert "custom_vjp" not in jaxpr and "name[" not in jaxpr
    named = str(jax.make_jaxpr(lambda x, w: einsum_f32("bti,io->bto", x, w, name="mm"))(x, w))
    assert "custom_vjp" not in named and "name[name=mm]" in named  # named in float32 too, for the remat policies
    np.testing.assert_array_equal(einsum_f32("bti,io->bto", x, w),
                                  jnp.einsum("bti,io->bto", x, w, preferred_element_type=jnp.float32))


@pytest.mark.parametrize("spec,shapes", [
    ("bti,io->bto", ((2, 5, 8), (8, 6))),  # a projection
    ("btkgd,bskd->bkgts", ((2, 5, 2, 3, 4), (2, 5, 2, 4))),  # attention scores (GQA)
    ("bkgts,bskd->btkgd", ((2, 2, 3, 5, 5), (2, 5, 2, 4))),  # attention output
])
def test_bfloat16_values_and_gradients_match_float64(spec, shapes):
    """Forward: the float32 einsum of the bf16 operands. Backward: each gradient is the float64 einsum of the
    bf16-rounded cotangent and the other operand, rounded once to bfloat16."""
    rng = np.random.default_rng(1)
    a, b = (_bf16(rng, s) for s in shapes)
    out, vjp = jax.vjp(lambda a, b: einsum_f32(spec, a, b), a, b)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(_f64(out), np.einsum(spec, _f64(a), _f64(b)), rtol=1e-5, atol=1e-5)
    g = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
    da, db = vjp(g)
    assert da.dtype == b.dtype == db.dtype == jnp.bfloat16
    lhs, rhs, res = spec.replace("->", ",").split(",")
    g16 = _f64(g.astype(jnp.bfloat16))
    for got, want in ((da, np.einsum(f"{res},{rhs}->{lhs}", g16, _f64(b))),
                      (db, np.einsum(f"{lhs},{res}->{rhs}", _f64(a), g16))):
        err = np.abs(_f64(got) - want)
        assert np.all(err <= BF16_EPS * np.abs(want) + 1e-6), float(np.max(err / (np.abs(want) + 1e-6)))


def test_gradients_agree_with_autodiff_when_the_cotangent_is_a_bfloat16_value():
    """A projection's output is cast to the compute dtype, so its cotangent is a bf16 value: then the custom backward
    computes what autodiff does (float32 accumulation), up to one bf16 rounding of the summation order."""
    rng = np.random.default_rng(2)
    x, w = _bf16(rng, (3, 7, 16)), _bf16(rng, (16, 12))
    g = _bf16(rng, (3, 7, 12))

    def grads(fn):
        _, vjp = jax.vjp(lambda x, w: fn("bti,io->bto", x, w).astype(jnp.bfloat16), x, w)
        return vjp(g)

    plain = grads(lambda s, x, w: jnp.einsum(s, x, w, preferred_element_type=jnp.float32))
    for got, want in zip(grads(einsum_f32), plain):
        np.testing.assert_allclose(_f64(got), _f64(want), rtol=2 * BF16_EPS, atol=1e-6)


def test_bfloat16_backward_runs_only_bfloat16_matmuls():
    """The point of the module: autodiff's backward of a bf16 einsum has float32 x bfloat16 matmuls (which XLA:CPU
    runs in float32); the custom backward has only bf16 x bf16 -> f32 ones."""
    rng = np.random.default_rng(3)
    x, w = _bf16(rng, (2, 4, 8)), _bf16(rng, (8, 6))

    def dots(fn):
        loss = lambda x, w: jnp.sum(fn("bti,io->bto", x, w) ** 2)  # noqa: E731
        return dot_operand_dtypes(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w))

    plain = dots(lambda s, x, w: jnp.einsum(s, x, w, preferred_element_type=jnp.float32))
    assert any("float32" in (lhs, rhs) for lhs, rhs, _ in plain), plain
    narrow = dots(einsum_f32)
    assert len(narrow) == 3 and set(narrow) == {("bfloat16", "bfloat16", "float32")}, narrow


def test_bad_subscripts():
    for dtype in (jnp.bfloat16, jnp.float32):  # refused whatever the dtype, not only on the bf16 path
        x = jnp.zeros((2, 3), dtype)
        with pytest.raises(ValueError, match=r"explicit subscripts.*'\.\.\.i,io->\.\.\.o'"):
            einsum_f32("...i,io->...o", x, x.T)
        with pytest.raises(ValueError, match=r"'ij,jk->k'"):  # i is summed within one operand: no einsum gradient
            einsum_f32("ij,jk->k", x, x.T)


def _decoder_dots(dtype, policy):
    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = DecoderLM(cfg, dtype=dtype, param_dtype=dtype, remat_policy=policy, attention_impl="xla_chunked",
                      rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)

    def loss(p):
        return jnp.mean(nnx.merge(graphdef, p).hidden_states(ids).astype(jnp.float32) ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
    # Sums written as matrix-vector products with ones (reductions.sum_last_axis: attention's softmax backward over
    # the float32 scores) are reductions, not matmuls of weights or activations: counted apart.
    row_sums = [eqn for eqn in dot_eqns(jaxpr) if eqn.invars[1].aval.ndim == 1]
    assert all(str(e.invars[0].aval.dtype) == "float32" for e in row_sums), row_sums

    def dtypes(e):
        return str(e.invars[0].aval.dtype), str(e.invars[1].aval.dtype), str(e.outvars[0].aval.dtype)

    # attention's einsums are batched over (b, k); the projections' (forward, dx, dW) have no batch dimensions
    matmuls = [e for e in dot_eqns(jaxpr) if e.invars[1].aval.ndim > 1]
    projections = [dtypes(e) for e in matmuls if not e.params["dimension_numbers"][1][0]]
    attention = [dtypes(e) for e in matmuls if e.params["dimension_numbers"][1][0]]
    return projections, attention, str(jaxpr), len(row_sums)


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
@pytest.mark.parametrize("policy", ["none", "full", "dots", "dots_saveable", "dots_and_acts"])
def test_bfloat16_decoder_keeps_its_remat_policy_and_runs_bfloat16_matmuls(policy, platform, monkeypatch):
    """Every projection matmul of the bf16 decoder's gradient is bf16 x bf16; attention's are too on a (faked) GPU,
    and float32 on CPU (``attention_kernels.attention_dtype``). Each remat policy recomputes exactly the matmuls it
    recomputes in float32: the policies save by name, and the names are the same in both dtypes."""
    monkeypatch.setattr(attention_kernels, "_platform", lambda: platform)
    proj16, attn16, text16, sums16 = _decoder_dots(jnp.bfloat16, policy)
    proj32, attn32, _, sums32 = _decoder_dots(jnp.float32, policy)
    assert set(proj16) == {("bfloat16", "bfloat16", "float32")}, set(proj16)
    attn_dtype = "float32" if platform == "cpu" else "bfloat16"
    assert set(attn16) == {(attn_dtype, attn_dtype, "float32")}, set(attn16)
    assert (len(proj16), len(attn16)) == (len(proj32), len(attn32)) and len(attn16) > 0, (proj16, attn16)
    assert sums16 == sums32 > 0, (sums16, sums32)  # the float32 softmax-backward sums, the same in both dtypes
    assert f"name={PROJECTION_NAME}" in text16 and f"name={ATTENTION_MATMUL_NAME}" in text16
