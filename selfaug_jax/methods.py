"""The method registry: every training method of the comparison, one declarative entry each.

A method says four things, and nothing else in the project decides them:

* **what trains** -- ``"lora"`` (LoRA adapters on the frozen base) or ``"all"`` (every parameter);
* **what the reference is** -- ``"none"``; ``"base"``: the frozen base model, i.e. the policy graph with its
  adapters multiplied by zero (LoRA methods only: no extra parameter memory, and bit-identical to the policy at
  step 0); ``"copy"``: a frozen copy of all parameters made at step 0 (full fine-tuning);
* **which loss terms** are added to the cross-entropy (their weights are config values, see
  :mod:`selfaug_jax.train.objective`): ``"prompt_kl"`` (SelfAug: KL(p_ref || p_policy) on the prompt positions),
  ``"features"`` (Table 2: a distance between intermediate features on the same positions,
  :mod:`selfaug_jax.feature_loss`), ``"response_kl"`` (the same KL on the response positions, as LLaMA-Factory's
  ASFT), ``"orth"`` (the orthogonal loss, :mod:`selfaug_jax.orth_loss`), and the terms the baselines add;
* **which training-data transform** is applied before tokenisation (``"none"``, or a replay / self-distillation
  transform).

The train step (:mod:`selfaug_jax.train.step`), the train state (:mod:`selfaug_jax.train.state`), config
validation, the trainer, the report and the benchmarks read names and properties from here, so adding a method is
one entry below (plus, for a new loss term, one function in the loss-terms table).

``table`` places the method in the paper's comparison: 1 = a column of Table 1 (the baselines), 2 = a row of
Table 2 (what is aligned), 0 = an extension of this project. Entries are listed in the paper's column order;
:data:`METHODS` keeps it.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

Trains = Literal["lora", "all"]
Reference = Literal["none", "base", "copy"]
DataTransform = Literal["none", "magpie", "sdft"]  # selfaug_jax/data/transforms.py: TRANSFORMS

DATA_TRANSFORMS: tuple[str, ...] = typing.get_args(DataTransform)


@dataclasses.dataclass(frozen=True)
class Method:
    """One training method (see the module docstring).

    Attributes:
        name: the name used in configs, folders and ``summary.json``.
        label: the column title in reports.
        trains: ``"lora"`` or ``"all"``.
        reference: ``"none"``, ``"base"`` (adapters off; LoRA only) or ``"copy"`` (a frozen copy; full FT only).
        terms: loss terms added to the cross-entropy, by name.
        data: the training-data transform, by name (a key of ``selfaug_jax.data.transforms.TRANSFORMS``).
        table: 1 / 2 = the paper's Table 1 / Table 2, 0 = this project's extension.
        summary: one line for ``--help`` and the README.
        options: top-level config sections that only this method (and others listing them) reads, e.g.
            ``("features",)``; a sweep of a key in such a section runs only those methods
            (:mod:`selfaug_jax.experiment.runs`).
    """

    name: str
    label: str
    trains: Trains
    reference: Reference = "none"
    terms: tuple[str, ...] = ()
    data: DataTransform = "none"
    table: int = 1
    summary: str = ""
    options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.reference == "base" and self.trains != "lora":
            raise ValueError(f"method {self.name!r}: reference='base' (adapters off) needs trains='lora'")
        if self.reference == "copy" and self.trains != "all":
            raise ValueError(f"method {self.name!r}: reference='copy' is for trains='all' (LoRA uses 'base')")
        if self.data not in DATA_TRANSFORMS:
            raise ValueError(f"method {self.name!r}: data={self.data!r} is not one of {', '.join(DATA_TRANSFORMS)}")
        if self.needs_reference_terms and self.reference == "none":
            raise ValueError(f"method {self.name!r}: terms {self.terms} need a reference model")

    @property
    def uses_lora(self) -> bool:
        return self.trains == "lora"

    @property
    def uses_reference(self) -> bool:
        return self.reference != "none"

    @property
    def needs_reference_terms(self) -> bool:
        return any(t in REFERENCE_TERMS for t in self.terms)


# Loss terms that compare the policy with the reference model (the others, e.g. a weight penalty, do not).
REFERENCE_TERMS = frozenset({"prompt_kl", "response_kl", "features"})

_ENTRIES: tuple[Method, ...] = (
    Method("sft", "SFT", trains="all", summary="full fine-tuning, cross-entropy only"),
    Method("lora", "LoRA", trains="lora", summary="LoRA adapters, cross-entropy only"),
    Method("lora-magpie", "LoRA + MAGPIE", trains="lora", data="magpie", table=1, options=("magpie",),
           summary="LoRA on the task data mixed 1:9 with self-synthesized general instructions (Magpie replay)"),
    Method("lora-sdft", "LoRA + SDFT", trains="lora", data="sdft", table=1, options=("sdft",),
           summary="LoRA on the task data with each answer rewritten by the base model (self-distillation)"),
    Method("lora-orth", "LoRA + Orth.", trains="lora", terms=("orth",), table=1, options=("orth",),
           summary="LoRA + lambda1 * sum |V_k^T A| (A orthogonal to the base weight's top-k input directions; "
                   "this project's reading of the paper's orthogonal loss)"),
    Method("selfaug", "SelfAug", trains="lora", reference="base", terms=("prompt_kl",),
           summary="LoRA + KL(p_base || p_policy) on the prompt tokens (the paper's method)"),
    Method("selfaug-features", "SelfAug (features)", trains="lora", reference="base", terms=("features",), table=2,
           options=("features",),
           summary="LoRA + distance of intermediate features (features.site) to the base's on the prompt tokens "
                   "(Table 2)"),
    Method("sft-selfaug", "SFT + SelfAug", trains="all", reference="copy", terms=("prompt_kl",), table=0,
           summary="full fine-tuning + the prompt-token KL to a frozen copy (the paper claims, never tests, this)"),
    Method("lora-response-kl", "LoRA + response KL", trains="lora", reference="base", terms=("response_kl",),
           table=0, summary="LoRA + KL(p_base || p_policy) on the response tokens (ASFT's positions): the contrast "
                            "to SelfAug's prompt-token choice"),
)

METHODS: dict[str, Method] = {m.name: m for m in _ENTRIES}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def get_method(name: str) -> Method:
    """The registry entry of ``name``; an unknown name raises ``ValueError`` listing the choices."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}") from None


def paper_order(names: list[str] | tuple[str, ...]) -> list[str]:
    """``names`` in the registry's (the paper's) order; names not in the registry keep their order at the end."""
    index = {n: i for i, n in enumerate(METHOD_NAMES)}
    return sorted(names, key=lambda n: index.get(n, len(index)))
