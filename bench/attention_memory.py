"""Compile-only XLA temp bytes of a SmolLM2-135M forward + backward under one attention kernel (bench/README.md).

Gradients w.r.t. every parameter of a ``sum(hidden**2)`` loss (no LM head, remat ``dots``), one row of ``T`` tokens;
nothing is executed, so it is cheap on a loaded CPU. Usage::

    python bench/attention_memory.py xla_chunked 2048
    python bench/attention_memory.py dot_product 2048
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from selfaug_jax.models import load_pretrained


def main(impl: str, t: int) -> None:
    model = load_pretrained(remat_policy="dots", attention_impl=impl)
    graphdef, params = nnx.split(model)
    ids_bt = jnp.zeros((1, t), jnp.int32)

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params).hidden_states(ids_bt).astype(jnp.float32) ** 2)

    c0 = time.process_time()
    memory = jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis()
    print(f"{impl} T={t}: XLA temp {memory.temp_size_in_bytes / 1e9:.3f} GB "
          f"(compile {time.process_time() - c0:.0f} CPU s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
