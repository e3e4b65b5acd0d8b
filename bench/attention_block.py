"""One layer's attention kernel alone: forward, and forward + remat + backward, per call.

Session 18 wrote ``attention._attention_block``'s matmuls head-major (``[b, k, g * t, d]`` queries): XLA:CPU had
transposed the ``[b, k, g, t, s]`` scores and probabilities, and their gradients, around every matmul of the former
``b t k g d`` form. This script times the kernel that ``attention_kernels.xla_chunked`` runs (dense below
``--q-chunk``, causal block skipping above it) on one layer's inputs, so two versions of the library can be compared
side by side: run a copy of it from inside a ``git worktree`` of the older commit, then this one (the script puts
its own checkout first on ``sys.path``, ahead of ``PYTHONPATH``).

Arms (one jitted function each, interleaved ``--reps`` rounds in this process; median wall and CPU ms per call):

* ``forward``: ``xla_chunked(q, k, v, causal mask)``;
* ``forward_backward``: the gradient w.r.t. q, k and v of ``sum(attention * w)``, the attention under
  ``jax.checkpoint`` as in the remat'd layer (its forward runs twice).

Defaults are SmolLM2-135M's attention at 4 x 256 (9 query heads on 3 kv heads, head dim 64). One JSON line per arm
goes to stdout and to ``--out`` (default ``bench/results/attention_block_cpu.jsonl``; ``-``: none).

Usage::

    python bench/attention_block.py --tag s18 [--dtype bfloat16] [--seq 2048]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
from loss_skip import interleaved_times  # noqa: E402
from machine import host_fields  # noqa: E402
from step import append_record  # noqa: E402

from selfaug_jax.models import attention_kernels  # noqa: E402
from selfaug_jax.models.attention import make_attention_mask  # noqa: E402


def layer_inputs(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, dtype: str, seed: int = 0):
    """``(q, k, v, w, ForwardMask)``: one layer's causal self-attention inputs and an output cotangent ``w``."""
    kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (batch, seq, heads, head_dim)).astype(dtype)
    k = jax.random.normal(kk, (batch, seq, kv_heads, head_dim)).astype(dtype)
    v = jax.random.normal(kv, (batch, seq, kv_heads, head_dim)).astype(dtype)
    w = jax.random.normal(kw, (batch, seq, heads, head_dim)).astype(dtype)
    index = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    args = (index, index, jnp.ones((batch, seq), jnp.int32), None, None)
    mask = attention_kernels.ForwardMask.from_mask_args(make_attention_mask(*args), args, None, False)
    return q, k, v, w, mask


def arms(q_chunk: int | None) -> dict:
    def attend(q, k, v, mask):
        return attention_kernels.xla_chunked(q, k, v, mask, q_chunk)

    def loss(q, k, v, w, mask):
        return jnp.sum((jax.checkpoint(attend)(q, k, v, mask) * w).astype(jnp.float32))

    return {
        "forward": lambda q, k, v, w, mask: attend(q, k, v, mask),
        "forward_backward": jax.grad(loss, argnums=(0, 1, 2)),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    """Time both arms; return the records (also printed and appended to ``--out``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--q-chunk", type=int, default=512, help="the model's attention_chunk (0: dense)")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--tag", default="")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.heads % a.kv_heads:
        p.error(f"--heads {a.heads} must be a multiple of --kv-heads {a.kv_heads}")
    q_chunk = a.q_chunk or None
    args = layer_inputs(a.batch, a.seq, a.heads, a.kv_heads, a.head_dim, a.dtype)
    fns = {name: jax.jit(f).lower(*args).compile() for name, f in arms(q_chunk).items()}
    records = []
    for name, ts in interleaved_times(fns, args, a.reps).items():
        records.append(dict(kind="attention_block", arm=name, batch=a.batch, seq=a.seq, heads=a.heads,
                            kv_heads=a.kv_heads, head_dim=a.head_dim, dtype=a.dtype, q_chunk=q_chunk,
                            median_wall_ms=1e3 * statistics.median(t[1] for t in ts),
                            median_cpu_ms=1e3 * statistics.median(t[0] for t in ts), reps=a.reps, tag=a.tag,
                            **host_fields()))
        append_record(records[-1], a.out, BENCH / "results" / "attention_block_cpu.jsonl")
    return records


if __name__ == "__main__":
    main()
