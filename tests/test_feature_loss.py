"""The ``features`` term (selfaug-features, SelfAug's Table 2) and the decoder's layer taps (models/taps.py)."""

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from selfaug_jax.experiment.config import ConfigError, build_config
from selfaug_jax.experiment.trainer import LOGGED_KEYS, _host_metrics
from selfaug_jax.feature_loss import SITE_TAPS, FeatureLossConfig, layer_distance_sum, selected_layers
from selfaug_jax.lora import LoRAConfig
from selfaug_jax.loss import SelfAugLossConfig
from selfaug_jax.models import DecoderLM, ModelConfig
from selfaug_jax.models.attention import make_attention_mask, rope_cos_sin, rope_inv_freq
from selfaug_jax.models.taps import TAP_SITES, LayerTaps
from selfaug_jax.train.objective import method_loss
from selfaug_jax.train.optimizer import OptimizerConfig, make_optimizer
from selfaug_jax.train.state import init_train_state
from selfaug_jax.train.step import StepConfig, make_train_step

B, T, V, L = 2, 12, 64, 3
LORA = LoRAConfig(rank=4, alpha=8.0, dropout=0.0)


def tiny_config(qwen=False):
    """A 3-layer GQA model; ``qwen``: q/k/v biases and per-head q/k RMSNorm (the taps are taken before the norm)."""
    extra = dict(q_bias=True, k_bias=True, v_bias=True, qk_norm=True) if qwen else {}
    return ModelConfig(model_type="qwen3" if qwen else "llama", vocab_size=V, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, head_dim=8, **extra)


def tiny_model(qwen=False, remat="none", seed=0):
    model = DecoderLM(tiny_config(qwen), remat_policy=remat, rngs=nnx.Rngs(seed))
    # Non-trivial norms and biases, so a misplaced tap (e.g. after a norm) shows.
    state = nnx.state(model, nnx.Param)
    state = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.3 * jax.random.normal(jax.random.key(zlib.crc32(str(p).encode()) % 9999), x.shape)
        if any(getattr(k, "key", None) in ("scale", "bias") for k in p) else x, state)
    nnx.update(model, state)
    return model


def make_batch(seed=0):
    """Random tokens; a prompt prefix (labels -100) and trailing padding (mask 0, labels -100) per row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, T)).astype(np.int32)
    labels, mask = ids.copy(), np.ones((B, T), np.int32)
    for i, (prompt, pad) in enumerate([(5, 2), (7, 0)]):
        labels[i, :prompt] = -100
        if pad:
            labels[i, T - pad:], mask[i, T - pad:], ids[i, T - pad:] = -100, 0, 0
    return {"input_ids_bt": jnp.asarray(ids), "labels_bt": jnp.asarray(labels), "attention_mask_bt": jnp.asarray(mask)}


def manual_taps(model, batch):
    """Every tap site, layer by layer in Python (no scan), from the layers' own sub-modules: {site: [L, b, t, F]}."""
    ids, mask = batch["input_ids_bt"], batch["attention_mask_bt"]
    cfg = model.config
    positions = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0)
    cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    index = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask_bts = make_attention_mask(index, index, mask, None, None, None)
    graphdef, stacked = nnx.split(model.layers)
    x = model.embed_tokens(ids)
    out = {s: [] for s in TAP_SITES}
    for layer_i in range(cfg.num_hidden_layers):
        layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[layer_i], stacked))
        normed = layer.input_layernorm(x)
        attn = layer.self_attn
        out["q"].append(attn.q_proj(normed))
        out["k"].append(attn.k_proj(normed))
        out["v"].append(attn.v_proj(normed))
        o = attn(normed, cos, sin, mask_bts)[0]
        ffn = layer.mlp(layer.post_attention_layernorm(x + o))
        x = x + o + ffn
        out["o"].append(o)
        out["ffn"].append(ffn)
        out["residual"].append(x)
    return {s: np.stack([np.asarray(a) for a in v]) for s, v in out.items()}


def numpy_distance(policy, ref, mask_bt, distance, layers):
    """float64 NumPy reading of the term: mean over layers of the mean over the site's taps of the mean over the
    aligned positions of the per-position distance."""
    per_layer = []
    for layer_i in layers:
        per_tap = []
        for s in policy:
            p, r = policy[s][layer_i].astype(np.float64), ref[s][layer_i].astype(np.float64)
            if distance == "mse":
                d = ((p - r) ** 2).mean(-1)
            else:
                d = 1.0 - (p * r).sum(-1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(r, axis=-1))
            per_tap.append(d[mask_bt].mean())
        per_layer.append(np.mean(per_tap))
    return float(np.mean(per_layer))


