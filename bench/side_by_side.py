"""The two-sided modes of ``bench/step.py``: ``--vs-torch`` and ``--compare-dtypes``, in interleaved rounds.

Each side runs in its own fresh subprocess (``bench/step.py --json ...``), so its peak RSS and compile time are its
own. With ``--rounds N`` the two sides run ``N`` times each, interleaved and in alternating order (A B, B A, A B,
...), so a drift in the machine's speed over the run (a shared VM's neighbours, thermal state) falls on both sides
alike. Every round gives its own ratio; the record's ratios (``tokens_per_s_ratio``, ``step_time_ratio``) are the
**medians over rounds**, ``*_range`` their min and max, and ``rounds`` lists each round's figures (for
``--vs-torch`` also ``round_compile_s``, our step's compile in that round's fresh process). The full side
records kept under ``jax`` / ``torch`` (or ``float32`` / ``bfloat16``) are those of the round whose tokens/s ratio is
nearest the median, so a table row built from them is one real measurement. On the 2-core VM one side's step time
varied by +-10% between rounds in a noisy hour (bench/README.md, session 14): a single round's ratio carries that
noise, and the range shows it.

Nothing here imports JAX or torch: both live in the subprocesses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import machine
import report

Log = Callable[[str], None]
Append = Callable[[dict[str, Any], "str | None", Path], None]


def child_argv(args: argparse.Namespace, **overrides: Any) -> list[str]:
    """The command line of one side of a comparison: this invocation's run options plus ``overrides``."""
    opts = {"method": args.method, "batch": args.batch, "seq": args.seq, "steps": args.steps, "model": args.model,
            "num_layers": args.num_layers, "dtype": args.dtype, "remat": args.remat,
            "attention_chunk": args.attention_chunk, "attention_impl": args.attention_impl,
            "lora_rank": args.lora_rank, "chunk_size": args.chunk_size,
            "seed": args.seed, "peak_n": args.peak_n, "torch_attn": args.torch_attn, "tag": args.tag,
            "impl": "jax", "out": "-"}
    opts.update(overrides)
    argv = [sys.executable, str(Path(__file__).resolve().parent / "step.py"), "--json"]
    for key, value in opts.items():
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    if args.remeasure_peak and opts["impl"] == "jax":
        argv.append("--remeasure-peak")
    return argv


def run_child(argv: list[str], what: str, log: Log) -> dict[str, Any]:
    """Run one side in a fresh process (its progress goes to our stderr); return its JSON record."""
    log(f"{what}: {' '.join(argv[1:])}")
    proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True, env=os.environ.copy(), check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{what} failed (exit {proc.returncode}); its stdout:\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1])


