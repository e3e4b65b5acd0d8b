"""KV-cache decoding one token at a time (``DecoderLM.decode`` with ``t == 1``, what every generation step runs)
against the full forward's logits: a regression test for any change to the decode path (bench/README.md,
"Session 5 — decode step")."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfaug_jax.models import load_pretrained
from selfaug_jax.models.decoder import default_positions
from selfaug_jax.models.generation import left_pad
from torch_reference import TINY, make_tiny_hf_model


def _make_smollm_shaped(out_dir):
    """A 2-layer random llama with SmolLM2-135M's attention shapes (9 heads, 3 KV heads, head dim 64)."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(**{**TINY, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3},
                                   rope_theta=100000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval().save_pretrained(out_dir)


@pytest.mark.parametrize("name,batch", [("llama3-untied", 2), ("mistral", 2), ("qwen3-qknorm", 2), ("smollm-shaped", 1)])
def test_decode_steps_match_full_forward(tmp_path, name, batch):
    """Prefill a left-padded prompt, then feed 7 known tokens one at a time: every step's logits and the final
    cache equal the full forward (mistral: sliding window 8 is crossed; qwen3: q/k norms; batch 1 with
    SmolLM2's head shapes: a candidate decode kernel was miscompiled by XLA:CPU there, see bench/README.md)."""
    _make_smollm_shaped(tmp_path) if name == "smollm-shaped" else make_tiny_hf_model(name, tmp_path)
    model = load_pretrained(tmp_path)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, 128, 9).tolist(), rng.integers(1, 128, 4).tolist()][:batch]
    ids_bt, mask_bt = left_pad(prompts, 0, bucket=64)  # left padding in every row, generate's default bucket
    t, n = ids_bt.shape[1], 7
    follow_bn = rng.integers(1, 128, (batch, n)).astype(np.int32)
    full_ids = np.concatenate([ids_bt, follow_bn], 1)
    full_mask = np.concatenate([mask_bt, np.ones((batch, n), np.int32)], 1)
    expected = np.asarray(model(jnp.asarray(full_ids), attention_mask=jnp.asarray(full_mask)))

    pos_bt = np.asarray(default_positions(jnp.asarray(full_mask)))
    kv_valid = jnp.asarray(full_mask)
    decode = jax.jit(model.decode)
    logits, cache = decode(jnp.asarray(ids_bt), jnp.asarray(pos_bt[:, :t]), kv_valid, model.init_cache(batch, t + n),
                           jnp.int32(0))
    real = mask_bt.astype(bool)  # a padding query's output is arbitrary (it attends nothing)
    np.testing.assert_allclose(np.asarray(logits)[real], expected[:, :t][real], atol=2e-5, rtol=0)
    for i in range(n):
        col = t + i
        logits, cache = decode(jnp.asarray(full_ids[:, col:col + 1]), jnp.asarray(pos_bt[:, col:col + 1]), kv_valid,
                               cache, jnp.int32(col))
        assert logits.shape == (batch, 1, model.config.vocab_size)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], expected[:, col], atol=2e-5, rtol=0)
    # The cache the one-token steps wrote equals the one a single prefill of everything writes (real slots).
    _, full_cache = decode(jnp.asarray(full_ids), jnp.asarray(pos_bt), kv_valid, model.init_cache(batch, t + n),
                           jnp.int32(0))
    for got, want in zip(cache, full_cache):
        np.testing.assert_allclose(np.asarray(got)[:, full_mask.astype(bool)],
                                   np.asarray(want)[:, full_mask.astype(bool)], atol=2e-5, rtol=0)
