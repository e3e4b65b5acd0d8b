"""Attention kernels and their dispatcher (``selfaug_jax/models/attention_kernels.py``).

Every kernel that runs on CPU (xla_chunked, dot_product, and splash in Pallas interpret mode) is checked against a
float64 NumPy reference on real query rows; cudnn's argument mapping is checked by running the same call through
jax's XLA implementation. Dispatch to cudnn / splash is tested on a faked platform: neither kernel has been run on
a GPU / TPU by these tests.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from selfaug_jax.experiment.config import ConfigError, build_config
from selfaug_jax.models import attention_kernels as ak
from selfaug_jax.models.attention import causal_block_skipping_attention, grouped_query_attention, make_attention_mask
from selfaug_jax.models.config import ModelConfig
from selfaug_jax.models.decoder import DecoderLM

B, H, K, D = 2, 4, 2, 8


def _case(kind: str, t: int = 12, d: int = D, seed: int = 0):
    """``(q, k, v, ForwardMask, valid rows [b, t])`` for one mask feature; GQA (4 query heads on 2 kv heads)."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((B, t, n, d)).astype(np.float32)) for n in (H, K, K))
    valid = np.ones((B, t), np.int32)
    segments = None
    window, layer_window = None, False
    if kind == "left_pad":
        valid[1, : t // 3] = 0
    elif kind == "packed":  # two examples in row 0, one plus right padding in row 1
        segments = np.ones((B, t), np.int32)
        segments[0, t // 2:] = 2
        segments[1, -2:] = 0
        valid = (segments > 0).astype(np.int32)
    elif kind == "packed_long_pad":  # row 1: one example, then right padding over most of the row (several chunks)
        segments = np.ones((B, t), np.int32)
        segments[0, t // 3:] = 2
        segments[1, t // 4:] = 0
        valid = (segments > 0).astype(np.int32)
    elif kind in ("window", "layer_window"):
        valid[1, :2] = 0
        window, layer_window = 5, kind == "layer_window"
    index = jnp.broadcast_to(jnp.arange(t), (B, t))
    seg = None if segments is None else jnp.asarray(segments)
    args = (index, index, jnp.asarray(valid), seg, seg)
    dense = make_attention_mask(*args, window)
    mask = ak.ForwardMask.from_mask_args(dense, args, None if layer_window else window, layer_window)
    return q, k, v, mask, valid.astype(bool)


def _reference_f64(q, k, v, dense_bts):
    """Float64 GQA softmax attention ``[b, t, h, d]`` (masked logits dropped)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(np.asarray(dense_bts)[:, None], s, -1e300)  # fully masked (padding) rows: uniform
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


KINDS = ["causal", "left_pad", "packed", "window", "layer_window"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", ["xla_chunked", "dot_product"])
def test_cpu_kernels_match_float64_reference(impl, kind):
    q, k, v, mask, rows = _case(kind)
    out = ak.attend(q, k, v, mask, impl=impl, q_chunk=5)
    ref = _reference_f64(q, k, v, mask.dense_bts)
    np.testing.assert_allclose(np.asarray(out)[rows], ref[rows], rtol=0, atol=3e-6)


@pytest.mark.parametrize("kind", ["left_pad", "packed", "window"])
def test_dot_product_gradients_match_xla_chunked(kind):
    q, k, v, mask, rows = _case(kind, seed=1)
    w = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape).astype(np.float32) * rows[:, :, None, None])

    def loss(q, k, v, impl):
        return jnp.sum(ak.attend(q, k, v, mask, impl=impl, q_chunk=5) * w)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    ours, ref = grad(q, k, v, "dot_product"), grad(q, k, v, "xla_chunked")
    for a, b in zip(ours, ref):
        assert float(jnp.max(jnp.abs(b))) > 1e-2  # the weights reach every input
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-5)


SKIP_KINDS = ["causal", "left_pad", "packed", "packed_long_pad", "window", "layer_window"]


@pytest.mark.parametrize("q_chunk", [16, 6])
@pytest.mark.parametrize("kind", SKIP_KINDS)
def test_causal_block_skipping_matches_float64_reference_on_every_row(kind, q_chunk):
    """xla_chunked on a ForwardMask skips key blocks; t=40 in chunks of 16 (ragged last chunk). Every row matches,
    the fully masked padding rows too (uniform over all keys, as the unskipped kernel and HF eager give them).
    q_chunk=6: 7 chunks in 4 groups, three of them mapping over two chunks (the last with the ragged chunk)."""
    q, k, v, mask, rows = _case(kind, t=40)
    out = np.asarray(jax.jit(functools.partial(ak.attend, impl="xla_chunked", q_chunk=q_chunk))(q, k, v, mask))
    ref = _reference_f64(q, k, v, mask.dense_bts)
    np.testing.assert_allclose(out, ref, rtol=0, atol=3e-6)
    full = np.asarray(jax.jit(functools.partial(grouped_query_attention, q_chunk=q_chunk))(q, k, v, mask.dense_bts))
    np.testing.assert_allclose(out, full, rtol=0, atol=2e-6)
    assert (~np.asarray(mask.dense_bts).any(-1)).any() == (kind in ("left_pad", "packed", "packed_long_pad", "window",
                                                                     "layer_window"))


@pytest.mark.parametrize("q_chunk", [16, 6])
@pytest.mark.parametrize("kind", ["left_pad", "packed_long_pad", "window"])
def test_causal_block_skipping_gradients_match_unskipped(kind, q_chunk):
    """Gradients of all rows (padding rows included: the SelfAug KL reads them) equal the unskipped kernel's."""
    q, k, v, mask, _ = _case(kind, t=40, seed=1)
    w = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape).astype(np.float32))

    def grads(kernel):
        loss = lambda q, k, v, m: jnp.sum(jnp.sin(kernel(q, k, v, m)) * w)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v, mask.dense_bts)

    ours = grads(functools.partial(causal_block_skipping_attention, q_chunk=q_chunk, window=mask.window))
    ref = grads(functools.partial(grouped_query_attention, q_chunk=q_chunk))
    for a, b in zip(ours, ref):
        assert float(jnp.max(jnp.abs(b))) > 1e-1
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)


