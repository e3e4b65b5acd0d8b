"""Matmuls accumulated in float32 whose backward pass keeps bfloat16 operands bfloat16.

The model's projections and attention einsums take operands in the compute dtype and accumulate in float32
(``preferred_element_type=float32``). For float32 compute that is a plain ``jnp.einsum``. For bfloat16 (or float16)
compute, autodiff's transpose of ``einsum(x_bf16, w_bf16) -> f32`` is an einsum of the **float32** cotangent with the
bfloat16 operand, often through a transposed view; XLA:CPU (jaxlib 0.10.2) then converts both operands to float32 and
runs its float32 dot. Only a dot whose two operands are bfloat16, read in place, with a float32 result runs on its
bfloat16 kernels, which use the avx512_bf16 instructions where the CPU has them. Measured on a 2-core AMD EPYC with
avx512_bf16, ``[1024, 1536] x [576, 1536]ᵀ`` (bench/README.md "Session 13"): float32 171 GFLOP/s; bfloat16 operands,
float32 result 363 GFLOP/s; a float32 cotangent against a bfloat16 weight (what autodiff emitted) 166 GFLOP/s; the
same with ``w.T`` written as a transpose 172 GFLOP/s. In the ``selfaug`` bf16 step every backward matmul of the layers
(50 of 176 dots) was of the slow kind.

:func:`einsum_f32` gives narrow operands a custom VJP that rounds the cotangent to the operands' dtype and writes both
gradients as einsums of two narrow operands with a float32 result, cast back to the operands' dtype (as autodiff
does). Where the cotangent is already a narrow value carried in float32 (a projection whose output is cast to the
compute dtype, the attention output) the rounding is exact; for the attention scores it rounds the softmax gradient
to bfloat16 before ``dq`` / ``dk``, the usual mixed-precision practice (FlashAttention's backward does the same). This
project's reading: bfloat16 compute means bfloat16 matmul operands in both passes, float32 accumulation.

A custom VJP hides its dot from :mod:`jax.checkpoint`'s dot policies (they see one ``custom_vjp_call``), so the
remat policies of ``models/remat.py`` save by name: a caller passes ``name=`` and the output carries that
:func:`jax.ad_checkpoint.checkpoint_name` in every dtype, so a policy saves the same values in float32 and bfloat16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

NARROW_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _operands_and_output(spec: str) -> tuple[str, str, str]:
    inputs, out = spec.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    if "." in spec or not set(lhs) <= set(rhs) | set(out) or not set(rhs) <= set(lhs) | set(out):
        raise ValueError(f"einsum_f32 takes explicit subscripts, each operand's in the other or the output: {spec!r}")
    return lhs, rhs, out


def einsum_f32(spec: str, a: jnp.ndarray, b: jnp.ndarray, *, name: str | None = None) -> jnp.ndarray:
    """``jnp.einsum(spec, a, b, preferred_element_type=float32)``: float32 result of a two-operand einsum.

    With both operands bfloat16 (or both float16), the backward pass runs both gradient einsums on operands of that
    dtype (see the module docstring). ``spec`` uses explicit subscripts, e.g. ``"bti,io->bto"``. ``name``: a
    ``checkpoint_name`` for the output (any dtype), for the remat policies; ``None``: unnamed.
    """
    _operands_and_output(spec)  # checks the subscripts, whatever the dtype
    if a.dtype != b.dtype or jnp.dtype(a.dtype) not in NARROW_DTYPES:
        out = jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    else:
        out = _narrow_einsum(spec, a, b)
    return out if name is None else checkpoint_name(out, name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _narrow_einsum(spec: str, a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _narrow_einsum_fwd(spec, a, b):
    return _narrow_einsum(spec, a, b), (a, b)


def _narrow_einsum_bwd(spec, res, g):
    a, b = res
    lhs, rhs, out = _operands_and_output(spec)
    g = g.astype(a.dtype)
    # Each gradient is an einsum of the (narrow) cotangent and the other operand, in the subscripts' own order: no
    # transposed operand for XLA to materialise or upcast.
    da = jnp.einsum(f"{out},{rhs}->{lhs}", g, b, preferred_element_type=jnp.float32).astype(a.dtype)
    db = jnp.einsum(f"{lhs},{out}->{rhs}", a, g, preferred_element_type=jnp.float32).astype(b.dtype)
    return da, db


_narrow_einsum.defvjp(_narrow_einsum_fwd, _narrow_einsum_bwd)
