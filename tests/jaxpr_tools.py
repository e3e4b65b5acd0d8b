"""Test helper: walk a jaxpr (nested jit / scan / cond / custom-VJP bodies included) for its matmuls."""

from __future__ import annotations


def dot_output_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Output shapes of every ``dot_general`` in a (closed) jaxpr, nested jaxprs (jit, scan bodies, ...) included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(tuple(eqn.outvars[0].aval.shape))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    shapes.extend(dot_output_shapes(sub))
    return shapes
