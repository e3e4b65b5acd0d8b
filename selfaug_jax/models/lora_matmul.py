"""The LoRA branch of a projection, ``(dropout(x) @ A @ B) * scale``, with a hand-written backward pass.

Why not plain autodiff (measured on XLA:CPU, SmolLM2-135M ``selfaug`` step, 4 x 256; bench/README.md "Session 4"):

* **Layout.** Autodiff writes the adapter gradient as ``dA = dot_general(x_drop, d_xa, contract tokens)``, i.e.
  ``x_dropᵀ @ d_xa`` with the big ``[tokens, in]`` operand on the left. XLA:CPU canonicalises a dot to
  ``lhs [rows, contracting]``, so it materialised ``x_dropᵀ`` ``[in, tokens]`` in a transposing loop fusion that
  re-reads the whole elementwise chain producing ``x_drop`` (SiLU·up, the dropout bits, the stacked remat
  residuals) with strided loads: the two such fusions of ``down_proj`` alone were ~17% of the step. Here the
  gradient is ``(d_xaᵀ @ x_drop)ᵀ``: the small ``[tokens, r]`` operand is transposed and ``x_drop`` is read in its
  natural layout. ``dB = xaᵀ @ g`` likewise transposes only ``xa`` ``[tokens, r]``.
* **Dropout bits.** :func:`dropout_keep_mask` draws 16 random bits per element, two per 32-bit word of
  :func:`hashed_words`: a keyed integer hash of the element's position, a dozen ``uint32`` operations that XLA fuses
  into whatever reads the mask. So no remat policy saves the masks: the backward hashes the same positions again
  inside its own fusions, at less cost than storing a bool per element and reading it back (bench/README.md
  "Session 19": the SmolLM2 ``lora`` / ``selfaug`` steps at 4 x 256 1.5-6% faster and 14% fewer XLA temp bytes
  than with Threefry draws saved for the backward). jax's Threefry (``jax.random.bits``, or its primitive with
  both output words kept, as sessions 4-18 did) lowers on CPU to a rolled loop whose output XLA must materialise
  and copy every round; written out as ``uint32`` code its twenty rounds were too costly to recompute in every
  reader (session 18).

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

_BITS = 16  # random bits per element of the dropout mask


def dropout_threshold(rate: float) -> int:
    """The 16-bit draw below which an element is dropped (``round(rate * 2**16)``)."""
    return int(round(rate * (1 << _BITS)))


def effective_keep_scale(rate: float) -> float:
    """``1 / (1 - p_effective)``: the scale of kept elements for ``rate`` quantised to ``2**-16``."""
    return 1.0 / (1.0 - dropout_threshold(rate) / (1 << _BITS))


# lowbias32's multipliers (C. Wellons, "Prospecting for Hash Functions", 2018, github.com/skeeto/hash-prospector):
# an invertible 32-bit mix whose output bits each flip with probability 0.5 +- 0.0017 for any flipped input bit.
_MIX_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)


def _mix32(x: jnp.ndarray) -> jnp.ndarray:
    """lowbias32: ``xorshift 16, * m1, xorshift 15, * m2, xorshift 16`` on ``uint32`` (a bijection of 2**32)."""
    m1, m2 = _MIX_MULTIPLIERS
    x = x ^ (x >> 16)
    x = x * jnp.uint32(m1)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(m2)
    return x ^ (x >> 16)


def hashed_words(rng: jax.Array, shape: tuple[int, ...]) -> jnp.ndarray:
    """``uint32`` array of ``shape``: ``mix(mix(position ^ k0) ^ k1)`` per element, 32 random bits each.

    ``position`` is the element's flat row-major index, ``(k0, k1)`` two words drawn from ``rng`` (any jax key type)
    and ``mix`` lowbias32 (:func:`_mix32`). Elementwise on positions, like jax's partitionable Threefry, so a
    sharded array's shards hash their own elements and the bits do not depend on the mesh. Statistical quality is
    that of a strong 32-bit hash, not a cryptographic generator: ample for dropout (tests check rates, independence
    of neighbouring draws and of keys), not meant for anything else.
    """
    size = math.prod(shape)
    if size > 1 << 32:
        raise ValueError(f"hashed_words: shape {shape} has {size} elements; positions must fit in 32 bits")
    with jax.named_scope("lora_dropout_hash"):
        key = jax.random.bits(rng, (2,), jnp.uint32)
        position = jnp.zeros(shape, jnp.uint32)
        stride = 1
        for axis in reversed(range(len(shape))):
            position = position + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
            stride *= shape[axis]
        return _mix32(_mix32(position ^ key[0]) ^ key[1])


def dropout_keep_mask(rng: jax.Array, shape: tuple[int, ...], rate: float) -> jnp.ndarray:
    """Boolean keep mask of ``shape`` (True = keep) for drop probability ``rate`` (see the module docstring).

    ``h = ceil(n / 2)`` words along the last axis (:func:`hashed_words`); their low 16 bits are the draws of the
    first half of that axis, their high 16 bits those of the second half.
    """
    lead, last = tuple(shape[:-1]), shape[-1]
    half = -(-last // 2)
    words = hashed_words(rng, lead + (half,))
    threshold = jnp.uint32(dropout_threshold(rate))
    return jnp.concatenate([(words & 0xFFFF) >= threshold, (words >> 16) >= threshold], axis=-1)[..., :last]


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
