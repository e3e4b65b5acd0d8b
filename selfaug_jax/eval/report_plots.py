"""PNG plots for :mod:`selfaug_jax.eval.report` (matplotlib, Agg backend, no display needed).

Each function returns the written path, or ``None`` when its data is absent (the caller lists it as skipped).
Where the report has bootstrap intervals (:mod:`selfaug_jax.eval.report_intervals`) they are drawn as error bars;
panels where every value is 0 (e.g. the base model's shift only) are left out.
Methods keep one colour across all plots (tab10, by their position in the report's method order).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_curves", "plot_shift_vs_ifeval", "plot_comparison", "plot_tradeoff", "pareto_front", "plot_pareto"]


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def _color(method: str, order: Sequence[str]) -> Any:
    """Colour by position in ``order`` (callers append methods missing from it, so colours are stable); tab10, or
    tab20 when there are more than 10 runs (sweeps, adapter scales)."""
    n = 10 if len(order) <= 10 else 20
    return plt.get_cmap(f"tab{n}")(list(order).index(method) % n)


def _series(records: Sequence[Mapping[str, Any]], x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    pts = [(float(r[x_key]), float(r[y_key])) for r in records if _num(r.get(x_key)) and _num(r.get(y_key))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path,
                order: Sequence[str] = (), label: Callable[[str], str] = str) -> Path | None:
    """``curves.png``: CE (falls back to ``loss``) and KL vs step, one line per method; KL panel only if logged."""
    order = list(order) + [m for m in curves if m not in order]
    methods = [m for m in order if m in curves]
    ce = {m: _series(curves[m], "step", "ce") for m in methods}
    ce = {m: xy if xy[0] else _series(curves[m], "step", "loss") for m, xy in ce.items()}
    kl = {m: _series(curves[m], "step", "kl") for m in methods}
    ce = {m: xy for m, xy in ce.items() if xy[0]}
    # CE-only methods (lora, sft) log kl = 0 because they never compute it: leave them out of the KL panel rather
    # than draw a flat line that reads as "no drift" (their drift is measured by the shift evaluation).
    kl = {m: xy for m, xy in kl.items() if xy[0] and any(v != 0 for v in xy[1])}
    if not ce and not kl:
        return None
    panels = [("CE (response tokens)", ce)] * bool(ce) + [("KL(p_orig || p_ft) on prompt tokens (objective)", kl)] * bool(kl)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, data) in zip(axes[0], panels):
        for m, (x, y) in data.items():
            ax.plot(x, y, label=label(m), color=_color(m, order), lw=1.5)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, Path(path))


def plot_shift_vs_ifeval(
    evals: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    order: Sequence[str] = (),
    *,
    shift_key: str = "shift_general_input",
    ifeval_key: str = "ifeval_prompt_strict",
    ifeval_scale: float = 100.0,
    label: Callable[[str], str] = str,
) -> Path | None:
    """``shift_vs_ifeval.png`` (paper Fig. 2): left, distribution shift over training; right, IFEval accuracy.

    The x axis is ``epoch`` when every record has one, else ``step``. Returns ``None`` if neither series exists.
    """
    order = list(order) + [m for m in evals if m not in order]
    methods = [m for m in order if m in evals]
    records = [r for m in methods for r in evals[m]]
    if not records:
        return None
    x_key = "epoch" if all(_num(r.get("epoch")) for r in records) else "step"
    shift = {m: _series(evals[m], x_key, shift_key) for m in methods}
    ife = {m: _series(evals[m], x_key, ifeval_key) for m in methods}
    shift = {m: xy for m, xy in shift.items() if xy[0]}
    ife = {m: (xy[0], [v * ifeval_scale for v in xy[1]]) for m, xy in ife.items() if xy[0]}
    if not shift and not ife:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, data, title in ((axes[0], shift, f"Distribution shift ({shift_key}, nats)"),
                            (axes[1], ife, f"IFEval ({ifeval_key})")):
        for m, (x, y) in data.items():
            ax.plot(x, y, marker="o", label=label(m), color=_color(m, order), lw=1.5)
        ax.set_xlabel(x_key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if data:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, Path(path))


def _yerr(iv: Mapping[str, Any] | None, value: float) -> tuple[float, float]:
    """Asymmetric error bar (below, above) of an interval dict around ``value``; (0, 0) without one."""
    if not iv or not _num(iv.get("low")) or not _num(iv.get("high")):
        return 0.0, 0.0
    return max(0.0, value - float(iv["low"])), max(0.0, float(iv["high"]) - value)


def plot_comparison(table: Mapping[str, Any], path: str | Path,
                    label: Callable[[str], str] = str,
                    intervals: Mapping[str, Any] | None = None) -> Path | None:
    """``comparison.png``: one small panel per metric (own y scale), one bar per method, shown values, with the
    bootstrap intervals (``intervals["metrics"]``, shown units) as error bars; all-zero panels are left out."""
    methods = table["methods"]
    per_metric = (intervals or {}).get("metrics", {})
    rows = [r for r in table["rows"]
            if any(r["values"][m] is not None for m in methods)
            and any(r["values"][m] not in (None, 0.0) for m in methods)]
    avg = table["average"]
    if any(v is not None for v in avg["values"].values()):
        rows.append({"label": "Average", "higher_is_better": True, "values": avg["values"]})
    if not rows or not methods:
        return None
    ncols = min(4, len(rows))
    nrows = math.ceil(len(rows) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.0 * nrows), squeeze=False)
    for ax, row in zip(axes.flat, rows):
        vals = [row["values"][m] for m in methods]
        heights = [v if v is not None and math.isfinite(v) else 0.0 for v in vals]
        ivs = per_metric.get(row.get("metric"), {})
        errs = [_yerr(ivs.get(m), h) for m, h in zip(methods, heights)]
        bars = ax.bar(range(len(methods)), heights, color=[_color(m, methods) for m in methods],
                      yerr=[[e[0] for e in errs], [e[1] for e in errs]] if ivs else None, capsize=3)
        for bar, v in zip(bars, vals):
            if v is None:
                bar.set_hatch("//")
                bar.set_alpha(0.3)
        ax.set_xticks(range(len(methods)), [label(m) for m in methods], rotation=30, fontsize=8)
        ax.set_title(f"{row['label']} {'↑' if row['higher_is_better'] else '↓'}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    return _save(fig, Path(path))


def plot_tradeoff(intervals: Mapping[str, Any], path: str | Path, downstream: str,
                  general: Sequence[tuple[str, str]], order: Sequence[str] = (),
                  label: Callable[[str], str] = str, downstream_label: str = "") -> Path | None:
    """``tradeoff.png`` (the headline): each method at (downstream gain over base, change from base of a general
    metric), both with their paired bootstrap intervals as error bars; one panel per general metric
    (``general`` = ``[(metric, axis label)]``) that has a non-zero value; dashed lines at 0 (= the base model)."""
    vs = intervals.get("vs_base", {})
    x_by_m = vs.get(downstream, {})
    panels = []
    for metric, ylabel in general:
        y_by_m = vs.get(metric, {})
        methods = [m for m in list(order) + [m for m in y_by_m if m not in order] if m in y_by_m and m in x_by_m]
        if methods and any(y_by_m[m]["estimate"] != 0 or x_by_m[m]["estimate"] != 0 for m in methods):
            panels.append((metric, ylabel, methods, y_by_m))
    if not panels:
        return None
    colours = list(order) + [m for p in panels for m in p[2] if m not in order]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for ax, (metric, ylabel, methods, y_by_m) in zip(axes[0], panels):
        for m in methods:
            x, y = x_by_m[m]["estimate"], y_by_m[m]["estimate"]
            xe, ye = _yerr(x_by_m[m], x), _yerr(y_by_m[m], y)
            ax.errorbar([x], [y], xerr=[[xe[0]], [xe[1]]], yerr=[[ye[0]], [ye[1]]], fmt="o", capsize=4,
                        color=_color(m, colours), label=label(m))
        ax.axhline(0, color="grey", ls="--", lw=1)
        ax.axvline(0, color="grey", ls="--", lw=1)
        ax.set_xlabel(f"downstream gain over base: {downstream_label or downstream}")
        ax.set_ylabel(f"change from base: {ylabel}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Trade-off: downstream gain vs change in general capability (95% intervals)", fontsize=10)
    return _save(fig, Path(path))


def pareto_front(points: Mapping[str, tuple[float, float]], maximize_y: bool = True) -> list[str]:
    """The non-dominated points (x higher is better; y higher or, with ``maximize_y=False``, lower is better), by x.

    ``p`` is dominated when some ``q`` is at least as good on both axes and strictly better on one."""
    sign = 1.0 if maximize_y else -1.0
    pts = {k: (float(x), sign * float(y)) for k, (x, y) in points.items()}
    front = [k for k, (x, y) in pts.items()
             if not any(qx >= x and qy >= y and (qx > x or qy > y) for q, (qx, qy) in pts.items() if q != k)]
    return sorted(front, key=lambda k: (pts[k][0], -pts[k][1]))


def plot_pareto(table: Mapping[str, Any], path: str | Path, *, downstream: str,
                panels: Sequence[tuple[str, bool, str]], intervals: Mapping[str, Any] | None = None,
                label: Callable[[str], str] = str, order: Sequence[str] = ()) -> Path | None:
    """``pareto.png``: every run (method, sweep value, adapter scale, base) at (downstream score, retention), with
    its 95% intervals as error bars, labelled; the non-dominated front drawn as a dashed line.

    ``table`` is the report's full table (shown values); ``panels`` = ``[(metric, higher_is_better, axis label)]``
    for the y axes (e.g. IFEval, higher is better; KL on general prompts, lower is better). A panel without two
    measured points is left out; ``None`` when no panel remains."""
    rows = {r["metric"]: r for r in table["rows"]}
    if downstream not in rows:
        return None
    xs = rows[downstream]["values"]
    ivs = (intervals or {}).get("metrics", {})
    made = []
    for metric, higher, ylabel in panels:
        if metric not in rows:
            continue
        ys = rows[metric]["values"]
        pts = {m: (xs[m], ys[m]) for m in table["methods"]
               if _num(xs.get(m)) and _num(ys.get(m))}
        if len(pts) >= 2:
            made.append((metric, higher, ylabel, pts))
    if not made:
        return None
    colours = list(order) + [m for m in table["methods"] if m not in order]
    fig, axes = plt.subplots(1, len(made), figsize=(5.6 * len(made), 4.6), squeeze=False)
    for ax, (metric, higher, ylabel, pts) in zip(axes[0], made):
        for m, (x, y) in pts.items():
            xe, ye = _yerr(ivs.get(downstream, {}).get(m), x), _yerr(ivs.get(metric, {}).get(m), y)
            ax.errorbar([x], [y], xerr=[[xe[0]], [xe[1]]], yerr=[[ye[0]], [ye[1]]], fmt="o", capsize=3,
                        color=_color(m, colours), ms=5)
            ax.annotate(label(m), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        front = pareto_front(pts, maximize_y=higher)
        ax.plot([pts[m][0] for m in front], [pts[m][1] for m in front], ls="--", color="black", lw=1,
                label=f"non-dominated front ({len(front)})")
        ax.set_xlabel(f"{rows[downstream]['label']} (downstream, higher is better →)")
        ax.set_ylabel(f"{ylabel} ({'higher is better ↑' if higher else 'lower is better ↓'})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle("Downstream score vs retention, one point per run (95% intervals)", fontsize=10)
    return _save(fig, Path(path))
