"""Benchmark: cost of the MAGPIE and SDFT training-data transforms at a preset's sizes, and where it goes.

Loads the preset's model, tokenizer and training examples exactly as the experiment runner does
(``selfaug_jax/experiment/train_data.py: transformed_sources``), then runs each transform with the disk cache off
(``--cache`` to use a temporary cache folder and run every transform twice: the second run must generate nothing).
Every :func:`selfaug_jax.models.generation.generate` call is recorded: rows, real prompt lengths, padded prompt
length, ``max_new_tokens``, decode steps (the longest row), rows that ran the whole budget, rows stopped inside the
loop, XLA compilations and CPU / wall seconds. Prints one JSON line per transform and appends it to ``--out``.

Usage (the machine is shared: nice it and read CPU seconds)::

    nice -n 19 python bench/transform_cost.py --preset compare-cpu
    nice -n 19 python bench/transform_cost.py --preset compare-cpu --transforms sdft --set sdft.max_new_tokens=64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="compare-cpu")
    ap.add_argument("--transforms", default="magpie,sdft")
    ap.add_argument("--set", action="append", default=[], help="config override, e.g. sdft.max_new_tokens=64")
    ap.add_argument("--cache", action="store_true", help="temporary cache folder; run each transform twice")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "transform_cost_cpu.jsonl"))
    args = ap.parse_args()

    from transformers import AutoTokenizer

    import selfaug_jax.models.generation as generation
    from eval_profile import CompileCounter  # bench/eval_profile.py
    from selfaug_jax.data import tokenize_examples
    from selfaug_jax.data.transforms import TransformContext, apply_transform
    from selfaug_jax.experiment.config import build_config
    from selfaug_jax.experiment.preflight import preflight
    from selfaug_jax.experiment.runner import load_model
    from selfaug_jax.experiment.train_data import load_train_examples, model_identity, prompt_config_of

    counter = CompileCounter()
    cfg = build_config(args.preset, args.set)
    model_dir = preflight(cfg).model_dir
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = load_model(cfg, model_dir)
    examples = load_train_examples(cfg)
    n_task = len(tokenize_examples(examples, tok, prompt_config_of(cfg), log=False)[0])

    calls: list[dict] = []
    real_generate = generation.generate

    def recording_generate(model_, prompt_ids, config=generation.GenerationConfig(), **kw):
        lens = [len(p) for p in prompt_ids]
        c0, w0, (n0, s0) = cpu_s(), time.perf_counter(), counter.snapshot()
        r = real_generate(model_, prompt_ids, config, **kw)
        n1, s1 = counter.snapshot()
        b = config.prompt_bucket
        calls.append({"rows": len(lens), "prompt_min": min(lens), "prompt_max": max(lens),
                      "prompt_mean": round(sum(lens) / len(lens), 1), "padded": -(-max(lens) // b) * b,
                      "max_new_tokens": config.max_new_tokens, "decode_steps": int(r.lengths.max()),
                      "rows_full_budget": int(((r.lengths == config.max_new_tokens) & ~r.stopped_on_eos).sum()),
                      "rows_stopped_in_loop": int(r.stopped_on_eos.sum()),
                      "compiles": n1 - n0, "compile_s": round(s1 - s0, 1),
                      "cpu_s": round(cpu_s() - c0, 1), "wall_s": round(time.perf_counter() - w0, 1)})
        return r

    generation.generate = recording_generate
    cache_dir = Path(tempfile.mkdtemp(prefix="transform_cost-")) if args.cache else None
    ctx = TransformContext(model=model, tokenizer=tok, model_id=model_identity(cfg, model_dir),
                           prompt_config=prompt_config_of(cfg), n_task=n_task,
                           options={"magpie": cfg.magpie, "sdft": cfg.sdft}, cache_dir=cache_dir)
    for name in args.transforms.split(","):
        for run in range(2 if args.cache else 1):
            calls.clear()
            c0, w0, (n0, s0) = cpu_s(), time.perf_counter(), counter.snapshot()
            result = apply_transform(name, examples, ctx)
            n1, s1 = counter.snapshot()
            report = {k: v for k, v in result.report.items() if not k.startswith("sample")}
            rec = {"bench": "transform_cost", "tag": args.tag, "preset": args.preset, "overrides": args.set,
                   "transform": name, "run": run, "examples": len(examples), "n_task": n_task,
                   "options": str(ctx.options[name]), "cpu_s": round(cpu_s() - c0, 1),
                   "wall_s": round(time.perf_counter() - w0, 1), "compiles": n1 - n0, "compile_s": round(s1 - s0, 1),
                   "generate_calls": len(calls), "decode_steps_total": sum(c["decode_steps"] for c in calls),
                   "calls": calls, "report": report, "load1": os.getloadavg()[0],
                   "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            print(json.dumps(rec), flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
