"""The report's columns: which runs, in which order, under which title, in which of the paper's tables.

Everything comes from the method registry (:mod:`selfaug_jax.methods`) and the run names
(:mod:`selfaug_jax.run_names`), so a method added to the registry, a sweep value or an adapter scale shows up
without edits here:

* **order** -- ``base`` first, then the registry's order (the paper's column order: Base | SFT | LoRA | +MAGPIE |
  +SDFT | +Orth | +SelfAug, then extensions); each method's sweep / scaled runs follow it in the order given; names
  the registry does not know come last, in the order given;
* **label** -- the registry's ``label`` plus the run's variant: ``SelfAug [alpha=0.1]``, ``LoRA @0.5``;
* **block** -- ``"table1"`` for ``base`` and the plain runs of ``table == 1`` methods; ``"table2"`` for the runs of
  ``table == 2`` methods (Table 2's feature ablation; their adapter-scale runs are extras); ``"extra"`` for
  extensions (``table == 0``), every sweep or adapter-scale variant and unknown names.

Every function takes an optional ``registry`` (``{name: Method}``; default :data:`selfaug_jax.methods.METHODS`, read
at call time), so reports of other method sets (and tests with stand-in registries) work the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from selfaug_jax.methods import METHODS, Method
from selfaug_jax.run_names import split_run_name

__all__ = ["METHOD_ORDER", "METHOD_LABELS", "ordered_methods", "method_label", "column_block"]

Registry = Mapping[str, Method]

METHOD_ORDER = ("base",) + tuple(METHODS)
"""The registry's column order with ``base`` first (a snapshot at import; the functions read the registry live)."""
METHOD_LABELS = {"base": "Base", **{name: m.label for name, m in METHODS.items()}}


def _registry(registry: Registry | None) -> Registry:
    return METHODS if registry is None else registry


def ordered_methods(methods: Sequence[str], registry: Registry | None = None) -> list[str]:
    """``methods`` (run names) in report order (module docstring)."""
    order = {name: i for i, name in enumerate(("base",) + tuple(_registry(registry)))}
    given = {name: i for i, name in enumerate(methods)}

    def key(name: str) -> tuple[int, int, int]:
        method, variant = split_run_name(name)
        if method not in order:
            return len(order), given[name], 0
        return order[method], bool(variant), given[name]

    return sorted(methods, key=key)


def method_label(name: str, registry: Registry | None = None) -> str:
    """Column title of a run: the registry's label, then the variant (``SelfAug [alpha=0.1] @0.5``)."""
    reg = _registry(registry)
    method, variant = split_run_name(name)
    if method == "base":
        title = "Base"
    elif method in reg:
        title = reg[method].label
    else:
        return name
    if not variant:
        return title
    sweep, _, scale = variant.partition("@")
    return " ".join([title] + ([sweep] if sweep else []) + ([f"@{scale}"] if scale else []))


def column_block(name: str, registry: Registry | None = None) -> str:
    """``"table1"``, ``"table2"`` or ``"extra"`` (module docstring)."""
    reg = _registry(registry)
    method, variant = split_run_name(name)
    if method == "base":
        return "table1"
    if method not in reg:
        return "extra"
    if reg[method].table == 2:
        return "extra" if "@" in variant else "table2"
    return "table1" if reg[method].table == 1 and not variant else "extra"
