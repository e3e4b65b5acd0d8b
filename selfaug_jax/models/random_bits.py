"""The dropout randomness of the decoder (LoRA dropout masks, per-layer keys) as one fusable integer expression.

Why: jax lowers its ``threefry2x32`` primitive on CPU as a *rolled* five-iteration ``fori_loop``
(``jax/_src/random/threefry2x32.py``, the CPU lowering rule; it keeps compile time down). XLA cannot fuse across the
loop's iterations, so every iteration runs its ~20 integer ops as separate passes over the whole array, plus copies
of the loop carries. In the LoRA train step that is one such loop per dropout mask (seven per layer, drawn again
in the remat backward) and one per derived key (``fold_in``: ten per layer), tens of thousands of small thunks per
step. Profile of the SmolLM2-135M ``selfaug`` step at 4 x 256 on the 2-core CPU (session 12,
``bench/profile_step.py``): 0.86 s of 10.8 s of op time.

Here the same hash is written out as straight-line ``uint32`` arithmetic: the 20 rounds of the Threefry-2x32 block
function (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011; rotation constants and the
key-schedule parity ``0x1BD11BDA`` as in jax), which XLA fuses into one loop over the output.

The results are **the same bits** jax gives for ``threefry2x32`` keys in its partitionable layout
(``jax_threefry_partitionable``, the default since jax 0.5): :func:`bits_at` of every position equals
``jax.random.bits(key, shape, jnp.uint32)`` and :func:`fold_in` equals ``jax.random.fold_in``
(``tests/test_models_lora_matmul.py``). The counters are a function of the element's index alone, so the values do
not depend on sharding either. Any other key implementation (``rbg``, a custom one) or the non-partitionable layout
goes to ``jax.random`` unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_PARITY = 0x1BD11BDA  # Threefry's key-schedule constant
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))  # Threefry-2x32 rotation distances, alternating groups of 4 rounds


def fast_path(key: jax.Array) -> bool:
    """True when ``key`` is a typed ``threefry2x32`` key and jax uses the partitionable layout (a trace-time test)."""
    return (jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and str(jax.random.key_impl(key)) == "threefry2x32"
            and bool(jax.config.jax_threefry_partitionable))


def threefry2x32(k1: jax.Array, k2: jax.Array, x1: jax.Array, x2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The Threefry-2x32 block function (20 rounds) of the counter pair ``(x1, x2)`` under the key ``(k1, k2)``.

    All operands ``uint32`` and broadcastable; returns the two output words. Straight-line code: under ``jit`` XLA
    fuses it with its producers and consumers.
    """
    k1, k2, x1, x2 = (jnp.asarray(v, jnp.uint32) for v in (k1, k2, x1, x2))
    ks = (k1, k2, k1 ^ k2 ^ jnp.uint32(_PARITY))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for group in range(1, 6):
        for r in _ROTATIONS[(group - 1) % 2]:
            x1 = x1 + x2
            x2 = (x2 << jnp.uint32(r)) | (x2 >> jnp.uint32(32 - r))
            x2 = x1 ^ x2
        x1 = x1 + ks[group % 3]
        x2 = x2 + ks[(group + 1) % 3] + jnp.uint32(group)
    return x1, x2


def fold_in(key: jax.Array, data: int | jax.Array) -> jax.Array:
    """``jax.random.fold_in(key, data)`` (same key), without the rolled loop on the fast path."""
    if not fast_path(key):
        return jax.random.fold_in(key, data)
    kd = jax.random.key_data(key)
    # jax: threefry_2x32(key, threefry_seed(uint32 data)), the seed of a 32-bit value being the pair (0, data).
    y1, y2 = threefry2x32(kd[..., 0], kd[..., 1], jnp.uint32(0), jnp.asarray(data).astype(jnp.uint32))
    return jax.random.wrap_key_data(jnp.stack([y1, y2], axis=-1), impl="threefry2x32")


def row_major_index(shape: tuple[int, ...]) -> jax.Array:
    """``uint32`` array of ``shape`` holding each element's row-major flat index (``shape`` under 2**32 elements)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    return index


def bits_at(key: jax.Array, index: jax.Array) -> jax.Array:
    """The 32-bit word that ``jax.random.bits(key, shape, jnp.uint32)`` puts at row-major flat position ``index``
    (a ``uint32`` array of any shape; fast path only, see :func:`fast_path`).

    The partitionable layout hashes position ``i`` as the counter pair ``(i >> 32, i & 0xFFFFFFFF)`` and returns
    the XOR of the two output words; here ``i < 2**32``. Positions may repeat or come in any order, so a caller can
    lay the words out as it needs (``lora_matmul.dropout_keep_mask``) without a gather or concatenation.
    """
    kd = jax.random.key_data(key)
    y1, y2 = threefry2x32(kd[0], kd[1], jnp.uint32(0), index)
    return y1 ^ y2
