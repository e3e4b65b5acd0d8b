"""The pure SelfAug train step ``(state, batch) -> (state, metrics)`` and its eval twin.

The loss is a function passed in (``loss_fn``, see ``train/objective.py``); the default, ``method_loss``, builds
the method's objective from its registry entry. For SelfAug, inside one jitted step (the anchored-reference
pattern):

    policy     = merge(policy_graphdef, trainable, frozen)             # adapters on
    reference  = merge(reference_graphdef, stop_gradient(frozen))      # the original model, same step
    hidden     = policy.hidden_states(batch)                           # [B, T, D]
    ref_hidden = stop_gradient(reference.hidden_states(batch))         # no residuals kept for backward
    loss       = selfaug_loss_from_hidden(hidden, ref_hidden, head, labels)  # chunked: never [B, T, V]

The reference depends only on stop-gradient values, so reverse-mode AD stores none of its activations; the fused
loss projects onto the vocabulary chunk by chunk. Gradient accumulation runs the micro-batches in a ``lax.scan``
inside the same jitted step.

Batch: a dict of int32 ``[B, T]`` arrays ``input_ids_bt``, ``labels_bt`` (-100 = no target), ``attention_mask_bt``
and optionally ``positions_bt`` and ``segment_ids_bt`` (packing) -- ``selfaug_jax.data.Batch.arrays()``. ``B`` must be divisible by ``grad_accum_steps``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from selfaug_jax import loss as loss_lib
from selfaug_jax.feature_loss import FeatureLossConfig
from selfaug_jax.orth_loss import OrthConfig
from selfaug_jax.train.objective import LossFn, logit_align, method_loss
from selfaug_jax.train.state import ModelDef, TrainState

ACCUM_NORMALIZATIONS = ("mean", "token")
Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static options of the train / eval step.

    Attributes:
        loss: SelfAug loss options (alpha, direction, chunk size, ...), used by the methods with a logit term
            (``prompt_kl``, ``response_kl``); the CE's chunk size and grad mode for every method.
        orth: options of the ``orth`` term (``lora-orth``; ``selfaug_jax/orth_loss.py``).
        grad_accum_steps: micro-batches per optimizer step.
        accum_normalization: "mean" = the released code's (mean over micro-batches of per-micro-batch means);
            "token" = token-weighted (equals one big batch): CE over all targets, KL over all aligned tokens.
        features: options of the ``features`` term (``selfaug-features``; ignored by the other methods).
    """

    loss: loss_lib.SelfAugLossConfig = loss_lib.SelfAugLossConfig()
    orth: OrthConfig = OrthConfig()
    grad_accum_steps: int = 1
    accum_normalization: str = "mean"
    features: FeatureLossConfig = FeatureLossConfig()

    def __post_init__(self) -> None:
        if self.accum_normalization not in ACCUM_NORMALIZATIONS:
            raise ValueError(
                f"unknown accum_normalization {self.accum_normalization!r}; choose from {ACCUM_NORMALIZATIONS}"
            )
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")


