"""The LoRA branch of a projection, ``(dropout(x) @ A @ B) * scale``, with a hand-written backward pass.

Why not plain autodiff (measured on XLA:CPU, SmolLM2-135M ``selfaug`` step, 4 x 256; bench/README.md "Session 4"):

* **Layout.** Autodiff writes the adapter gradient as ``dA = dot_general(x_drop, d_xa, contract tokens)``, i.e.
  ``x_dropᵀ @ d_xa`` with the big ``[tokens, in]`` operand on the left. XLA:CPU canonicalises a dot to
  ``lhs [rows, contracting]``, so it materialised ``x_dropᵀ`` ``[in, tokens]`` in a transposing loop fusion that
  re-reads the whole elementwise chain producing ``x_drop`` (SiLU·up, the dropout bits, the stacked remat
  residuals) with strided loads: the two such fusions of ``down_proj`` alone were ~17% of the step. Here the
  gradient is ``(d_xaᵀ @ x_drop)ᵀ``: the small ``[tokens, r]`` operand is transposed and ``x_drop`` is read in its
  natural layout. ``dB = xaᵀ @ g`` likewise transposes only ``xa`` ``[tokens, r]``.
* **Dropout bits.** :func:`dropout_keep_mask` draws 16 random bits per element, four per Threefry hash: both
  64-bit output words of each hash (:func:`random_words`). ``jax.random.bernoulli`` hashes a full float32 uniform per
  element, and ``jax.random.bits`` (with ``jax_threefry_partitionable``, the default) one hash per 32-bit word, the
  XOR of its two output words: 3.6 ms vs 14.2 ms CPU for one ``[4, 256, 1536]`` mask with ``bits`` (session 4), and
  half of that hashing again with both words (session 18).

This project's reading of LoRA dropout (PEFT applies ``torch.nn.Dropout(p)`` to the adapter input): an element is
kept when its 16-bit draw is ``>= round(p * 2**16)``, so the drop probability is ``p`` rounded to a multiple of
``2**-16`` (at most 7.7e-6 away from ``p``), and kept elements are scaled by ``1 / (1 - p_effective)`` so the
expectation is exactly ``x``. The random stream differs from torch's anyway (different generators).

Values equal the autodiff formulation's; gradients equal it up to float summation order
(``tests/test_lora.py``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.random import threefry2x32_p

_BITS = 16  # random bits per element of the dropout mask


def dropout_threshold(rate: float) -> int:
    """The 16-bit draw below which an element is dropped (``round(rate * 2**16)``)."""
    return int(round(rate * (1 << _BITS)))


def effective_keep_scale(rate: float) -> float:
    """``1 / (1 - p_effective)``: the scale of kept elements for ``rate`` quantised to ``2**-16``."""
    return 1.0 / (1.0 - dropout_threshold(rate) / (1 << _BITS))


def random_words(rng: jax.Array, shape: tuple[int, ...]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Two uint32 arrays of ``shape``, the two output words of one Threefry-2x32 hash per element: 64 random bits.

    The hash key is two words drawn from ``rng`` (any jax key type), the counter of an element is its position:
    ``(last-axis index, flat index over the leading axes)``. Elementwise, as jax's partitionable Threefry, so a
    sharded array's shards hash their own elements. jax's primitive (``jax.extend.random.threefry2x32_p``) keeps
    its lowering: on CPU a rolled loop, whose output XLA materialises rather than fusing twenty rounds into every
    consumer of the mask (session 18: inline rounds were fused into the single-threaded store of the mask for the
    backward, and recomputed once per element there).
    """
    rows = math.prod(shape[:-1])
    if rows >= 1 << 32 or shape[-1] >= 1 << 32:
        raise ValueError(f"random_words: shape {shape} needs Threefry counters wider than 32 bits")
    key = jax.random.bits(rng, (2,), jnp.uint32)
    col = jax.lax.broadcasted_iota(jnp.uint32, shape, len(shape) - 1)
    row = jnp.zeros(shape, jnp.uint32)  # flat row-major index over the leading axes
    stride = 1
    for axis in reversed(range(len(shape) - 1)):
        row = row + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    first, second = threefry2x32_p.bind(key[0], key[1], col, row)
    return first, second


