"""Rotary embeddings, attention masks and grouped-query attention.

Everything here is a pure function of arrays, shared by training (full sequences, optional packing) and
generation (a KV cache). Shapes: ``b`` batch, ``t`` query length, ``s`` key length, ``h`` query heads,
``k`` key/value heads, ``g`` = h / k query heads per kv head, ``d`` head dim.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from selfaug_jax.chunking import from_chunks, to_chunks
from selfaug_jax.models.matmul import einsum_f32
from selfaug_jax.models.remat import ATTENTION_MATMUL_NAME
from selfaug_jax.reductions import sum_last_axis

# Fill value for masked scores: finite, so a fully masked row (a padding query) gives a uniform softmax, not NaN.
_MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> jnp.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` (float32) with optional linear / llama3 scaling.

    The llama3 rule follows transformers' ``_compute_llama3_parameters`` (Meta's Llama 3.1 release): wavelengths
    longer than ``original_max_position_embeddings / low_freq_factor`` are divided by ``factor``, shorter than
    ``.../high_freq_factor`` are kept, and the band in between is interpolated smoothly.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type == "llama3":
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2.0 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return jnp.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_type {rope_type!r}")


def rope_cos_sin(positions_bt: jnp.ndarray, inv_freq_f: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``cos``/``sin`` tables ``[b, t, head_dim]`` (float32, halves duplicated as in HF's rotate-half layout)."""
    angles_btf = positions_bt.astype(jnp.float32)[..., None] * inv_freq_f
    angles_btd = jnp.concatenate([angles_btf, angles_btf], axis=-1)
    return jnp.cos(angles_btd), jnp.sin(angles_btd)


