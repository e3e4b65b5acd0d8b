"""Test helper: walk a jaxpr (nested jit / scan / cond / custom-VJP bodies included) for its matmuls."""

from __future__ import annotations

from typing import Any, Iterator


def dot_eqns(jaxpr) -> Iterator[Any]:
    """Every ``dot_general`` equation of a (closed) jaxpr, nested jaxprs (jit, scan bodies, ...) included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    yield from dot_eqns(sub)


def dot_output_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Output shapes of every ``dot_general`` in a (closed) jaxpr, nested jaxprs included."""
    return [tuple(eqn.outvars[0].aval.shape) for eqn in dot_eqns(jaxpr)]


def dot_operand_dtypes(jaxpr) -> list[tuple[str, str, str]]:
    """``(lhs, rhs, result)`` dtype names of every ``dot_general`` in a (closed) jaxpr, nested jaxprs included."""
    return [(str(eqn.invars[0].aval.dtype), str(eqn.invars[1].aval.dtype), str(eqn.outvars[0].aval.dtype))
            for eqn in dot_eqns(jaxpr)]
