"""The report's results schema and metric display settings (see :mod:`selfaug_jax.eval.report` for the schema).

:class:`MetricInfo` says how one metric is shown (label, direction, group, scale, whether it enters the Average);
:data:`DEFAULT_METRIC_INFO` holds the project's metrics; :func:`validate_results` checks a results mapping and names
the offending field; :func:`jsonable` makes ``summary.json`` strict JSON (NaN -> null).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["SCHEMA_VERSION", "GROUP_ORDER", "GROUP_LABELS", "MetricInfo", "DEFAULT_METRIC_INFO", "is_number",
           "validate_results", "resolve_metric_info", "resolve_scale", "jsonable"]

SCHEMA_VERSION = 1
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


def is_number(x: Any) -> bool:
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
            if v is not None and not is_number(v):
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
                if not isinstance(rec, Mapping) or not is_number(rec.get("step", rec.get("epoch"))):
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
    runs = results.get("runs", {})
    if not isinstance(runs, Mapping) or not all(isinstance(v, Mapping) for v in runs.values()):
        raise ValueError(f"{_path('runs')}: expected a mapping run -> {{method, sweep, ...}}")
    if "wall_time_s" in results and results["wall_time_s"] is not None and not is_number(results["wall_time_s"]):
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



def resolve_scale(results: Mapping[str, Any], metric: str) -> float:
    """Display scale of ``metric`` (results' metric_info override, else default, else 1)."""
    override = results.get("metric_info", {}).get(metric, {})
    if "scale" in override:
        return float(override["scale"])
    return DEFAULT_METRIC_INFO[metric].scale if metric in DEFAULT_METRIC_INFO else 1.0


def jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if x is None or isinstance(x, (str, int, bool)):
        return x
    return str(x)
