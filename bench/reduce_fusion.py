"""XLA:CPU's vocabulary reductions: a plain sum against a sum with elementwise work fused into it.

Session 17 found the fused loss chunk's two vocabulary sums (``sum(exp(z - max))`` and the divergence
``sum(r * (log r - log p))``) running 4-13x slower per element than a plain ``sum(x)`` over a materialised array:
XLA:CPU fuses the elementwise producers into the reduction (a YNNPACK reduce fusion), and that fused reduction is
slow. ``loss_primitives._ce_divergence_and_grad`` now shares one ``exp`` between the normaliser and the
probabilities (two readers keep the exp in its own loop fusion) and sums the divergence with a matrix-vector
product (``reductions.sum_last_axis``). This script measures the forms side by side on one loss chunk of SmolLM2's
shape (policy and reference stacked, ``[2, B, t, V]``, ``V`` = 49,152).

Arms (one jitted function each, interleaved ``--reps`` rounds in this process; median wall and CPU ms per call):

* ``sum``: ``sum(x, -1)`` of a materialised ``[2, B, t, V]`` array (twice the elements of the others but ``exp_sum``);
* ``sum_plus1``: ``sum(x + 1, -1)``, the same with one fused elementwise op;
* ``exp_sum``: ``sum(exp(x), -1)`` with the exp fused (the chunk's former normaliser);
* ``kl_fused``: ``sum(r * ((sr - lzr) - (sp - lzp)), -1)`` over ``[B, t, V]`` (the chunk's former divergence);
* ``kl_matvec``: the same summand summed by ``sum_last_axis`` (the chunk's divergence now).

Compare XLA flags (``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-reduce``) in separate invocations. One JSON
line per arm goes to stdout and to ``--out`` (default ``bench/results/reduce_fusion_cpu.jsonl``; ``-``: none).

Usage::

    python bench/reduce_fusion.py --tag s17
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

from selfaug_jax.reductions import sum_last_axis  # noqa: E402


def chunk_inputs(batch: int, t: int, vocab: int, seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(shifted [2, B, t, V], r [B, t, V], logz [2, B, t, 1])``: the loss chunk's arrays after the max pass."""
    z = 3.0 * jax.random.normal(jax.random.key(seed), (2, batch, t, vocab), jnp.float32)

    def prep(z):
        shifted = z - jnp.max(z, -1, keepdims=True)
        e = jnp.exp(shifted)
        s = jnp.sum(e, -1, keepdims=True)
        return shifted, e[1] / s[1], jnp.log(s)

    return jax.block_until_ready(jax.jit(prep)(z))


def arms() -> dict:
    def summand(sh, r, lz):
        return r * ((sh[1] - lz[1]) - (sh[0] - lz[0]))

    return {
        "sum": lambda sh, r, lz: jnp.sum(sh, -1),
        "sum_plus1": lambda sh, r, lz: jnp.sum(sh + 1.0, -1),
        "exp_sum": lambda sh, r, lz: jnp.sum(jnp.exp(sh), -1),
        "kl_fused": lambda sh, r, lz: jnp.sum(summand(sh, r, lz), -1),
        "kl_matvec": lambda sh, r, lz: sum_last_axis(summand(sh, r, lz)),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    """Run every arm; return the records (also printed and appended to ``--out``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--chunk-tokens", type=int, default=64, help="tokens per row of the chunk (t; B x t = 256)")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--tag", default="")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    args = chunk_inputs(a.batch, a.chunk_tokens, a.vocab)
    fns = {name: jax.jit(f).lower(*args).compile() for name, f in arms().items()}
    fused = jax.block_until_ready(fns["kl_fused"](*args))
    matvec = jax.block_until_ready(fns["kl_matvec"](*args))
    rel = float(jnp.max(jnp.abs(matvec - fused)) / jnp.max(jnp.abs(fused)))
    records = []
    for name, ts in interleaved_times(fns, args, a.reps).items():
        records.append(dict(kind="reduce_fusion", arm=name, batch=a.batch, chunk_tokens=a.chunk_tokens,
                            vocab=a.vocab, median_wall_ms=1e3 * statistics.median(t[1] for t in ts),
                            median_cpu_ms=1e3 * statistics.median(t[0] for t in ts), reps=a.reps,
                            kl_matvec_vs_fused_max_rel_diff=rel, tag=a.tag, **host_fields()))
        append_record(records[-1], a.out, BENCH / "results" / "reduce_fusion_cpu.jsonl")
    return records


if __name__ == "__main__":
    main()
