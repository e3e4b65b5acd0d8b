"""LoRA: zero-init is a no-op, separate pytrees, merge, and PEFT export reproduced by transformers + peft."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
from flax import nnx

from selfaug_jax.lora import (
    ALL_LINEAR_TARGETS,
    LoRAConfig,
    add_lora,
    load_peft_adapter,
    lora_targets,
    merge_lora,
    save_peft_adapter,
    split_lora_model,
)
from selfaug_jax.models import LoRAParam, load_pretrained
from torch_reference import make_tiny_hf_model, torch_logits

CFG = LoRAConfig(rank=4, alpha=8.0, dropout=0.0)


def _randomise_b(model, seed=0):
    for i, (_, linear) in enumerate(lora_targets(model, ALL_LINEAR_TARGETS)):
        shape = linear.lora_b[...].shape
        linear.lora_b.set_value(0.05 * jax.random.normal(jax.random.key(seed * 1000 + i), shape))


@pytest.fixture(scope="module", params=["llama3-untied", "qwen2-bias-tied"])
def tiny(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    return d, make_tiny_hf_model(request.param, d)


def test_zero_init_is_identity_and_pytrees_are_separate(tiny):
    d, _ = tiny
    base = load_pretrained(d)
    model = add_lora(load_pretrained(d), CFG, nnx.Rngs(params=3))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 12)))
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(base(ids)))
    policy_gd, base_gd, lora, frozen = split_lora_model(model)
    lora_leaves = jax.tree.leaves(lora)
    n_layers = 2
    assert len(lora_leaves) == 2 * 7  # A and B on all seven projections, stacked over the layers
    assert all(leaf.shape[0] == n_layers for leaf in lora_leaves)
    q = model.layers.self_attn.q_proj
    assert q.lora_a[...].shape == (n_layers, 64, CFG.rank) and q.lora_b[...].shape == (n_layers, CFG.rank, 64)
    assert not any(isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(frozen))
    # the reference is the same frozen arrays without adapters
    reference = nnx.merge(base_gd, frozen)
    np.testing.assert_array_equal(np.asarray(reference(ids)), np.asarray(base(ids)))
    # embeddings and LM head are never adapted
    paths = [p for p, _ in lora_targets(model, ALL_LINEAR_TARGETS)]
    assert all(p[0] == "layers" for p in paths)


def test_unknown_target_is_rejected():
    with pytest.raises(ValueError, match="lm_head"):
        LoRAConfig(target_modules=("q_proj", "lm_head"))


def test_peft_export_reproduces_logits_and_merge(tiny, tmp_path):
    d, torch_model = tiny
    model = add_lora(load_pretrained(d), CFG, nnx.Rngs(params=1))
    _randomise_b(model)
    ids = np.random.default_rng(1).integers(0, 128, (2, 16))
    ours = np.asarray(model(jnp.asarray(ids)))
    out = save_peft_adapter(model, CFG, tmp_path / "adapter", base_model_name_or_path=str(d))
    peft_model = peft.PeftModel.from_pretrained(torch_model, out).eval()
    try:
        np.testing.assert_allclose(torch_logits(peft_model, ids), ours, atol=1e-5, rtol=0)
        with peft_model.disable_adapter():
            base_logits = torch_logits(peft_model, ids)
    finally:
        peft_model.unload()  # leave the shared fixture model without adapters
    assert np.abs(base_logits - ours).max() > 1e-3  # the adapters really change the output
    # reload into a fresh model
    again, cfg = load_peft_adapter(load_pretrained(d), out)
    assert cfg == CFG
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(ids))), ours)
    # merge folds the adapters into the kernels
    merged = merge_lora(model)
    assert not list(nnx.to_flat_state(nnx.state(merged, LoRAParam)))
    # same structure as the plain base model, so jitted evaluation functions are shared
    assert nnx.graphdef(merged) == nnx.graphdef(load_pretrained(d))
    np.testing.assert_allclose(np.asarray(merged(jnp.asarray(ids))), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.25])
def test_scaled_merge_matches_numpy_wise_ft(tiny, scale):
    """merge_lora(model, s) = W0 + s * (alpha / r) * A @ B per layer (float64 NumPy reference), i.e. WiSE-FT's
    (1 - s) * W0 + s * W_ft; a scale outside (0, 1] is refused."""
    d, _ = tiny
    model = add_lora(load_pretrained(d), CFG, nnx.Rngs(params=2))
    _randomise_b(model, seed=3)
    want, w0s = {}, {}
    for path, linear in lora_targets(model, ALL_LINEAR_TARGETS):
        w0 = np.asarray(linear.kernel[...], np.float64)
        a, b = np.asarray(linear.lora_a[...], np.float64), np.asarray(linear.lora_b[...], np.float64)
        w0s[path] = w0
        want[path] = w0 + scale * (CFG.alpha / CFG.rank) * np.einsum("lir,lro->lio", a, b)
        w_ft = w0 + (CFG.alpha / CFG.rank) * np.einsum("lir,lro->lio", a, b)
        np.testing.assert_allclose(want[path], (1 - scale) * w0 + scale * w_ft, rtol=0, atol=1e-12)
    merged = merge_lora(model, scale=scale)
    for path, linear in lora_targets(merged, ALL_LINEAR_TARGETS):
        got = np.asarray(linear.kernel[...], np.float64)
        np.testing.assert_allclose(got, want[path], rtol=0, atol=1e-6)
        assert np.abs(want[path] - w0s[path]).max() > 1e-4  # the adapter really moves every kernel
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"scale must be in \(0, 1\]"):
            merge_lora(add_lora(load_pretrained(d), CFG), scale=bad)
