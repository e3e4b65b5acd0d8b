"""Attention kernels of the training / evaluation forward, and the dispatcher that picks one.

``model.attention_impl`` (``DecoderLM(attention_impl=...)``) names the kernel:

- ``"xla_chunked"``: :func:`~selfaug_jax.models.attention.grouped_query_attention`, this project's dense GQA einsum,
  query-chunked by ``attention_chunk`` (the reference every other kernel is tested against; any mask). For the
  cache-free forward's causal mask it is ``causal_block_skipping_attention``: each query chunk attends only to the
  keys up to its last query (about half the work at many chunks), with the same values on every row. On CPU it
  attends half-precision inputs in float32 (:func:`attention_dtype`: measured faster there).
- ``"dot_product"``: ``jax.nn.dot_product_attention(implementation="xla")`` with the dense boolean mask (any mask;
  unchunked, so it holds a float32 ``[b, heads, t, t]`` score tensor per layer).
- ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN flash attention (GPU; bfloat16 /
  float16 only; ``head_dim`` a multiple of 8, at most 128). Causality is passed as ``is_causal`` (cuDNN skips the
  blocks above the diagonal); padding, packed segments and per-layer windows travel as the dense mask, which
  jax turns into an additive bias (exact for any padding side; a bias-free path for unpadded batches is future
  work).
- ``"splash"``: the Pallas splash-attention kernel (``jax.experimental.pallas.ops.tpu.splash_attention``, TPU): a
  static causal (or causal local-window) block mask plus segment ids, which encode both packed examples and padding
  (padding is segment 0). Sequence length must be a multiple of 128 (its block size).
- ``"auto"`` (default): cudnn on GPU, splash on TPU, xla_chunked on CPU, each when the inputs suit it and
  xla_chunked otherwise, with the reason logged. On CPU, xla_chunked and dot_product were measured equal within
  noise (bench/README.md "Attention kernels"), and xla_chunked bounds long-context memory.

A kernel chosen explicitly that cannot run here (wrong platform, import error, shape or dtype it does not take)
raises one ``ValueError`` naming ``model.attention_impl``; a mask *feature* it cannot express (splash: a general mask
or per-layer windows) falls back to xla_chunked with a logged warning. No path silently computes a different mask.

**Hardware status**: ``xla_chunked`` and ``dot_product`` are tested equal to a float64 reference on CPU, and so
is the splash kernel (values and gradients) in Pallas interpret mode (tests/test_attention_kernels.py). The
``cudnn`` path ran on an NVIDIA H200 (``bench/gpu_attention.py``, session 16: values and gradients within bf16
rounding of a float32 reference, 4x faster than ``xla_chunked`` at 4 x 2048); on CPU its ``jax.nn`` call is checked
through jax's XLA implementation. The *compiled* splash kernel has not yet been run on a TPU (dispatch is tested
with a faked platform).

KV-cache decoding keeps ``grouped_query_attention`` (``DecoderLM.decode``); only the cache-free forward dispatches.
Shapes: ``b`` batch, ``t`` queries, ``s`` keys, ``h`` query heads, ``k`` kv heads, ``g`` = h / k, ``d`` head dim.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable

import jax
import jax.extend.backend
import jax.numpy as jnp

from selfaug_jax.models.attention import causal_block_skipping_attention, grouped_query_attention
from selfaug_jax.models.matmul import NARROW_DTYPES

logger = logging.getLogger(__name__)

ATTENTION_IMPLS: tuple[str, ...] = ("auto", "xla_chunked", "dot_product", "cudnn", "splash")

# cuDNN flash attention limits as checked by jax (jax/_src/cudnn/fused_attention_stablehlo.py): half-precision
# inputs, head_dim a multiple of 8 and at most 128 (256 from Hopper on; 128 is the safe bound without asking the
# device), and even sequence lengths when a bias (our mask) takes part in training.
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CUDNN_MAX_HEAD_DIM = 128
# Splash attention's default block size (BlockSizes.get_default(): 128 everywhere); the sequence must tile by it.
_SPLASH_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class ForwardMask:
    """The cache-free forward's attention mask, in the forms the kernels take (built by :meth:`from_mask_args`).

    Attributes:
        dense_bts: boolean ``[b, t, s]`` (``t == s``), True where query t may attend key s: causality, padding,
            packed segments and every sliding window included. The complete truth; dense kernels use only this.
        segment_bt: int32 ``[b, t]`` packed-example ids with padding 0 (``segment_ids``), or the validity mask
            (1 real, 0 padding) when nothing is packed: with causality it reproduces ``dense_bts`` on every real
            query row (splash's form). Queries and keys share it (self-attention).
        window: the static sliding window included in ``dense_bts`` (HF: attend iff ``q - kv < window``), or None.
        layer_window: True when ``dense_bts`` also holds a per-layer window that is a traced scan input (layers
            with different windows): no static block mask can express it.
    """

    dense_bts: jax.Array
    segment_bt: jax.Array
    window: int | None = None
    layer_window: bool = False

    @classmethod
    def from_mask_args(
        cls, dense_bts: jax.Array, mask_args: tuple, window: int | None, layer_window: bool
    ) -> "ForwardMask":
        """From :func:`~selfaug_jax.models.attention.make_attention_mask`'s arguments (``DecoderLM._run_layers``):
        ``(q_index_bt, kv_index_bs, kv_valid_bs, q_segment_bt, kv_segment_bs)`` with ``q_index == kv_index``."""
        _, _, kv_valid_bs, q_segment_bt, _ = mask_args
        valid_bt = kv_valid_bs.astype(jnp.int32)
        # Padding is segment 0 even where a caller's segment ids and attention mask disagree.
        segment_bt = valid_bt if q_segment_bt is None else jnp.where(valid_bt > 0, q_segment_bt, 0)
        return cls(dense_bts, segment_bt.astype(jnp.int32), window, layer_window)


jax.tree_util.register_dataclass(
    ForwardMask, data_fields=["dense_bts", "segment_bt"], meta_fields=["window", "layer_window"]
)


def _platform() -> str:
    """The backend the forward is traced for: ``cpu``, ``gpu`` (CUDA), ``rocm`` or ``tpu``; tests monkeypatch this.

    A ROCm GPU reports ``gpu`` too; its ``platform_version`` names ROCm (cuDNN needs CUDA, as jax's own check).
    """
    platform = jax.default_backend()
    if platform == "gpu" and "rocm" in str(getattr(jax.extend.backend.get_backend(), "platform_version", "")).lower():
        return "rocm"
    return platform


def check_attention_impl(impl: str) -> None:
    """Raise one clear ``ValueError`` for a name that is not in :data:`ATTENTION_IMPLS`."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention_impl: unknown {impl!r}; choose from {', '.join(ATTENTION_IMPLS)}")


# ---------------------------------------------------------------------------------------------------- kernels
def xla_chunked(q_bthd, k_bskd, v_bskd, mask, q_chunk: int | None = None) -> jax.Array:
    """This project's GQA einsum, query-chunked. A :class:`ForwardMask` (always causal, queries and keys sharing
    the sequence index) takes ``causal_block_skipping_attention``, which skips the key blocks above the diagonal
    (and left of a static window); a plain mask takes ``grouped_query_attention`` over all keys.

    On CPU, bfloat16 / float16 queries, keys and values are attended in float32 and the output is rounded back to
    their dtype (:func:`attention_dtype`)."""
    dtype = q_bthd.dtype
    compute = attention_dtype(dtype)
    q_bthd, k_bskd, v_bskd = (x.astype(compute) for x in (q_bthd, k_bskd, v_bskd))
    if isinstance(mask, ForwardMask):
        out = causal_block_skipping_attention(q_bthd, k_bskd, v_bskd, mask.dense_bts, q_chunk, mask.window)
    else:
        out = grouped_query_attention(q_bthd, k_bskd, v_bskd, mask, q_chunk)
    return out.astype(dtype)


def attention_dtype(dtype, *, platform: str | None = None) -> jnp.dtype:
    """The dtype ``xla_chunked`` runs its einsums in for inputs of ``dtype``: float32 for half precision on CPU,
    else ``dtype``.

    XLA:CPU (jaxlib 0.10.2) has bfloat16 dot kernels only for the plain ``[m, k] x [k, n]`` form; the attention
    backward's ``dk`` / ``dv`` matmuls contract the query axis and it converted their bfloat16 operands to float32
    anyway, after copies. In float32 throughout, the bf16 ``selfaug`` step took 4.56 / 4.47 s against 4.66 / 4.74 s
    at 4 x 256 and 15.5 vs 16.7 s at 1 x 2048 (bench/README.md "Session 18"); the probabilities are not rounded to
    bfloat16 before ``@ v``, so it is also closer to the float32 model. On GPU and TPU the half-precision kernels
    are the fast ones, and ``xla_chunked`` keeps the inputs' dtype there.
    """
    dtype = jnp.dtype(dtype)
    narrow = dtype in NARROW_DTYPES
    return jnp.dtype(jnp.float32) if narrow and (platform or _platform()) == "cpu" else dtype


def dot_product(q_bthd, k_bskd, v_bskd, mask, q_chunk: int | None = None) -> jax.Array:
    """``jax.nn.dot_product_attention`` (XLA implementation) with the dense mask; ``q_chunk`` is not used."""
    del q_chunk
    return jax.nn.dot_product_attention(
        q_bthd, k_bskd, v_bskd, mask=_dense(mask)[:, None], implementation="xla"
    ).astype(q_bthd.dtype)


def cudnn(q_bthd, k_bskd, v_bskd, mask, q_chunk: int | None = None) -> jax.Array:
    """cuDNN flash attention: ``is_causal`` for a forward mask, plus the dense mask (padding, segments, windows)."""
    del q_chunk
    causal = isinstance(mask, ForwardMask)
    return jax.nn.dot_product_attention(
        q_bthd, k_bskd, v_bskd, mask=_dense(mask)[:, None], is_causal=causal, implementation="cudnn"
    )


def splash(q_bthd, k_bskd, v_bskd, mask: "ForwardMask", q_chunk: int | None = None, *, interpret: bool = False):
    """Pallas splash attention: static causal / local block mask, segment ids for packing and padding.

    One MQA kernel serves a kv head's ``g`` query heads; it is vmapped over kv heads and batch rows. Splash takes
    unscaled logits, so queries are scaled by ``1/sqrt(d)`` first. ``interpret=True`` runs the kernel in Pallas
    interpret mode (any platform; the CPU tests).
    """
    del q_chunk
    sa = _import_splash()
    b, t, h, d = q_bthd.shape
    k_heads = k_bskd.shape[2]
    g = h // k_heads
    _check_splash_shapes(t, k_bskd.shape[1])
    if mask.window is None:
        block_mask = sa.CausalMask((t, t))
    else:  # HF window: q - kv < window, i.e. kv in [q - (window - 1), q]
        block_mask = sa.LocalMask((t, t), window_size=(mask.window - 1, 0), offset=0)
    kernel = sa.make_splash_mqa_single_device(sa.MultiHeadMask([block_mask] * g), interpret=interpret)
    q_bkgtd = (q_bthd * (1.0 / math.sqrt(d))).astype(q_bthd.dtype).reshape(b, t, k_heads, g, d)
    q_bkgtd = q_bkgtd.transpose(0, 2, 3, 1, 4)
    k_bksd = k_bskd.transpose(0, 2, 1, 3)
    v_bksd = v_bskd.transpose(0, 2, 1, 3)

    def one_row(q_kgtd, k_ksd, v_ksd, seg_t):
        ids = sa.SegmentIds(q=seg_t, kv=seg_t)
        return jax.vmap(lambda q_gtd, k_sd, v_sd: kernel(q_gtd, k_sd, v_sd, segment_ids=ids))(q_kgtd, k_ksd, v_ksd)

    out_bkgtd = jax.vmap(one_row)(q_bkgtd, k_bksd, v_bksd, mask.segment_bt)
    return out_bkgtd.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q_bthd.dtype)


