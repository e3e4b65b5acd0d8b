"""The one-token decode path (``attention.cached_single_query_attention`` and ``DecoderLM.decode`` with ``t == 1``):
against a float64 NumPy reference, and step-by-step decoding against the full forward's logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfaug_jax.models import load_pretrained
from selfaug_jax.models.attention import cached_single_query_attention
from selfaug_jax.models.decoder import default_positions
from selfaug_jax.models.generation import left_pad
from torch_reference import make_tiny_hf_model

L, B, S, H, K, D = 3, 2, 11, 6, 2, 8


def test_single_query_attention_matches_float64_reference():
    """Layer 1 of a 3-layer stack, new token at slot 7, row 1 left-padded over slots 0-2: equals softmax attention
    over the slice with the new key / value written at slot 7 (float64), slots beyond 7 and padding excluded."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, 1, H, D)).astype(np.float32)
    k_new, v_new = (rng.standard_normal((B, 1, K, D)).astype(np.float32) for _ in range(2))
    k_cache, v_cache = (rng.standard_normal((L, B, S, K, D)).astype(np.float32) for _ in range(2))
    slot, layer = 7, 1
    valid = np.ones((B, S), bool)
    valid[1, :3] = False
    old_mask = valid & (np.arange(S) < slot)  # the slot being written holds no key yet
    out = cached_single_query_attention(
        *(jnp.asarray(x) for x in (q, k_new, v_new, k_cache, v_cache)), jnp.int32(layer),
        jnp.asarray(old_mask[:, None, :]), jnp.ones((B, 1), bool),
    )
    k_ref, v_ref = (c[layer].astype(np.float64) for c in (k_cache, v_cache))
    k_ref[:, slot], v_ref[:, slot] = k_new[:, 0], v_new[:, 0]
    ref = np.zeros((B, H, D))
    for b in range(B):
        for h in range(H):
            s = k_ref[b, :, h // (H // K)] @ q[b, 0, h].astype(np.float64) / np.sqrt(D)
            s = np.where(valid[b] & (np.arange(S) <= slot), s, -np.inf)
            p = np.exp(s - s.max())
            ref[b, h] = (p / p.sum()) @ v_ref[b, :, h // (H // K)]
    assert out.shape == (B, 1, H, D) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out)[:, 0], ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize("name", ["llama3-untied", "mistral", "qwen3-qknorm"])
def test_decode_steps_match_full_forward(tmp_path, name):
    """Prefill a left-padded prompt, then feed 7 known tokens one at a time through the one-token path: every
    step's logits and the final cache equal the full forward (mistral: sliding window 8 is crossed; qwen3: q/k
    norms)."""
    make_tiny_hf_model(name, tmp_path)
    model = load_pretrained(tmp_path)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, 128, 9).tolist(), rng.integers(1, 128, 4).tolist()]
    ids_bt, mask_bt = left_pad(prompts, 0)
    t, n = ids_bt.shape[1], 7
    follow_bn = rng.integers(1, 128, (2, n)).astype(np.int32)
    full_ids = np.concatenate([ids_bt, follow_bn], 1)
    full_mask = np.concatenate([mask_bt, np.ones((2, n), np.int32)], 1)
    expected = np.asarray(model(jnp.asarray(full_ids), attention_mask=jnp.asarray(full_mask)))

    pos_bt = np.asarray(default_positions(jnp.asarray(full_mask)))
    kv_valid = jnp.asarray(full_mask)
    decode = jax.jit(model.decode)
    logits, cache = decode(jnp.asarray(ids_bt), jnp.asarray(pos_bt[:, :t]), kv_valid, model.init_cache(2, t + n),
                           jnp.int32(0))
    real = mask_bt.astype(bool)  # a padding query's output is arbitrary (it attends nothing)
    np.testing.assert_allclose(np.asarray(logits)[real], expected[:, :t][real], atol=2e-5, rtol=0)
    for i in range(n):
        col = t + i
        logits, cache = decode(jnp.asarray(full_ids[:, col:col + 1]), jnp.asarray(pos_bt[:, col:col + 1]), kv_valid,
                               cache, jnp.int32(col))
        assert logits.shape == (2, 1, model.config.vocab_size)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], expected[:, col], atol=2e-5, rtol=0)
    # The cache the one-token steps wrote equals the one a single prefill of everything writes (real slots).
    _, full_cache = decode(jnp.asarray(full_ids), jnp.asarray(pos_bt), kv_valid, model.init_cache(2, t + n),
                           jnp.int32(0))
    for got, want in zip(cache, full_cache):
        np.testing.assert_allclose(np.asarray(got)[:, full_mask.astype(bool)],
                                   np.asarray(want)[:, full_mask.astype(bool)], atol=2e-5, rtol=0)
