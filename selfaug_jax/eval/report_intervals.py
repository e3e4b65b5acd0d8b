"""Intervals for the report: per-metric 95% bootstrap intervals, paired differences vs base and between methods.

Input: ``results["items"] = {method: {metric: {"num": [...], "den": [...] | None}}}`` as the evaluation suite
returns them per model (``samples["items"]``; ``metric = sum(num) / sum(den)``). Every method was evaluated on the
same items in the same order, so differences are **paired** (:func:`selfaug_jax.eval.stats.paired_difference`).

Output of :func:`compute_intervals` (stored in ``summary.json`` as ``intervals``; values in *shown* units, i.e.
multiplied by the metric's display ``scale``)::

    {"bootstrap": {"n_resamples", "confidence", "seed", "method": "percentile, paired over items"},
     "metrics": {metric: {method: {"estimate", "low", "high", "n", "n_dropped", "excludes_zero"}}},
     "vs_base": {metric: {method: {... of method - base}}},
     "pairs":   {metric: {"a vs b": {... of a - b}}}}   # every pair of fine-tuned methods, report order

``vs_base`` of a general-capability metric is the **forgetting** row (negative = worse than base for
higher-is-better metrics); of a downstream metric, the gain. Metrics whose item counts differ between methods
(another evaluation set) get no paired difference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from selfaug_jax.eval.stats import BootstrapConfig, Interval, paired_difference, ratio_interval

__all__ = ["compute_intervals", "format_interval", "render_interval_tables"]


def _scaled(iv: Interval, scale: float) -> dict[str, Any]:
    d = iv.as_dict()
    for k in ("estimate", "low", "high"):
        d[k] = d[k] * scale
    return d


def compute_intervals(items: Mapping[str, Mapping[str, Mapping[str, Any]]], methods: Sequence[str],
                      scales: Mapping[str, float], config: BootstrapConfig = BootstrapConfig(),
                      reference: str = "base") -> dict[str, Any]:
    """Intervals of every metric with per-item values (module docstring). ``methods`` gives the order; ``scales``
    the display scale per metric (1 when absent)."""
    out: dict[str, Any] = {"bootstrap": {"n_resamples": config.n_resamples, "confidence": config.confidence,
                                         "seed": config.seed, "method": "percentile, paired over items"},
                           "metrics": {}, "vs_base": {}, "pairs": {}}
    present = [m for m in methods if m in items]
    metrics: list[str] = []
    for m in present:
        metrics += [k for k in items[m] if k not in metrics]
    for metric in metrics:
        scale = float(scales.get(metric, 1.0))
        have = {m: items[m][metric] for m in present if metric in items[m]}
        out["metrics"][metric] = {m: _scaled(ratio_interval(v["num"], v["den"], config, name=f"{m}.{metric}"), scale)
                                  for m, v in have.items()}

        def diff(a: str, b: str) -> dict[str, Any] | None:
            va, vb = have[a], have[b]
            if len(va["num"]) != len(vb["num"]):
                return None
            return _scaled(paired_difference(va["num"], vb["num"], va["den"], vb["den"], config,
                                             name=f"{metric}: {a} - {b}"), scale)

        if reference in have:
            vs = {m: diff(m, reference) for m in have if m != reference}
            out["vs_base"][metric] = {m: d for m, d in vs.items() if d is not None}
        tuned = [m for m in have if m != reference]
        pairs = {}
        for i, b in enumerate(tuned):
            for a in tuned[i + 1:]:
                d = diff(a, b)
                if d is not None:
                    pairs[f"{a} vs {b}"] = d
        out["pairs"][metric] = pairs
    return out


def format_interval(d: Mapping[str, Any] | None, decimals: int, signed: bool = False) -> str:
    """``"12.3 [8.1, 16.4]"`` (``"+1.2 [-0.3, +2.8] *"`` when ``signed``: * = interval excludes 0); ``"—"``."""
    if not d:
        return "—"
    f = f"{{:{'+' if signed else ''}.{decimals}f}}"
    text = f"{f.format(d['estimate'])} [{f.format(d['low'])}, {f.format(d['high'])}]"
    return text + (" *" if signed and d.get("excludes_zero") else "")


def render_interval_tables(intervals: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], methods: Sequence[str],
                           label: Any = str, reference: str = "base", *, per_metric: bool = True,
                           pairs_with: str | None = None) -> list[str]:
    """Markdown lines: per-metric intervals (unless ``per_metric=False``: the report's tables already show them),
    change from base (gain / forgetting), and method-vs-method pairs (only those involving ``pairs_with`` when
    given and measured: with many runs, every pair would be a table of dozens of columns; ``summary.json`` keeps
    all).

    ``rows`` are the report table's rows (``metric``, ``label``, ``group``, ``decimals``, ``higher_is_better``), in
    order; metrics without intervals are left out."""
    rows = [r for r in rows if r["metric"] in intervals.get("metrics", {})]
    if not rows:
        return []
    bs = intervals["bootstrap"]
    conf = f"{100 * bs['confidence']:.0f}%"
    lines = [f"{conf} intervals: percentile bootstrap over items ({bs['n_resamples']} resamples, seed {bs['seed']}); "
             "differences are paired (every model answered the same items). * = the difference's interval "
             "excludes 0.", ""]
    if per_metric:
        lines += ["| Metric | n | " + " | ".join(label(m) for m in methods) + " |",
                  "|---|---:|" + "---:|" * len(methods)]
        for r in rows:
            per = intervals["metrics"][r["metric"]]
            n = next((v["n"] for v in per.values()), 0)
            cells = [format_interval(per.get(m), r["decimals"]) for m in methods]
            lines.append(f"| {r['label']} | {n} | " + " | ".join(cells) + " |")
    else:
        ns = sorted({v["n"] for r in rows for v in intervals["metrics"][r["metric"]].values()})
        lines += [f"Items per metric: {', '.join(map(str, ns))} (per-run intervals: in the tables above)."]
    tuned = [m for m in methods if m != reference]
    vs = intervals.get("vs_base", {})
    if any(vs.get(r["metric"]) for r in rows) and tuned:
        lines += ["", f"### Change from {label(reference)}: downstream gain and forgetting", "",
                  "Method minus base, paired. On general-capability rows a change against the arrow is forgetting.",
                  "", "| Metric | " + " | ".join(label(m) for m in tuned) + " |", "|---|" + "---:|" * len(tuned)]
        for group in ("downstream", "general", "shift", "other"):
            for r in rows:
                if r["group"] == group and vs.get(r["metric"]):
                    arrow = "↑" if r["higher_is_better"] else "↓"
                    cells = [format_interval(vs[r["metric"]].get(m), r["decimals"], signed=True) for m in tuned]
                    lines.append(f"| {r['label']} {arrow} | " + " | ".join(cells) + " |")
    pair_names = []
    for r in rows:
        pair_names += [p for p in intervals.get("pairs", {}).get(r["metric"], {}) if p not in pair_names]
    if pairs_with is not None and any(pairs_with in p.split(" vs ", 1) for p in pair_names):
        pair_names = [p for p in pair_names if pairs_with in p.split(" vs ", 1)]
    if pair_names:
        heads = [" − ".join(label(x) for x in p.split(" vs ", 1)) for p in pair_names]
        lines += ["", "### Method vs method", "", "| Metric | " + " | ".join(heads) + " |",
                  "|---|" + "---:|" * len(heads)]
        for r in rows:
            pairs = intervals["pairs"].get(r["metric"], {})
            if pairs:
                arrow = "↑" if r["higher_is_better"] else "↓"
                cells = [format_interval(pairs.get(p), r["decimals"], signed=True) for p in pair_names]
                lines.append(f"| {r['label']} {arrow} | " + " | ".join(cells) + " |")
    return lines
