"""Split the time axis of ``[B, T, ...]`` arrays into fixed-size chunks for ``lax.scan`` / ``lax.map``, and back.

Shared by the fused loss (vocabulary projections a chunk of positions at a time), the query-chunked attention and
the shift evaluation's chunked KL. Chunks are taken along T only, so the batch axis (and its sharding) is never
split. :func:`selected_first` / :func:`permute_time` reorder the positions *inside* each sequence (again never
across the batch) so that the selected ones come first, letting a chunk loop skip the chunks with no selected
position. Like :mod:`selfaug_jax.loss`, this module imports only jax and the standard library.
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


def selected_first(select_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A per-sequence stable reorder putting the selected positions first: ``(perm_bt, dest_bt)``.

    ``perm_bt[b, i]`` is the original position placed at ``i`` (selected positions first, each group in its original
    order); ``dest_bt[b, t]`` the new index of original position ``t`` (the inverse permutation). Both int32
    ``[B, T]``; rows are permuted independently (the batch axis is never mixed).
    """
    select_bt = select_bt.astype(bool)
    perm_bt = jnp.argsort(~select_bt, axis=1, stable=True).astype(jnp.int32)
    # The inverse from counts instead of a second sort or a scatter: a selected position goes to the number of
    # selected positions before it, an unselected one after all selected ones of its row.
    n_sel_b1 = jnp.sum(select_bt, axis=1, keepdims=True, dtype=jnp.int32)
    sel_before = jnp.cumsum(select_bt, axis=1, dtype=jnp.int32) - select_bt
    unsel_before = jnp.cumsum(~select_bt, axis=1, dtype=jnp.int32) - ~select_bt
    dest_bt = jnp.where(select_bt, sel_before, n_sel_b1 + unsel_before)
    return perm_bt, dest_bt


@jax.custom_vjp
def permute_time(x_bt_: jax.Array, perm_bt: jax.Array, dest_bt: jax.Array) -> jax.Array:
    """``x[b, perm[b, i]]`` for ``[B, T, ...]`` ``x``: the reorder of :func:`selected_first`.

    Its gradient is the gather by the inverse permutation ``dest_bt`` -- autodiff of a gather would give a
    scatter-add, which XLA:CPU executes element by element.
    """
    return take_time(x_bt_, perm_bt)


def take_time(x_bt_: jax.Array, idx_bt: jax.Array) -> jax.Array:
    """``x[b, idx[b, i], ...]``: a per-row gather along T (plain autodiff; for arrays that are not differentiated)."""
    idx = idx_bt.reshape(idx_bt.shape + (1,) * (x_bt_.ndim - 2))
    return jnp.take_along_axis(x_bt_, idx, axis=1, mode="promise_in_bounds")


def _permute_time_fwd(x_bt_, perm_bt, dest_bt):
    return take_time(x_bt_, perm_bt), dest_bt


def _permute_time_bwd(dest_bt, g_bt_):
    return take_time(g_bt_, dest_bt), None, None


permute_time.defvjp(_permute_time_fwd, _permute_time_bwd)
