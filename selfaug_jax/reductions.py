"""Sums over the last axis written as matrix-vector products, for summands XLA:CPU would otherwise fuse.

XLA:CPU runs a reduction fast only when it reads a materialised array: with elementwise work fused into it (a
product of several arrays, even a slice) the same sum ran 4-13x slower per element, YNNPACK's reduce fusion or
XLA's own (``bench/reduce_fusion.py``; bench/README.md "Session 17"). A dot cannot absorb its operand's producer, so
``x @ ones`` keeps the summand in its own vectorised loop fusion and sums it at memory speed. Used for the fused
loss's divergence over the vocabulary and attention's softmax gradient over the keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sum_last_axis(x: jax.Array) -> jax.Array:
    """``sum(x, axis=-1)`` as ``x @ ones`` at full precision, accumulated in at least float32; ``x``'s dtype out.

    Exactly-zero summands still sum to exactly zero (the step-0 KL of SelfAug stays 0).
    """
    ones = jnp.ones((x.shape[-1],), x.dtype)
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)  # float32, or float64 in the float64 tests
    return jnp.einsum("...v,v->...", x, ones, precision=jax.lax.Precision.HIGHEST,
                      preferred_element_type=acc_dtype).astype(x.dtype)
