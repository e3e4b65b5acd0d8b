"""AdamW with warmup + cosine decay and global-norm clipping (the paper's recipe), via optax.

Paper defaults (Section 4.1 / ``../shared/PAPER.md``): AdamW, cosine schedule, 5% warmup, weight decay 0.1;
LR 5e-4 for LoRA on CRAG, 5e-5 for LoRA on RAG-Instruct, 1e-5 (CRAG) / 5e-6 (RAG-Instruct) for full fine-tuning.
Gradient clipping is not stated in the paper; 1.0 is the Hugging Face Trainer default it most likely used.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer hyper-parameters.

    Attributes:
        learning_rate: peak learning rate.
        weight_decay: decoupled AdamW weight decay, applied to matrices only (not norms/biases, as HF Trainer).
        warmup_ratio: fraction of the total steps of linear warmup from 0.
        schedule: decay after warmup: "cosine" (to ``min_lr_ratio * lr``), "linear" or "constant".
        b1, b2, eps: Adam moments.
        max_grad_norm: global-norm clipping threshold (``None`` or 0 disables).
    """

    learning_rate: float = 5e-4
    weight_decay: float = 0.1
    warmup_ratio: float = 0.05
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose from {SCHEDULES}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")


def make_schedule(config: OptimizerConfig, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """The learning-rate schedule as a function of the (0-based) optimizer step."""
    total_steps = max(int(total_steps), 1)
    warmup = int(round(config.warmup_ratio * total_steps))
    peak, end = config.learning_rate, config.learning_rate * config.min_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    if config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.min_lr_ratio)
    elif config.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    # HF-style warmup: lr = peak * (step + 1) / warmup would skip 0; optax's linear ramp starts at 0 at step 0.
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params) -> object:
    """True for leaves that get weight decay: arrays with ndim >= 2 (kernels, embeddings, LoRA A/B)."""
    return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def make_optimizer(config: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    """``(optimizer, schedule)``: clip-by-global-norm then AdamW with the schedule."""
    schedule = make_schedule(config, total_steps)
    parts = []
    if config.max_grad_norm:
        parts.append(optax.clip_by_global_norm(config.max_grad_norm))
    parts.append(
        optax.adamw(
            schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay, mask=decay_mask
        )
    )
    return optax.chain(*parts), schedule
