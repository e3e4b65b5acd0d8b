"""The report's tables: the comparison as data (:func:`build_table`), the paper's Table 1 and Table 2 shapes.

* :func:`build_table` / :func:`render_table` -- metrics as rows (grouped downstream / general / shift / other),
  runs as columns, the Average row, the best value per row in bold; with intervals, each cell is
  ``value [low, high]`` (95% bootstrap, :mod:`selfaug_jax.eval.report_intervals`).
* :func:`paper_blocks` -- **Table 1's shape**: Base and every Table-1 method of the registry that was run, as
  columns in the paper's order (Base | SFT | LoRA | +MAGPIE | +SDFT | +Orth | +SelfAug); then a second table of the
  extensions (``table == 0``), the sweep and adapter-scale variants and unknown names, with Base repeated for
  reference (:func:`selfaug_jax.eval.report_columns.column_block`).
* :func:`build_table2` / :func:`render_table2` -- **Table 2's shape** (the feature-alignment ablation): one row per
  run of a ``table == 2`` method, labelled by its aligned feature (``features.site``: Q, K, V, O, All attention,
  FFN, All layers; from the run's sweep point or the experiment config), then the input-token-logits row (=
  ``selfaug``); metrics as columns, with intervals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from selfaug_jax.eval.report_columns import Registry, column_block, method_label, ordered_methods
from selfaug_jax.eval.report_schema import (GROUP_LABELS, GROUP_ORDER, MetricInfo, is_number, resolve_metric_info,
                                            validate_results)
from selfaug_jax.run_names import format_value, short_keys

__all__ = ["build_table", "render_table", "paper_blocks", "SITE_KEY", "SITE_ORDER", "SITE_LABELS", "LOGITS_LABEL",
           "build_table2", "render_table2"]

SITE_KEY = "features.site"
SITE_ORDER = ("q", "k", "v", "o", "attn", "ffn", "residual")
"""The aligned features in Table 2's row order."""
SITE_LABELS = {"q": "Q", "k": "K", "v": "V", "o": "O", "attn": "All attention", "ffn": "FFN",
               "residual": "All layers"}
LOGITS_LABEL = "Input-token logits (SelfAug)"


def _shown(value: Any, info: MetricInfo) -> float | None:
    if value is None or not is_number(value):
        return None
    return float(value) * info.scale


def build_table(
    results: Mapping[str, Any], reference_methods: Sequence[str] = ("base",), *,
    columns: Sequence[str] | None = None, registry: Registry | None = None,
) -> dict[str, Any]:
    """The table as data: ordered runs (all, or ``columns``), grouped rows (shown values, best runs) and the
    Average row. ``reference_methods`` are shown but not ranked for bold.

    Returns ``{"methods", "labels": {m: title}, "rows": [{"metric", "label", "group", "higher_is_better",
    "decimals", "values": {m: shown | None}, "best": [m, ...]}], "average": {"values": {m: float | None},
    "metrics": [...], "best": [...]}}``.
    """
    validate_results(results)
    infos = resolve_metric_info(results)
    unknown = [c for c in (columns or ()) if c not in results["methods"]]
    if unknown:
        raise ValueError(f"build_table: columns {unknown} are not in results['methods']")
    methods = ordered_methods(list(columns if columns is not None else results["methods"]), registry)
    ranked = [m for m in methods if m not in reference_methods]

    def best(values: Mapping[str, float | None], higher: bool, decimals: int) -> list[str]:
        cand = {m: round(v, decimals) for m, v in values.items() if m in ranked and v is not None and math.isfinite(v)}
        if len(cand) < 2:
            return []
        target = max(cand.values()) if higher else min(cand.values())
        return [m for m in ranked if cand.get(m) == target]

    rows = []
    for group in GROUP_ORDER:
        for name, info in infos.items():
            if info.group != group:
                continue
            values = {m: _shown(results["methods"][m].get(name), info) for m in methods}
            rows.append({
                "metric": name, "label": info.label, "group": group, "higher_is_better": info.higher_is_better,
                "decimals": info.decimals, "values": values, "best": best(values, info.higher_is_better, info.decimals),
            })
    avg_metrics = [name for name, info in infos.items() if info.in_average]
    avg_values: dict[str, float | None] = {}
    for m in methods:
        parts = []
        for name in avg_metrics:
            v = _shown(results["methods"][m].get(name), infos[name])
            parts.append(None if v is None else infos[name].avg_scale * v + infos[name].avg_offset)
        ok = parts and all(p is not None and math.isfinite(p) for p in parts)
        avg_values[m] = float(np.mean(parts)) if ok else None
    return {
        "methods": methods,
        "labels": {m: method_label(m, registry) for m in methods},
        "rows": rows,
        "average": {"values": avg_values, "metrics": avg_metrics, "best": best(avg_values, True, 2)},
    }


def _cell(v: float | None, decimals: int, bold: bool, iv: Mapping[str, Any] | None = None) -> str:
    if v is None:
        return "—"
    text = f"{v:.{decimals}f}" if math.isfinite(v) else "NaN"
    text = f"**{text}**" if bold else text
    if iv and is_number(iv.get("low")) and is_number(iv.get("high")) and math.isfinite(iv["low"]):
        text += f" [{iv['low']:.{decimals}f}, {iv['high']:.{decimals}f}]"
    return text


def _interval(intervals: Mapping[str, Any] | None, metric: str, run: str) -> Mapping[str, Any] | None:
    return ((intervals or {}).get("metrics", {}).get(metric) or {}).get(run)


