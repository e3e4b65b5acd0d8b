"""The fused Threefry-2x32 of the decoder's dropout randomness (selfaug_jax/models/random_bits.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from selfaug_jax.lora import LoRAConfig, add_lora
from selfaug_jax.models import DecoderLM, ModelConfig
from selfaug_jax.models.random_bits import bits_at, fast_path, fold_in, row_major_index, threefry2x32


@pytest.mark.parametrize("seed", [0, 3, 123456])
def test_fused_threefry_gives_jax_random_bits_and_fold_in_exactly(seed):
    """random_bits.py's straight-line Threefry-2x32 reproduces jax's own draws bit for bit: every position's word
    of jax.random.bits, and fold_in's keys (static and traced data, as in the layer scan)."""
    key = jax.random.key(seed)
    for shape in [(5,), (3, 4), (4, 7, 288), (2, 3, 5, 7)]:
        ours = jax.jit(lambda k, shape=shape: bits_at(k, row_major_index(shape)))(key)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(jax.random.bits(key, shape, jnp.uint32)))
    for data in (0, 1, 29, 2**31 + 5):
        np.testing.assert_array_equal(np.asarray(jax.random.key_data(fold_in(key, jnp.uint32(data)))),
                                      np.asarray(jax.random.key_data(jax.random.fold_in(key, data))))
    traced = jax.jit(lambda k, i: jax.random.key_data(fold_in(k, i)))(key, jnp.int32(17))
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(jax.random.key_data(jax.random.fold_in(key, 17))))



def test_threefry2x32_known_answer():
    """The block function against Random123's known-answer vectors for Threefry-2x32 with 20 rounds (the ones
    jax's own tests use)."""
    for key, counter, expect in [((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
                                 ((0xFFFFFFFF,) * 2, (0xFFFFFFFF,) * 2, (0x1CB996FC, 0xBB002BE7)),
                                 ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0))]:
        y1, y2 = threefry2x32(*key, *counter)
        assert (int(y1), int(y2)) == expect


def test_other_key_implementations_take_jax_random():
    rbg = jax.random.key(0, impl="rbg")
    assert fast_path(jax.random.key(0)) and not fast_path(rbg) and not fast_path(jax.random.key_data(rbg))
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(fold_in(rbg, 3))),
                                  np.asarray(jax.random.key_data(jax.random.fold_in(rbg, 3))))


def test_lora_step_has_no_rolled_threefry_loop():
    """The dropout masks and per-layer keys of a LoRA forward lower to straight-line code: no while loop (jax's CPU
    threefry lowering) inside the layer scan's body."""
    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    model = DecoderLM(cfg, rngs=nnx.Rngs(0), remat_policy="dots")
    add_lora(model, LoRAConfig(rank=2, dropout=0.1), nnx.Rngs(1))
    ids = jnp.zeros((2, 8), jnp.int32)
    text = jax.jit(lambda m, k: m.hidden_states(ids, dropout_rng=k)).lower(model, jax.random.key(0)).as_text()
    assert text.count("stablehlo.while") == 1  # the layer scan alone
