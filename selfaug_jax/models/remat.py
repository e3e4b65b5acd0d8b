"""Rematerialisation (gradient checkpointing) policies of the decoder's layer scan.

The decoder runs its stacked layers as one ``jax.lax.scan`` whose body is wrapped in ``jax.checkpoint`` with the
chosen policy (``DecoderLM._run_layers``). The backward pass of a scan is itself a scan that runs the layers in
reverse, recomputing one layer's forward inside each iteration, so no scheduler can hoist every layer's recompute to
the start of the backward pass (which XLA:CPU did when the layers were an unrolled Python loop, and which the former
``ordered_checkpoint`` prevented). Measured under the scan (SmolLM2-135M ``selfaug`` step, 1 x 2048, fp32): XLA temp
bytes are the same with plain ``jax.checkpoint`` and with the ordered checkpoint (``dots``: 3,531,531,320 vs
3,531,531,248; ``full``: 1,239,081,696 vs 1,239,081,624), so plain ``jax.checkpoint`` is used.

The policies save by name (:func:`jax.ad_checkpoint.checkpoint_name`), not by primitive: the bfloat16 matmuls of
``models/matmul.py`` are custom-VJP calls that ``jax.checkpoint``'s dot policies cannot see, and a name means the
same value in every dtype.

* ``dots`` keeps each projection's base matmul result (:data:`PROJECTION_NAME`: ``x @ W`` of ``decoder.Linear``,
  float32). It used to keep every dot without batch dimensions (``dots_with_no_batch_dims_saveable``), which with
  LoRA also kept the adapter's ``x @ A`` and ``(x @ A) @ B``: a second ``[tokens, out]`` float32 tensor per
  projection. The backward now recomputes the adapter branch instead (rank ``r``: ``r (in + out)`` against the
  projection's ``in out`` multiply-adds, 4.6% of the layer's on SmolLM2 at ``r = 16``), and the SmolLM2 ``selfaug``
  step's XLA temp bytes fell by a third (bench/README.md "Session 14"). Why the base result and not ``Linear``'s
  output (bias and LoRA update added, as many bytes): with the output saved, XLA fused the policy's primal forward
  differently from the reference's, and the step-0 feature-alignment term (``tests/test_feature_loss.py``) was
  ~1e-21 instead of exactly 0.
* No policy keeps the LoRA dropout keep masks: they are a cheap hash of each element's position
  (``models/lora_matmul.py``), which the backward recomputes inside the fusions that read them, on the same bits.
  Sessions 17-18 saved them (one bool per element) because their Threefry draws were costly to repeat; the hash
  made both the saving and the stacked bool residuals unnecessary (bench/README.md "Session 19").
* ``dots_saveable`` also keeps the attention einsums' outputs (:data:`ATTENTION_MATMUL_NAME`: scores and the
  probability-weighted values, ``O(T^2)`` per layer).
* ``dots_and_acts`` keeps, besides the projections, the layer's cheap-to-store elementwise results that feed a
  matmul (the two RMSNorm outputs, RoPE'd queries and keys, the attention output and the SwiGLU product, named in
  ``models/decoder.py``): ``O(T)`` per layer, no ``T^2`` term, so the backward recomputes only the attention scores
  and softmax. It trades memory for the elementwise recompute that ``dots`` repeats in every backward iteration
  (bench/README.md, session 10).
"""

from __future__ import annotations

from typing import Any, Callable

import jax

# The base matmul of every projection (decoder.Linear): x @ W, float32.
PROJECTION_NAME = "projection"
# Outputs of the attention einsums (attention._attention_block): scores and probs @ v, float32.
ATTENTION_MATMUL_NAME = "attention_matmul"
# Names of the layer's saved-by-name activations (``checkpoint_name`` in models/decoder.py), for ``dots_and_acts``.
ACTIVATION_NAMES: tuple[str, ...] = ("attn_norm", "q_rope", "k_rope", "attn_out", "mlp_norm", "mlp_act")

_save_names = jax.checkpoint_policies.save_only_these_names

# Remat policies of the layer-scan body, by name (``None``: no remat, every activation is kept for the backward).
REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": _save_names(PROJECTION_NAME),
    "dots_saveable": _save_names(PROJECTION_NAME, ATTENTION_MATMUL_NAME),
    "dots_and_acts": _save_names(*ACTIVATION_NAMES, PROJECTION_NAME),
}