def test_causal_block_skipping_skips_the_blocks_above_the_diagonal():
    """Compiled forward FLOPs against the unchunked kernel, n = 8 chunks of 64 (64 chunk-by-key blocks in all).
    One chunk per group: (n + 1) / (2 n) = 36/64 of them. The default 4 groups of 2 chunks attend to 2, 4, 6, 8 key
    blocks; XLA's cost analysis counts each group's lax.map body once, so it sees 2 + 4 + 6 + 8 = 20 of 64 (the
    work done is twice that, 40/64 = (G + 1) / (2 G)). A static window of one chunk leaves each chunk at most two
    key blocks (< 1/4). (The backward is not counted: checkpointed chunks recompute the forward.)"""
    q, k, v, mask, _ = _case("causal", t=512, d=32)

    def flops(q_chunk, window=None, groups=None):
        kernel = functools.partial(causal_block_skipping_attention, q_chunk=q_chunk, window=window, groups=groups)
        cost = jax.jit(kernel).lower(q, k, v, mask.dense_bts).compile().cost_analysis()
        return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])

    full, per_chunk, grouped = flops(None), flops(64, groups=8), flops(64)
    assert abs(per_chunk / full - 36 / 64) < 0.03, (per_chunk, full)
    assert abs(grouped / full - 20 / 64) < 0.03, (grouped, full)
    assert flops(64, window=64, groups=8) / full < 0.25


def test_causal_block_skipping_rejects_cross_attention():
    q, k, v, mask, _ = _case("causal", t=12)
    with pytest.raises(ValueError, match="query length 12 != key length 6"):
        causal_block_skipping_attention(q, k[:, :6], v[:, :6], mask.dense_bts[:, :, :6], 4)


@pytest.mark.parametrize("kind", ["left_pad", "packed", "window"])
def test_splash_interpret_matches_float64_reference(kind):
    """The splash kernel itself (Pallas interpret mode on CPU): its block mask + segment ids reproduce the mask."""
    q, k, v, mask, rows = _case(kind, t=128, d=16)
    out = ak.splash(q, k, v, mask, interpret=True)
    ref = _reference_f64(q, k, v, mask.dense_bts)
    np.testing.assert_allclose(np.asarray(out)[rows], ref[rows], rtol=0, atol=3e-6)