# ------------------------------------------------------------------------------------------------ decoder taps


@pytest.mark.parametrize("qwen", [False, True])
def test_taps_equal_a_layer_by_layer_forward_and_leave_the_output_unchanged(qwen):
    model, batch = tiny_model(qwen), make_batch()
    kw = dict(attention_mask=batch["attention_mask_bt"])
    plain = model.hidden_states(batch["input_ids_bt"], **kw)
    hidden, taps = model.hidden_states(batch["input_ids_bt"], taps=LayerTaps(tuple(TAP_SITES)), **kw)
    assert np.asarray(hidden).tobytes() == np.asarray(plain).tobytes()  # tapping never changes the forward
    manual = manual_taps(model, batch)
    d, hd = 32, 8
    widths = {"q": 4 * hd, "k": 2 * hd, "v": 2 * hd, "o": d, "ffn": d, "residual": d}
    for site in TAP_SITES:
        assert taps[site].shape == (L, B, T, widths[site]), site
        np.testing.assert_allclose(np.asarray(taps[site]), manual[site], rtol=1e-5, atol=1e-6, err_msg=site)
    # The last layer's residual tap is what the final norm normalises.
    np.testing.assert_allclose(np.asarray(model.norm(taps["residual"][-1])), np.asarray(plain), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("remat", ["none", "dots"])
def test_taps_do_not_change_the_forward_or_its_gradient(remat):
    """With a reduce inside the scan (the training path): the hidden states and the gradient of a loss of the
    hidden states alone are bitwise those of the plain forward."""
    model, batch = tiny_model(remat=remat), make_batch(1)
    graphdef, params = nnx.split(model)
    ids, kw = batch["input_ids_bt"], dict(attention_mask=batch["attention_mask_bt"])
    ref = jax.tree.map(lambda x: x + 0.01, params)
    _, ref_taps = nnx.merge(graphdef, ref).hidden_states(ids, taps=LayerTaps(("residual",)), **kw)
    tap = LayerTaps(("residual",), lambda p, r: jnp.sum(p["residual"] - r["residual"]), ref_taps)

    def plain(params):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, params).hidden_states(ids, **kw)))

    def tapped(params):
        hidden, sums_l = nnx.merge(graphdef, params).hidden_states(ids, taps=tap, **kw)
        return jnp.sum(jnp.sin(hidden)), sums_l

    v0, g0 = jax.jit(jax.value_and_grad(plain))(params)
    (v1, sums_l), g1 = jax.jit(jax.value_and_grad(tapped, has_aux=True))(params)
    assert sums_l.shape == (L,) and np.all(np.asarray(sums_l) != 0)
    assert np.float32(v0).tobytes() == np.float32(v1).tobytes()
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_layer_taps_refuse_unknown_sites():
    with pytest.raises(ValueError, match=r"LayerTaps.sites: \['attn'\] must be a non-empty subset"):
        LayerTaps(("attn",))


# ------------------------------------------------------------------------------------------------ the distances


@pytest.mark.parametrize("distance", ["mse", "cosine"])
def test_layer_distance_sum_equals_float64_numpy(distance):
    rng = np.random.default_rng(3)
    p = {s: rng.normal(size=(B, T, 6)).astype(np.float32) for s in ("q", "k")}
    r = {s: (p[s] + rng.normal(size=p[s].shape)).astype(np.float32) for s in p}
    r["k"][0, 0] = 0.0  # a zero reference vector: cosine distance 0.5 (its unit vector is 0), MSE as usual
    mask = rng.random((B, T)) < 0.5
    mask[0, 0] = True
    got = layer_distance_sum({s: jnp.asarray(v) for s, v in p.items()}, {s: jnp.asarray(v) for s, v in r.items()},
                             jnp.asarray(mask), distance)
    want = []
    for s in p:
        a, b = p[s].astype(np.float64), r[s].astype(np.float64)
        if distance == "mse":
            d = ((a - b) ** 2).mean(-1)
        else:
            d = 1.0 - (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-300)
            if s == "k":
                d[0, 0] = 0.5
        want.append(d[mask].sum())
    np.testing.assert_allclose(float(got), np.mean(want), rtol=2e-6)