KERNELS: dict[str, Callable[..., jax.Array]] = {
    "xla_chunked": xla_chunked,
    "dot_product": dot_product,
    "cudnn": cudnn,
    "splash": splash,
}


# ---------------------------------------------------------------------------------------------------- dispatch
def select_kernel(impl: str, q_bthd: jax.Array, mask, *, platform: str | None = None) -> tuple[str, str | None]:
    """``(kernel name, reason)``: the kernel ``impl`` resolves to for these inputs, and why it is not the one asked
    for (``None`` when it is). ``auto`` picks by platform; unsuitable inputs fall back to ``xla_chunked``.

    Raises:
        ValueError: unknown name; an explicitly chosen cudnn / splash on the wrong platform, or with a dtype or
            shape the kernel does not take (the message names ``model.attention_impl``).
    """
    check_attention_impl(impl)
    platform = platform or _platform()
    if impl in ("xla_chunked", "dot_product"):
        return impl, None
    wanted = impl
    if impl == "auto":
        wanted = {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}.get(platform)
        if wanted is None:
            return "xla_chunked", None  # CPU (and anything else, e.g. ROCm): the measured default
    explicit = impl != "auto"
    needs = "gpu" if wanted == "cudnn" else "tpu"
    if platform not in ({"gpu", "cuda"} if wanted == "cudnn" else {"tpu"}):
        raise ValueError(
            f"model.attention_impl={impl!r} needs a {needs.upper()} but this process runs on {platform!r}; "
            f"use 'auto', 'xla_chunked' or 'dot_product'"
        )
    # A mask feature the kernel cannot express: fall back (logged), whether chosen or automatic.
    feature = None if wanted == "cudnn" else _splash_mask_unsupported(mask)
    if feature is not None:
        return "xla_chunked", f"{wanted}: {feature}"
    hard = _cudnn_unsupported(q_bthd) if wanted == "cudnn" else _splash_shape_unsupported(q_bthd)
    if hard is not None:
        if explicit:
            raise ValueError(f"model.attention_impl={impl!r}: {hard}")
        return "xla_chunked", f"{wanted}: {hard}"
    return wanted, None


