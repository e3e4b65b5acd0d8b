"""The training runs of one experiment: ``train.methods`` x ``train.sweep`` points, with per-method overrides.

Two config keys shape the runs (both checked here, before any work, with one error line naming the key):

``train.sweep: {dotted key: [values]}``  (``python experiments/run.py --sweep loss.alpha=0.1,0.3,0.5,1.0``)
    Several keys form their **product** (every combination; the order of the keys is the order of the name parts).
    Each point is applied like a dotted override and each run gets its own column, e.g. ``selfaug[alpha=0.1]``
    (:mod:`selfaug_jax.run_names`). The base model is evaluated once.

``train.method_overrides: {method: {dotted key: value}}``
    Config values for one method only, e.g. the paper's SFT learning rate:
    ``{sft: {optimizer.learning_rate: 1.0e-5}}`` (nested mappings ``{optimizer: {learning_rate: ...}}`` work too).
    They apply on top of the sweep point: a method that overrides a swept key does not follow the sweep.

**Which keys may vary per run.** Everything that only training reads: ``train.*`` (but not ``train.methods``,
``train.sweep``, ``train.method_overrides``), ``lora.*``, ``optimizer.*``, ``loss.*`` and the method-option sections
that other methods add (e.g. ``features.*``). The sections that the runs share -- ``model``, ``data`` (tokenised
once), ``eval`` (the base model is evaluated once), ``mesh`` and ``output`` -- are refused (:data:`SHARED_SECTIONS`).

**Which methods a swept key applies to** -- this project's rule, deliberately simple: every configured method runs
once per value, *except* a method that provably never reads the key, which runs once under its plain name (no
identical trainings):

* ``lora.*`` is read only by LoRA methods (``Method.trains == "lora"``);
* the logit-alignment options of ``loss`` (:data:`LOGIT_TERM_KEYS`: alpha, direction, beta, temperature, align,
  include_padding) are read only by methods with a logit term (``selfaug``, ``sft-selfaug``);
* a key of a method-option section (a section that some registry entry lists in ``Method.options``, e.g.
  ``features.*`` for ``selfaug-features``) is read only by the methods that list it;
* a key that the method overrides in ``train.method_overrides``.

Any other key is assumed read by every method. A sweep whose keys no configured method reads is an error. With two
keys, a method that reads only one of them runs once per distinct value of that one.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from typing import Any

from selfaug_jax import run_names
from selfaug_jax.experiment.config import ConfigError, ExperimentConfig, _build
from selfaug_jax.methods import METHOD_NAMES, METHODS, Method, get_method
from selfaug_jax.train.objective import LOGIT_TERMS

__all__ = ["SHARED_SECTIONS", "LOGIT_TERM_KEYS", "RunSpec", "flatten_keys", "method_reads", "plan_runs",
           "run_config"]

SHARED_SECTIONS = ("model", "data", "eval", "mesh", "output", "preset")
"""Top-level sections that every run shares; a sweep or method override may not change them."""
_SHARED_KEYS = ("train.methods", "train.sweep", "train.method_overrides")

LOGIT_TERM_KEYS = ("alpha", "direction", "beta", "temperature", "align", "include_padding")
"""``loss.*`` fields that only the fused logit-alignment term reads (``SelfAugLossConfig``; the CE-only path reads
``chunk_size``, ``grad_mode`` and ``skip_unweighted`` too, so those are swept for every method)."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run.

    Attributes:
        name: results key and report column (``selfaug[alpha=0.1]``).
        method: the registry name.
        dir_name: its folder under ``output.dir`` (:func:`selfaug_jax.run_names.dir_name`).
        sweep: the swept keys' values of this run, full dotted keys (empty when not swept).
        overrides: every dotted key this run sets on top of the experiment config (sweep point + method overrides).
    """

    name: str
    method: str
    dir_name: str
    sweep: dict[str, Any]
    overrides: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "dir": self.dir_name, "sweep": dict(self.sweep),
                "overrides": dict(self.overrides)}


def flatten_keys(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optimizer": {"learning_rate": 1e-5}}`` and ``{"optimizer.learning_rate": 1e-5}`` -> the latter."""
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_keys(v, key + "."))
        else:
            out[key] = v
    return out


def _check_key(key: str, where: str) -> None:
    if "." not in key:
        raise ConfigError(f"{where}: {key!r} is not a dotted config key (section.key)")
    if key.split(".", 1)[0] in SHARED_SECTIONS or key in _SHARED_KEYS:
        raise ConfigError(f"{where}: {key} cannot vary between runs (every run shares model, data, eval, mesh, "
                          f"output and the method list); vary only training keys: train, lora, optimizer, loss, ...")


def method_reads(method: Method, key: str, overridden: Mapping[str, Any] = {}) -> bool:
    """Whether ``method``'s training can read ``key`` (the module docstring's rule)."""
    if key in overridden:
        return False
    section, _, field = key.partition(".")
    if section == "lora":
        return method.uses_lora
    if any(section in m.options for m in METHODS.values()):
        return section in method.options
    if section == "loss" and field in LOGIT_TERM_KEYS:
        return any(t in LOGIT_TERMS for t in method.terms)
    return True