def _train_setup(config: StepConfig, remat="dots", lora=LORA, steps=3, qwen=False):
    model = tiny_model(qwen=qwen, remat=remat)
    opt, sched = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_ratio=0.0, schedule="constant"), steps)
    model_def, state = init_train_state(model, "selfaug-features", opt, lora_config=lora, seed=0)
    return model_def, state, make_train_step(model_def, opt, sched, config)


def _nonzero_b(state):
    def randomise(path, x):
        if any(getattr(k, "key", None) == "lora_b" for k in path):
            return 0.3 * jax.random.normal(jax.random.key(zlib.crc32(str(path).encode()) % 9999), x.shape, x.dtype)
        return x

    return state.replace(trainable=jax.tree_util.tree_map_with_path(randomise, state.trainable))


@pytest.mark.parametrize("site,distance,layers,align", [
    ("residual", "mse", None, "prompt"),
    ("attn", "cosine", (0, -1), "prompt"),
    ("v", "mse", (1,), "prompt_without_padding"),
])
def test_term_equals_float64_numpy_from_the_taps(site, distance, layers, align):
    """method_loss's feature_distance (policy with non-zero LoRA B) against NumPy float64 from the two models' taps,
    on the prompt KL's own positions (``loss.align``)."""
    features = FeatureLossConfig(site=site, distance=distance, layers=layers, weight=0.7)
    config = StepConfig(loss=SelfAugLossConfig(align=align), features=features)
    model_def, state, _ = _train_setup(config, qwen=site == "attn")
    state, batch = _nonzero_b(state), make_batch(2)
    total, aux = method_loss(model_def, config, state.trainable, state.frozen, batch, None, None)
    kw = dict(attention_mask=batch["attention_mask_bt"])
    sites = SITE_TAPS[site]
    _, pol = model_def.policy(state.trainable, state.frozen).hidden_states(batch["input_ids_bt"],
                                                                          taps=LayerTaps(sites), **kw)
    _, ref = model_def.reference(state.trainable, state.frozen).hidden_states(batch["input_ids_bt"],
                                                                             taps=LayerTaps(sites), **kw)
    labels, mask = np.asarray(batch["labels_bt"]), np.asarray(batch["attention_mask_bt"])
    aligned = (labels == -100) & ((mask != 0) if align == "prompt_without_padding" else True)
    want = numpy_distance({s: np.asarray(pol[s]) for s in sites}, {s: np.asarray(ref[s]) for s in sites}, aligned,
                          distance, selected_layers(layers, L))
    got = float(aux["feature_distance"])
    assert want > 1e-6
    np.testing.assert_allclose(got, want, rtol=1e-4)
    np.testing.assert_allclose(float(total), float(aux["ce"]) + 0.7 * got, rtol=1e-6)


@pytest.mark.parametrize("remat,distance", [("dots", "mse"), ("dots", "cosine"), ("none", "mse")])
def test_step0_term_is_exactly_zero_and_total_equals_ce(remat, distance):
    """As for the prompt KL (tests/test_train_step.py): with per-layer remat (the training default) the policy's
    primal forward is bitwise the reference's at step 0 (LoRA B = 0), so the term is exactly 0 and the total is the
    CE bit for bit; without remat XLA fuses the linearised forward differently: float32 rounding, no more."""
    config = StepConfig(features=FeatureLossConfig(site="attn", distance=distance))
    _, state, step = _train_setup(config, remat=remat, lora=dataclasses.replace(LORA, dropout=0.1))
    _, metrics = step(state, make_batch())
    if remat == "none":
        assert 0.0 <= float(metrics["feature_distance"]) < 1e-9
        assert abs(float(metrics["loss"] - metrics["ce"])) < 1e-9
        return
    assert float(metrics["feature_distance"]) == 0.0
    assert np.float32(metrics["loss"]).tobytes() == np.float32(metrics["ce"]).tobytes()
    assert float(metrics["kl"]) == 0.0 and int(metrics["n_aligned_tokens"]) == 0  # no logit term


