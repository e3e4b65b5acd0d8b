"""Names of the runs of one experiment: a method, a sweep value of it, an adapter scale of it.

One name per column of the report and per key of ``summary.json``'s ``methods``:

* ``lora``                  -- a method of the registry, as configured;
* ``selfaug[alpha=0.1]``    -- one point of a sweep (``--sweep loss.alpha=...``): the method, then the swept keys'
  *short* names (the last dotted component, or the full key where two swept keys share it, e.g. ``loss.alpha`` and
  ``lora.alpha``) with their values, in sweep order; several keys are joined by ``,``;
* ``lora@0.5``              -- a trained LoRA run evaluated with its adapter merged at scale 0.5 (WiSE-FT,
  ``eval.adapter_scales``); a sweep run can carry one too: ``selfaug[alpha=0.1]@0.5``.

The full dotted keys of a run stay in ``summary.json`` (``runs``); the folder of a run is :func:`dir_name` of its
name (only ``[A-Za-z0-9._=+-]``). :func:`split_run_name` recovers the method, so the report can order and label
columns by the registry without being told about sweeps.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["format_value", "short_keys", "run_name", "scaled_name", "split_run_name", "dir_name"]


def format_value(value: Any) -> str:
    """A value as it appears in a run name: ``0.1``, ``1e-05``, ``true``, ``null``, ``q_proj+v_proj``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return "+".join(format_value(v) for v in value)
    return str(value)


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """``{dotted key: short name}``: the last component, or the whole key where two keys share a last component."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def run_name(method: str, point: Mapping[str, Any], short: Mapping[str, str] | None = None) -> str:
    """``method`` alone, or ``method[k=v,...]`` for a sweep point (``point`` = {dotted key: value}, in order)."""
    if not point:
        return method
    short = short if short is not None else short_keys(list(point))
    return f"{method}[" + ",".join(f"{short[k]}={format_value(v)}" for k, v in point.items()) + "]"


def scaled_name(run: str, scale: float) -> str:
    """The column of ``run`` evaluated with its adapter merged at ``scale``: ``lora@0.5``."""
    return f"{run}@{scale:g}"


def split_run_name(name: str) -> tuple[str, str]:
    """``(method, variant)``: ``"selfaug[alpha=0.1]@0.5"`` -> ``("selfaug", "[alpha=0.1]@0.5")``."""
    cut = min((i for i in (name.find("["), name.find("@")) if i > 0), default=len(name))
    return name[:cut], name[cut:]


def dir_name(name: str) -> str:
    """A filesystem- and shell-safe folder name of a run (idempotent):
    ``selfaug[alpha=0.1,rank=8]`` -> ``selfaug_alpha=0.1_rank=8``."""
    text = name.replace("[", "_").replace("]", "").replace(",", "_").replace("@", "_at")
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", text)
