"""Split the time axis of ``[B, T, ...]`` arrays into fixed-size chunks for ``lax.scan`` / ``lax.map``, and back.

Shared by the fused loss (vocabulary projections a chunk of positions at a time), the query-chunked attention and
the shift evaluation's chunked KL. Chunks are taken along T only, so the batch axis (and its sharding) is never
split. Like :mod:`selfaug_jax.loss`, this module imports only jax and the standard library.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def to_chunks(x_bt_: jax.Array, chunk_t: int, fill: Any = 0) -> jax.Array:
    """``[B, T, ...]`` -> ``[C, B, chunk_t, ...]`` with ``C = ceil(T / chunk_t)``, padding T with ``fill``."""
    b, t = x_bt_.shape[:2]
    n_chunks = -(-t // chunk_t)
    pad = n_chunks * chunk_t - t
    if pad:
        widths = [(0, 0), (0, pad)] + [(0, 0)] * (x_bt_.ndim - 2)
        x_bt_ = jnp.pad(x_bt_, widths, constant_values=fill)
    return jnp.moveaxis(x_bt_.reshape((b, n_chunks, chunk_t) + x_bt_.shape[2:]), 1, 0)


def from_chunks(x_cbt_: jax.Array, t: int) -> jax.Array:
    """Inverse of :func:`to_chunks`: ``[C, B, chunk_t, ...]`` -> ``[B, T, ...]`` (the padding dropped)."""
    x = jnp.moveaxis(x_cbt_, 0, 1)
    b, c, ct = x.shape[:3]
    return x.reshape((b, c * ct) + x.shape[3:])[:, :t]
