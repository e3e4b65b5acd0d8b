"""Flax NNX decoder-only transformer covering Llama (2/3/3.1, SmolLM, TinyLlama), Mistral, Qwen2/2.5 and Qwen3.

The module computes what the Hugging Face PyTorch classes compute (see ``tests/test_models_parity.py``).
Parameters are ``nnx.Param`` (kernels ``[in, out]``); LoRA adapters, when added by :mod:`selfaug_jax.lora`, are
``LoRAParam`` variables inside the same :class:`Linear` modules, so ``nnx.split(model, LoRAParam, nnx.Param)``
separates the trainable adapters from the frozen base.

The final hidden states are available separately from the LM head (:meth:`DecoderLM.hidden_states`,
:meth:`DecoderLM.lm_head_weight`) so a loss can project onto the vocabulary in chunks.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from selfaug_jax.loss_primitives import HEAD_LAYOUTS
from selfaug_jax.models.attention import (
    apply_rope,
    grouped_query_attention,
    make_attention_mask,
    rope_cos_sin,
    rope_inv_freq,
    within_window,
)
from selfaug_jax.models.attention_kernels import ForwardMask, attend, check_attention_impl
from selfaug_jax.models.config import ModelConfig
from selfaug_jax.models.lora_matmul import effective_keep_scale, keep_mask_or_none, lora_update
from selfaug_jax.models.matmul import einsum_f32
from selfaug_jax.models.remat import PROJECTION_NAME, REMAT_POLICIES
from selfaug_jax.models.scan_params import layer_params, scan_inputs
from selfaug_jax.models.swiglu import swiglu
from selfaug_jax.models.taps import LayerTaps, TapDict

# Query-chunk length of training/prefill attention (``grouped_query_attention``'s ``q_chunk``). Dense attention
# holds a float32 [b, heads, t, t] score buffer per layer being computed (all layers' probabilities without remat);
# chunks of 512 bound that by [b, heads, 512, t], which matters from a few thousand tokens on (bench/README.md).
DEFAULT_ATTENTION_CHUNK = 512
# Layers per iteration of the training / evaluation layer scan. 2 measured 8% faster than 1 (and 3 no faster than 1)
# on the SmolLM2-135M selfaug step, 4 x 256, fp32, XLA:CPU, with identical losses (bench/README.md, session 6).
# Session 19 found 1 compiling faster and fp32 steps 1-2% faster, but with 1 XLA:CPU converts a bf16 model's stacked
# parameters to float32 whole (tests/test_models_scan_params.py fails), so bf16 runs slower: 2 stays the default.
DEFAULT_SCAN_UNROLL = 2

# The KV cache of all layers: (k [L, b, s, kv_heads, head_dim], v [L, b, s, kv_heads, head_dim]).
KVCache = tuple[jnp.ndarray, jnp.ndarray]

# Sliding-window value of a full-attention layer when layers differ (a scan input must be an int for every layer).
NO_WINDOW = 2**30

# Optional activation-sharding hook ``(x, kind) -> x`` (set by ``selfaug_jax.train.sharding`` while a sharded step
# is traced); ``None``: no constraints, the single-device path.
_ACTIVATION_HOOK: Callable[[jnp.ndarray, str], jnp.ndarray] | None = None


@contextlib.contextmanager
def activation_hook(hook: Callable[[jnp.ndarray, str], jnp.ndarray] | None) -> Iterator[None]:
    """Install ``hook`` (e.g. a ``with_sharding_constraint`` on a mesh) for the activations traced in the block."""
    global _ACTIVATION_HOOK
    previous, _ACTIVATION_HOOK = _ACTIVATION_HOOK, hook
    try:
        yield
    finally:
        _ACTIVATION_HOOK = previous


def constrain_activation(x: jnp.ndarray, kind: str) -> jnp.ndarray:
    """Apply the active activation hook (a no-op without one). ``kind``: e.g. ``"hidden_btd"``."""
    return x if _ACTIVATION_HOOK is None else _ACTIVATION_HOOK(x, kind)


class LoRAParam(nnx.Variable):
    """A LoRA adapter weight: a separate variable type so adapters split apart from the frozen base."""


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)`` with an optional LoRA update ``(dropout(x) @ lora_a @ lora_b) * lora_scale``.

    ``kernel`` is ``[in, out]``. Params are stored in ``param_dtype`` and cast to the compute ``dtype``; the
    matmul accumulates in float32.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        init = nnx.initializers.normal(0.02)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        # Set by selfaug_jax.lora.add_lora; static python values otherwise.
        # Data attributes even when empty, so a model whose adapters were merged away has the same graphdef
        # (and reuses the same compiled functions) as the plain base model.
        self.lora_a: LoRAParam | None = nnx.data(None)
        self.lora_b: LoRAParam | None = nnx.data(None)
        self.lora_scale: float = 0.0
        self.lora_dropout: float = 0.0

    def __call__(self, x: jnp.ndarray, dropout_rng: jax.Array | None = None) -> jnp.ndarray:
        x = x.astype(self.dtype)
        lead = "abcdefgh"[: x.ndim - 1]  # subscripts of the leading (token) axes
        y = einsum_f32(f"{lead}i,io->{lead}o", x, self.kernel[...].astype(self.dtype), name=PROJECTION_NAME)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        if self.lora_a is not None:
            # The adapter branch and its backward live in lora_matmul.py (a custom VJP: layout-friendly adapter
            # gradients, hashed 16-bit dropout draws; bench/README.md "Session 4" and "Session 19").
            keep = keep_mask_or_none(dropout_rng, x.shape, self.lora_dropout)
            a = self.lora_a[...].astype(self.dtype)
            b = self.lora_b[...].astype(self.dtype)
            y = y + lora_update(x, a, b, keep, self.lora_scale, effective_keep_scale(self.lora_dropout))
        return y.astype(self.dtype)


class Embed(nnx.Module):
    """Token embedding table ``[V, D]``."""

    def __init__(self, vocab_size: int, features: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (vocab_size, features), param_dtype))

    def __call__(self, ids_bt: jnp.ndarray) -> jnp.ndarray:
        return jnp.take(self.embedding[...], ids_bt, axis=0).astype(self.dtype)


class RMSNorm(nnx.Module):
    """HF ``LlamaRMSNorm``: normalise in float32, cast back to the input dtype, then scale."""

    def __init__(self, features: int, *, eps: float, param_dtype: Any):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE, optional q/k/v/o bias and optional per-head q/k RMSNorm."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
        attention_chunk: int | None = None,
        attention_impl: str = "auto",
    ):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.attention_chunk = attention_chunk
        self.attention_impl = attention_impl  # kernel of the cache-free forward (attention_kernels.py)
        h, k = cfg.num_attention_heads, cfg.num_key_value_heads
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = h, k, hd
        self.q_proj = Linear(d, h * hd, use_bias=cfg.q_bias, **kw)
        self.k_proj = Linear(d, k * hd, use_bias=cfg.k_bias, **kw)
        self.v_proj = Linear(d, k * hd, use_bias=cfg.v_bias, **kw)
        self.o_proj = Linear(h * hd, d, use_bias=cfg.o_bias, **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
            self.k_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        else:
            self.q_norm = None
            self.k_norm = None

    def __call__(
        self,
        x_btd: jnp.ndarray,
        cos_btd: jnp.ndarray,
        sin_btd: jnp.ndarray,
        mask_bts: jnp.ndarray,
        kv_cache: KVCache | None = None,
        cache_index: jnp.ndarray | None = None,
        layer_index: jnp.ndarray | None = None,
        dropout_rng: jax.Array | None = None,
        taps: TapDict | None = None,
    ) -> tuple[jnp.ndarray, KVCache | None]:
        """Attention output ``[b, t, D]`` and, with ``kv_cache``, the updated stacked cache.

        ``kv_cache`` is the whole stack ``(k, v)`` of shape ``[L, b, s, kv_heads, head_dim]``: this layer's new keys and
        values are written at ``[layer_index, :, cache_index]`` (in place inside the layer scan) and attention reads
        this layer's slice. ``taps``: a dict that receives the q/k/v projections (``selfaug_jax.models.taps``).
        """
        b, t, _ = x_btd.shape
        rngs = _split_rng(dropout_rng, 4)
        q_bthd = self.q_proj(x_btd, rngs[0]).reshape(b, t, self.num_heads, self.head_dim)
        k_btkd = self.k_proj(x_btd, rngs[1]).reshape(b, t, self.num_kv_heads, self.head_dim)
        v_btkd = self.v_proj(x_btd, rngs[2]).reshape(b, t, self.num_kv_heads, self.head_dim)
        if taps is not None:  # feature taps: the projections' outputs
            taps.update(q=q_bthd.reshape(b, t, -1), k=k_btkd.reshape(b, t, -1), v=v_btkd.reshape(b, t, -1))
        if self.q_norm is not None:
            q_bthd = self.q_norm(q_bthd)
            k_btkd = self.k_norm(k_btkd)
        q_bthd = checkpoint_name(apply_rope(q_bthd, cos_btd, sin_btd), "q_rope")
        k_btkd = checkpoint_name(apply_rope(k_btkd, cos_btd, sin_btd), "k_rope")
        new_cache = None
        if kv_cache is not None:
            k_lbskd, v_lbskd = kv_cache
            start = (layer_index, 0, cache_index, 0, 0)
            k_lbskd = jax.lax.dynamic_update_slice(k_lbskd, k_btkd[None].astype(k_lbskd.dtype), start)
            v_lbskd = jax.lax.dynamic_update_slice(v_lbskd, v_btkd[None].astype(v_lbskd.dtype), start)
            new_cache = (k_lbskd, v_lbskd)
            k_btkd = jax.lax.dynamic_index_in_dim(k_lbskd, layer_index, axis=0, keepdims=False)
            v_btkd = jax.lax.dynamic_index_in_dim(v_lbskd, layer_index, axis=0, keepdims=False)
        if kv_cache is None:  # training / evaluation forward: the configured kernel (attention_kernels.attend)
            out_bthd = attend(q_bthd, k_btkd, v_btkd, mask_bts, impl=self.attention_impl, q_chunk=self.attention_chunk)
            out_bthd = checkpoint_name(out_bthd, "attn_out")
        else:
            out_bthd = grouped_query_attention(q_bthd, k_btkd, v_btkd, mask_bts, self.attention_chunk)
        return self.o_proj(out_bthd.reshape(b, t, -1), rngs[3]), new_cache


class MLP(nnx.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        kw = dict(use_bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, **kw)

    def __call__(self, x_btd: jnp.ndarray, dropout_rng: jax.Array | None = None) -> jnp.ndarray:
        rngs = _split_rng(dropout_rng, 3)
        # SiLU and the product in float32, rounded once, with a backward that keeps only gate and up (swiglu.py)
        gate_btf = self.gate_proj(x_btd, rngs[0])
        up_btf = self.up_proj(x_btd, rngs[1])
        hidden_btf = swiglu(gate_btf, up_btf).astype(x_btd.dtype)
        hidden_btf = checkpoint_name(hidden_btf, "mlp_act")
        return self.down_proj(hidden_btf, rngs[2])


class DecoderLayer(nnx.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``h + mlp(norm(h))``.

    Inside :class:`DecoderLM` one ``DecoderLayer`` holds *all* layers: every parameter carries a leading layer axis
    (see :func:`stacked_layers`), and the decoder calls the block on one layer's slice inside a ``jax.lax.scan``.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
        attention_chunk: int | None = None,
        attention_impl: str = "auto",
    ):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(
            cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, attention_chunk=attention_chunk,
            attention_impl=attention_impl,
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self, x_btd, cos_btd, sin_btd, mask_bts, kv_cache=None, cache_index=None, layer_index=None, dropout_rng=None,
        taps=None,
    ):
        """``taps``: a dict that receives this layer's feature taps (``selfaug_jax.models.taps``), or ``None``."""
        attn_rng, mlp_rng = _split_rng(dropout_rng, 2)
        attn_in_btd = checkpoint_name(self.input_layernorm(x_btd), "attn_norm")
        attn_out, new_cache = self.self_attn(
            attn_in_btd, cos_btd, sin_btd, mask_bts, kv_cache, cache_index, layer_index, attn_rng, taps
        )
        h_btd = x_btd + attn_out
        mlp_in_btd = checkpoint_name(self.post_attention_layernorm(h_btd), "mlp_norm")
        if taps is None:
            return h_btd + self.mlp(mlp_in_btd, mlp_rng), new_cache
        ffn_btd = self.mlp(mlp_in_btd, mlp_rng)
        out_btd = h_btd + ffn_btd
        taps.update(o=attn_out, ffn=ffn_btd, residual=out_btd)
        return out_btd, new_cache


