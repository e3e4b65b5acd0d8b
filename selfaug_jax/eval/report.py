"""Experiment report: ``summary.json``, ``report.md`` (paper Table 1 shape) and PNG plots.

Results schema (``SCHEMA_VERSION = 1``; every key but ``methods`` is optional)::

    {
      "config": {...},                      # anything JSON-serialisable; echoed into summary.json / report.md
      "wall_time_s": 123.4,
      "methods": {                          # final metrics per method; "base" = the model before training
        "base":    {"rag_em": 0.12, "ifeval_prompt_strict": 0.71, "shift_general_input": 0.0, ...},
        "lora":    {...},
        "selfaug": {...},
      },
      "metric_info": {                      # optional per-metric overrides of DEFAULT_METRIC_INFO (see MetricInfo)
        "rag_em": {"label": "RAG EM", "higher_is_better": true, "group": "downstream",
                   "in_average": true, "scale": 100},
      },
      "curves": {                           # training curves, one record per logged step
        "lora": [{"step": 10, "loss": 1.2, "ce": 1.2, "kl": 0.0, "lr": 5e-4, "grad_norm": 0.8,
                  "tokens_per_s": 1e4}, ...],
      },
      "items": {                            # optional per-item values -> 95% bootstrap intervals (report_intervals)
        "lora": {"rag_em": {"num": [1, 0, ...], "den": null}, "ifeval_inst_strict": {"num": [...], "den": [...]}},
      },
      "samples": {"lora": {"generation": {"ifeval": {"n": 300, "hit_cap": 4, "max_new_tokens": 256}}}},
      "evals_over_training": {              # periodic evals (paper Fig. 2); "epoch" optional
        "lora": [{"step": 100, "epoch": 1, "shift_general_input": 0.03, "ifeval_prompt_strict": 0.65,
                  "rag_f1": 0.4}, ...],
      },
    }

``runs`` (optional, written by the experiment runner) maps a column to how it was made: ``{"selfaug[alpha=0.1]":
{"method": "selfaug", "sweep": {"loss.alpha": 0.1}, "overrides": {...}, "dir": ...}, "lora@0.5": {...,
"adapter_scale": 0.5}}``; Table 2 reads the aligned feature (``features.site``) of each run from it.

Metric values are raw numbers (fractions for accuracies) or ``null``; the table shows ``value * scale``. Runs are
columns in the registry's (the paper's) order, Base first, each method's sweep / adapter-scale variants after it
(:mod:`selfaug_jax.eval.report_columns`); metrics are rows grouped downstream / general / shift / other.
The **Average** row is the mean, per method, of the metrics flagged ``in_average`` (each must be
higher-is-better), mapped to 0-100 by ``avg_scale * shown + avg_offset`` (so the paper's CRAG score in
[-100, 100] uses ``avg_scale=0.5, avg_offset=50``); a method missing any of them gets "—".
The best value of a row is bold, compared on the shown (rounded) numbers among the fine-tuned methods (the
``reference_methods``, by default ``base``, are shown but not ranked: the base model trivially has zero shift).

The report follows the paper's tables: the **Results** table has Table 1's shape (Base and the Table-1 methods, with
95% intervals in the cells when ``items`` are given), a second table holds the extensions and the sweep /
adapter-scale variants, and **Table 2**'s shape lists the feature-alignment runs (:mod:`selfaug_jax.eval.
report_tables`). ``pareto.png`` puts every run at (downstream score, retention). Plots live in
:mod:`selfaug_jax.eval.report_plots`; missing optional pieces are skipped and listed in the report.

Modules: ``report_schema`` (schema, metric settings), ``report_columns`` (order, labels, blocks), ``report_tables``
(tables), ``report_findings`` (bullets), ``report_intervals`` (bootstrap intervals), ``report_plots`` (PNGs); this
one writes the files and re-exports the public names.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from selfaug_jax.eval import report_plots
from selfaug_jax.eval.report_columns import METHOD_LABELS, METHOD_ORDER, Registry, method_label, ordered_methods
from selfaug_jax.eval.report_findings import findings, generation_lines
from selfaug_jax.eval.report_intervals import compute_intervals, render_interval_tables
from selfaug_jax.eval.report_schema import (DEFAULT_METRIC_INFO, SCHEMA_VERSION, MetricInfo, is_number, jsonable,
                                            resolve_metric_info, resolve_scale, validate_results)
from selfaug_jax.eval.report_tables import (build_table, build_table2, paper_blocks, render_table, render_table2)
from selfaug_jax.eval.stats import BootstrapConfig

__all__ = [
    "SCHEMA_VERSION",
    "MetricInfo",
    "DEFAULT_METRIC_INFO",
    "METHOD_ORDER",
    "METHOD_LABELS",
    "validate_results",
    "resolve_metric_info",
    "resolve_scale",
    "ordered_methods",
    "method_label",
    "build_table",
    "render_table",
    "paper_blocks",
    "build_table2",
    "render_table2",
    "findings",
    "write_report",
]


def write_report(
    results: Mapping[str, Any],
    out_dir: str | Path,
    *,
    compare: tuple[str, str] = ("selfaug", "lora"),
    reference_methods: Sequence[str] = ("base",),
    shift_key: str = "shift_general_input",
    ifeval_key: str = "ifeval_prompt_strict",
    title: str = "SelfAug experiment report",
    bootstrap: BootstrapConfig = BootstrapConfig(),
    tradeoff_downstream: str = "rag_f1",
    tradeoff_general: Sequence[str] = ("ifeval_prompt_strict", "general_collapse", "knowledge_acc_norm",
                                       "general_length_ratio"),
    registry: Registry | None = None,
) -> str:
    """Write ``summary.json``, ``report.md`` and the PNGs into ``out_dir``; return the markdown tables (Table 1's
    shape, then the extensions / variants table when there is one).

    Plots: ``curves.png`` (CE and KL vs step), ``shift_vs_ifeval.png`` (paper Fig. 2 style),
    ``comparison.png`` (bars per metric and run, with interval error bars), ``tradeoff.png`` (each run at
    (gain on ``tradeoff_downstream``, change on each ``tradeoff_general`` metric) from base, both with paired
    intervals) and ``pareto.png`` (every run at (``tradeoff_downstream``, ``ifeval_key``) and (``tradeoff_downstream``,
    ``shift_key``, lower is better), the non-dominated front drawn). A plot whose data is absent is skipped and
    listed under "Skipped" in the report.

    With ``results["items"]``, every metric gets a bootstrap interval (``bootstrap``) shown in the tables, and the
    report adds the change from base (downstream gain / forgetting) and run-vs-run paired differences
    (:mod:`selfaug_jax.eval.report_intervals`); ``summary.json`` keeps them under ``intervals``. ``registry``
    (default: the method registry) orders, labels and places the columns (:mod:`selfaug_jax.eval.report_columns`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = build_table(results, reference_methods, registry=registry)
    order = table["methods"]
    infos = resolve_metric_info(results)
    intervals = None
    if results.get("items"):
        scales = {k: v.scale for k, v in infos.items()}
        intervals = compute_intervals(results["items"], order, scales, bootstrap,
                                      reference=reference_methods[0] if reference_methods else "base")
    notes = findings(results, table, compare, shift_key, ifeval_key, intervals, registry)
    blocks = paper_blocks(results, reference_methods, registry=registry)
    md_table = render_table(blocks["table1"], intervals)
    md_extra = render_table(blocks["extra"], intervals) if blocks["extra"] else ""
    table2 = build_table2(results, shift_key=shift_key, registry=registry)

    def label(m: str) -> str:
        return method_label(m, registry)

    downstream_label = infos[tradeoff_downstream].label if tradeoff_downstream in infos else tradeoff_downstream
    plots = {
        "curves.png": report_plots.plot_curves(results.get("curves") or {}, out / "curves.png", order, label),
        "shift_vs_ifeval.png": report_plots.plot_shift_vs_ifeval(
            results.get("evals_over_training") or {}, out / "shift_vs_ifeval.png", order,
            shift_key=shift_key, ifeval_key=ifeval_key, ifeval_scale=resolve_scale(results, ifeval_key),
            label=label),
        "comparison.png": report_plots.plot_comparison(table, out / "comparison.png", label, intervals),
        "tradeoff.png": report_plots.plot_tradeoff(
            intervals or {}, out / "tradeoff.png", tradeoff_downstream,
            [(k, infos[k].label) for k in tradeoff_general if k in infos], order, label,
            downstream_label=downstream_label),
        "pareto.png": report_plots.plot_pareto(
            table, out / "pareto.png", downstream=tradeoff_downstream, intervals=intervals, label=label,
            order=order, panels=[(ifeval_key, True, infos[ifeval_key].label if ifeval_key in infos else ifeval_key),
                                 (shift_key, False, infos[shift_key].label if shift_key in infos else shift_key)]),
    }
    summary = {
        "schema_version": SCHEMA_VERSION,
        **{k: v for k, v in results.items() if k != "metric_info"},
        "metric_info": {k: dataclasses.asdict(v) for k, v in infos.items()},
        "table": table,
        "paper_tables": {"table1": blocks["table1"]["methods"],
                         "extra": blocks["extra"]["methods"] if blocks["extra"] else [],
                         "table2": ({run: table2["row_labels"][run] for run in table2["runs"]} if table2 else {})},
        "findings": notes,
        "intervals": intervals,
        "plots": [name for name, p in plots.items() if p is not None],
    }
    (out / "summary.json").write_text(json.dumps(jsonable(summary), indent=2, allow_nan=False) + "\n")
    lines = [f"# {title}", ""]
    config = results.get("config") or {}
    scalars = [f"`{k}={v}`" for k, v in config.items() if not isinstance(v, (Mapping, list))]
    if scalars:
        lines.append("Config: " + ", ".join(scalars) + " (full config in summary.json)")
    if is_number(results.get("wall_time_s")):
        lines.append(f"Wall time: {float(results['wall_time_s']):.1f} s")
    ranked = [m for m in blocks["table1"]["methods"] if m not in reference_methods]
    iv_note = (" Cells: value [95% interval] (percentile bootstrap over items)." if intervals is not None else "")
    lines += ["", "## Results", "", md_table, "",
              f"Bold = best among {', '.join(label(m) for m in ranked)}; "
              "↑/↓ = higher/lower is better; — = not measured. Accuracies in %, "
              "shift = mean per-token KL (nats)." + iv_note,
              ""]
    if md_extra:
        lines += ["### Extensions and variants", "",
                  "Methods beyond the paper's Table 1, sweep values (`method[key=value]`, full keys under `runs` in "
                  "summary.json) and adapters merged at scale s (`method@s`, WiSE-FT); Base repeated for reference; "
                  "bold ranks this table only.", "", md_extra, ""]
    if table2:
        lines += ["### Table 2: aligned feature", "",
                  "One row per aligned intermediate feature, then SelfAug's input-token logits; bold = best row.", "",
                  render_table2(table2, intervals), ""]
    lines += generation_lines(results, order, registry)
    if intervals is not None:
        lines += ["## Uncertainty", ""] + render_interval_tables(
            intervals, table["rows"], order, label, reference_methods[0] if reference_methods else "base",
            per_metric=False, pairs_with=compare[0])
        lines.append("")
    lines += ["## What this shows", ""]
    lines += [f"- {n}" for n in notes] or ["- Not enough methods or metrics to compare."]
    made = [name for name, p in plots.items() if p is not None]
    if made:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in made]
    skipped = [name for name, p in plots.items() if p is None]
    if skipped:
        lines += ["", "Skipped (no data): " + ", ".join(skipped)]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return md_table + (f"\n\nExtensions and variants:\n\n{md_extra}" if md_extra else "")
