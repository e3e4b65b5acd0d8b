"""A/B of the fused loss's precompute chunk: closed form vs autodiff (``closed_form``), across ``chunk_size``.

The inputs and timing loop of ``bench/loss_skip.py`` (``head_inputs``: SmolLM2-135M's head shape D=576, V=49152,
the tied ``[V, D]`` table passed as stored and frozen, as in the LoRA step; reference = policy + 1% noise; 75%
prompt labels). Every arm is compiled first, then the arms run interleaved ``--reps`` times in this one process
(``interleaved_times``); one JSON line per arm gives the median wall and process CPU time (all threads) of one
value+grad call, its loss and KL. XLA flags (e.g. ``--xla_cpu_experimental_ynn_fusion_type=-reduce``) apply to the whole process:
compare them in separate invocations.

Usage::

    python bench/loss_chunk.py                                   # 512/256/128, closed and autodiff, SelfAug
    python bench/loss_chunk.py --arms 512:autodiff,256:closed --kind ce
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_skip import head_inputs, interleaved_times  # noqa: E402  (the same inputs and timing as the skip A/B)

from selfaug_jax.loss import selfaug_loss_from_hidden  # noqa: E402


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
    args = head_inputs(a.batch, a.seq)

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
    for (chunk, closed), ts in interleaved_times(fns, args, a.reps).items():
        print(json.dumps(dict(kind=a.kind, chunk_size=chunk, closed_form=closed, batch=a.batch, seq=a.seq,
                              median_wall_s=statistics.median(t[1] for t in ts),
                              median_cpu_s=statistics.median(t[0] for t in ts),
                              loss=values[(chunk, closed)][0], kl=values[(chunk, closed)][1], reps=a.reps)))


if __name__ == "__main__":
    main()