def interleaved_rounds(sides: list[tuple[str, list[str]]], rounds: int, log: Log) -> list[dict[str, dict]]:
    """Run every side ``rounds`` times, alternating the order each round; one ``{name: record}`` per round."""
    if rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {rounds}")
    out = []
    for r in range(rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        recs = {name: run_child(argv, f"{name} side (round {r + 1}/{rounds})", log) for name, argv in order}
        out.append(recs)
    return out


def median_of_rounds(per_round: list[dict[str, Any]], keys: tuple[str, ...], lead: str) -> dict[str, Any]:
    """The record of the round nearest the median of ``lead``, with each of ``keys`` replaced by its median over
    rounds, ``<key>_range`` = [min, max], ``n_rounds`` and ``rounds`` (each round's ``keys``)."""
    med = statistics.median(r[lead] for r in per_round)
    out = dict(min(per_round, key=lambda r: abs(r[lead] - med)))
    for key in keys:
        values = [r[key] for r in per_round if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
        out[f"{key}_range"] = [min(values), max(values)] if values else None
    out["n_rounds"] = len(per_round)
    out["rounds"] = [{k: r.get(k) for k in (*keys, "round_step_s", "round_compile_s")} for r in per_round]
    return out


def vs_torch(args: argparse.Namespace, model_dir: str, log: Log, append: Append, results: Path) -> dict[str, Any]:
    """Our step and the PyTorch HF + PEFT released step, same weights and batches, ``args.rounds`` interleaved
    rounds of fresh processes."""
    sides = [("jax", child_argv(args, model=model_dir, impl="jax")),
             ("torch", child_argv(args, model=model_dir, impl="torch"))]
    per_round = []
    for recs in interleaved_rounds(sides, args.rounds, log):
        ours, theirs = recs["jax"], recs["torch"]
        theirs["mfu"] = ours["model_flops_per_step"] / theirs["median_step_s"] / ours["peak_flops"]
        per_round.append({
            "mode": "vs-torch", "method": args.method, "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
            "num_layers": ours["num_layers"], "model": model_dir, "steps": args.steps,
            "tokens_per_s_ratio": report.ratio(ours["tokens_per_s"], theirs["tokens_per_s"]),
            "step_time_ratio": report.ratio(ours["median_step_s"], theirs["median_step_s"]),
            "peak_rss_ratio": report.ratio(ours["peak_rss_mb"], theirs["peak_rss_mb"]),
            "steps_peak_rss_ratio": report.ratio(ours["steps_peak_rss_mb"], theirs["steps_peak_rss_mb"]),
            "first_loss_abs_diff": abs(ours["first_loss"] - theirs["first_loss"]),
            "round_step_s": {"jax": ours["median_step_s"], "torch": theirs["median_step_s"]},
            "round_compile_s": ours.get("compile_s"),  # our step's compile in this round's fresh process
            "jax": ours, "torch": theirs,
        })
    rec = median_of_rounds(per_round, ("tokens_per_s_ratio", "step_time_ratio", "steps_peak_rss_ratio"),
                           "tokens_per_s_ratio")
    rec.update(tag=args.tag, **machine.host_fields())
    print(report.comparison_table([rec]), file=sys.stderr)
    append(rec, args.out, results / f"vs_torch_{rec['jax']['platform']}.jsonl")
    return rec


def loss_agreement(fp32_losses: list[float], bf16_losses: list[float], rtol: float) -> dict[str, Any]:
    """Per-step relative difference of the bf16 losses from the fp32 ones; agreement = all within ``rtol``."""
    if len(fp32_losses) != len(bf16_losses):
        raise ValueError(f"loss lists differ in length: {len(fp32_losses)} float32 vs {len(bf16_losses)} bfloat16")
    rel = [abs(b - f) / max(abs(f), 1e-12) for f, b in zip(fp32_losses, bf16_losses)]
    return {"loss_max_rel_diff": max(rel), "loss_rel_diffs": rel, "loss_rtol": rtol, "losses_agree": max(rel) <= rtol}


def compare_dtypes(args: argparse.Namespace, log: Log, append: Append, results: Path) -> dict[str, Any]:
    """The same step in float32 and bfloat16 (fresh processes, ``args.rounds`` interleaved rounds): tokens/s ratio
    and the losses' agreement (the worst round's, so a round whose losses disagree is never hidden)."""
    sides = [("float32", child_argv(args, dtype="float32")), ("bfloat16", child_argv(args, dtype="bfloat16"))]
    per_round = []
    for recs in interleaved_rounds(sides, args.rounds, log):
        fp32, bf16 = recs["float32"], recs["bfloat16"]
        per_round.append({
            "mode": "compare-dtypes", "method": args.method, "batch": args.batch, "seq": args.seq,
            "num_layers": fp32["num_layers"], "model": fp32["model"], "steps": args.steps,
            "tokens_per_s_ratio": report.ratio(bf16["tokens_per_s"], fp32["tokens_per_s"]),
            "step_time_ratio": report.ratio(bf16["median_step_s"], fp32["median_step_s"]),
            **loss_agreement(fp32["losses"], bf16["losses"], args.loss_rtol),
            "round_step_s": {"float32": fp32["median_step_s"], "bfloat16": bf16["median_step_s"]},
            "float32": fp32, "bfloat16": bf16,
        })
    rec = median_of_rounds(per_round, ("tokens_per_s_ratio", "step_time_ratio"), "tokens_per_s_ratio")
    worst = max(per_round, key=lambda r: r["loss_max_rel_diff"])
    rec.update({k: worst[k] for k in ("loss_max_rel_diff", "loss_rel_diffs", "losses_agree")})
    rec.update(tag=args.tag, **machine.host_fields())
    print(report.comparison_table([rec]), file=sys.stderr)
    append(rec, args.out, results / f"dtypes_{rec['float32']['platform']}.jsonl")
    return rec
