"""Rematerialisation (gradient checkpointing) policies of the decoder's layer scan.

The decoder runs its stacked layers as one ``jax.lax.scan`` whose body is wrapped in ``jax.checkpoint`` with the
chosen policy (``DecoderLM._run_layers``). The backward pass of a scan is itself a scan that runs the layers in
reverse, recomputing one layer's forward inside each iteration, so no scheduler can hoist every layer's recompute to
the start of the backward pass (which XLA:CPU did when the layers were an unrolled Python loop, and which the former
``ordered_checkpoint`` prevented). Measured under the scan (SmolLM2-135M ``selfaug`` step, 1 x 2048, fp32): XLA temp
bytes are the same with plain ``jax.checkpoint`` and with the ordered checkpoint (``dots``: 3,531,531,320 vs
3,531,531,248; ``full``: 1,239,081,696 vs 1,239,081,624), so plain ``jax.checkpoint`` is used.

``dots_and_acts`` keeps, besides the ``dots`` policy's matmul outputs, the layer's cheap-to-store elementwise results
that feed a matmul (the two RMSNorm outputs, RoPE'd queries and keys, the attention output and the SwiGLU product,
named with :func:`jax.ad_checkpoint.checkpoint_name` in ``models/decoder.py``): ``O(T)`` per layer, no ``T^2`` term,
so the backward recomputes only the attention scores and softmax. It trades memory for the elementwise recompute that
the ``dots`` policy repeats in every backward iteration (bench/README.md, session 10).
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from selfaug_jax.models.matmul import BATCHED_MATMUL_NAME, MATMUL_NAME

# Names of the layer's saved-by-name activations (``checkpoint_name`` in models/decoder.py), for ``dots_and_acts``.
ACTIVATION_NAMES: tuple[str, ...] = ("attn_norm", "q_rope", "k_rope", "attn_out", "mlp_norm", "mlp_act")

_policies = jax.checkpoint_policies
_save_names = _policies.save_only_these_names
_either = _policies.save_from_both_policies

# Remat policies of the layer-scan body, by name (``None``: no remat, every activation is kept for the backward).
# The bfloat16 matmuls of models/matmul.py are custom-VJP calls that the dot policies cannot see; their outputs carry
# MATMUL_NAME / BATCHED_MATMUL_NAME, saved wherever the matching dots are.
REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "none": None,
    "full": _policies.nothing_saveable,
    "dots": _either(_policies.dots_with_no_batch_dims_saveable, _save_names(MATMUL_NAME)),
    "dots_saveable": _either(_policies.dots_saveable, _save_names(MATMUL_NAME, BATCHED_MATMUL_NAME)),
    "dots_and_acts": _either(_policies.dots_with_no_batch_dims_saveable, _save_names(*ACTIVATION_NAMES, MATMUL_NAME)),
}
