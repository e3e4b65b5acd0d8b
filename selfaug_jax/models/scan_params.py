"""The layer scan's stacked 16-bit parameters, sliced as raw bits.

XLA:CPU (jaxlib 0.10.2) has no bfloat16 ``dynamic-slice``: its float normalisation converts the whole operand to
float32, slices it, and converts the slice back. The decoder's layer scan slices every stacked parameter once per
layer, so for a bfloat16 model XLA hoisted a float32 copy of every stacked kernel out of each layer loop (one copy per
scan: the policy's forward, the reference's, the backward) and converted each layer's slice back to bfloat16 inside
the loop. In the SmolLM2 ``selfaug`` bf16 step (bench/README.md "Session 13") that was ~0.3 s of converts per step
and float32 copies of the frozen stack (~0.4 GB each); a micro-benchmark of 30 scanned bf16 ``[576, 1536]`` /
``[1536, 576]`` projections ran 10-12% faster with the slices taken as bits.

:func:`scan_inputs` replaces every 16-bit float leaf of the stacked state by a :class:`BitsAndValue`: its ``uint16``
view (what the scan slices, a plain integer ``dynamic-slice``) and the leaf itself. :func:`layer_params` turns the
scanned slice back into the float leaf with a bitcast. The bitcast has a straight-through custom VJP: the slice's
cotangent goes to the leaf itself (``value``), whose slice is never read, so XLA drops it while gradients with
respect to trainable 16-bit parameters flow as before (a bare bitcast would give them silently zero gradients).
Float32 leaves pass through untouched. On other backends the bitcasts are free.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from selfaug_jax.models.matmul import NARROW_DTYPES  # the 16-bit float dtypes


class BitsAndValue(NamedTuple):
    """A 16-bit float leaf as a scan input: its integer view (read) and itself (carries the gradient, not read)."""

    bits: jax.Array
    value: jax.Array


def scan_inputs(tree: Any) -> Any:
    """``tree`` with every 16-bit float leaf replaced by a :class:`BitsAndValue` (other leaves unchanged)."""

    def wrap(x):
        if jnp.dtype(x.dtype) not in NARROW_DTYPES:
            return x
        return BitsAndValue(jax.lax.bitcast_convert_type(x, jnp.uint16), x)

    return jax.tree.map(wrap, tree)


def layer_params(tree: Any) -> Any:
    """Inverse of :func:`scan_inputs` on a scanned slice: each :class:`BitsAndValue` back to its float values."""
    return jax.tree.map(
        lambda x: _from_bits(x.bits, x.value) if isinstance(x, BitsAndValue) else x,
        tree,
        is_leaf=lambda x: isinstance(x, BitsAndValue),
    )


@jax.custom_vjp
def _from_bits(bits: jax.Array, value: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(bits, value.dtype)


def _from_bits_fwd(bits, value):
    return _from_bits(bits, value), None


def _from_bits_bwd(_, g):
    return None, g  # integer bits: no cotangent; the value takes the slice's cotangent unchanged


_from_bits.defvjp(_from_bits_fwd, _from_bits_bwd)
