"""Reproducer (session 5): XLA:CPU (jaxlib 0.10.2) miscompiles a broadcast-multiply-reduce when the batch axis is 1.

``python bench/xla_cpu_ynn_batch1_repro.py`` computes decode-step attention scores the way a candidate kernel did
(``sum(k[:, :, :, None, :] * q, -1)`` over a layer slice of a stacked ``[L, b, s, kv, d]`` cache, ``q`` reshaped from
``[b, 1, heads, d]``), jitted and op by op, for batch 1 and batch 2, and prints the largest difference. On this
machine batch 1 differs by O(1) unless ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-reduce`` (the YNNPACK
reduce fusion) is set; batch 2 agrees to ~1e-6. The project's decoder does not use this formulation (it uses
``einsum`` dots); the script is kept to check newer jaxlib releases before trying it again.
"""
import jax
import jax.numpy as jnp
import numpy as np


def scores(q_b1hd, k_lbskd, layer):
    b, _, h, d = q_b1hd.shape
    kv = k_lbskd.shape[3]
    k_bskd = jax.lax.dynamic_index_in_dim(k_lbskd, layer, axis=0, keepdims=False)
    q_b1kgd = q_b1hd.reshape(b, 1, kv, h // kv, d)
    return jnp.sum(k_bskd[:, :, :, None, :] * q_b1kgd, axis=-1) / np.sqrt(d)


for batch in (1, 2):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((batch, 1, 9, 64)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, batch, 70, 3, 64)), jnp.float32)
    jitted, op_by_op = jax.jit(scores)(q, k, jnp.int32(1)), scores(q, k, jnp.int32(1))
    print(f"batch {batch}: max |jit - op-by-op| = {float(jnp.max(jnp.abs(jitted - op_by_op))):.3g}")