def apply_rope(x_bthd: jnp.ndarray, cos_btd: jnp.ndarray, sin_btd: jnp.ndarray) -> jnp.ndarray:
    """Rotate ``x`` (``[b, t, heads, d]``) by position, HF "rotate_half" convention (not interleaved).

    Computed in float32 and rounded once to ``x``'s dtype. HF rounds every operation to a bfloat16 ``x``'s dtype
    (``q * cos + rotate_half(q) * sin`` with ``cos``/``sin`` cast to it); XLA:CPU has no bfloat16 arithmetic and
    rounds between every pair of operations, and that chain of converts was the costliest elementwise work of the
    bf16 step (bench/README.md, session 14). This project's reading: a bfloat16 activation is rounded where it is
    stored, not inside an elementwise formula. Float32 ``x``: the same operations as before.
    """
    half = x_bthd.shape[-1] // 2
    x_f = x_bthd.astype(jnp.float32)
    x1, x2 = x_f[..., :half], x_f[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos = cos_btd[:, :, None, :].astype(jnp.float32)
    sin = sin_btd[:, :, None, :].astype(jnp.float32)
    return (x_f * cos + rotated * sin).astype(x_bthd.dtype)


def make_attention_mask(
    q_index_bt: jnp.ndarray,
    kv_index_bs: jnp.ndarray,
    kv_valid_bs: jnp.ndarray,
    q_segment_bt: jnp.ndarray | None = None,
    kv_segment_bs: jnp.ndarray | None = None,
    sliding_window: int | None = None,
) -> jnp.ndarray:
    """Boolean mask ``[b, t, s]``: True where query t may attend key s.

    Causality is by *index in the sequence/cache* (not by RoPE position), keys must be valid (not padding), the
    same packed segment when segment ids are given, and within ``sliding_window`` (HF: ``q - kv < window``).
    """
    mask = kv_index_bs[:, None, :] <= q_index_bt[:, :, None]
    mask &= kv_valid_bs[:, None, :].astype(bool)
    if q_segment_bt is not None and kv_segment_bs is not None:
        mask &= q_segment_bt[:, :, None] == kv_segment_bs[:, None, :]
    if sliding_window is not None:
        mask &= within_window(q_index_bt, kv_index_bs, sliding_window)
    return mask


def within_window(q_index_bt: jnp.ndarray, kv_index_bs: jnp.ndarray, sliding_window: int | jnp.ndarray) -> jnp.ndarray:
    """Boolean ``[b, t, s]``: key s lies within ``sliding_window`` of query t (HF: ``q - kv < window``).

    ``sliding_window`` may be a traced int32 scalar (a per-layer scan input of the decoder).
    """
    return (q_index_bt[:, :, None] - kv_index_bs[:, None, :]) < sliding_window


def grouped_query_attention(
    q_bthd: jnp.ndarray,
    k_bskd: jnp.ndarray,
    v_bskd: jnp.ndarray,
    mask_bts: jnp.ndarray,
    q_chunk: int | None = None,
) -> jnp.ndarray:
    """Softmax attention with GQA; scores and softmax in float32. Returns ``[b, t, h, d]`` in q's dtype.

    Args:
        q_bthd, k_bskd, v_bskd: queries, keys, values (``h`` a multiple of ``k``).
        mask_bts: boolean ``[b, t, s]``, True where query t may attend key s (see :func:`make_attention_mask`).
        q_chunk: when set and ``t > q_chunk``, queries are processed ``q_chunk`` at a time (``lax.map`` over
            chunks, each under ``jax.checkpoint``), so the float32 score / probability tensors live at
            ``[b, h, q_chunk, s]`` instead of ``[b, h, t, s]`` in the forward *and* in the backward, which recomputes
            one chunk's scores at a time instead of keeping every layer's ``[b, h, t, s]`` probabilities. Every row's
            softmax still sees all keys, so the result equals the unchunked one up to float rounding. ``t`` is padded
            up to a multiple of ``q_chunk`` (padding rows are computed and dropped).

    Any mask; the KV-cache paths use this one. The cache-free forward's causal self-attention takes
    :func:`causal_block_skipping_attention` (``attention_kernels.xla_chunked``), which skips the masked key blocks.
    """
    t = q_bthd.shape[1]
    if q_chunk is None or t <= q_chunk:
        return _attention_block(q_bthd, k_bskd, v_bskd, mask_bts)
    # [n, b, c, ...]: lax.map scans over the leading chunk axis; k and v are loop constants (not copied per chunk).
    q_nbchd = to_chunks(q_bthd, q_chunk)
    mask_nbcs = to_chunks(mask_bts, q_chunk, False)

    @jax.checkpoint
    def one_chunk(args):
        q_bchd, m_bcs = args
        return _attention_block(q_bchd, k_bskd, v_bskd, m_bcs)

    return from_chunks(jax.lax.map(one_chunk, (q_nbchd, mask_nbcs)), t)


# Chunk groups of causal_block_skipping_attention: each group is one lax.map (one chunk's scores live at a time).
SKIP_GROUPS = 4


def causal_block_skipping_attention(
    q_bthd: jnp.ndarray,
    k_bskd: jnp.ndarray,
    v_bskd: jnp.ndarray,
    mask_bts: jnp.ndarray,
    q_chunk: int | None = None,
    window: int | None = None,
    groups: int | None = None,
) -> jnp.ndarray:
    """Query-chunked GQA for a *causal self-attention* mask that skips the key blocks no query of a chunk can see.

    Precondition (the cache-free forward's :class:`~selfaug_jax.models.attention_kernels.ForwardMask`): ``t == s``,
    query ``i`` and key ``i`` share the sequence index ``i``, and ``mask_bts`` contains causality
    (``kv_index <= q_index``, :func:`make_attention_mask`) and, when ``window`` is given, that static sliding window
    (``q - kv < window``). ``mask_bts`` may mask more (padding, packed segments, a traced per-layer window).

    Chunk ``j`` holds queries ``[j c, e_j)`` with ``e_j = min((j + 1) c, t)``; it needs only keys ``[a_j, e_j)``,
    ``a_j = max(0, j c - (window - 1))`` (``0`` without a window): every key at or after ``e_j`` is later than the
    chunk's last query, every key before ``a_j`` lies outside the window of its first query, so both are masked on
    every row of the chunk and dropping them changes no real row (their ``exp`` was exactly 0; only the float
    summation order differs). With ``n = ceil(t / c)`` chunks and no window, the score / softmax / value work is
    ``c^2 n (n + 1) / 2`` instead of ``c^2 n^2`` elements per head: ``(n + 1) / (2 n)`` of it, 53% at ``n = 16``
    (t = 8192, c = 512); a window bounds it by ``c (c + window - 1)`` per chunk.

    The chunks are split into ``groups`` (default :data:`SKIP_GROUPS`) contiguous groups; a group attends to the
    key range of its *last* chunk, and runs its chunks one at a time in a ``lax.map`` (each under
    ``jax.checkpoint``), so the backward recomputes one chunk's ``[b, h, c, keys]`` scores at a time per group. The
    work is then ``(G + 1) / (2 G)`` of the unskipped kernel's for ``G`` equal groups (62.5% at 4). One group per
    chunk (a static loop of ``n`` slices) would do ``(n + 1) / (2 n)``, but nothing orders its chunks, and XLA:CPU
    kept every chunk's scores live at once: 14.6 GB of XLA temporaries at 1 x 8192 on SmolLM2 against 11.1 GB
    unskipped (bench/README.md, session 6).

    Fully masked rows (padding queries with left padding, or packed batches' trailing padding, segment 0) would
    otherwise differ: their softmax over the finite ``_MASK_VALUE`` is uniform over the keys it is given, i.e.
    over ``[a_j, e_j)`` here but over all ``s`` keys in :func:`grouped_query_attention` (and HF's eager
    attention). Those rows are *read*: the SelfAug KL aligns ``labels == -100`` positions, padding included by
    default (``loss.include_padding``, as the released code), and a padding row's output mixes real tokens'
    values. So a fully masked row's output is set to exactly what the unskipped kernel gives it, the mean of
    ``v`` over all ``s`` keys (gradient ``1/s`` to every value, none to q / k, as there). Real queries always see
    at least themselves, so every row equals the unskipped kernel's up to float summation order (for half
    precision ``v``, the unskipped kernel rounds the ``1/s`` weights to ``v``'s dtype; the mean here is float32).

    Args:
        q_bthd, k_bskd, v_bskd: queries, keys, values (``h`` a multiple of ``k``; ``t == s``).
        mask_bts: boolean ``[b, t, t]``, True where query t may attend key s (causal; see above).
        q_chunk: query-chunk length ``c``; ``None`` or ``t <= c``: one dense block (nothing to skip).
        window: the static sliding window contained in ``mask_bts``, or None.
        groups: number of chunk groups ``G`` (default :data:`SKIP_GROUPS`); ``groups >= n`` is one chunk per group.
    """
    groups = SKIP_GROUPS if groups is None else groups
    t, s = q_bthd.shape[1], k_bskd.shape[1]
    if t != s:
        raise ValueError(f"causal_block_skipping_attention: query length {t} != key length {s} (self-attention only)")
    if q_chunk is None or t <= q_chunk:
        return _attention_block(q_bthd, k_bskd, v_bskd, mask_bts)

    b, _, h, d = q_bthd.shape
    k_heads = v_bskd.shape[2]
    # A fully masked row's output in the unskipped kernel: uniform weights over all s keys.
    uniform_b11hd = jnp.broadcast_to(
        jnp.mean(v_bskd, axis=1, dtype=jnp.float32)[:, None, :, None, :], (b, 1, k_heads, h // k_heads, d)
    ).reshape(b, 1, h, d).astype(q_bthd.dtype)

    n = -(-t // q_chunk)
    n_groups = max(1, min(groups, n))
    outs = []
    for g in range(n_groups):
        lo, hi = g * n // n_groups, (g + 1) * n // n_groups  # chunk indices [lo, hi) of this group
        start, end = lo * q_chunk, min(hi * q_chunk, t)
        first = 0 if window is None else max(0, start - (window - 1))
        k_g, v_g = k_bskd[:, first:end], v_bskd[:, first:end]

        @jax.checkpoint
        def one_chunk(args, k_g=k_g, v_g=v_g):
            q_bchd, m_bcs = args
            out_bchd = _attention_block(q_bchd, k_g, v_g, m_bcs)
            return jnp.where(jnp.any(m_bcs, axis=-1)[:, :, None, None], out_bchd, uniform_b11hd)

        q_mbchd = to_chunks(q_bthd[:, start:end], q_chunk)
        m_mbcs = to_chunks(mask_bts[:, start:end, first:end], q_chunk, False)  # padded query rows: fully masked
        outs.append(from_chunks(jax.lax.map(one_chunk, (q_mbchd, m_mbcs)), end - start))
    return jnp.concatenate(outs, axis=1)


@jax.custom_vjp
def softmax_last(x: jnp.ndarray) -> jnp.ndarray:
    """``jax.nn.softmax(x, axis=-1)`` (the same forward, bit for bit) with its backward written out.

    The backward ``dx = g y - y sum(g y)`` sums ``g y`` over the keys with
    :func:`~selfaug_jax.reductions.sum_last_axis`, not with a reduction that XLA:CPU would fuse with the product and
    run slowly (bench/README.md "Session 17").
    """
    return jax.nn.softmax(x, axis=-1)


def _softmax_last_fwd(x):
    y = jax.nn.softmax(x, axis=-1)
    return y, y


def _softmax_last_bwd(y, g):
    gy = g * y
    return (gy - y * sum_last_axis(gy)[..., None],)


softmax_last.defvjp(_softmax_last_fwd, _softmax_last_bwd)


def _attention_block(
    q_bthd: jnp.ndarray, k_bskd: jnp.ndarray, v_bskd: jnp.ndarray, mask_bts: jnp.ndarray
) -> jnp.ndarray:
    """Dense GQA attention of all ``t`` queries against all ``s`` keys (the unchunked kernel).

    The matmuls run head-major: the ``g`` query heads of a kv head and their ``t`` queries are one row axis
    ``m = g * t`` of ``q_bkmd``, and keys and values are ``[b, k, s, d]``, so both einsums (and their gradients) are
    plain batched matmuls over ``(b, k)`` with the contracted axis leading or trailing. Written with ``b t k g d``
    operands instead, XLA:CPU transposed the ``[b, k, g, t, s]`` probabilities and scores (and their gradients) for
    every matmul, and ran the backward's ``[s, m]``-contracting matmuls (``dk``, ``dv``) on those copies. Head-major,
    XLA:CPU runs those two as plain dots on the untransposed operands. SmolLM2-135M's attention (4 x 256, 9 / 3
    heads, float32) took 29.6 ms per layer forward + backward against 14.8 ms head-major, and 399 vs 213 ms at
    1 x 2048 (``bench/attention_block.py``); the whole ``selfaug`` step 6.47 vs 6.89 s at 4 x 256 and 19.8 vs 28.0 s
    at 1 x 2048 (bench/README.md "Session 18"). The three input transposes and the output one are
    ``[tokens, heads, d]``-sized: at most ``d / s`` of a probability tensor.
    """
    b, t, h, d = q_bthd.shape
    s, k_heads = k_bskd.shape[1], k_bskd.shape[2]
    g = h // k_heads
    q_bkmd = q_bthd.reshape(b, t, k_heads, g, d).transpose(0, 2, 3, 1, 4).reshape(b, k_heads, g * t, d)
    k_bksd = k_bskd.transpose(0, 2, 1, 3)
    v_bksd = v_bskd.transpose(0, 2, 1, 3)
    scores_bkms = einsum_f32("bkmd,bksd->bkms", q_bkmd, k_bksd, name=ATTENTION_MATMUL_NAME)
    scores_bkgts = scores_bkms.reshape(b, k_heads, g, t, s) * (1.0 / math.sqrt(d))
    scores_bkgts = jnp.where(mask_bts[:, None, None, :, :], scores_bkgts, _MASK_VALUE)
    probs_bkms = softmax_last(scores_bkgts).astype(v_bskd.dtype).reshape(b, k_heads, g * t, s)
    out_bkmd = einsum_f32("bkms,bksd->bkmd", probs_bkms, v_bksd, name=ATTENTION_MATMUL_NAME)
    out_bthd = out_bkmd.reshape(b, k_heads, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
    return out_bthd.astype(q_bthd.dtype)
