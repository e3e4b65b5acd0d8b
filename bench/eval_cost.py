"""Benchmark: wall time and peak RSS of one model's evaluation with the default preset's eval sizes (issue 13).

Runs the evaluation suite (``selfaug_jax.eval.suite``) on the default model (SmolLM2-135M-Instruct unless
``--model``) exactly as the main job does for the base model: prepare the prompts, generate the original model's
reference answers (general + shift RAG prompts, also the base's general answers), then ``evaluate_model`` (RAG,
IFEval, general answers, shift, knowledge MC). Then it evaluates the same model once more as if it were a
fine-tuned model (``original_model`` a separate copy), which is what each method costs after training: the general
answers are generated again and the shift runs its forward passes (the original's hidden states are cached).

Sizes come from a preset (``--preset default``), optionally scaled down with ``--fraction`` (e.g. 0.25 evaluates a
quarter of every set; times then scale about linearly). Prints one JSON line and appends it to
``bench/results/eval_cost_cpu.jsonl`` (or ``--out``): per-part seconds of both evaluations, answers that hit the
budget, mean new tokens, the process CPU seconds (user + sys) of each phase and of each part, the XLA compilations
(count and seconds, ``jax.monitoring`` backend-compile events) of each phase, and the process's peak RSS. A second
"fine-tuned" evaluation shows what each further method costs (it must compile nothing). Wall times
on a shared machine are inflated by the other jobs; the CPU seconds much less so.

Usage::

    python bench/eval_cost.py --fraction 0.25
    python bench/eval_cost.py                       # the full default sizes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--model", default=None, help="model name or directory (default: the preset's)")
    ap.add_argument("--fraction", type=float, default=1.0, help="evaluate this fraction of every set")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model compute dtype")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "eval_cost_cpu.jsonl"))
    args = ap.parse_args()

    from selfaug_jax.eval.suite import evaluate_model, prepare_eval_data, reference_responses
    from selfaug_jax.experiment.config import build_config
    import jax.numpy as jnp

    from selfaug_jax.models import load_pretrained, load_tokenizer
    from eval_profile import CompileCounter  # bench/eval_profile.py (same directory)

    counter = CompileCounter()
    compiles = {}
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]

    cfg = build_config(args.preset)
    ev = cfg.eval
    full = {"n_rag": ev.n_rag, "n_ifeval": ev.n_ifeval, "n_shift_general": ev.n_shift_general,
            "n_shift_rag": ev.n_shift_rag, "n_knowledge": ev.n_knowledge}
    scaled = {k: (None if v is None and args.fraction == 1.0 else
                  max(1, round((197 if v is None else v) * args.fraction))) for k, v in full.items()}
    # cache=False: this measures the computation (the runner's base_evaluation would reuse a cached one)
    ev = dataclasses.replace(ev, **scaled, cache=False, **({"batch_size": args.batch_size} if args.batch_size else {}))
    name = args.model or cfg.model.name
    tokenizer = load_tokenizer(name)
    t_start = t = time.perf_counter()
    data = prepare_eval_data(tokenizer, ev)
    t_prepare = time.perf_counter() - t
    base = load_pretrained(name, dtype=dtype)
    cpu = {}

    def cpu_s() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def say(msg: str) -> None:
        print(f"[eval_cost] {msg} (wall {time.perf_counter() - t_start:.0f}s, cpu {cpu_s():.0f}s)", flush=True)

    say("reference answers")
    t, c, k = time.perf_counter(), cpu_s(), counter.snapshot()
    refs = reference_responses(base, tokenizer, data, ev)
    t_refs, cpu["reference_answers"] = time.perf_counter() - t, cpu_s() - c
    compiles["reference_answers"] = _delta(counter, k)
    say("base evaluation")
    c, k = cpu_s(), counter.snapshot()
    base_metrics, base_samples = evaluate_model(base, tokenizer, data, ev, original_model=base,
                                                reference_responses=refs)
    cpu["base_eval"] = cpu_s() - c
    compiles["base_eval"] = _delta(counter, k)
    copy = load_pretrained(name, dtype=dtype)  # a "fine-tuned" model: same weights, another object (no shortcuts)
    say("fine-tuned evaluation")
    c, k = cpu_s(), counter.snapshot()
    _, tuned_samples = evaluate_model(copy, tokenizer, data, ev, original_model=base, reference_responses=refs)
    cpu["finetuned_eval"] = cpu_s() - c
    compiles["finetuned_eval"] = _delta(counter, k)
    say("second fine-tuned evaluation")
    copy2 = load_pretrained(name, dtype=dtype)  # what every further method costs: nothing left to compile
    c, k = cpu_s(), counter.snapshot()
    _, tuned2_samples = evaluate_model(copy2, tokenizer, data, ev, original_model=base, reference_responses=refs)
    cpu["finetuned_eval_2"] = cpu_s() - c
    compiles["finetuned_eval_2"] = _delta(counter, k)
    record = {
        "bench": "eval_cost", "platform": platform.machine(), "preset": args.preset, "model": str(name),
        "fraction": args.fraction, "batch_size": ev.batch_size,
        "sizes": {"rag": len(data.rag_examples), "ifeval": len(data.ifeval_records),
                  "general": len(data.general_prompts), "shift_rag": len(data.shift_rag_prompts),
                  "mc": {k: len(v) for k, v in data.mc_datasets.items()}},
        "budgets": {"rag": ev.max_new_tokens_rag, "ifeval": ev.max_new_tokens_ifeval,
                    "general": ev.max_new_tokens_shift},
        "prepare_s": round(t_prepare, 1),
        "reference_answers_s": round(t_refs, 1),
        "base_eval_s": {k: round(v, 1) for k, v in base_samples["timing_s"].items()},
        "finetuned_eval_s": {k: round(v, 1) for k, v in tuned_samples["timing_s"].items()},
        "base_eval_cpu_s": {k: round(v, 1) for k, v in base_samples["cpu_s"].items()},
        "finetuned_eval_cpu_s": {k: round(v, 1) for k, v in tuned_samples["cpu_s"].items()},
        "finetuned_eval_2_cpu_s": {k: round(v, 1) for k, v in tuned2_samples["cpu_s"].items()},
        "compiles": compiles,
        "dtype": args.dtype, "tag": args.tag, "base_metrics": base_metrics,
        "prompt_tokens": data.info,
        "generation": {"reference": refs["generation"], "base": base_samples["generation"],
                       "finetuned": tuned_samples["generation"]},
        "process_cpu_s": {k: round(v, 1) for k, v in cpu.items()},  # user + sys, all threads; less contention-prone
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "note": "shared 2-core machine: timings inflated by other jobs",
        "load_avg": [round(x, 2) for x in __import__("os").getloadavg()],
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
        "cpu_model": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                           if ln.startswith("model name")), platform.processor()),
    }
    line = json.dumps(record)
    print(line)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(line + "\n")


def _delta(counter, before: tuple[int, float]) -> dict[str, float]:
    n, s = counter.snapshot()
    return {"n": n - before[0], "s": round(s - before[1], 1)}


if __name__ == "__main__":
    main()
