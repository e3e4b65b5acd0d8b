"""A stand-in train state for checkpoint fault tests (``tests/test_faults.py``), shared by the test and the
subprocess it kills: the checkpointer only needs these four fields and ``replace``. Big enough that writing it takes
a while: 4 x 8M float32 = 128 MB."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass
class State:
    trainable: Any
    opt_state: Any
    step: Any
    rng: Any

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)


def filled_state(value: float) -> State:
    """Every float array filled with ``value``; ``step`` = int(value)."""
    return State({f"w{i}": jnp.full((8 << 20,), value, jnp.float32) for i in range(4)},
                 {"mu": jnp.full((16,), value, jnp.float32)}, jnp.int32(value), jnp.zeros((2,), jnp.uint32))
