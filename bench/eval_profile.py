"""Benchmark: the unit costs of evaluation on this machine, by CPU seconds (issue 13, session 4).

Measures, for the default model, in a fresh process:

* **prefill** CPU seconds per prompt token: ``generate`` with ``max_new_tokens=1`` on ``[batch, T]`` random prompts
  (no padding), for each ``--lengths`` T;
* **decode** CPU seconds per step of a batch: ``generate`` with no stop id (every row runs the budget) at
  ``--decode-steps`` minus the 1-token run, divided by the extra steps;
* **score** CPU seconds per token of the full-sequence forward the shift and multiple-choice parts use
  (``hidden_states`` + the LM head over every position for MC, hidden states only for the shift);
* the **compile** seconds and count of each (``jax.monitoring``'s backend-compile events), separately from the runs.

Each measured call runs once to compile, then ``--repeats`` times; the median CPU seconds (user + sys of the whole
process, all threads: much less sensitive than wall time to other jobs on a shared host) and wall seconds are kept.
Prints one JSON line per dtype and appends it to ``bench/results/eval_profile_<platform>.jsonl`` (or ``--out``; ``-``:
print only), with ``bench/machine.py``'s host fields (CPU model and flags, XLA flags, load, date).

Usage::

    python bench/eval_profile.py --dtype float32 bfloat16 --batch 16 --lengths 256 1024 --decode-steps 33
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class CompileCounter:
    """Counts XLA backend compilations and their seconds (``/jax/core/compile/backend_compile_duration``)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        from jax import monitoring

        monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_: object) -> None:
        if event == self.EVENT:
            self.count += 1
            self.seconds += duration

    def snapshot(self) -> tuple[int, float]:
        return self.count, self.seconds


def timed(fn, repeats: int, counter: CompileCounter) -> dict[str, float]:
    """First call (compile + run), then ``repeats`` timed calls: medians of CPU and wall seconds."""
    c0, w0, (n0, s0) = cpu_s(), time.perf_counter(), counter.snapshot()
    fn()
    first_cpu, first_wall = cpu_s() - c0, time.perf_counter() - w0
    n1, s1 = counter.snapshot()
    cpus, walls = [], []
    for _ in range(repeats):
        c, w = cpu_s(), time.perf_counter()
        fn()
        cpus.append(cpu_s() - c)
        walls.append(time.perf_counter() - w)
    n2, _ = counter.snapshot()
    return {"first_cpu_s": round(first_cpu, 3), "first_wall_s": round(first_wall, 3),
            "compiles": n1 - n0, "compile_s": round(s1 - s0, 3), "recompiles_in_repeats": n2 - n1,
            "cpu_s": round(statistics.median(cpus), 4), "wall_s": round(statistics.median(walls), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, nargs="+", default=[16])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--decode-steps", type=int, default=33)
    ap.add_argument("--decode-length", type=int, default=256, help="prompt length of the decode measurement")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-score", action="store_true")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=None,
                    help="JSONL to append to (default bench/results/eval_profile_<platform>.jsonl; '-': print only)")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from machine import host_fields  # bench/machine.py, bench/step.py (same directory)
    from step import append_record
    from selfaug_jax.models import load_pretrained
    from selfaug_jax.models.generation import GenerationConfig, generate

    counter = CompileCounter()
    for dtype in args.dtype:
        dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
        model = load_pretrained(args.model, dtype=dt)
        vocab = model.config.vocab_size
        rng = np.random.default_rng(0)
        rec: dict = {"bench": "eval_profile", "model": args.model, "dtype": dtype, "prefill": {}, "decode": {},
                     "score": {}, "hidden": {}}
        for b in args.batch:
            for t in args.lengths:
                ids = rng.integers(100, vocab, size=(b, t)).astype(np.int32)
                cfg = GenerationConfig(max_new_tokens=1, eos_token_ids=(), pad_token_id=0, prompt_bucket=t)
                r = timed(lambda: generate(model, ids, cfg), args.repeats, counter)
                r["cpu_s_per_token"] = r["cpu_s"] / (b * t)
                rec["prefill"][f"{b}x{t}"] = r
                print(json.dumps({dtype: {"prefill": {f"{b}x{t}": r}}}), flush=True)
            t = args.decode_length
            ids = rng.integers(100, vocab, size=(b, t)).astype(np.int32)
            n = args.decode_steps
            cfg1 = GenerationConfig(max_new_tokens=1, eos_token_ids=(), pad_token_id=0, prompt_bucket=t)
            cfgn = GenerationConfig(max_new_tokens=n, eos_token_ids=(), pad_token_id=0, prompt_bucket=t)
            r1 = timed(lambda: generate(model, ids, cfg1), args.repeats, counter)
            rn = timed(lambda: generate(model, ids, cfgn), args.repeats, counter)
            rec["decode"][f"{b}x{t}+{n}"] = {"one_token": r1, "n_tokens": rn,
                                             "cpu_s_per_step": (rn["cpu_s"] - r1["cpu_s"]) / (n - 1),
                                             "wall_s_per_step": (rn["wall_s"] - r1["wall_s"]) / (n - 1)}
            print(json.dumps({dtype: {"decode": rec["decode"][f"{b}x{t}+{n}"]}}), flush=True)
            if args.skip_score:
                continue
            graphdef, state = nnx.split(model)
            logits_fn = jax.jit(lambda st, i, m: nnx.merge(graphdef, st)(i, attention_mask=m))
            hidden_fn = jax.jit(lambda st, i, m: nnx.merge(graphdef, st).hidden_states(i, attention_mask=m))
            for t in args.lengths:
                ids = jnp.asarray(rng.integers(100, vocab, size=(b, t)).astype(np.int32))
                mask = jnp.ones((b, t), jnp.int32)
                r = timed(lambda: jax.block_until_ready(hidden_fn(state, ids, mask)), args.repeats, counter)
                r["cpu_s_per_token"] = r["cpu_s"] / (b * t)
                rec["hidden"][f"{b}x{t}"] = r
                if t <= 512:  # full float32 logits [b, t, V]: what the MC scorer's logits_fn returns
                    r = timed(lambda: jax.block_until_ready(logits_fn(state, ids, mask)), args.repeats, counter)
                    r["cpu_s_per_token"] = r["cpu_s"] / (b * t)
                    rec["score"][f"{b}x{t}"] = r
                print(json.dumps({dtype: {"hidden": rec["hidden"], "score": rec["score"]}}), flush=True)
        rec.update(platform=platform.machine(), jax_version=jax.__version__, tag=args.tag, **host_fields())
        append_record(rec, args.out, BENCH / "results" / f"eval_profile_{platform.machine()}.jsonl")
        del model


if __name__ == "__main__":
    main()
