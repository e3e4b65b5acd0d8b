"""A/B of the fused loss's precompute chunk: closed form vs autodiff (``closed_form``), across ``chunk_size``.

SmolLM2-135M's head shape (D=576, V=49152, tied ``[V, D]`` table passed as stored and frozen, as in the LoRA step),
random hidden states (reference = policy + 1% noise), labels as ``bench/step.py``'s batch (the first 75% of every
row prompt, the rest answer). Every arm is compiled first, then the arms run interleaved ``--reps`` times in this
one process; one JSON line per arm gives the median wall and process CPU time (all threads) of one value+grad call,
its loss and KL. XLA flags (e.g. ``--xla_cpu_experimental_ynn_fusion_type=-reduce``) apply to the whole process:
compare them in separate invocations.

Usage::

    python bench/loss_chunk.py                                   # 512/256/128, closed and autodiff, SelfAug
    python bench/loss_chunk.py --arms 512:autodiff,256:closed --kind ce
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from selfaug_jax.loss import selfaug_loss_from_hidden

D, V = 576, 49152


def parse_arms(text: str) -> list[tuple[int, bool]]:
    """``"512:autodiff,256:closed"`` -> ``[(512, False), (256, True)]``."""
    arms = []
    for item in text.split(","):
        size, _, mode = item.partition(":")
        if mode not in ("closed", "autodiff"):
            raise ValueError(f"--arms: {item!r}: want CHUNK:closed or CHUNK:autodiff")
        arms.append((int(size), mode == "closed"))
    return arms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--arms", default="512:autodiff,512:closed,256:autodiff,256:closed,128:closed")
    p.add_argument("--kind", choices=("selfaug", "ce"), default="selfaug", help="ce: no alignment term (lora)")
    a = p.parse_args()
    arms = parse_arms(a.arms)
    rng = np.random.default_rng(0)
    emb = jnp.asarray(rng.normal(scale=0.02, size=(V, D)), jnp.float32)
    h = jnp.asarray(rng.normal(size=(a.batch, a.seq, D)), jnp.float32)
    rh = h + 0.01 * jnp.asarray(rng.normal(size=h.shape), jnp.float32)
    labels = rng.integers(0, V, (a.batch, a.seq)).astype(np.int32)
    labels[:, : int(0.75 * a.seq)] = -100
    args = (h, rh, emb, jnp.asarray(labels))

    def make(chunk: int, closed: bool):
        def loss(h, rh, emb, labels):
            return selfaug_loss_from_hidden(h, rh if a.kind == "selfaug" else None, jax.lax.stop_gradient(emb),
                                            labels, head_layout="vd", chunk_size=chunk, closed_form=closed)
        return jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(*args).compile()

    fns = {arm: make(*arm) for arm in arms}
    values = {}
    for arm, f in fns.items():
        (total, aux), _ = jax.block_until_ready(f(*args))
        values[arm] = (float(total), float(aux["kl"]))
    times: dict[tuple[int, bool], list[tuple[float, float]]] = {arm: [] for arm in arms}
    for _ in range(a.reps):
        for arm, f in fns.items():
            c0, w0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(f(*args))
            times[arm].append((time.perf_counter() - w0, time.process_time() - c0))
    for (chunk, closed), ts in times.items():
        print(json.dumps(dict(kind=a.kind, chunk_size=chunk, closed_form=closed, batch=a.batch, seq=a.seq,
                              median_wall_s=statistics.median(t[0] for t in ts),
                              median_cpu_s=statistics.median(t[1] for t in ts),
                              loss=values[(chunk, closed)][0], kl=values[(chunk, closed)][1], reps=a.reps)))


if __name__ == "__main__":
    main()
