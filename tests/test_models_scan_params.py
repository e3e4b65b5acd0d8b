"""``selfaug_jax/models/scan_params.py``: 16-bit stacked parameters scanned as bits, with gradients intact."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from selfaug_jax.models import DecoderLM, ModelConfig
from selfaug_jax.models.scan_params import BitsAndValue, layer_params, scan_inputs


def _scan_loss(use_bits: bool):
    def loss(x, w_lio, b_lo):
        xs = (w_lio, b_lo)
        if use_bits:
            xs = scan_inputs(xs)

        def body(h, xs):
            w, b = layer_params(xs) if use_bits else xs
            y = jnp.einsum("ni,io->no", h, w, preferred_element_type=jnp.float32) + b
            return jnp.tanh(y).astype(h.dtype), None

        h, _ = jax.lax.scan(jax.checkpoint(body), x, xs)
        return jnp.sum(h.astype(jnp.float32) ** 2)

    return loss


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_bits_scan_gives_the_values_and_gradients_of_the_plain_scan(dtype):
    """Straight-through: gradients reach trainable 16-bit stacks (a bare bitcast would make them zero)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 8)), dtype)
    w = jnp.asarray(rng.standard_normal((3, 8, 8)) * 0.3, dtype)
    b = jnp.asarray(rng.standard_normal((3, 8)), jnp.float32)  # a float32 leaf rides along unchanged
    wrapped = scan_inputs((w, b))
    assert isinstance(wrapped[0], BitsAndValue) and wrapped[0].bits.dtype == jnp.uint16
    assert not isinstance(wrapped[1], BitsAndValue)
    v0, g0 = jax.value_and_grad(_scan_loss(False), argnums=(0, 1, 2))(x, w, b)
    v1, g1 = jax.value_and_grad(_scan_loss(True), argnums=(0, 1, 2))(x, w, b)
    assert float(v1) == float(v0)
    for a, c in zip(g0, g1):
        assert float(jnp.max(jnp.abs(a.astype(jnp.float32)))) > 0
        np.testing.assert_array_equal(np.asarray(c, np.float32), np.asarray(a, np.float32))


def test_bfloat16_decoder_keeps_no_float32_copy_of_its_stacked_parameters():
    """XLA:CPU converts a bf16 operand of dynamic-slice to float32 whole; scanned as bits, no stacked parameter of a
    bf16 decoder is converted to float32 in its compiled gradient."""
    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = DecoderLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat_policy="dots", rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)  # 24 tokens: no kernel dim

    def loss(p):
        return jnp.mean(nnx.merge(graphdef, p).hidden_states(ids).astype(jnp.float32) ** 2)

    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    assert _float32_copies_of_stacked_params(hlo, cfg.num_hidden_layers) == []
    # and the check can fail: the plain bf16 dynamic-slice of such a stack is converted whole
    plain = jax.jit(lambda s, i: jax.lax.dynamic_index_in_dim(s, i, keepdims=False) * 2)
    text = plain.lower(jnp.zeros((4, 96, 32), jnp.bfloat16), 1).compile().as_text()
    assert _float32_copies_of_stacked_params(text, 4) == ["bf16[4,96,32]"]


def _float32_copies_of_stacked_params(hlo: str, n_layers: int) -> list[str]:
    """The ``bf16[n_layers, ...]`` parameters of an optimized HLO module that a convert (or a fusion of one) turns
    into float32 of the same size, whatever the fused computation reshapes them to."""
    params = dict(re.findall(rf"%([\w.\-]+) = (bf16\[{n_layers},[\d,]+\])\S* parameter\(", hlo))
    copies = []
    for out_dims, operand in re.findall(r"= f32\[([\d,]+)\]\S* (?:convert|fusion)\(%([\w.\-]+)[,)]", hlo):
        if operand in params and np.prod([int(d) for d in out_dims.split(",")]) == np.prod(
                [int(d) for d in params[operand][5:-1].split(",")]):
            copies.append(params[operand])
    return copies