def _with_overrides(cfg: ExperimentConfig, overrides: Mapping[str, Any], where: str) -> ExperimentConfig:
    """``cfg`` with dotted ``overrides`` applied and checked like every other key (one error line on failure)."""
    values = cfg.to_dict()
    values["train"]["sweep"] = {}
    values["train"]["method_overrides"] = {}
    for key, value in overrides.items():
        node = values
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: {key}: {part!r} is not a section")
        node[parts[-1]] = value
    try:
        return _build(ExperimentConfig, values, "").validate(check_paths=False)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _sweep_points(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    sweep = flatten_keys(cfg.train.sweep)
    for key, values in sweep.items():
        where = f"train.sweep.{key}"
        _check_key(key, "train.sweep")
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"{where}: expected a non-empty list of values, got {values!r}")
        shown = [run_names.format_value(v) for v in values]
        dupes = sorted({s for s in shown if shown.count(s) > 1})
        if dupes:
            raise ConfigError(f"{where}: value(s) {', '.join(dupes)} given twice (identical runs)")
    keys = list(sweep)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(sweep[k] for k in keys))] if keys else [{}]


def plan_runs(cfg: ExperimentConfig) -> list[RunSpec]:
    """The runs of ``cfg`` in order (methods in ``train.methods`` order, then sweep points in product order); every
    run's config is built and validated here, so a bad sweep value or override fails before any work."""
    overrides = {}
    for method, mapping in cfg.train.method_overrides.items():
        where = f"train.method_overrides.{method}"
        if method not in METHOD_NAMES:
            raise ConfigError(f"train.method_overrides: unknown method {method!r}; choose from "
                              f"{', '.join(METHOD_NAMES)}")
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"{where}: expected a mapping of dotted keys to values, got {mapping!r}")
        flat = flatten_keys(mapping)
        for key in flat:
            _check_key(key, where)
        if method not in cfg.train.methods:
            _with_overrides(cfg, flat, where)  # checked even when this experiment does not run the method
        overrides[method] = flat
    points = _sweep_points(cfg)
    short = run_names.short_keys(list(points[0]))
    if points[0] and not any(method_reads(get_method(m), k, overrides.get(m, {}))
                             for m in cfg.train.methods for k in points[0]):
        raise ConfigError(f"train.sweep: none of the methods {', '.join(cfg.train.methods)} reads "
                          f"{', '.join(points[0])} (lora.* is read by LoRA methods only, loss."
                          f"{'/'.join(LOGIT_TERM_KEYS)} by methods with a logit term only, a Method.options "
                          f"section by the methods that list it)")
    runs: list[RunSpec] = []
    for method in cfg.train.methods:
        own = overrides.get(method, {})
        seen: set[str] = set()
        for point in points:
            mine = {k: v for k, v in point.items() if method_reads(get_method(method), k, own)}
            name = run_names.run_name(method, mine, short)
            if name in seen:
                continue
            seen.add(name)
            spec = RunSpec(name, method, run_names.dir_name(name), mine, {**mine, **own})
            where = f"train.sweep point {name}" if mine else f"train.method_overrides.{method}"
            if spec.overrides:
                _with_overrides(cfg, spec.overrides, where)
            runs.append(spec)
    dirs = [r.dir_name for r in runs]
    clash = sorted({d for d in dirs if dirs.count(d) > 1})
    if clash:
        raise ConfigError(f"train.sweep: runs share the folder name(s) {', '.join(clash)}; use distinct values")
    return runs


def run_config(cfg: ExperimentConfig, spec: RunSpec) -> ExperimentConfig:
    """The config one run trains with: ``cfg`` plus the run's overrides (sweep and method overrides cleared)."""
    return _with_overrides(cfg, spec.overrides, spec.name)


def parse_sweep_arg(text: str) -> tuple[str, list[Any]]:
    """``"loss.alpha=0.1,0.3"`` -> ``("loss.alpha", [0.1, 0.3])``: each value YAML-parsed like a dotted override;
    commas inside ``[...]`` / ``{...}`` belong to the value (``lora.target_modules=[q_proj,v_proj],[o_proj]``)."""
    import yaml

    key, sep, rest = text.partition("=")
    key = key.strip()
    if not sep or "." not in key or not rest.strip():
        raise ConfigError(f"--sweep {text!r}: expected section.key=value1,value2,...")
    parts, depth, current = [], 0, ""
    for ch in rest:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    if any(not p.strip() for p in parts):
        raise ConfigError(f"--sweep {text!r}: empty value in the list")
    try:
        return key, [yaml.safe_load(p) for p in parts]
    except yaml.YAMLError as e:
        raise ConfigError(f"--sweep {text!r}: invalid value ({getattr(e, 'problem', e)})") from None


def sweep_override(args: list[str]) -> str:
    """The ``train.sweep=...`` override of several ``--sweep`` arguments (their product; a key given twice is an
    error). It replaces a preset's ``train.sweep``."""
    import json

    sweep: dict[str, list[Any]] = {}
    for text in args:
        key, values = parse_sweep_arg(text)
        if key in sweep:
            raise ConfigError(f"--sweep {key} given twice; give all its values in one flag: {key}=v1,v2,...")
        sweep[key] = values
    return "train.sweep=" + json.dumps(sweep)
