"""The scanned layer stack (``selfaug_jax/models/decoder.py``): one compiled block whatever the depth, remat
policies that keep values and gradients, and remat that really lowers XLA's temporary memory."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from selfaug_jax.models import DecoderLM, ModelConfig
from selfaug_jax.lora import LoRAConfig, add_lora
from selfaug_jax.models.remat import ACTIVATION_NAMES, ATTENTION_MATMUL_NAME, PROJECTION_NAME


def _config(n_layers: int, windows=None) -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       sliding_windows=windows)


def _loss_fn(model: DecoderLM):
    graphdef, params = nnx.split(model)

    def loss(p, ids):
        return jnp.mean(nnx.merge(graphdef, p).hidden_states(ids) ** 2)

    return loss, params


def _ids(b=2, t=16):
    return jnp.asarray(np.random.default_rng(0).integers(0, 64, (b, t)), jnp.int32)


def test_parameters_are_stacked_over_layers():
    model = DecoderLM(_config(3), rngs=nnx.Rngs(0))
    assert model.layers.self_attn.q_proj.kernel[...].shape == (3, 32, 32)
    assert model.layers.mlp.down_proj.kernel[...].shape == (3, 64, 32)
    assert model.layers.input_layernorm.scale[...].shape == (3, 32)
    q_l = np.asarray(model.layers.self_attn.q_proj.kernel[...])
    assert not np.array_equal(q_l[0], q_l[1])  # each layer initialised from its own key


def test_program_size_does_not_grow_with_depth():
    """The lowered step of a 12-layer model is the 4-layer one (one scanned block), not three times its size.

    (4, not 2: a stack no deeper than ``scan_unroll`` (default 2) runs unrolled by 1, a deeper one by 2.)"""
    sizes = {}
    for n in (4, 12):
        loss, params = _loss_fn(DecoderLM(_config(n), remat_policy="full", rngs=nnx.Rngs(0)))
        text = jax.jit(jax.grad(loss)).lower(params, _ids()).as_text()
        sizes[n] = len(text)
    assert abs(sizes[12] - sizes[4]) < 0.02 * sizes[4], sizes


@pytest.mark.parametrize("policy", ["full", "dots", "dots_and_acts", "dots_saveable"])
def test_remat_policies_keep_values_and_gradients(policy):
    windows = (None, 4, None)  # layers that differ: the window rides along in the scan
    base = DecoderLM(_config(3, windows), rngs=nnx.Rngs(1))
    loss, params = _loss_fn(base)
    v0, g0 = jax.jit(jax.value_and_grad(loss))(params, _ids())
    loss_r, params_r = _loss_fn(DecoderLM(_config(3, windows), remat_policy=policy, rngs=nnx.Rngs(1)))
    v1, g1 = jax.jit(jax.value_and_grad(loss_r))(params_r, _ids())
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_policy_names_are_the_layers_checkpoint_names():
    """The names the policies save (models/remat.py) and the ``checkpoint_name`` tags in models/decoder.py and
    attention.py are the same names: a tag renamed in one place only would silently stop being saved."""
    loss, params = _loss_fn(DecoderLM(_config(2), remat_policy="dots_and_acts", rngs=nnx.Rngs(0)))
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params, _ids()))
    assert set(re.findall(r"name\[name=(\w+)\]", jaxpr)) == {*ACTIVATION_NAMES, PROJECTION_NAME, ATTENTION_MATMUL_NAME}


def _lora_dropout_loss(policy: str):
    model = add_lora(DecoderLM(_config(3), remat_policy=policy, rngs=nnx.Rngs(3)), LoRAConfig(rank=4, dropout=0.3))
    graphdef, params = nnx.split(model)

    def loss(p, ids, key):
        return jnp.mean(nnx.merge(graphdef, p).hidden_states(ids, dropout_rng=key) ** 2)

    return loss, params


@pytest.mark.parametrize("policy", ["full", "dots", "dots_and_acts", "dots_saveable"])
def test_remat_recomputes_the_same_lora_dropout_masks(policy):
    """No policy saves the LoRA dropout keep masks: the backward hashes the same positions again. The gradients
    (which read the masks through the adapter's input gradient and ``dA``) equal those without remat."""
    key = jax.random.key(7)
    loss0, params0 = _lora_dropout_loss("none")
    loss1, params1 = _lora_dropout_loss(policy)
    v0, g0 = jax.jit(jax.value_and_grad(loss0))(params0, _ids(), key)
    v1, g1 = jax.jit(jax.value_and_grad(loss1))(params1, _ids(), key)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    # a different dropout key changes the gradient: the comparison above sees the masks
    _, g2 = jax.jit(jax.value_and_grad(loss1))(params1, _ids(), jax.random.key(8))
    assert any(not np.allclose(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)))


def test_full_remat_lowers_temporary_memory():
    """Without remat the backward keeps every layer's activations; with "full" it keeps only the layer inputs."""
    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=256, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)

    def temp_bytes(policy):
        loss, params = _loss_fn(DecoderLM(cfg, remat_policy=policy, rngs=nnx.Rngs(0)))
        compiled = jax.jit(jax.grad(loss)).lower(params, _ids(4, 256)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    none, full = temp_bytes("none"), temp_bytes("full")
    activation = 4 * 256 * 256 * 4  # one [b, t, F] float32 MLP activation: 1 MiB
    # none: several [b, t, F] buffers (and [b, h, t, t] probabilities) per layer for all 8 layers
    assert none > 8 * 3 * activation, none
    assert full < 0.5 * none, (full, none)
    # dots_and_acts keeps the named O(T) activations on top of dots' matmul outputs (measured: 50.8 / 65.1 / 97.6
    # MiB for dots / dots_and_acts / none; 62.9 / 69.4 / 158.9 before attention's softmax had its own backward,
    # which keeps only the probabilities): more than dots, less than no remat.
    dots, acts = temp_bytes("dots"), temp_bytes("dots_and_acts")
    assert dots + 4 * activation < acts < 0.8 * none, (dots, acts, none)


@pytest.mark.parametrize("unroll", [1, 3])
def test_scan_unroll_keeps_values_and_gradients(unroll):
    """Unrolling the layer scan changes only the schedule: with 5 layers, the default 2 (two unrolled pairs and a
    remainder layer) and 3 give the values and gradients of the plain loop (1), per-layer windows riding along."""
    windows = (None, 4, None, 4, None)
    loss, params = _loss_fn(DecoderLM(_config(5, windows), remat_policy="dots", rngs=nnx.Rngs(2)))
    v0, g0 = jax.jit(jax.value_and_grad(loss))(params, _ids())
    loss_u, params_u = _loss_fn(
        DecoderLM(_config(5, windows), remat_policy="dots", scan_unroll=unroll, rngs=nnx.Rngs(2)))
    v1, g1 = jax.jit(jax.value_and_grad(loss_u))(params_u, _ids())
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_scan_unroll_must_be_positive():
    with pytest.raises(ValueError, match="scan_unroll"):
        DecoderLM(_config(2), scan_unroll=0, rngs=nnx.Rngs(0))