def _split_micro(batch: Batch, k: int) -> Batch:
    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum_steps={k}")
        return x.reshape((k, x.shape[0] // k) + x.shape[1:])

    return {name: split(x) for name, x in batch.items()}


def _accumulate(model_def: ModelDef, config: StepConfig, trainable, frozen, batch: Batch, rng, *, with_grad: bool,
                loss_fn: LossFn = method_loss, constants: Any = None):
    """Run the micro-batches; returns (grads or None, metrics) with the configured normalisation.

    "mean": each micro-batch loss is normalised by its own token counts and the k losses are averaged.
    "token": every micro-batch divides its CE / KL sums by the counts of the *whole* batch, so the summed loss
    (and gradient) equals that of one big batch.
    Metrics: ``loss`` plus every ``aux`` entry of the loss; float entries are averaged like the loss, int entries
    (token counts) summed. ``constants`` (``TrainState.constants``) reach ``loss_fn`` as ``constants=`` when
    non-empty.
    """
    k = config.grad_accum_steps
    micro = _split_micro(batch, k)
    token_weighted = config.accum_normalization == "token"
    if token_weighted:
        normalizers = loss_lib.token_counts(
            batch["labels_bt"],
            batch["attention_mask_bt"],
            # the positions of the method's own logit term (prompt or response), not necessarily loss.align
            align=logit_align(model_def.spec, config) or config.loss.align,
            include_padding=config.loss.include_padding,
        )
        scale = 1.0
    else:
        normalizers = None
        scale = 1.0 / k

    extra = {"constants": constants} if constants else {}

    def objective(params, mb, mb_rng):
        total, aux = loss_fn(model_def, config, params, frozen, mb, mb_rng, normalizers, **extra)
        return total * scale if k > 1 else total, aux

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def body(carry, xs):
        grads_acc, sums = carry
        mb, i = xs
        if with_grad:
            (weighted, aux), grads = grad_fn(trainable, mb, jax.random.fold_in(rng, i))
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
        else:
            weighted, aux = objective(trainable, mb, None)
        if k == 1:  # the metrics are the loss's own values bit for bit
            return (grads_acc, dict(aux, loss=weighted)), None
        sums = dict(sums, loss=sums["loss"] + weighted)
        for name, value in aux.items():
            is_count = jnp.issubdtype(value.dtype, jnp.integer)
            sums[name] = sums[name] + (value if is_count else value * scale)
        return (grads_acc, sums), None

    zeros = jax.tree.map(jnp.zeros_like, trainable) if with_grad else None
    xs = (micro, jnp.arange(k, dtype=jnp.int32))
    if k == 1:  # no scan: simpler HLO
        (grads, sums), _ = body((zeros, None), jax.tree.map(lambda x: x[0], xs))
    else:
        # The metric keys and dtypes are the loss's aux (traced once, abstractly, to build the scan carry).
        total_shape, aux_shapes = jax.eval_shape(lambda mb: objective(trainable, mb, None),
                                                 jax.tree.map(lambda x: x[0], micro))
        init_sums = {name: jnp.zeros((), s.dtype) for name, s in aux_shapes.items()}
        init_sums["loss"] = jnp.zeros((), total_shape.dtype)
        (grads, sums), _ = jax.lax.scan(body, (zeros, init_sums), xs)
    sums["n_tokens"] = jnp.sum(batch["attention_mask_bt"].astype(jnp.int32))
    return grads, sums


def train_step_fn(
    model_def: ModelDef,
    optimizer: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array],
    config: StepConfig,
    loss_fn: LossFn = method_loss,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure (un-jitted) train step for ``model_def`` (see :func:`make_train_step`)."""

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.wrap_key_data(state.rng)
        rng, step_rng = jax.random.split(rng)
        grads, metrics = _accumulate(
            model_def, config, state.trainable, state.frozen, batch, step_rng, with_grad=True, loss_fn=loss_fn,
            constants=state.constants,
        )
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        new_state = state.replace(
            trainable=trainable, opt_state=opt_state, step=state.step + 1, rng=jax.random.key_data(rng)
        )
        return new_state, metrics

    return train_step


def make_train_step(
    model_def: ModelDef,
    optimizer: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array],
    config: StepConfig = StepConfig(),
    *,
    loss_fn: LossFn = method_loss,
    state_shardings: Any = None,
    batch_sharding: Any = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """``jax.jit`` of the train step, donating the state; with shardings when given (see ``train/sharding.py``).

    ``loss_fn`` computes one micro-batch's ``(total, aux)`` (:data:`~selfaug_jax.train.objective.LossFn`); the
    default is the method's registry objective."""
    fn = train_step_fn(model_def, optimizer, schedule, config, loss_fn)
    if state_shardings is None:
        return jax.jit(fn, donate_argnums=(0,))
    from selfaug_jax.train.sharding import with_activation_sharding  # hidden-state sharding constraints

    fn = with_activation_sharding(fn, state_shardings)
    return jax.jit(
        fn,
        donate_argnums=(0,),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, None),
    )


def make_eval_step(
    model_def: ModelDef,
    config: StepConfig = StepConfig(),
    *,
    loss_fn: LossFn = method_loss,
    state_shardings: Any = None,
    batch_sharding: Any = None,
) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
    """Jitted ``(state, batch) -> metrics``: the same losses as training, no update, no dropout."""

    def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
        _, metrics = _accumulate(
            model_def, config, state.trainable, state.frozen, batch, jax.random.key(0), with_grad=False,
            loss_fn=loss_fn, constants=state.constants,
        )
        return metrics

    if state_shardings is None:
        return jax.jit(eval_step)
    from selfaug_jax.train.sharding import with_activation_sharding

    eval_step = with_activation_sharding(eval_step, state_shardings)
    return jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding))
