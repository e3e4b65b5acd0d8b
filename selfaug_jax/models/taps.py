"""Per-layer feature taps of the decoder's layer scan (for losses on intermediate features, e.g. Table 2 of SelfAug).

``DecoderLM.hidden_states(..., taps=LayerTaps(sites))`` additionally returns, for every layer, the tensors named by
``sites`` (:data:`TAP_SITES`), stacked by the layer scan into ``[L, b, t, F]`` arrays. With a ``reduce`` function
the scan instead emits ``reduce(this layer's taps, this layer's slice of xs)`` per layer, so a loss can be computed
inside the scan body and only its (small) result leaves the scan -- e.g. a per-layer distance to another model's
taps passed as ``xs`` (``[L, ...]`` arrays, one slice per layer), which keeps the tapped activations out of the
scan's outputs (and their cotangents out of the backward pass).

Without ``taps`` the decoder traces exactly the program it traces without this module (see
``tests/test_feature_loss.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp

# Tap name -> what it is (inside one decoder layer; ``[b, t, F]`` in the compute dtype):
TAP_SITES: dict[str, str] = {
    "q": "q_proj output [b, t, heads * head_dim] (before the q-norm and RoPE)",
    "k": "k_proj output [b, t, kv_heads * head_dim] (before the k-norm and RoPE)",
    "v": "v_proj output [b, t, kv_heads * head_dim]",
    "o": "o_proj output [b, t, D] (the attention block's output, before the residual add)",
    "ffn": "the MLP's output [b, t, D] (down_proj, before the residual add)",
    "residual": "the layer's output [b, t, D] (the residual stream after the layer)",
}

TapDict = dict[str, jnp.ndarray]


@dataclasses.dataclass(frozen=True)
class LayerTaps:
    """A request for per-layer taps (see the module docstring).

    Attributes:
        sites: tap names from :data:`TAP_SITES`.
        reduce: ``reduce(taps, xs_l) -> pytree`` run inside the scan body on one layer's taps (``{site: [b, t,
            F]}``) and that layer's slice of ``xs``; ``None``: the taps themselves leave the scan.
        xs: a pytree of ``[L, ...]`` arrays scanned along with the layers (given to ``reduce``), or ``None``.
    """

    sites: tuple[str, ...]
    reduce: Callable[[TapDict, Any], Any] | None = None
    xs: Any = None

    def __post_init__(self) -> None:
        unknown = [s for s in self.sites if s not in TAP_SITES]
        if unknown or not self.sites:
            raise ValueError(f"LayerTaps.sites: {list(self.sites)} must be a non-empty subset of {list(TAP_SITES)}")

    def emit(self, recorded: TapDict, xs_l: Any) -> Any:
        """What leaves the scan for one layer, from the taps the layer ``recorded``."""
        taps = {s: recorded[s] for s in self.sites}
        return taps if self.reduce is None else self.reduce(taps, xs_l)

