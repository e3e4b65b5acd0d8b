"""The training-data transforms, by name: the one table a method's ``data`` field (selfaug_jax/methods.py) is
looked up in.

* ``"none"`` -- the task examples as they are;
* ``"magpie"`` -- the task examples plus self-synthesized general instruction replay, 1:9 (:mod:`.magpie`);
* ``"sdft"`` -- each answer rewritten by the base model when the rewrite passes SDFT's checks (:mod:`.sdft`).

A transform runs on the raw examples before tokenisation, with the base model (:class:`TransformContext`);
methods that name the same transform share its output (the experiment runner computes each name once).
"""

from __future__ import annotations

from collections.abc import Callable

from selfaug_jax.data.magpie import MagpieConfig, magpie_transform
from selfaug_jax.data.schema import RagExample
from selfaug_jax.data.sdft import SDFTConfig, sdft_transform
from selfaug_jax.data.transform_context import TransformContext, TransformResult, examples_fingerprint

__all__ = ["TRANSFORMS", "TRANSFORM_NAMES", "MagpieConfig", "SDFTConfig", "TransformContext", "TransformResult",
           "apply_transform"]

Transform = Callable[[list[RagExample], TransformContext], TransformResult]


def _identity(examples: list[RagExample], ctx: TransformContext) -> TransformResult:
    return TransformResult(list(examples), examples_fingerprint(list(examples)), {})


TRANSFORMS: dict[str, Transform] = {"none": _identity, "magpie": magpie_transform, "sdft": sdft_transform}
TRANSFORM_NAMES: tuple[str, ...] = tuple(TRANSFORMS)


def apply_transform(name: str, examples: list[RagExample], ctx: TransformContext) -> TransformResult:
    """``TRANSFORMS[name](examples, ctx)``; an unknown name raises ``ValueError`` listing the choices."""
    try:
        fn = TRANSFORMS[name]
    except KeyError:
        raise ValueError(f"unknown data transform {name!r}; choose from {', '.join(TRANSFORM_NAMES)}") from None
    return fn(list(examples), ctx)
