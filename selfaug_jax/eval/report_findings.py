"""The report's "What this shows" bullets, computed from the numbers (:func:`findings`), and the generation-budget
line (:func:`generation_lines`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from selfaug_jax.eval.report_columns import Registry, method_label, ordered_methods
from selfaug_jax.eval.report_schema import is_number, resolve_scale

__all__ = ["findings", "generation_lines"]


def _row(table: Mapping[str, Any], metric: str) -> Mapping[str, Any] | None:
    return next((r for r in table["rows"] if r["metric"] == metric), None)


def _fmt(v: float, decimals: int) -> str:
    return f"{v:.{decimals}f}"


def _pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def findings(
    results: Mapping[str, Any],
    table: Mapping[str, Any],
    compare: tuple[str, str] = ("selfaug", "lora"),
    shift_key: str = "shift_general_input",
    ifeval_key: str = "ifeval_prompt_strict",
    intervals: Mapping[str, Any] | None = None,
    registry: Registry | None = None,
) -> list[str]:
    """Bullet points computed from the numbers: ``compare[0]`` vs ``compare[1]`` per row, forgetting vs Base,
    the Average, and the shift/IFEval correlation over training. Pairs that are not both present are skipped.
    With ``intervals`` (:func:`~selfaug_jax.eval.report_intervals.compute_intervals`), each comparison says whether
    its paired 95% interval excludes 0."""
    out: list[str] = []

    def _label(name: str) -> str:
        return method_label(name, registry)

    def sig(metric: str, section: str, key: str, d: int) -> str:
        iv = ((intervals or {}).get(section, {}).get(metric) or {}).get(key)
        if not iv:
            return ""
        verdict = "excludes 0" if iv["excludes_zero"] else "includes 0: not significant"
        return f" [95% interval {iv['low']:+.{d}f} to {iv['high']:+.{d}f}, {verdict}]"
    new, old = compare
    methods = table["methods"]
    if new in methods and old in methods:
        for row in table["rows"]:
            a, b = row["values"][new], row["values"][old]
            if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
                continue
            d = row["decimals"]
            delta = a - b
            if row["group"] == "shift":
                rel = f" ({abs(delta) / abs(b) * 100:.0f}% {'lower' if delta < 0 else 'higher'})" if b else ""
                word = "less" if delta < 0 else ("more" if delta > 0 else "the same")
                out.append(f"{row['label']}: {_label(new)} {_fmt(a, d)} vs {_label(old)} {_fmt(b, d)}{rel} — "
                           f"{_label(new)} drifts {word} from the original model on these prompts"
                           f"{sig(row['metric'], 'pairs', f'{new} vs {old}', d)}.")
            else:
                better = (delta > 0) == row["higher_is_better"] and delta != 0
                verdict = "better" if better else ("worse" if delta != 0 else "equal")
                out.append(f"{row['label']}: {_label(new)} {_fmt(a, d)} vs {_label(old)} {_fmt(b, d)} "
                           f"({delta:+.{d}f}, {verdict}){sig(row['metric'], 'pairs', f'{new} vs {old}', d)}.")
        avg = table["average"]["values"]
        if avg.get(new) is not None and avg.get(old) is not None:
            out.append(f"Average over {len(table['average']['metrics'])} metrics: {_label(new)} {avg[new]:.2f} vs "
                       f"{_label(old)} {avg[old]:.2f} ({avg[new] - avg[old]:+.2f}).")
    if "base" in methods:
        for row in table["rows"]:
            base = row["values"]["base"]
            if row["group"] != "general" or base is None:
                continue
            drops = {m: base - row["values"][m] for m in methods
                     if m != "base" and row["values"][m] is not None}
            if not drops:
                continue
            d = row["decimals"]
            parts = ", ".join(f"{_label(m)} {-v:+.{d}f}{sig(row['metric'], 'vs_base', m, d)}" for m, v in drops.items())
            line = f"Forgetting on {row['label']} (change vs Base {_fmt(base, d)}): {parts}."
            if drops.get(old, 0) > 0 and new in drops:
                kept = 100.0 * (1.0 - drops[new] / drops[old])
                line += f" {_label(new)} avoids {kept:.0f}% of {_label(old)}'s drop."
            out.append(line)
    evals = results.get("evals_over_training") or {}
    for m in ordered_methods(list(evals), registry):
        pts = [r for r in evals[m] if is_number(r.get(shift_key)) and is_number(r.get(ifeval_key))]
        if len(pts) < 2:
            continue
        s = [float(r[shift_key]) for r in pts]
        i = [float(r[ifeval_key]) * resolve_scale(results, ifeval_key) for r in pts]
        r_txt = _pearson(s, i)
        corr = f"; Pearson r(shift, IFEval) = {r_txt:+.2f} over {len(pts)} evals" if r_txt is not None else ""
        out.append(f"Over training, {_label(m)}: shift {s[0]:.4f} → {s[-1]:.4f}, "
                   f"IFEval {i[0]:.2f} → {i[-1]:.2f}{corr}.")
    shift, ife = _row(table, shift_key), _row(table, ifeval_key)
    if shift and ife and new in methods and old in methods:
        s_new, s_old = shift["values"][new], shift["values"][old]
        i_new, i_old = ife["values"][new], ife["values"][old]
        if None not in (s_new, s_old, i_new, i_old):
            lower_shift, kept_if = s_new < s_old, i_new >= i_old
            if lower_shift and kept_if:
                out.append(f"Consistent with the paper: {_label(new)} has lower distribution shift and higher or "
                           f"equal IFEval than {_label(old)}.")
            else:
                out.append(f"Not consistent with the paper's claim on this run: {_label(new)} has "
                           f"{'lower' if lower_shift else 'higher or equal'} shift and "
                           f"{'higher or equal' if kept_if else 'lower'} IFEval than {_label(old)}.")
    return out


def generation_lines(results: Mapping[str, Any], order: Sequence[str], registry: Registry | None = None) -> list[str]:
    """One line per evaluation part: how many answers hit the token budget, per method (from the samples)."""
    samples = results.get("samples") or {}
    parts: dict[str, list[str]] = {}
    for m in order:
        for part, g in ((samples.get(m) or {}).get("generation") or {}).items():
            if isinstance(g, Mapping) and is_number(g.get("n")) and g.get("n"):
                parts.setdefault(part, []).append(
                    f"{method_label(m, registry)} {int(g['hit_cap'])}/{int(g['n'])}")
    if not parts:
        return []
    budgets = {part: next(((samples.get(m) or {}).get("generation", {}).get(part, {}).get("max_new_tokens")
                           for m in order if (samples.get(m) or {}).get("generation", {}).get(part)), None)
               for part in parts}
    out = ["Answers that hit the generation budget (and may be cut), per part: " + "; ".join(
        f"{part} (budget {budgets[part]} tokens): {', '.join(v)}" for part, v in parts.items()) + ".", ""]
    return out
