"""lm-evaluation-harness tasks inside ``experiments/run.py``'s report (``eval.lm_eval_tasks``).

For the base model and every trained method (adapters merged, the model the rest of the suite evaluates),
:func:`run_lm_eval_tasks` runs the named tasks through lm-eval's ``simple_evaluate`` with the ``selfaug-jax``
backend wrapped around the in-memory model (nothing is exported or reloaded). The runner stores the numbers under
``summary.json``'s ``lm_eval`` key (``{method: {task: {metric: value}}}``) and :func:`lm_eval_markdown` renders
the table appended to ``report.md``. lm-eval is imported only when tasks are named.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["lm_eval_markdown", "run_lm_eval_tasks"]

logger = logging.getLogger(__name__)


def run_lm_eval_tasks(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    include_path: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    include_defaults: bool = True,
) -> dict[str, Any]:
    """``{task: {metric: value}, "_wall_s": seconds}`` of lm-eval's ``tasks`` on ``model`` (stderr values dropped;
    ``sample_len`` is the number of documents evaluated).

    Args:
        include_path: a directory of extra task YAMLs (lm-eval's ``--include_path``).
        limit: documents per task (lm-eval's ``--limit``; None = all).
        batch_size: rows per compiled batch of the backend.
        include_defaults: also index lm-eval's own tasks (False: only ``include_path``; much faster to start).
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    from selfaug_jax.eval.lm_eval_backend import SelfAugJaxLM

    t0 = time.perf_counter()
    lm = SelfAugJaxLM.from_model(model, tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, log_samples=False,
                                  task_manager=TaskManager(include_path=include_path,
                                                            include_defaults=include_defaults))
    results: dict[str, Any] = {}
    for task, metrics in (out or {}).get("results", {}).items():
        results[task] = {name.removesuffix(",none"): float(v) for name, v in metrics.items()
                         if "stderr" not in name and isinstance(v, (int, float)) and not isinstance(v, bool)
                         and math.isfinite(float(v))}
    results["_wall_s"] = round(time.perf_counter() - t0, 1)
    logger.info("lm-eval %s: %s", ", ".join(tasks), results)
    return results


def lm_eval_markdown(per_method: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown section: one row per (task, metric), one column per method."""
    methods = list(per_method)
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for method, tasks in per_method.items():
        for task, metrics in tasks.items():
            if task.startswith("_"):
                continue
            for metric, value in metrics.items():
                if metric == "sample_len":  # documents evaluated, not a metric (kept in summary.json)
                    continue
                rows.setdefault((task, metric), {})[method] = value
    lines = ["## lm-evaluation-harness", "",
             "| Task | Metric | " + " | ".join(methods) + " |",
             "|---|---|" + "---:|" * len(methods)]
    for (task, metric), values in rows.items():
        cells = [f"{values[m]:.4f}" if m in values else "—" for m in methods]
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    walls = [f"{m} {per_method[m].get('_wall_s', float('nan')):.0f} s" for m in methods]
    lines += ["", "Wall time per model: " + ", ".join(walls) + "."]
    return "\n".join(lines) + "\n"
