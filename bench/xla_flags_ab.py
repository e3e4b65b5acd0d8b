"""A/B of XLA:CPU options on one ``bench/step.py`` configuration, side by side in one invocation.

Every arm runs ``bench/step.py`` in a fresh process with ``SELFAUG_JAX_XLA_DEFAULTS=0`` (so the project's
defaults do not leak into the baseline) and ``XLA_FLAGS`` set to the arm's flags only; the arms run in the order
given, then again in reverse order with ``--rounds 2`` (so slow drift of a shared machine's load hits every arm
alike). Records go to ``bench/results/xla_flags_ab_<platform>.jsonl`` (tagged ``xla-ab:<arm>``) and a table of
wall and CPU seconds per step, compile time and step-0 loss relative to the baseline is printed at the end.

    python bench/xla_flags_ab.py -- --method selfaug --batch 4 --seq 256 --steps 3
    python bench/xla_flags_ab.py --arms baseline,onednn -- --method selfaug --num-layers 2 --seq 64

The flags were taken from jaxlib 0.10.2's own listing (``XLA_FLAGS=--help python -c 'import jax; jax.devices()'``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
STEP = BENCH / "step.py"

ARMS: dict[str, str] = {
    "baseline": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "xnn-fusion": "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
    "xnn-graph-greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "no-xnnpack": "--xla_cpu_use_xnnpack=false",
    "vector-512": "--xla_cpu_prefer_vector_width=512",
    "fast-compile": "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE",
    # Added in session 6 (jaxlib 0.10.2 lists them; not in the first A/B): the scheduler that orders independent
    # thunks so that more of them can run at once, and the runtime-speed optimisation preset.
    "concurrency-scheduler": "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED",
    "fast-runtime": "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME",
    # Added in session 16: the YNNPACK reduce fusion off (the profile's slowest non-matmul ops on the AMD EPYC are
    # YNN reduce fusions of the loss' softmax sums, e.g. f32[2,4,64,49152] -> f32[2,4,64] at ~0.3 G elements/s).
    "no-ynn-reduce": "--xla_cpu_experimental_ynn_fusion_type=-reduce",
}


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    own, step_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    p.add_argument("--rounds", type=int, default=1, help="2 = run the arms forwards, then backwards")
    p.add_argument("--out", default=None, help="JSONL (default bench/results/xla_flags_ab_cpu.jsonl)")
    args = p.parse_args(own)
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
    out = Path(args.out) if args.out else BENCH / "results" / "xla_flags_ab_cpu.jsonl"
    order = arms + (arms[::-1] if args.rounds >= 2 else [])
    recs: list[dict] = []
    for arm in order:
        env = {**os.environ, "SELFAUG_JAX_XLA_DEFAULTS": "0", "XLA_FLAGS": ARMS[arm]}
        cmd = [sys.executable, str(STEP), *step_args, "--json", "--tag", f"xla-ab:{arm}", "--out", str(out)]
        print(f"[xla_flags_ab] {arm}: XLA_FLAGS={ARMS[arm]!r}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(f"[xla_flags_ab] {arm} FAILED (exit {proc.returncode})", file=sys.stderr)
            recs.append({"tag": f"xla-ab:{arm}", "failed": True})
            continue
        recs.append(json.loads(lines[-1]))
    print(table(recs))
    return recs


def table(recs: list[dict]) -> str:
    """Per arm (all its runs): median wall / CPU s per step, compile s, step-0 loss; ratios vs the baseline."""
    by: dict[str, list[dict]] = {}
    for r in recs:
        by.setdefault(r["tag"].split(":", 1)[1], []).append(r)
    ok = {arm: [r for r in rs if not r.get("failed")] for arm, rs in by.items()}

    def med(arm: str, key: str) -> float | None:
        vals = [r[key] for r in ok.get(arm, []) if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    base_wall, base_cpu, base_loss = med("baseline", "median_step_s"), med("baseline", "median_step_cpu_s"), None
    if ok.get("baseline"):
        base_loss = ok["baseline"][0]["first_loss"]
    rows = ["| arm | XLA_FLAGS | runs | step s (wall) | vs baseline | step s (cpu) | vs baseline | compile s "
            "| step-0 loss - baseline | load avg |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, rs in by.items():
        if not ok[arm]:
            rows.append(f"| {arm} | `{ARMS.get(arm, '?')}` | {len(rs)} | failed | | | | | | |")
            continue
        wall, cpu = med(arm, "median_step_s"), med(arm, "median_step_cpu_s")
        rows.append(
            f"| {arm} | `{ARMS.get(arm, '?')}` | {len(ok[arm])} | {wall:.2f} "
            f"| {wall / base_wall if base_wall else float('nan'):.3f} | {cpu:.2f} "
            f"| {cpu / base_cpu if base_cpu else float('nan'):.3f} | {med(arm, 'compile_s'):.1f} "
            f"| {ok[arm][0]['first_loss'] - base_loss if base_loss is not None else float('nan'):+.2e} "
            f"| {' / '.join(str(x) for x in ok[arm][-1].get('load_avg') or [])} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