def render_table(table: Mapping[str, Any], intervals: Mapping[str, Any] | None = None) -> str:
    """Markdown: metrics as rows (grouped), runs as columns, an Average row, best per row in bold; with
    ``intervals`` (:func:`~selfaug_jax.eval.report_intervals.compute_intervals`) each cell is ``value [low, high]``."""
    methods = table["methods"]
    labels = table.get("labels") or {}
    lines = ["| Metric | " + " | ".join(labels.get(m) or method_label(m) for m in methods) + " |",
             "|---|" + "---:|" * len(methods)]
    group = None
    for row in table["rows"]:
        if row["group"] != group:
            group = row["group"]
            lines.append(f"| *{GROUP_LABELS[group]}* |" + " |" * len(methods))
        arrow = "↑" if row["higher_is_better"] else "↓"
        cells = [_cell(row["values"][m], row["decimals"], m in row["best"], _interval(intervals, row["metric"], m))
                 for m in methods]
        lines.append(f"| {row['label']} {arrow} | " + " | ".join(cells) + " |")
    avg = table["average"]
    if avg["metrics"]:
        cells = [_cell(avg["values"][m], 2, m in avg["best"]) for m in methods]
        lines.append(f"| **Average** ({len(avg['metrics'])} metrics) ↑ | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paper_blocks(results: Mapping[str, Any], reference_methods: Sequence[str] = ("base",), *,
                 registry: Registry | None = None) -> dict[str, dict[str, Any] | None]:
    """``{"table1": table, "extra": table | None}`` (:func:`build_table` data; module docstring). Without any
    Table-1 run, ``table1`` holds every column instead (a report of extensions only still has one main table)."""
    names = list(results["methods"])
    blocks = {n: column_block(n, registry) for n in names}
    main = [n for n in names if blocks[n] == "table1"]
    extra = [n for n in names if blocks[n] == "extra"]
    if not [n for n in main if n not in reference_methods]:
        return {"table1": build_table(results, reference_methods, columns=names, registry=registry), "extra": None}
    table1 = build_table(results, reference_methods, columns=main, registry=registry)
    if not extra:
        return {"table1": table1, "extra": None}
    refs = [n for n in names if n in reference_methods]
    return {"table1": table1,
            "extra": build_table(results, reference_methods, columns=refs + extra, registry=registry)}


def _site_row_label(run: str, results: Mapping[str, Any]) -> tuple[int, str]:
    """(sort index, label) of a Table-2 run from its sweep point, else the experiment config's ``features``."""
    sweep = dict(((results.get("runs") or {}).get(run) or {}).get("sweep") or {})
    config_site = ((results.get("config") or {}).get("features") or {}).get("site")
    site = sweep.pop(SITE_KEY, config_site)
    label = SITE_LABELS.get(site, str(site) if site is not None else run)
    if sweep:
        short = short_keys(list(sweep))
        label += " [" + ", ".join(f"{short[k]}={format_value(v)}" for k, v in sweep.items()) + "]"
    return (SITE_ORDER.index(site) if site in SITE_ORDER else len(SITE_ORDER)), label


def build_table2(results: Mapping[str, Any], *, metrics: Sequence[str] | None = None, logits_run: str = "selfaug",
                 shift_key: str = "shift_general_input", registry: Registry | None = None) -> dict[str, Any] | None:
    """Table 2's shape as data, or ``None`` without any run of a ``table == 2`` method.

    ``metrics`` (columns) default to the Average's metrics and ``shift_key``, those measured. Returns ``{"runs":
    [...], "row_labels": {run: label}, "columns": [table rows of the metrics], "average": {...}}`` where the
    values and the best runs (bold) are ranked among the rows.
    """
    validate_results(results)
    feature_runs = [n for n in results["methods"] if column_block(n, registry) == "table2"]
    if not feature_runs:
        return None
    keyed = sorted(((_site_row_label(n, results), i, n) for i, n in enumerate(feature_runs)))
    runs = [n for _, _, n in keyed]
    labels = {n: lab for (_, lab), _, n in keyed}
    if logits_run in results["methods"]:
        runs.append(logits_run)
        labels[logits_run] = LOGITS_LABEL
    table = build_table(results, reference_methods=(), columns=runs, registry=registry)
    if metrics is None:
        infos = resolve_metric_info(results)
        metrics = [m for m in infos if infos[m].in_average] + [shift_key]
    by_metric = {r["metric"]: r for r in table["rows"]}
    columns = [by_metric[m] for m in metrics
               if m in by_metric and any(v is not None for v in by_metric[m]["values"].values())]
    return {"runs": runs, "row_labels": labels, "columns": columns, "average": table["average"]}


def render_table2(table2: Mapping[str, Any], intervals: Mapping[str, Any] | None = None) -> str:
    """Markdown of :func:`build_table2`: one row per aligned feature, metrics as columns (``value [low, high]``)."""
    cols = table2["columns"]
    avg = table2["average"]
    heads = [f"{c['label']} {'↑' if c['higher_is_better'] else '↓'}" for c in cols]
    if avg["metrics"]:
        heads.append(f"Average ({len(avg['metrics'])}) ↑")
    lines = ["| Aligned feature | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for run in table2["runs"]:
        cells = [_cell(c["values"][run], c["decimals"], run in c["best"], _interval(intervals, c["metric"], run))
                 for c in cols]
        if avg["metrics"]:
            cells.append(_cell(avg["values"][run], 2, run in avg["best"]))
        lines.append(f"| {table2['row_labels'][run]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
