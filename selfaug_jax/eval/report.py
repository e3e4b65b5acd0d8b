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

Metric values are raw numbers (fractions for accuracies) or ``null``; the table shows ``value * scale``. Methods are
columns in the order Base, LoRA, SelfAug, SFT, then any others in the order given; metrics are rows grouped
downstream / general / shift / other. The **Average** row is the mean, per method, of the metrics flagged
``in_average`` (each must be higher-is-better), mapped to 0-100 by ``avg_scale * shown + avg_offset`` (so the
paper's CRAG score in [-100, 100] uses ``avg_scale=0.5, avg_offset=50``); a method missing any of them gets "—".
The best value of a row is bold, compared on the shown (rounded) numbers among the fine-tuned methods (the
``reference_methods``, by default ``base``, are shown but not ranked: the base model trivially has zero shift).
Plots live in :mod:`selfaug_jax.eval.report_plots`; missing optional pieces are skipped and listed in the report.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from selfaug_jax.eval import report_plots
from selfaug_jax.eval.report_intervals import compute_intervals, render_interval_tables
from selfaug_jax.eval.stats import BootstrapConfig
from selfaug_jax.methods import METHOD_NAMES, METHODS

__all__ = [
    "SCHEMA_VERSION",
    "MetricInfo",
    "DEFAULT_METRIC_INFO",
    "METHOD_ORDER",
    "METHOD_LABELS",
    "validate_results",
    "resolve_metric_info",
    "ordered_methods",
    "build_table",
    "render_table",
    "findings",
    "write_report",
]

SCHEMA_VERSION = 1
METHOD_ORDER = ("base",) + METHOD_NAMES  # the paper's column order (Base | SFT | LoRA | ... | SelfAug)
METHOD_LABELS = {"base": "Base", **{name: m.label for name, m in METHODS.items()}}
GROUP_ORDER = ("downstream", "general", "shift", "other")
GROUP_LABELS = {
    "downstream": "Downstream (RAG)", "general": "General capabilities",
    "shift": "Distribution shift", "other": "Other",
}


@dataclasses.dataclass(frozen=True)
class MetricInfo:
    """How one metric is shown.

    Attributes:
      label: row label.
      higher_is_better: direction used for bold and for the arrows (↑ / ↓).
      group: ``downstream`` | ``general`` | ``shift`` | ``other``.
      in_average: counted in the Average row (requires ``higher_is_better``).
      scale: shown value = raw * scale (100 for fractions).
      avg_scale, avg_offset: the Average uses ``avg_scale * shown + avg_offset`` (0-100 for every metric).
      decimals: digits shown.
    """

    label: str
    higher_is_better: bool = True
    group: str = "other"
    in_average: bool = False
    scale: float = 1.0
    avg_scale: float = 1.0
    avg_offset: float = 0.0
    decimals: int = 2

    def __post_init__(self) -> None:
        if self.group not in GROUP_ORDER:
            raise ValueError(f"MetricInfo({self.label!r}).group must be one of {GROUP_ORDER}, got {self.group!r}")
        if self.in_average and not self.higher_is_better:
            raise ValueError(f"MetricInfo({self.label!r}): in_average needs higher_is_better (the paper's Average)")


def _pct(label: str, group: str, in_average: bool = False) -> MetricInfo:
    return MetricInfo(label, True, group, in_average, scale=100.0)


def _kl(label: str) -> MetricInfo:
    return MetricInfo(label, higher_is_better=False, group="shift", decimals=4)


DEFAULT_METRIC_INFO: dict[str, MetricInfo] = {
    "rag_em": _pct("RAG EM", "downstream", True),
    "rag_f1": _pct("RAG F1", "downstream", True),
    "rag_contains": _pct("RAG answer contained", "downstream"),
    "rag_refusal_acc": _pct("RAG 'not in documents' acc", "downstream"),
    "crag_score": MetricInfo("CRAG score", True, "downstream", True, 1.0, avg_scale=0.5, avg_offset=50.0),
    "ifeval_prompt_strict": _pct("IFEval (prompt, strict)", "general", True),
    "ifeval_prompt_loose": _pct("IFEval (prompt, loose)", "general"),
    "ifeval_inst_strict": _pct("IFEval (instruction, strict)", "general"),
    "ifeval_inst_loose": _pct("IFEval (instruction, loose)", "general"),
    "mmlu_acc": _pct("MMLU", "general", True),
    "arc_c_acc_norm": _pct("ARC-C", "general", True),
    "hellaswag_acc_norm": _pct("HellaSwag", "general", True),
    "general_probe_acc": _pct("General probes", "general", True),
    "knowledge_acc": _pct("Knowledge MC (acc)", "general"),
    "knowledge_acc_norm": _pct("Knowledge MC (acc_norm)", "general"),
    "general_collapse": MetricInfo("General answers collapsed (<= 5 words)", False, "general", scale=100.0),
    "general_length_ratio": MetricInfo("General answer length / base", True, "general", decimals=2),
    "shift_general_input": _kl("KL on general inputs"),
    "shift_general_response": _kl("KL on general responses"),
    "shift_rag_input": _kl("KL on RAG inputs"),
}


def _path(*keys: Any) -> str:
    return "results" + "".join(f"[{k!r}]" for k in keys)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def validate_results(results: Mapping[str, Any]) -> None:
    """Check the schema; raise ``ValueError`` naming the offending field (e.g. ``results['methods']['lora']``)."""
    if not isinstance(results, Mapping):
        raise ValueError(f"results: expected a mapping, got {type(results).__name__}")
    methods = results.get("methods")
    if not isinstance(methods, Mapping) or not methods:
        raise ValueError(f"{_path('methods')}: expected a non-empty mapping method -> metrics")
    for m, metrics in methods.items():
        if not isinstance(metrics, Mapping):
            raise ValueError(f"{_path('methods', m)}: expected a mapping metric -> number")
        for k, v in metrics.items():
            if v is not None and not _is_number(v):
                raise ValueError(f"{_path('methods', m, k)}: expected a number or null, got {type(v).__name__} {v!r}")
    info = results.get("metric_info", {})
    if not isinstance(info, Mapping):
        raise ValueError(f"{_path('metric_info')}: expected a mapping")
    fields = {f.name for f in dataclasses.fields(MetricInfo)}
    for k, spec in info.items():
        if not isinstance(spec, Mapping):
            raise ValueError(f"{_path('metric_info', k)}: expected a mapping")
        unknown = set(spec) - fields
        if unknown:
            raise ValueError(f"{_path('metric_info', k)}: unknown keys {sorted(unknown)}; allowed {sorted(fields)}")
    for section in ("curves", "evals_over_training"):
        block = results.get(section, {})
        if not isinstance(block, Mapping):
            raise ValueError(f"{_path(section)}: expected a mapping method -> list of records")
        for m, records in block.items():
            if not isinstance(records, Sequence) or isinstance(records, str):
                raise ValueError(f"{_path(section, m)}: expected a list of records")
            for i, rec in enumerate(records):
                if not isinstance(rec, Mapping) or not _is_number(rec.get("step", rec.get("epoch"))):
                    raise ValueError(f"{_path(section, m, i)}: expected a record with a numeric 'step' (or 'epoch')")
    items = results.get("items", {})
    if not isinstance(items, Mapping):
        raise ValueError(f"{_path('items')}: expected a mapping method -> metric -> {{num, den}}")
    for m, per in items.items():
        if not isinstance(per, Mapping):
            raise ValueError(f"{_path('items', m)}: expected a mapping metric -> {{num, den}}")
        for k, v in per.items():
            if not isinstance(v, Mapping) or not isinstance(v.get("num"), Sequence) or not (
                    v.get("den") is None or isinstance(v.get("den"), Sequence)):
                raise ValueError(f"{_path('items', m, k)}: expected {{'num': [numbers], 'den': [numbers] | null}}")
            if v.get("den") is not None and len(v["den"]) != len(v["num"]):
                raise ValueError(f"{_path('items', m, k)}: {len(v['num'])} num values but {len(v['den'])} den values")
    if "wall_time_s" in results and results["wall_time_s"] is not None and not _is_number(results["wall_time_s"]):
        raise ValueError(f"{_path('wall_time_s')}: expected a number")


def resolve_metric_info(results: Mapping[str, Any]) -> dict[str, MetricInfo]:
    """MetricInfo for every metric reported by any method: defaults, overridden field by field by the results."""
    names: list[str] = []
    for metrics in results["methods"].values():
        names += [k for k in metrics if k not in names]
    overrides = results.get("metric_info", {})
    out = {}
    for name in names:
        base = DEFAULT_METRIC_INFO.get(name, MetricInfo(label=name))
        try:
            out[name] = dataclasses.replace(base, **dict(overrides.get(name, {})))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{_path('metric_info', name)}: {e}") from None
    return out


def ordered_methods(methods: Sequence[str]) -> list[str]:
    """The registry's methods in the paper's order (base first, when present), then the rest in the given order."""
    return [m for m in METHOD_ORDER if m in methods] + [m for m in methods if m not in METHOD_ORDER]


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _shown(value: Any, info: MetricInfo) -> float | None:
    if value is None or not _is_number(value):
        return None
    return float(value) * info.scale


def build_table(
    results: Mapping[str, Any], reference_methods: Sequence[str] = ("base",)
) -> dict[str, Any]:
    """The table as data: ordered methods, grouped rows (shown values, best methods) and the Average row.

    Returns ``{"methods", "rows": [{"metric", "label", "group", "higher_is_better", "decimals", "values": {m:
    shown | None}, "best": [m, ...]}], "average": {"values": {m: float | None}, "metrics": [...], "best": [...]}}``.
    """
    validate_results(results)
    infos = resolve_metric_info(results)
    methods = ordered_methods(list(results["methods"]))
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
        "rows": rows,
        "average": {"values": avg_values, "metrics": avg_metrics, "best": best(avg_values, True, 2)},
    }


