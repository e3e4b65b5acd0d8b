"""The SwiGLU product ``silu(gate) * up`` in float32, rounded once, with a backward that keeps only its inputs.

The MLP's product runs in float32 whatever the compute dtype: XLA:CPU has no bfloat16 arithmetic and rounds after
every bf16 op, so a bf16 ``silu(gate) * up`` rounds three times where one float32 formula rounds once
(bench/README.md "Session 14"). Written as plain ``jnp`` code, though, autodiff of the float32 formula let XLA keep
one more compute-dtype ``[B, T, F]`` buffer alive in the 7B ``full``-remat step than the bf16 formula did
(``tpu-v5p-7b``: +1.24 GB per device, exactly ``4 * 8192 * 18944 * 2`` bytes; docs/SCALING.md section 7).

:func:`swiglu` is the same formula under a ``jax.custom_vjp`` whose residuals are its two inputs, in their own dtype,
and whose backward recomputes ``sigmoid(gate)`` and writes both input gradients in float32, each rounded once to its
input's dtype::

    s = sigmoid(gate);  d_up = g * gate * s;  d_gate = g * up * s * (1 + gate * (1 - s))

(``d silu(x) / dx = s + x s (1 - s)``). The values are the autodiff ones up to float rounding; float32 models run the
same forward formula as before.

Why the barrier in the backward: under ``full`` remat the backward recomputes the product (the down projection's
input) and needs both gradients, three consumers of ``sigmoid(gate)``. XLA's CSE merges the three sigmoids into one
value, and its fusion will not duplicate an ``exp`` / ``divide`` into several consumers, so it materialised that
sigmoid as a float32 ``[B, T, F]`` array (the buffer-assignment dump of the 2-layer ``tpu-v5p-7b`` compile:
``add_divide_fusion f32[4,8192,18944]``). Reading ``gate`` through an ``optimization_barrier`` as two distinct values
keeps each gradient's sigmoid apart, so each is fused into its own gradient's loop. Measured with ``bench/step.py
--abstract`` (per device): ``tpu-v5p-7b`` 71.78 -> 70.54 GB, session 13's total with the bf16 product; the 2-layer
compile 31.36 -> 30.34 GB (30.12 with the bf16 product; one barrier shared by both gradients: 31.36). The price on
CPU is two more ``exp`` per ``[B, T, F]`` element in the backward: +0.035 s per SmolLM2 bf16 ``selfaug`` step in
XLA's op profile (0.5%; bench/README.md "Session 15").

Only first-order reverse-mode differentiation is defined (``jax.custom_vjp``), which is all the train step and every
evaluation use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _product_f32(gate: jax.Array, up: jax.Array) -> jax.Array:
    gate32 = gate.astype(jnp.float32)
    return jax.nn.silu(gate32) * up.astype(jnp.float32)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``silu(gate) * up`` computed in float32 and rounded once to ``gate``'s dtype (same shapes, any float dtype)."""
    return _product_f32(gate, up).astype(gate.dtype)


def _swiglu_fwd(gate: jax.Array, up: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    gate, up = residuals
    # Two distinct copies of ``gate`` (free: the barrier forwards its buffers), so that XLA's CSE merges neither
    # gradient's sigmoid with the other's nor with the recomputed forward's: each is then fused into its own
    # consumer instead of being materialised once as a float32 [B, T, F] array (+1 bf16 [B, T, F] of peak memory).
    gate_u, gate_g = jax.lax.optimization_barrier((gate, gate))
    g32 = g.astype(jnp.float32)
    gate32_u = gate_u.astype(jnp.float32)
    d_up = g32 * (gate32_u * jax.nn.sigmoid(gate32_u))
    gate32_g = gate_g.astype(jnp.float32)
    s = jax.nn.sigmoid(gate32_g)
    d_gate = (g32 * up.astype(jnp.float32)) * (s + gate32_g * (s * (1.0 - s)))
    return d_gate.astype(gate.dtype), d_up.astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