def test_training_moves_the_term_off_zero():
    config = StepConfig(features=FeatureLossConfig(site="residual"))
    _, state, step = _train_setup(config)
    values = []
    for i in range(3):
        state, metrics = step(state, make_batch(i))
        values.append(float(metrics["feature_distance"]))
        assert np.isfinite(float(metrics["loss"]))
    assert values[0] == 0.0 and values[1] > 0.0 and values[2] > 0.0
    np.testing.assert_allclose(float(metrics["loss"]), float(metrics["ce"]) + 0.5 * values[-1], rtol=1e-6)


def test_token_weighted_accumulation_equals_one_big_batch():
    """accum_normalization="token": the term's sum over micro-batches uses the whole batch's aligned count."""
    base = StepConfig(features=FeatureLossConfig(site="ffn", distance="cosine"), accum_normalization="token")
    model_def, state, _ = _train_setup(base)
    state, batch = _nonzero_b(state), make_batch(4)
    _, big = method_loss(model_def, base, state.trainable, state.frozen, batch, None, None)
    from selfaug_jax.train.step import make_eval_step

    metrics = make_eval_step(model_def, dataclasses.replace(base, grad_accum_steps=2))(state, batch)
    np.testing.assert_allclose(float(metrics["feature_distance"]), float(big["feature_distance"]), rtol=1e-5)


# ------------------------------------------------------------------------------------------------ config, logging


def test_config_section_and_errors():
    cfg = build_config("smoke", ["train.methods=[selfaug-features]", "features.site=q", "features.distance=cosine",
                                 "features.weight=0.3", "features.layers=[0,-1]"], check_paths=False)
    assert cfg.features == FeatureLossConfig(site="q", distance="cosine", weight=0.3, layers=(0, -1))
    assert build_config("smoke", [], check_paths=False).features == FeatureLossConfig()
    with pytest.raises(ConfigError, match="features.site: 'mlp' is not one of q, k, v, o, attn, ffn, residual"):
        build_config("smoke", ["features.site=mlp"], check_paths=False)
    with pytest.raises(ConfigError, match="features.weight"):
        build_config("smoke", ["features.weight=-1"], check_paths=False)
    with pytest.raises(ConfigError, match="repeats a layer"):
        build_config("smoke", ["features.layers=[1,1]"], check_paths=False)
    with pytest.raises(ValueError, match=r"features.layers: \[3\] out of range for a model with 3 layers"):
        selected_layers((0, 3), 3)
    with pytest.raises(ValueError, match="names a layer twice"):
        selected_layers((2, -1), 3)


def test_trainer_logs_term_metrics_generically():
    metrics = {k: jnp.float32(1.5) for k in LOGGED_KEYS} | {"feature_distance": jnp.float32(0.25)}
    metrics["n_tokens"] = jnp.int32(7)
    (row,) = _host_metrics([metrics])
    assert row["feature_distance"] == 0.25 and row["n_tokens"] == 7 and row["lr"] == 1.5
    assert list(row)[-1] == "feature_distance"


def test_trainer_runs_selfaug_features_from_the_config_and_logs_the_term(tmp_path):
    """``features:`` of the experiment config reaches the step (weight 2: the logged loss is CE + 2 x the term)."""
    import json

    from _sharding_worker import tiny_config
    from selfaug_jax.data import TokenizedExample
    from selfaug_jax.experiment.trainer import train_method

    cfg = build_config("smoke", ["train.max_steps=3", "train.batch_size=2", "train.export=false",
                                 "output.tensorboard=false", "data.max_length=16", "data.buckets=[16]", "lora.rank=4",
                                 "optimizer.learning_rate=1e-2", "optimizer.warmup_ratio=0",
                                 "features.site=ffn", "features.weight=2.0"], check_paths=False)
    rng = np.random.default_rng(0)
    source = []
    for i in range(6):
        ids = rng.integers(3, 128, 16).astype(np.int32)
        labels = np.where(np.arange(16) >= 10, ids, -100).astype(np.int32)
        source.append(TokenizedExample(id=f"ex{i}", input_ids=ids, labels=labels, meta={}))
    train_method("selfaug-features", cfg, model=DecoderLM(tiny_config(), rngs=nnx.Rngs(0)), source=source, pad_id=0,
                 out_dir=tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert abs(rows[0]["feature_distance"]) < 1e-9 and rows[-1]["feature_distance"] > 0
    np.testing.assert_allclose(rows[-1]["loss"], rows[-1]["ce"] + 2.0 * rows[-1]["feature_distance"], rtol=1e-5)