def stacked_layers(
    cfg: ModelConfig,
    *,
    dtype: Any,
    param_dtype: Any,
    rngs: nnx.Rngs,
    attention_chunk: int | None = None,
    attention_impl: str = "auto",
) -> DecoderLayer:
    """A :class:`DecoderLayer` whose every parameter has a leading axis of ``cfg.num_hidden_layers`` layers.

    Each layer is initialised from its own key (``jax.vmap`` over the constructor); the module structure (graphdef)
    is that of a single layer, so ``nnx.merge(graphdef, state_slice)`` of one layer's slice is a plain layer.
    """
    kw = dict(dtype=dtype, param_dtype=param_dtype, attention_chunk=attention_chunk, attention_impl=attention_impl)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: DecoderLayer(cfg, rngs=nnx.Rngs(0), **kw)))
    keys_l = jax.random.split(rngs.params(), cfg.num_hidden_layers)
    state_l = jax.vmap(lambda key: nnx.state(DecoderLayer(cfg, rngs=nnx.Rngs(params=key), **kw)))(keys_l)
    return nnx.merge(graphdef, state_l)


class DecoderLM(nnx.Module):
    """Decoder-only causal LM. See ``docs/ARCHITECTURE.md`` for the parameter layout.

    ``self.layers`` is a single :class:`DecoderLayer` whose parameters are stacked over the layers (leading axis
    ``L``); every forward (training, evaluation, prefill, KV-cache decoding) runs the layers as one ``jax.lax.scan``,
    so XLA compiles the block once whatever the depth.

    Args:
        config: the model hyper-parameters.
        dtype: compute dtype (activations, matmul inputs). Logits are always float32.
        param_dtype: storage dtype of the parameters (e.g. float32 master weights with bfloat16 compute).
        remat_policy: one of ``REMAT_POLICIES`` ("none", "full", "dots", "dots_and_acts", "dots_saveable"): the
            ``jax.checkpoint`` policy of the layer-scan body (training and evaluation forwards; decoding never remats).
        attention_chunk: query-chunk length of the attention kernel (see
            :func:`~selfaug_jax.models.attention.grouped_query_attention`): sequences longer than this never hold a
            float32 ``[b, heads, t, t]`` score tensor, which at long context dominates training memory. ``None``
            disables chunking.
        attention_impl: kernel of the training / evaluation forward, one of
            :data:`~selfaug_jax.models.attention_kernels.ATTENTION_IMPLS` ("auto": cuDNN flash attention on GPU,
            splash on TPU, ``xla_chunked`` on CPU). KV-cache decoding always uses ``grouped_query_attention``.
        scan_unroll: layers per iteration of the training / evaluation layer scan (``jax.lax.scan(unroll=...)``;
            KV-cache decoding keeps 1). Values are identical for every setting; a larger unroll gives the
            compiler more independent work per iteration at the cost of compile time (bench/README.md, session 6).
        rngs: initialisation randomness (weights are normally overwritten by a checkpoint).
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat_policy: str = "none",
        attention_chunk: int | None = DEFAULT_ATTENTION_CHUNK,
        attention_impl: str = "auto",
        scan_unroll: int = DEFAULT_SCAN_UNROLL,
        rngs: nnx.Rngs | None = None,
    ):
        if attention_chunk is not None and attention_chunk < 1:
            raise ValueError(f"attention_chunk must be a positive int or None, got {attention_chunk!r}")
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {remat_policy!r}; choose from {sorted(REMAT_POLICIES)}")
        check_attention_impl(attention_impl)
        if not isinstance(scan_unroll, int) or isinstance(scan_unroll, bool) or scan_unroll < 1:
            raise ValueError(f"scan_unroll must be a positive int, got {scan_unroll!r}")
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.dtype = dtype
        self.remat_policy = remat_policy
        self.attention_chunk = attention_chunk
        self.attention_impl = attention_impl
        self.scan_unroll = scan_unroll
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, **kw)
        # All decoder layers as one module with stacked parameters ([L, ...]); run by a scan in _run_layers.
        self.layers = stacked_layers(config, attention_chunk=attention_chunk, attention_impl=attention_impl, **kw)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, use_bias=False, **kw)

    # ------------------------------------------------------------------ public API
    @property
    def lm_head_layout(self) -> str:
        """The layout the output projection is stored in: ``"vd"`` (the tied embedding table) or ``"dv"``."""
        return "vd" if self.lm_head is None else "dv"

    def lm_head_weight(self, layout: str = "dv") -> jnp.ndarray:
        """The output projection, ``[D, V]`` (``layout="dv"``; the transposed embedding table when embeddings are
        tied) or ``[V, D]`` (``"vd"``). ``layout=self.lm_head_layout`` returns the stored array untransposed."""
        if layout not in HEAD_LAYOUTS:  # the one definition, shared with the fused loss' head_layout
            raise ValueError(f"lm_head_weight: layout must be one of {HEAD_LAYOUTS}, got {layout!r}")
        w = self.embed_tokens.embedding[...] if self.lm_head is None else self.lm_head.kernel[...]
        return w if layout == self.lm_head_layout else w.T

    def hidden_states(
        self,
        input_ids_bt: jnp.ndarray,
        *,
        attention_mask: jnp.ndarray | None = None,
        positions: jnp.ndarray | None = None,
        segment_ids: jnp.ndarray | None = None,
        dropout_rng: jax.Array | None = None,
        taps: LayerTaps | None = None,
    ) -> jnp.ndarray | tuple[jnp.ndarray, Any]:
        """Final hidden states ``[b, t, D]`` (after the last RMSNorm), in the compute dtype.

        Args:
            input_ids_bt: token ids ``[b, t]``.
            attention_mask: ``[b, t]``, 1 for real tokens, 0 for padding (left or right). Default: all ones.
            positions: RoPE positions ``[b, t]``. Default: ``cumsum(mask) - 1`` (restarting per segment).
            segment_ids: ``[b, t]`` packed-example ids (0 = padding); attention stays within a segment.
            dropout_rng: enables LoRA dropout when given.
            taps: per-layer feature taps (:class:`~selfaug_jax.models.taps.LayerTaps`); with them the result is
                ``(hidden, per-layer outputs stacked [L, ...])``. ``None``: the plain forward, traced unchanged.
        """
        b, t = input_ids_bt.shape
        if attention_mask is None:
            attention_mask = (segment_ids > 0) if segment_ids is not None else jnp.ones((b, t), jnp.int32)
        attention_mask = attention_mask.astype(jnp.int32)
        if positions is None:
            positions = default_positions(attention_mask, segment_ids)
        index_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mask_args = (index_bt, index_bt, attention_mask, segment_ids, segment_ids)
        if taps is not None:  # feature taps: the same scan with one more output per layer
            x_btd, tapped = self._run_layers(
                self.embed_tokens(input_ids_bt), positions, mask_args, None, None, dropout_rng, taps
            )
            return constrain_activation(self.norm(x_btd), "hidden_btd"), tapped
        x_btd, _ = self._run_layers(self.embed_tokens(input_ids_bt), positions, mask_args, None, None, dropout_rng)
        return constrain_activation(self.norm(x_btd), "hidden_btd")

    def __call__(
        self,
        input_ids_bt: jnp.ndarray,
        attention_mask: jnp.ndarray | None = None,
        positions: jnp.ndarray | None = None,
        segment_ids: jnp.ndarray | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> jnp.ndarray:
        """Float32 logits ``[b, t, V]``. Same arguments as :meth:`hidden_states`."""
        hidden_btd = self.hidden_states(
            input_ids_bt,
            attention_mask=attention_mask,
            positions=positions,
            segment_ids=segment_ids,
            dropout_rng=dropout_rng,
        )
        return self.project(hidden_btd)

    def project(self, hidden_btd: jnp.ndarray) -> jnp.ndarray:
        """Project hidden states onto the vocabulary: float32 logits."""
        head_dv = self.lm_head_weight().astype(hidden_btd.dtype)
        return jnp.dot(hidden_btd, head_dv, preferred_element_type=jnp.float32)

    # ------------------------------------------------------------------ KV-cache decoding
    def init_cache(self, batch_size: int, max_length: int, dtype: Any | None = None) -> KVCache:
        """Zeroed KV cache ``(k, v)``, each ``[layers, batch, max_length, kv_heads, head_dim]``."""
        cfg = self.config
        shape = (cfg.num_hidden_layers, batch_size, max_length, cfg.num_key_value_heads, cfg.head_dim)
        dtype = dtype or self.dtype
        return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)

    def decode(
        self,
        input_ids_bt: jnp.ndarray,
        positions_bt: jnp.ndarray,
        kv_valid_bs: jnp.ndarray,
        cache: KVCache,
        cache_index: jnp.ndarray,
        *,
        last_only: bool = False,
    ) -> tuple[jnp.ndarray, KVCache]:
        """Run ``t`` new tokens written at ``cache_index`` of the cache; returns (float32 logits ``[b, t, V]``, cache).

        ``kv_valid_bs`` marks which cache slots hold real tokens (left padding of the prompt is 0); slots at or
        beyond ``cache_index + t`` are excluded by causality. ``last_only`` projects only the last position onto
        the vocabulary (a prefill needs nothing else), returning logits ``[b, 1, V]``.
        """
        b, t = input_ids_bt.shape
        s = cache[0].shape[2]
        q_index_bt = cache_index + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        kv_index_bs = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        x_btd, new_cache = self._run_layers(
            self.embed_tokens(input_ids_bt), positions_bt, (q_index_bt, kv_index_bs, kv_valid_bs, None, None),
            cache, cache_index, None,
        )
        if last_only:
            x_btd = x_btd[:, -1:]
        return self.project(self.norm(x_btd)), new_cache

    # ------------------------------------------------------------------ internals
    def _window_plan(self) -> tuple[int | None, jnp.ndarray | None]:
        """``(static window, per-layer windows [L])``: one window (or ``None``) shared by every layer is applied once
        to the mask outside the scan; windows that differ between layers are a scan input (``NO_WINDOW`` = full)."""
        windows = self.config.sliding_windows
        if windows is None or len(set(windows)) == 1:
            return (None if windows is None else windows[0]), None
        return None, jnp.asarray([NO_WINDOW if w is None else w for w in windows], jnp.int32)

    def _run_layers(self, x_btd, positions_bt, mask_args, cache, cache_index, dropout_rng, taps=None):
        """Scan the stacked layers over ``x_btd``; returns ``(x_btd, new cache or None)``.

        With ``taps`` (a :class:`~selfaug_jax.models.taps.LayerTaps`; no cache) it returns ``(x_btd, per-layer
        outputs)`` instead: the body records the layer's taps and emits ``taps.emit(...)`` as the scan's ys.

        ``mask_args`` = ``(q_index_bt, kv_index_bs, kv_valid_bs, q_segment_bt, kv_segment_bs)`` of
        :func:`~selfaug_jax.models.attention.make_attention_mask`. Scan inputs per layer: the layer's parameter slice,
        its index (dropout key ``fold_in(dropout_rng, index)``, cache slot) and, when layers differ, its window.
        Training forwards (no cache) run the body under ``jax.checkpoint`` with the remat policy.
        """
        cfg = self.config
        cos_btd, sin_btd = rope_cos_sin(positions_bt, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
        static_window, windows_l = self._window_plan()
        q_index_bt, kv_index_bs = mask_args[0], mask_args[1]
        mask_bts = make_attention_mask(*mask_args, static_window)
        graphdef, stack_state = nnx.split(self.layers)
        # 16-bit stacks are sliced as integer bits: XLA:CPU would keep a float32 copy of each (models/scan_params.py)
        xs = (scan_inputs(stack_state), jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32), windows_l)

        def layer_call(x_btd, layer_state, index, window, kv_cache, recorded=None):
            mask = mask_bts if window is None else mask_bts & within_window(q_index_bt, kv_index_bs, window)
            if kv_cache is None:  # the cache-free forward: the mask in every kernel's form (attention_kernels.py)
                mask = ForwardMask.from_mask_args(mask, mask_args, static_window, window is not None)
            rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)
            layer = nnx.merge(graphdef, layer_params(layer_state))
            x_btd, kv_cache = layer(x_btd, cos_btd, sin_btd, mask, kv_cache, cache_index, index, rng, recorded)
            return constrain_activation(x_btd, "hidden_btd"), kv_cache

        x_btd = constrain_activation(x_btd, "hidden_btd")
        if cache is not None:
            def decode_body(carry, xs):
                x_btd, kv_cache = carry
                return layer_call(x_btd, *xs, kv_cache), None

            (x_btd, cache), _ = jax.lax.scan(decode_body, (x_btd, cache), xs)
            return x_btd, cache

        def body(x_btd, xs):
            return layer_call(x_btd, *xs, None)[0], None

        if taps is not None:  # feature taps (selfaug_jax/models/taps.py): the layer's taps leave as ys
            def body(x_btd, xs):  # noqa: F811
                (layer_xs, taps_xs), recorded = xs, {}
                x_btd = layer_call(x_btd, *layer_xs, None, recorded)[0]
                return x_btd, taps.emit(recorded, taps_xs)

            xs = (xs, taps.xs)

        policy = REMAT_POLICIES[self.remat_policy]
        if self.remat_policy != "none":
            # prevent_cse=False: the scan already keeps XLA from merging the recompute with the forward.
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        # A scan unrolled over all its layers has no loop left, and XLA then fuses the policy's linearised forward
        # differently from the reference's: the step-0 KL becomes ~1e-8 instead of exactly 0
        # (tests/test_train_step.py). So a stack no deeper than the unroll runs as a plain loop.
        unroll = self.scan_unroll if cfg.num_hidden_layers > self.scan_unroll else 1
        x_btd, ys = jax.lax.scan(body, x_btd, xs, unroll=unroll)
        return x_btd, ys


def default_positions(attention_mask_bt: jnp.ndarray, segment_ids_bt: jnp.ndarray | None = None) -> jnp.ndarray:
    """RoPE positions: count of real tokens before each token (so left padding starts at 0).

    With ``segment_ids`` the count restarts at every new segment of a packed row.
    """
    mask = attention_mask_bt.astype(jnp.int32)
    pos = jnp.cumsum(mask, axis=-1) - 1
    if segment_ids_bt is not None:
        seg = segment_ids_bt.astype(jnp.int32)
        t = seg.shape[-1]
        is_start = jnp.concatenate([jnp.ones_like(seg[:, :1]), (seg[:, 1:] != seg[:, :-1]).astype(jnp.int32)], -1)
        idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), seg.shape)
        start_idx = jax.lax.cummax(jnp.where(is_start > 0, idx, 0), axis=1)
        pos = idx - start_idx
    return jnp.maximum(pos, 0).astype(jnp.int32)


def _split_rng(rng: jax.Array | None, n: int) -> list[jax.Array | None]:
    if rng is None:
        return [None] * n
    return [jax.random.fold_in(rng, i) for i in range(n)]