def _cell(v: float | None, decimals: int, bold: bool) -> str:
    if v is None:
        return "—"
    text = f"{v:.{decimals}f}" if math.isfinite(v) else "NaN"
    return f"**{text}**" if bold else text


def render_table(table: Mapping[str, Any]) -> str:
    """Markdown: metrics as rows (grouped), methods as columns, an Average row, best per row in bold."""
    methods = table["methods"]
    lines = ["| Metric | " + " | ".join(_label(m) for m in methods) + " |",
             "|---|" + "---:|" * len(methods)]
    group = None
    for row in table["rows"]:
        if row["group"] != group:
            group = row["group"]
            lines.append(f"| *{GROUP_LABELS[group]}* |" + " |" * len(methods))
        arrow = "↑" if row["higher_is_better"] else "↓"
        cells = [_cell(row["values"][m], row["decimals"], m in row["best"]) for m in methods]
        lines.append(f"| {row['label']} {arrow} | " + " | ".join(cells) + " |")
    avg = table["average"]
    if avg["metrics"]:
        cells = [_cell(avg["values"][m], 2, m in avg["best"]) for m in methods]
        lines.append(f"| **Average** ({len(avg['metrics'])} metrics) ↑ | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
) -> list[str]:
    """Bullet points computed from the numbers: ``compare[0]`` vs ``compare[1]`` per row, forgetting vs Base,
    the Average, and the shift/IFEval correlation over training. Pairs that are not both present are skipped.
    With ``intervals`` (:func:`~selfaug_jax.eval.report_intervals.compute_intervals`), each comparison says whether
    its paired 95% interval excludes 0."""
    out: list[str] = []

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
    for m in ordered_methods(list(evals)):
        pts = [r for r in evals[m] if _is_number(r.get(shift_key)) and _is_number(r.get(ifeval_key))]
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


