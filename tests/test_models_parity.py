"""Logit parity of the NNX decoder against transformers' PyTorch models, and HF import/export."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from selfaug_jax.checkpoints.hf import CheckpointError, load_hf_model, save_hf_model
from selfaug_jax.models import ModelConfig, UnsupportedModelError, load_pretrained
from torch_reference import TINY_CONFIGS, make_tiny_hf_model, torch_logits

B, T = 2, 20


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    return request.param, d, make_tiny_hf_model(request.param, d)


def _ids(seed=0):
    return np.random.default_rng(seed).integers(0, 128, (B, T))


def test_fp32_logits_match_transformers(tiny):
    name, d, ref_model = tiny
    model = load_pretrained(d, dtype=jnp.float32)
    ids = _ids()
    ours = np.asarray(model(jnp.asarray(ids)))
    assert ours.dtype == np.float32 and ours.shape == (B, T, 128)
    np.testing.assert_allclose(ours, torch_logits(ref_model, ids), atol=1e-4, rtol=0)


def test_lm_head_weight_layouts_are_the_stored_table_and_its_transpose(tiny):
    """``lm_head_weight(layout)``: the stored array untransposed for ``lm_head_layout`` ([V, D] when tied), its
    transpose otherwise; both equal transformers' output embedding."""
    name, d, ref_model = tiny
    model = load_pretrained(d, dtype=jnp.float32)
    tied = model.lm_head is None
    assert model.lm_head_layout == ("vd" if tied else "dv")
    head_vd = ref_model.get_output_embeddings().weight.detach().numpy()  # torch Linear: [V, D]
    np.testing.assert_array_equal(np.asarray(model.lm_head_weight("vd")), head_vd)
    np.testing.assert_array_equal(np.asarray(model.lm_head_weight("dv")), head_vd.T)
    stored = model.embed_tokens.embedding[...] if tied else model.lm_head.kernel[...]
    assert model.lm_head_weight(model.lm_head_layout).shape == stored.shape
    with pytest.raises(ValueError, match="layout must be"):
        model.lm_head_weight("vv")


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_logits_match_transformers(tiny, side):
    name, d, ref_model = tiny
    model = load_pretrained(d)
    ids = _ids(1)
    mask = np.ones((B, T), np.int64)
    if side == "right":
        mask[1, 13:] = 0
    else:
        mask[1, :6] = 0
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)  # HF needs explicit positions for left padding
    ref = torch_logits(ref_model, ids, mask, positions)
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.abs(ours - ref)[real].max() <= 1e-4
    # explicit positions give the same thing
    ours2 = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), positions=jnp.asarray(positions)))
    np.testing.assert_array_equal(ours, ours2)


def test_bf16_load_and_hidden_states(tiny):
    name, d, ref_model = tiny
    model = load_pretrained(d, dtype=jnp.bfloat16)
    ids = jnp.asarray(_ids())
    assert model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    hidden = model.hidden_states(ids)
    assert hidden.dtype == jnp.bfloat16 and hidden.shape == (B, T, 64)
    logits = model(ids)
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())
    ref = torch_logits(ref_model, np.asarray(ids))
    # bf16 compute: loose agreement only (8 mantissa bits)
    assert np.abs(np.asarray(logits) - ref).max() < 0.1 * max(1.0, np.abs(ref).max())
    # separate hidden + head == full call
    full = model.project(hidden)
    np.testing.assert_array_equal(np.asarray(full), np.asarray(logits))
    assert model.lm_head_weight().shape == (64, 128)


def test_remat_policy_gives_identical_values_and_grads(tiny):
    name, d, _ = tiny
    ids = jnp.asarray(_ids())

    def loss_and_grad(policy):
        model = load_pretrained(d, remat_policy=policy)
        graphdef, params = nnx.split(model)

        def f(p):
            return jnp.mean(nnx.merge(graphdef, p)(ids) ** 2)

        return jax.jit(jax.value_and_grad(f))(params)

    v0, g0 = loss_and_grad("none")
    v1, g1 = loss_and_grad("full")
    np.testing.assert_allclose(float(v0), float(v1), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_export_round_trip_is_bitwise_and_loads_in_transformers(tiny, tmp_path):
    name, d, ref_model = tiny
    model = load_pretrained(d)
    out = save_hf_model(model, tmp_path / "export", tokenizer_dir=d)
    again = load_pretrained(out)
    for (p1, a), (p2, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(again))):
        assert p1 == p2
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids(2)
    np.testing.assert_allclose(torch_logits(hf, ids), torch_logits(ref_model, ids), atol=1e-6, rtol=0)


def test_sharded_export(tmp_path):
    d = tmp_path / "src"
    ref_model = make_tiny_hf_model("llama-tied", d)
    model = load_pretrained(d)
    out = save_hf_model(model, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    again = load_pretrained(out)
    ids = _ids(3)
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(ids))), np.asarray(model(jnp.asarray(ids))))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(torch_logits(hf, ids), torch_logits(ref_model, ids), atol=1e-6, rtol=0)


def _corrupt(d, fn):
    tensors = load_file(str(d / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path):
    d = tmp_path / "m"
    make_tiny_hf_model("llama3-untied", d)
    _corrupt(d, lambda t: (t.pop("model.layers.1.mlp.up_proj.weight"),
                           t.__setitem__("model.layers.0.self_attn.k_proj.weight", np.zeros((7, 64), np.float32)),
                           t.__setitem__("model.extra.weight", np.zeros(3, np.float32))))
    with pytest.raises(CheckpointError) as err:
        load_hf_model(d)
    msg = str(err.value)
    assert "missing tensor 'model.layers.1.mlp.up_proj.weight' (expected shape (96, 64))" in msg
    assert "'model.layers.0.self_attn.k_proj.weight'" in msg and "(7, 64)" in msg and "(32, 64)" in msg
    assert "unexpected tensor 'model.extra.weight'" in msg


def test_unknown_model_type_lists_supported():
    with pytest.raises(UnsupportedModelError, match="llama, mistral, qwen2, qwen3"):
        ModelConfig.from_hf_dict({"model_type": "gpt2", "vocab_size": 1})


def test_config_round_trip_through_transformers(tiny):
    name, d, _ = tiny
    cfg = ModelConfig.from_json_file(d / "config.json")
    again = ModelConfig.from_hf_dict(cfg.to_hf_dict())
    assert again == cfg
    # our parameter count equals torch's
    ref = transformers.AutoModelForCausalLM.from_pretrained(d)
    assert cfg.num_params() == sum(p.numel() for p in ref.parameters())