def test_splash_interpret_gradients_match_xla_chunked():
    q, k, v, mask, rows = _case("packed", t=128, d=16)
    w = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape).astype(np.float32) * rows[:, :, None, None])

    def grads(kernel):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(kernel(q, k, v, mask) * w), argnums=(0, 1, 2)))(q, k, v)

    ours = grads(functools.partial(ak.splash, interpret=True))
    for a, b in zip(ours, grads(ak.xla_chunked)):
        assert float(jnp.max(jnp.abs(b))) > 1.0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)


def test_cudnn_call_maps_the_mask_exactly(monkeypatch):
    """cudnn's jax.nn call (is_causal + dense mask), run through jax's XLA implementation, equals the reference."""
    calls = []
    real = jax.nn.dot_product_attention

    def via_xla(*args, implementation=None, **kw):
        calls.append((implementation, kw["is_causal"]))
        return real(*args, implementation="xla", **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", via_xla)
    q, k, v, mask, rows = _case("packed")
    out = ak.cudnn(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out)[rows], _reference_f64(q, k, v, mask.dense_bts)[rows], atol=3e-6)
    assert calls == [("cudnn", True)]


def test_dispatch_on_gpu(monkeypatch):
    monkeypatch.setattr(ak, "_platform", lambda: "gpu")
    q, k, v, mask, _ = _case("packed")
    bf16 = q.astype(jnp.bfloat16)
    assert ak.select_kernel("auto", bf16, mask) == ("cudnn", None)
    assert ak.select_kernel("cudnn", bf16, mask.dense_bts) == ("cudnn", None)  # any mask: it travels as a bias
    name, reason = ak.select_kernel("auto", q, mask)  # float32: cuDNN flash attention does not take it
    assert name == "xla_chunked" and "bfloat16/float16, not float32" in reason
    name, reason = ak.select_kernel("auto", jnp.zeros((B, 12, H, 12), jnp.bfloat16), mask)
    assert name == "xla_chunked" and "head_dim 12" in reason
    with pytest.raises(ValueError, match=r"model.attention_impl='cudnn': cuDNN flash attention takes bfloat16"):
        ak.select_kernel("cudnn", q, mask)
    with pytest.raises(ValueError, match=r"model.attention_impl='splash' needs a TPU but this process runs on 'gpu'"):
        ak.select_kernel("splash", bf16, mask)
    assert ak.select_kernel("dot_product", q, mask) == ("dot_product", None)


def test_dispatch_on_tpu_and_logged_fallbacks(monkeypatch, caplog):
    monkeypatch.setattr(ak, "_platform", lambda: "tpu")
    q, k, v, mask, rows = _case("window", t=128)
    assert ak.select_kernel("auto", q, mask) == ("splash", None)
    assert ak.select_kernel("splash", q, mask) == ("splash", None)
    name, reason = ak.select_kernel("splash", q, mask.dense_bts)
    assert name == "xla_chunked" and "general [b, t, s] mask" in reason
    with pytest.raises(ValueError, match=r"model.attention_impl='splash': sequence length 12 is not a multiple"):
        ak.select_kernel("splash", _case("causal")[0], mask)
    assert ak.select_kernel("auto", _case("causal")[0], mask)[0] == "xla_chunked"
    with pytest.raises(ValueError, match=r"model.attention_impl='cudnn' needs a GPU but this process runs on 'tpu'"):
        ak.select_kernel("cudnn", q, mask)
    # Per-layer windows cannot be a static block mask: attend falls back, logs why, and computes the right thing.
    q, k, v, mask, rows = _case("layer_window")
    with caplog.at_level(logging.WARNING, logger=ak.__name__):
        out = ak.attend(q, k, v, mask, impl="splash")
    assert "falling back to xla_chunked (splash: sliding windows that differ between layers" in caplog.text
    np.testing.assert_allclose(np.asarray(out)[rows], _reference_f64(q, k, v, mask.dense_bts)[rows], atol=3e-6)