def resolve_scale(results: Mapping[str, Any], metric: str) -> float:
    """Display scale of ``metric`` (results' metric_info override, else default, else 1)."""
    override = results.get("metric_info", {}).get(metric, {})
    if "scale" in override:
        return float(override["scale"])
    return DEFAULT_METRIC_INFO[metric].scale if metric in DEFAULT_METRIC_INFO else 1.0


def _generation_lines(results: Mapping[str, Any], order: Sequence[str]) -> list[str]:
    """One line per evaluation part: how many answers hit the token budget, per method (from the samples)."""
    samples = results.get("samples") or {}
    parts: dict[str, list[str]] = {}
    for m in order:
        for part, g in ((samples.get(m) or {}).get("generation") or {}).items():
            if isinstance(g, Mapping) and _is_number(g.get("n")) and g.get("n"):
                parts.setdefault(part, []).append(
                    f"{_label(m)} {int(g['hit_cap'])}/{int(g['n'])}")
    if not parts:
        return []
    budgets = {part: next(((samples.get(m) or {}).get("generation", {}).get(part, {}).get("max_new_tokens")
                           for m in order if (samples.get(m) or {}).get("generation", {}).get(part)), None)
               for part in parts}
    out = ["Answers that hit the generation budget (and may be cut), per part: " + "; ".join(
        f"{part} (budget {budgets[part]} tokens): {', '.join(v)}" for part, v in parts.items()) + ".", ""]
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if x is None or isinstance(x, (str, int, bool)):
        return x
    return str(x)


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
) -> str:
    """Write ``summary.json``, ``report.md`` and the PNGs into ``out_dir``; return the markdown table.

    Plots: ``curves.png`` (CE and KL vs step), ``shift_vs_ifeval.png`` (paper Fig. 2 style),
    ``comparison.png`` (bars per metric and method, with interval error bars) and ``tradeoff.png`` (each method at
    (gain on ``tradeoff_downstream``, change on each ``tradeoff_general`` metric) from base, both with paired
    intervals). A plot whose data is absent is skipped and listed under "Skipped" in the report.

    With ``results["items"]``, every metric gets a bootstrap interval (``bootstrap``), and the report adds the
    change from base (downstream gain / forgetting) and method-vs-method paired differences
    (:mod:`selfaug_jax.eval.report_intervals`); ``summary.json`` keeps them under ``intervals``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = build_table(results, reference_methods)
    intervals = None
    if results.get("items"):
        scales = {k: v.scale for k, v in resolve_metric_info(results).items()}
        intervals = compute_intervals(results["items"], table["methods"], scales, bootstrap,
                                      reference=reference_methods[0] if reference_methods else "base")
    notes = findings(results, table, compare, shift_key, ifeval_key, intervals)
    md_table = render_table(table)

    infos = resolve_metric_info(results)
    order = ordered_methods(list(results["methods"]))
    plots = {
        "curves.png": report_plots.plot_curves(results.get("curves") or {}, out / "curves.png", order, _label),
        "shift_vs_ifeval.png": report_plots.plot_shift_vs_ifeval(
            results.get("evals_over_training") or {}, out / "shift_vs_ifeval.png", order,
            shift_key=shift_key, ifeval_key=ifeval_key, ifeval_scale=resolve_scale(results, ifeval_key),
            label=_label),
        "comparison.png": report_plots.plot_comparison(table, out / "comparison.png", _label, intervals),
        "tradeoff.png": report_plots.plot_tradeoff(
            intervals or {}, out / "tradeoff.png", tradeoff_downstream,
            [(k, resolve_metric_info(results)[k].label) for k in tradeoff_general
             if k in resolve_metric_info(results)], order, _label,
            downstream_label=DEFAULT_METRIC_INFO[tradeoff_downstream].label
            if tradeoff_downstream in DEFAULT_METRIC_INFO else tradeoff_downstream),
    }
    summary = {
        "schema_version": SCHEMA_VERSION,
        **{k: v for k, v in results.items() if k != "metric_info"},
        "metric_info": {k: dataclasses.asdict(v) for k, v in infos.items()},
        "table": table,
        "findings": notes,
        "intervals": intervals,
        "plots": [name for name, p in plots.items() if p is not None],
    }
    (out / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2, allow_nan=False) + "\n")
    lines = [f"# {title}", ""]
    config = results.get("config") or {}
    scalars = [f"`{k}={v}`" for k, v in config.items() if not isinstance(v, (Mapping, list))]
    if scalars:
        lines.append("Config: " + ", ".join(scalars) + " (full config in summary.json)")
    if _is_number(results.get("wall_time_s")):
        lines.append(f"Wall time: {float(results['wall_time_s']):.1f} s")
    lines += ["", "## Results", "", md_table, "",
              f"Bold = best among {', '.join(_label(m) for m in order if m not in reference_methods)}; "
              "↑/↓ = higher/lower is better; — = not measured. Accuracies in %, "
              "shift = mean per-token KL (nats).",
              ""]
    lines += _generation_lines(results, order)
    if intervals is not None:
        lines += ["## Uncertainty", ""] + render_interval_tables(intervals, table["rows"], order, _label,
                                                                reference_methods[0] if reference_methods else "base")
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
    return md_table
