"""Query-chunked attention (``selfaug_jax/models/attention.py``) against a float64 NumPy reference and the dense path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from selfaug_jax.models import load_pretrained
from selfaug_jax.models.attention import grouped_query_attention, make_attention_mask
from torch_reference import TINY, make_tiny_hf_model, torch_logits

B, T, H, K, D = 2, 13, 6, 2, 8


def _inputs(seed=0, t=T):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, t, H, D)).astype(np.float32)
    k = rng.standard_normal((B, t, K, D)).astype(np.float32)
    v = rng.standard_normal((B, t, K, D)).astype(np.float32)
    valid = np.ones((B, t), np.int32)
    valid[1, t - 4:] = 0  # right padding in row 1
    segments = np.ones((B, t), np.int32)
    segments[0, 6:] = 2  # two packed examples in row 0
    index = np.broadcast_to(np.arange(t), (B, t))
    mask = np.asarray(make_attention_mask(jnp.asarray(index), jnp.asarray(index), jnp.asarray(valid),
                                          jnp.asarray(segments), jnp.asarray(segments), sliding_window=9))
    return q, k, v, mask


def _reference_f64(q, k, v, mask):
    """Plain-loop GQA softmax attention in float64 (fully masked rows: uniform, as with a finite fill value)."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    out = np.zeros(q.shape, np.float64)
    group = H // K
    for b in range(B):
        for h in range(H):
            s = q[b, :, h] @ k[b, :, h // group].T / np.sqrt(D)
            s = np.where(mask[b], s, -1e300)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[b, :, h] = p @ v[b, :, h // group]
    return out


@pytest.mark.parametrize("q_chunk", [None, 4, 5, 13, 64])
def test_chunked_attention_matches_float64_reference(q_chunk):
    q, k, v, mask = _inputs()
    ours = np.asarray(grouped_query_attention(*(jnp.asarray(x) for x in (q, k, v, mask)), q_chunk=q_chunk))
    ref = _reference_f64(q, k, v, mask)
    valid_rows = mask.any(-1)
    np.testing.assert_allclose(ours[valid_rows], ref[valid_rows], rtol=0, atol=2e-6)


@pytest.mark.parametrize("q_chunk", [4, 5])
def test_chunked_attention_gradients_match_dense(q_chunk):
    q, k, v, mask = (jnp.asarray(x) for x in _inputs(1))
    w = jnp.asarray(np.random.default_rng(2).standard_normal((B, T, H, D)).astype(np.float32))

    def loss(q, k, v, chunk):
        return jnp.sum(jnp.sin(grouped_query_attention(q, k, v, mask, q_chunk=chunk)) * w)

    dense = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)(q, k, v, None)
    chunked = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)(q, k, v, q_chunk)
    np.testing.assert_allclose(float(chunked[0]), float(dense[0]), rtol=1e-5)
    for a, b in zip(chunked[1], dense[1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-6)


def test_chunked_attention_keeps_bf16_dtype():
    q, k, v, mask = _inputs(3)
    out = grouped_query_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), jnp.asarray(mask), q_chunk=4)
    assert out.dtype == jnp.bfloat16 and out.shape == (B, T, H, D)
    ref = _reference_f64(q, k, v, mask)
    assert np.abs(np.asarray(out, np.float64) - ref)[mask.any(-1)].max() < 0.05


def test_chunked_attention_does_not_hold_full_score_tensor():
    """XLA's buffer assignment: the chunked value+grad needs far less scratch than the dense one at long T."""
    t, h, k, d, chunk = 1024, 8, 2, 16, 128
    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.standard_normal((1, t, h, d)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((1, t, k, d)), jnp.float32)
    index = jnp.arange(t)[None]
    mask = make_attention_mask(index, index, jnp.ones((1, t), jnp.int32))

    def temp_bytes(q_chunk):
        f = jax.jit(jax.grad(lambda q: jnp.sum(grouped_query_attention(q, kv, kv, mask, q_chunk=q_chunk) ** 2)))
        return f.lower(q).compile().memory_analysis().temp_size_in_bytes

    dense, chunked = temp_bytes(None), temp_bytes(chunk)
    scores = h * t * t * 4  # one float32 [1, h, t, t] tensor: 32 MiB
    assert dense >= scores
    assert chunked < scores / 2, (dense, chunked)


@pytest.mark.parametrize("name", ["llama3-untied", "qwen2-bias-tied", "mistral"])
def test_decoder_with_small_chunks_matches_transformers(tmp_path, name):
    """Chunks of 8 over T=20 (padded to 24), with left padding: same logits as transformers and the dense path."""
    ref_model = make_tiny_hf_model(name, tmp_path)
    ids = np.random.default_rng(5).integers(0, 128, (2, 20))
    mask = np.ones((2, 20), np.int64)
    mask[1, :5] = 0
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    ref = torch_logits(ref_model, ids, mask, positions)
    chunked = load_pretrained(tmp_path, attention_chunk=8)
    dense = load_pretrained(tmp_path, attention_chunk=None)
    ours = np.asarray(chunked(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    ours_dense = np.asarray(dense(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.abs(ours - ref)[real].max() <= 1e-4
    np.testing.assert_allclose(ours, ours_dense, rtol=0, atol=2e-6)
    assert chunked.layers.self_attn.attention_chunk == 8
    assert nnx.graphdef(chunked) != nnx.graphdef(dense)


def test_attention_chunk_must_be_positive(tmp_path):
    make_tiny_hf_model("llama-tied", tmp_path)
    with pytest.raises(ValueError, match="attention_chunk"):
        load_pretrained(tmp_path, attention_chunk=0)


def test_per_layer_sliding_windows_match_transformers(tmp_path):
    """Qwen2 with ``max_window_layers=1``: layer 0 full, layer 1 windowed (the window is a scan input). Logits match
    transformers, and KV-cache greedy decoding equals the no-cache reference."""
    import torch
    import transformers

    from selfaug_jax.models.generation import GenerationConfig, generate, greedy_generate_no_cache

    cfg = transformers.Qwen2Config(**TINY, rope_theta=10000.0, use_sliding_window=True, sliding_window=4,
                                   max_window_layers=1, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    assert model.config.sliding_windows == (None, 4)
    ids = np.random.default_rng(0).integers(0, 128, (2, 20))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), torch_logits(hf, ids), atol=1e-5, rtol=0)
    prompts = [ids[0, :9].tolist(), ids[1, :5].tolist()]
    res = generate(model, prompts, GenerationConfig(max_new_tokens=8, eos_token_ids=()))
    np.testing.assert_array_equal(res.tokens, greedy_generate_no_cache(model, prompts, 8))


def test_softmax_last_matches_jax_softmax_forward_and_gradient_float64():
    """attention.softmax_last (hand-written backward, the keys' sum as a matrix-vector product) is jax.nn.softmax:
    the forward bit for bit, the gradient to float64 rounding, a fully masked row (finite fill) included."""
    from selfaug_jax.models.attention import _MASK_VALUE, softmax_last

    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5, 7)) * 4, jnp.float64)
        x = x.at[0, 0, 0].set(_MASK_VALUE)  # a padding query: every key masked
        x = x.at[1, 2, :, :3].set(_MASK_VALUE)
        g = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float64)
        np.testing.assert_array_equal(np.asarray(softmax_last(x)), np.asarray(jax.nn.softmax(x, axis=-1)))
        got = jax.vjp(softmax_last, x)[1](g)[0]
        want = jax.vjp(lambda z: jax.nn.softmax(z, axis=-1), x)[1](g)[0]
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-15)