def attend(q_bthd, k_bskd, v_bskd, mask, *, impl: str = "auto", q_chunk: int | None = None) -> jax.Array:
    """GQA softmax attention ``[b, t, h, d]`` (q's dtype) by the kernel ``impl`` resolves to (:func:`select_kernel`).

    Args:
        q_bthd, k_bskd, v_bskd: queries, keys, values (``h`` a multiple of ``k``).
        mask: a :class:`ForwardMask` (the cache-free forward) or a plain boolean ``[b, t, s]`` mask.
        impl: one of :data:`ATTENTION_IMPLS`.
        q_chunk: query-chunk length of ``xla_chunked`` (ignored by the other kernels).

    A fallback is logged (at trace time, so once per compilation) with its reason.
    """
    name, reason = select_kernel(impl, q_bthd, mask)
    if reason is not None:
        logger.warning("model.attention_impl=%r: falling back to xla_chunked (%s)", impl, reason)
    return KERNELS[name](q_bthd, k_bskd, v_bskd, mask, q_chunk)


# ---------------------------------------------------------------------------------------------------- helpers
def _dense(mask) -> jax.Array:
    return mask.dense_bts if isinstance(mask, ForwardMask) else mask


def _cudnn_unsupported(q_bthd: jax.Array) -> str | None:
    """Why cuDNN flash attention cannot take these queries (dtype / head_dim / length), or None."""
    t, d = q_bthd.shape[1], q_bthd.shape[-1]
    if q_bthd.dtype not in _CUDNN_DTYPES:
        return f"cuDNN flash attention takes bfloat16/float16, not {q_bthd.dtype} (set model.dtype: bfloat16)"
    if d % 8 or d > _CUDNN_MAX_HEAD_DIM:
        return f"head_dim {d} is not a multiple of 8 up to {_CUDNN_MAX_HEAD_DIM}"
    if t % 2:
        return f"sequence length {t} is odd (cuDNN needs even lengths with a mask bias)"
    return None


def _splash_shape_unsupported(q_bthd: jax.Array) -> str | None:
    t = q_bthd.shape[1]
    if t % _SPLASH_BLOCK:
        return f"sequence length {t} is not a multiple of splash attention's block size {_SPLASH_BLOCK}"
    return None


def _check_splash_shapes(t: int, s: int) -> None:
    if t != s or t % _SPLASH_BLOCK:
        raise ValueError(
            f"model.attention_impl='splash': query/key lengths {t}/{s} must be equal multiples of {_SPLASH_BLOCK}"
        )


def _splash_mask_unsupported(mask) -> str | None:
    """Which mask feature splash's static block mask + segment ids cannot express here, or None."""
    if not isinstance(mask, ForwardMask):
        return "a general [b, t, s] mask (only the causal forward's mask maps to splash)"
    if mask.layer_window:
        return "sliding windows that differ between layers (a traced per-layer window)"
    return None


def _import_splash():
    try:
        from jax.experimental.pallas.ops.tpu import splash_attention
    except ImportError as e:  # pragma: no cover - depends on the jax build
        raise ValueError(f"model.attention_impl='splash': cannot import splash attention ({e})") from None
    return splash_attention