def test_dispatch_on_cpu_and_unknown_names():
    q, k, v, mask, _ = _case("causal")
    assert ak.select_kernel("auto", q, mask, platform="cpu") == ("xla_chunked", None)
    with pytest.raises(ValueError, match=r"model.attention_impl='cudnn' needs a GPU but this process runs on 'cpu'"):
        ak.select_kernel("cudnn", q, mask, platform="cpu")
    with pytest.raises(ValueError, match=r"^model.attention_impl: unknown 'flash'; choose from auto, xla_chunked"):
        ak.select_kernel("flash", q, mask)
    cfg = _tiny_config()
    with pytest.raises(ValueError, match=r"^model.attention_impl: unknown 'flash'"):
        DecoderLM(cfg, attention_impl="flash")
    with pytest.raises(ConfigError, match=r"model.attention_impl: 'flash' is not one of auto, xla_chunked, dot_pro"):
        build_config("smoke", ["model.attention_impl=flash"])
    assert build_config("smoke", ["model.attention_impl=dot_product"]).model.attention_impl == "dot_product"


def _tiny_config(windows=None):
    return ModelConfig(model_type="mistral", vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_windows=windows)


def _batch(t):
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(0, 50, (B, t)), jnp.int32)
    segments = np.ones((B, t), np.int32)
    segments[0, t // 2:] = 2
    segments[1, : t // 4] = 0  # left padding
    return ids, jnp.asarray(segments)


@pytest.mark.parametrize("windows", [None, (6, None)])
def test_tiny_model_forward_with_dot_product_equals_default(windows):
    """Packed rows with left padding through the whole decoder (per-layer windows in the second case)."""
    cfg = _tiny_config(windows)
    ids, segments = _batch(16)
    rows = np.asarray(segments) > 0
    forward = nnx.jit(lambda model: model(ids, segment_ids=segments))
    ref = np.asarray(forward(DecoderLM(cfg, attention_chunk=5, rngs=nnx.Rngs(0))))  # CPU auto: xla_chunked
    out = np.asarray(forward(DecoderLM(cfg, attention_impl="dot_product", attention_chunk=5, rngs=nnx.Rngs(0))))
    assert np.abs(ref[rows]).max() > 0.1
    np.testing.assert_allclose(out[rows], ref[rows], rtol=0, atol=2e-5)


def test_tiny_model_on_faked_tpu_runs_splash(monkeypatch):
    """The whole decoder with auto on a faked TPU: the forward dispatches to splash (interpret mode here)."""
    cfg = _tiny_config((6, 6))
    ids, segments = _batch(128)
    rows = np.asarray(segments) > 0
    forward = nnx.jit(lambda model: model(ids, segment_ids=segments))
    ref = np.asarray(forward(DecoderLM(cfg, attention_impl="xla_chunked", rngs=nnx.Rngs(0))))
    used = []

    def splash_interpret(*args):
        used.append(True)
        return ak.splash(*args, interpret=True)

    monkeypatch.setattr(ak, "_platform", lambda: "tpu")
    monkeypatch.setitem(ak.KERNELS, "splash", splash_interpret)
    out = np.asarray(forward(DecoderLM(cfg, attention_impl="auto", rngs=nnx.Rngs(0))))
    assert used
    np.testing.assert_allclose(out[rows], ref[rows], rtol=0, atol=2e-5)


def test_xla_chunked_attends_half_precision_in_float32_on_cpu_only(monkeypatch):
    """bf16 inputs on CPU: float32 attention of the bf16 values, rounded once; on a (faked) GPU: bf16 einsums."""
    q, k, v, mask, rows = _case("left_pad", t=16)
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    assert ak.attention_dtype(jnp.bfloat16, platform="cpu") == jnp.float32
    assert ak.attention_dtype(jnp.bfloat16, platform="gpu") == jnp.bfloat16
    assert ak.attention_dtype(jnp.float32, platform="cpu") == jnp.float32
    out = ak.xla_chunked(q16, k16, v16, mask, q_chunk=5)
    assert out.dtype == jnp.bfloat16
    f32 = ak.xla_chunked(*(x.astype(jnp.float32) for x in (q16, k16, v16)), mask, q_chunk=5)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(f32.astype(jnp.bfloat16), np.float32))
    monkeypatch.setattr(ak, "_platform", lambda: "gpu")
    out_gpu = ak.xla_chunked(q16, k16, v16, mask, q_chunk=5)
    bf16_ref = causal_block_skipping_attention(q16, k16, v16, mask.dense_bts, 5, mask.window)
    np.testing.assert_array_equal(np.asarray(out_gpu, np.float32), np.asarray(bf16_ref, np.float32))
    assert not np.array_equal(np.asarray(out_gpu, np.float32)[rows], np.asarray(out, np.float32)[rows])
