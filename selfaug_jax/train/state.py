"""Training state: a pytree of arrays, plus the static model structure needed to rebuild the models.

How a method splits the model follows its registry entry (:mod:`selfaug_jax.methods`):

| ``trains`` | ``reference`` | trainable     | frozen                      | reference model                  |
|------------|---------------|---------------|-----------------------------|----------------------------------|
| ``lora``   | ``none``      | LoRA adapters | base params                 | none                             |
| ``lora``   | ``base``      | LoRA adapters | base params                 | base params, adapters bypassed   |
| ``all``    | ``none``      | all params    | (empty)                     | none                             |
| ``all``    | ``copy``      | all params    | a frozen copy of the params | the frozen copy                  |

For the LoRA methods the reference costs no extra parameter memory: it is the same frozen arrays merged into the
graph *without* adapters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from selfaug_jax.lora import LoRAConfig, add_lora, split_lora_model
from selfaug_jax.methods import Method, get_method
from selfaug_jax.models.decoder import DecoderLM, LoRAParam
from selfaug_jax.train.objective import term_constants


class TrainState(struct.PyTreeNode):
    """Everything that changes (or is carried) across steps; a pure pytree (checkpointable, shardable).

    Attributes:
        trainable: the parameters being optimised (``nnx.State``).
        frozen: parameters that are not optimised (base for LoRA, the original copy for ``sft-selfaug``).
        opt_state: optax state of ``trainable``.
        step: int32 optimizer step.
        rng: PRNG key (LoRA dropout).
        constants: non-trained arrays that a method's loss terms need, computed once by :func:`init_train_state`
            (``{term name: pytree}``, see ``objective.TERM_CONSTANTS``; e.g. ``"orth"``: the top-k singular basis of
            every adapted base weight). Empty for most methods. Like ``frozen`` they are derived from the base
            weights, so checkpoints do not store them: a restored state keeps its template's (rebuilt) constants.
    """

    trainable: Any
    frozen: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array
    constants: Any = struct.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """Static structure: how to rebuild the policy and the reference models from a :class:`TrainState`."""

    method: str
    policy_graphdef: Any
    reference_graphdef: Any | None

    @property
    def spec(self) -> Method:
        """The method's registry entry."""
        return get_method(self.method)

    def policy(self, trainable, frozen) -> DecoderLM:
        if self.spec.uses_lora:
            return nnx.merge(self.policy_graphdef, trainable, frozen)
        return nnx.merge(self.policy_graphdef, trainable)

    def reference(self, trainable, frozen) -> DecoderLM:
        """The original model, from stop-gradient frozen params.

        For LoRA methods it is the *policy graph* with the adapters multiplied by zero: mathematically the base
        model (the adapter update is exactly +0), and compiled into the same kernels as the policy, so at step 0
        (B = 0) the two forwards are bit-identical and the KL is exactly 0. (The adapter-free base graph can
        differ in the last bits: XLA merges and tiles the policy's extra rank-r matmuls differently.) The cost is
        the rank-r matmuls in the reference forward, a few percent of a step.
        """
        if self.reference_graphdef is None:
            raise ValueError(f"method {self.method!r} has no reference model")
        if self.spec.uses_lora:
            zero_adapters = jax.tree.map(lambda x: jax.lax.stop_gradient(x) * 0, trainable)
            return nnx.merge(self.policy_graphdef, zero_adapters, jax.lax.stop_gradient(frozen))
        return nnx.merge(self.reference_graphdef, jax.lax.stop_gradient(frozen))

    def merged_model(self, state: TrainState) -> DecoderLM:
        """The trained model (with adapters still attached for LoRA methods), on concrete arrays."""
        return self.policy(state.trainable, state.frozen)


def init_train_state(
    model: DecoderLM,
    method: str,
    optimizer: optax.GradientTransformation,
    *,
    lora_config: LoRAConfig | None = None,
    seed: int = 0,
    config: Any = None,
) -> tuple[ModelDef, TrainState]:
    """Split ``model`` for ``method`` and build the initial state. LoRA methods add adapters (in place).

    ``config`` is the step's ``StepConfig`` (``None``: the defaults): the options of loss terms whose constants are
    computed here, once per run (``objective.TERM_CONSTANTS``, e.g. ``orth.top_k``).
    """
    spec = get_method(method)
    if spec.uses_lora:
        has_lora = any(True for _ in nnx.to_flat_state(nnx.state(model, LoRAParam)))
        if not has_lora:
            add_lora(model, lora_config or LoRAConfig(), nnx.Rngs(params=jax.random.fold_in(jax.random.key(seed), 1)))
        policy_gd, base_gd, trainable, frozen = split_lora_model(model)
        model_def = ModelDef(method, policy_gd, base_gd if spec.reference == "base" else None)
    else:
        graphdef, params = nnx.split(model, nnx.Param)
        trainable = params
        copy = spec.reference == "copy"
        frozen = jax.tree.map(jnp.copy, params) if copy else nnx.State({})
        model_def = ModelDef(method, graphdef, graphdef if copy else None)
    state = TrainState(
        trainable=trainable,
        frozen=frozen,
        opt_state=optimizer.init(trainable),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
        constants=term_constants(model, spec, config),
    )
    return model_def, state