def dropout_keep_mask(rng: jax.Array, shape: tuple[int, ...], rate: float) -> jnp.ndarray:
    """Boolean keep mask of ``shape`` (True = keep) for drop probability ``rate`` (see the module docstring).

    ``q = ceil(n / 4)`` hashes along the last axis (:func:`random_words`); the low and high halves of their first
    output words are the 16-bit draws of the first and second quarter of that axis, those of their second words the
    third and fourth quarter.
    """
    lead, last = tuple(shape[:-1]), shape[-1]
    quarter = -(-last // 4)
    first_w, second_w = random_words(rng, lead + (quarter,))
    threshold = jnp.uint32(dropout_threshold(rate))
    draws = (first_w & 0xFFFF, first_w >> 16, second_w & 0xFFFF, second_w >> 16)
    return jnp.concatenate([d >= threshold for d in draws], axis=-1)[..., :last]


def lora_update(x: jnp.ndarray, a: jnp.ndarray, b: jnp.ndarray, keep: jnp.ndarray | None, scale: float,
                keep_scale: float) -> jnp.ndarray:
    """``((x * keep * keep_scale) @ a @ b) * scale`` in float32 (``keep=None``: no dropout).

    ``x`` ``[..., in]`` in the compute dtype, ``a`` ``[in, r]`` and ``b`` ``[r, out]`` already cast to it; the
    matmuls accumulate in float32 and ``x @ a`` is rounded to the compute dtype before ``@ b`` (as
    :class:`~selfaug_jax.models.decoder.Linear` did with autodiff). Returns float32 ``[..., out]``.
    """
    lead = x.shape[:-1]
    x_ni = x.reshape(-1, x.shape[-1])
    keep_ni = None if keep is None else keep.reshape(x_ni.shape)
    y_no = _lora_2d(x_ni, a, b, keep_ni, float(scale), float(keep_scale))
    return y_no.reshape(lead + (b.shape[-1],))


def _drop(x_ni, keep_ni, keep_scale):
    if keep_ni is None:
        return x_ni
    return jnp.where(keep_ni, x_ni * jnp.asarray(keep_scale, x_ni.dtype), jnp.zeros((), x_ni.dtype))


def _forward(x_ni, a, b, keep_ni, scale, keep_scale):
    x_drop = _drop(x_ni, keep_ni, keep_scale)
    xa_nr = jnp.dot(x_drop, a, preferred_element_type=jnp.float32).astype(x_ni.dtype)
    y_no = jnp.dot(xa_nr, b, preferred_element_type=jnp.float32) * scale
    return y_no, xa_nr


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _lora_2d(x_ni, a, b, keep_ni, scale, keep_scale):
    return _forward(x_ni, a, b, keep_ni, scale, keep_scale)[0]


def _lora_2d_fwd(x_ni, a, b, keep_ni, scale, keep_scale):
    y_no, xa_nr = _forward(x_ni, a, b, keep_ni, scale, keep_scale)
    return y_no, (x_ni, a, b, keep_ni, xa_nr)


def _lora_2d_bwd(scale, keep_scale, res, g_no):
    x_ni, a, b, keep_ni, xa_nr = res
    dt = x_ni.dtype
    gs_no = (g_no * scale).astype(b.dtype)
    # dB = xaᵀ @ g: contract the token axis with the small [n, r] operand on the left
    db_ro = jnp.einsum("nr,no->ro", xa_nr, gs_no, preferred_element_type=jnp.float32).astype(b.dtype)
    d_xa_nr = jnp.einsum("no,ro->nr", gs_no, b, preferred_element_type=jnp.float32).astype(dt)
    x_drop = _drop(x_ni, keep_ni, keep_scale)
    # dA = (d_xaᵀ @ x_drop)ᵀ: x_drop stays in its [n, in] layout (see the module docstring)
    da_ri = jnp.einsum("nr,ni->ri", d_xa_nr, x_drop, preferred_element_type=jnp.float32)
    da_ir = da_ri.T.astype(a.dtype)
    dx_drop = jnp.einsum("nr,ir->ni", d_xa_nr, a, preferred_element_type=jnp.float32).astype(dt)
    dx_ni = _drop(dx_drop, keep_ni, keep_scale)
    dkeep = None
    return dx_ni, da_ir, db_ro, dkeep


_lora_2d.defvjp(_lora_2d_fwd, _lora_2d_bwd)


def keep_mask_or_none(rng: jax.Array | None, shape: tuple[int, ...], rate: float) -> Any:
    """The dropout keep mask when dropout is active (``rate > 0`` and a key given), else ``None``."""
    if rate <= 0.0 or rng is None:
        return None
    return dropout_keep_mask(rng, shape, rate)
