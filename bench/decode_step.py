"""CPU cost of one KV-cache decode step, without the prefill (session 5, issue 13).

``python bench/decode_step.py --layers L --batch B --prompt T [--steps N] [--repeats R] [--out FILE.jsonl]``

Builds the default model (SmolLM2-135M, fp32) truncated to ``L`` layers, fills a ``[L, B, T + N + 1, kv, hd]`` cache
with random keys / values (the values do not change the cost), and runs the same greedy loop as
``selfaug_jax.models.generation`` (a ``jax.lax.while_loop`` of ``model.decode`` on one token, argmax, token buffer)
for 1 and for ``1 + N`` steps, each jitted with the cache donated and compiled ahead of time. Per-step cost =
``(cpu(1 + N steps) - cpu(1 step)) / N`` in process CPU seconds (user + sys, all threads), the minimum over
``R`` repeats; the wall-clock figure is reported beside it. Unlike ``bench/decode_cache_scaling.py`` no prefill is
run, so the full 30-layer model at long prompts and large batches costs seconds, not minutes.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tag", default="")
    p.add_argument("--out", default="-")
    args = p.parse_args(argv)

    from selfaug_jax.models import load_pretrained

    model = load_pretrained("smollm2-135m-instruct", num_layers=args.layers)
    graphdef, state = nnx.split(model)
    b, t, n = args.batch, args.prompt, args.steps
    s = t + n + 1
    k_shape = model.init_cache(b, s)[0].shape
    rng = np.random.default_rng(0)
    kv_valid_bs = jnp.ones((b, s), jnp.int32)

    def make(steps: int):
        def loop(state, cache, first_b):
            m = nnx.merge(graphdef, state)

            def body(carry):
                i, tokens_bn, cache = carry
                prev_b1 = jax.lax.dynamic_slice_in_dim(tokens_bn, i - 1, 1, axis=1)
                pos_b1 = jnp.broadcast_to(t + i - 1, (b, 1)).astype(jnp.int32)
                logits_b1v, cache = m.decode(prev_b1, pos_b1, kv_valid_bs, cache, t + i - 1)
                tok_b = jnp.argmax(logits_b1v[:, 0], -1).astype(jnp.int32)
                tokens_bn = jax.lax.dynamic_update_slice_in_dim(tokens_bn, tok_b[:, None], i, axis=1)
                return i + 1, tokens_bn, cache

            tokens_bn = jnp.zeros((b, steps + 1), jnp.int32).at[:, 0].set(first_b)
            carry = (jnp.int32(1), tokens_bn, cache)
            _, tokens_bn, cache = jax.lax.while_loop(lambda c: c[0] <= steps, body, carry)
            return tokens_bn, cache

        return jax.jit(loop, donate_argnums=(1,))

    def fresh_cache():
        return tuple(jnp.asarray(rng.standard_normal(k_shape, np.float32)) for _ in range(2))

    first_b = jnp.asarray(rng.integers(100, 40000, size=(b,)), jnp.int32)
    timings = {}
    for steps in (1, 1 + n):
        cache = fresh_cache()
        compiled = make(steps).lower(state, cache, first_b).compile()
        best_cpu, best_wall = float("inf"), float("inf")
        for _ in range(args.repeats):
            cache = fresh_cache()
            jax.block_until_ready(cache)
            c, w = _cpu(), time.perf_counter()
            toks, cache = compiled(state, cache, first_b)
            jax.block_until_ready((toks, cache))
            best_cpu, best_wall = min(best_cpu, _cpu() - c), min(best_wall, time.perf_counter() - w)
        timings[steps] = (best_cpu, best_wall)
    rec = {
        "bench": "decode_step", "tag": args.tag, "layers": args.layers, "batch": b, "prompt": t, "cache_len": s,
        "steps": n, "cpu_s_per_step": round((timings[1 + n][0] - timings[1][0]) / n, 5),
        "wall_s_per_step": round((timings[1 + n][1] - timings[1][1]) / n, 5),
        "load_avg": [round(x, 2) for x in __import__("os").getloadavg()],
        "jax_version": jax.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    line = json.dumps(rec)
    print(line, flush=True)
    if args.out != "-":
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return rec


if __name__ == "__main__":
    main(sys.argv[1:])
