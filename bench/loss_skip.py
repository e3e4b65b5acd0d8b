"""A/B of the fused loss' ``skip_unweighted`` (selfaug_jax/fused_loss.py): value+grad CPU time of the loss alone.

SmolLM2-135M's head shape (D=576, V=49152, tied ``[V, D]`` table passed as stored and frozen, as in the LoRA step),
random hidden states, labels as ``bench/step.py``'s batch (the first 75% of every row prompt, the rest answer).
Every variant is compiled first, then they run interleaved ``--reps`` times in this one process; the median
process CPU time (all threads) and wall time per call are printed, one JSON line per variant.

Usage::

    python bench/loss_skip.py                          # 4 x 256: CE only and SelfAug, skip on/off
    python bench/loss_skip.py --batch 1 --seq 2048 --kinds ce
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from selfaug_jax.loss import selfaug_loss_from_hidden

D, V = 576, 49152


def head_inputs(batch: int, seq: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(hidden, ref_hidden, head_vd, labels)``: random policy hidden states, the reference = policy + 1% noise,
    SmolLM2's head shape ``[V, D]``, labels with the first 75% of every row prompt (``-100``), as ``bench/step.py``."""
    rng = np.random.default_rng(0)
    emb = jnp.asarray(rng.normal(scale=0.02, size=(V, D)), jnp.float32)
    h = jnp.asarray(rng.normal(size=(batch, seq, D)), jnp.float32)
    rh = h + 0.01 * jnp.asarray(rng.normal(size=h.shape), jnp.float32)
    labels = rng.integers(0, V, (batch, seq)).astype(np.int32)
    labels[:, : int(0.75 * seq)] = -100
    return h, rh, emb, jnp.asarray(labels)


def interleaved_times(fns: dict, args: tuple, reps: int) -> dict:
    """Call every compiled function once per round, ``reps`` rounds; ``{key: [(cpu_s, wall_s), ...]}`` per call
    (process CPU time of all threads, wall time)."""
    times: dict = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            c0, w0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(f(*args))
            times[k].append((time.process_time() - c0, time.perf_counter() - w0))
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--kinds", default="ce,selfaug", help="ce (no alignment term, lora/sft) and/or selfaug")
    a = p.parse_args()
    args = head_inputs(a.batch, a.seq)

    def make(kind: str, skip: bool):
        def loss(h, rh, emb, labels):
            return selfaug_loss_from_hidden(h, rh if kind == "selfaug" else None, jax.lax.stop_gradient(emb), labels,
                                            head_layout="vd", chunk_size=a.chunk_size, skip_unweighted=skip)[0]
        return jax.jit(jax.value_and_grad(loss)).lower(*args).compile()

    fns = {f"{kind}_skip_{'on' if skip else 'off'}": make(kind, skip)
           for kind in a.kinds.split(",") for skip in (False, True)}
    values = {k: float(jax.block_until_ready(f(*args))[0]) for k, f in fns.items()}
    times = interleaved_times(fns, args, a.reps)
    for k, ts in times.items():
        cpu, wall = sorted(t[0] for t in ts), sorted(t[1] for t in ts)
        print(json.dumps(dict(variant=k, batch=a.batch, seq=a.seq, chunk_size=a.chunk_size,
                              median_cpu_s=round(cpu[len(cpu) // 2], 3), median_wall_s=round(wall[len(wall) // 2], 3),
                              value=values[k], load_avg=[round(x, 2) for x in os.getloadavg()])))


if __name__ == "__main__":
    main()
