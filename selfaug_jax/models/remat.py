"""Rematerialisation (gradient checkpointing) policies of the decoder's layer scan.

The decoder runs its stacked layers as one ``jax.lax.scan`` whose body is wrapped in ``jax.checkpoint`` with the
chosen policy (``DecoderLM._run_layers``). The backward pass of a scan is itself a scan that runs the layers in
reverse, recomputing one layer's forward inside each iteration, so no scheduler can hoist every layer's recompute to
the start of the backward pass (which XLA:CPU did when the layers were an unrolled Python loop, and which the former
``ordered_checkpoint`` prevented). Measured under the scan (SmolLM2-135M ``selfaug`` step, 1 x 2048, fp32): XLA temp
bytes are the same with plain ``jax.checkpoint`` and with the ordered checkpoint (``dots``: 3,531,531,320 vs
3,531,531,248; ``full``: 1,239,081,696 vs 1,239,081,624), so plain ``jax.checkpoint`` is used.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

# Remat policies of the layer-scan body, by name (``None``: no remat, every activation is kept for the backward).
REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}
