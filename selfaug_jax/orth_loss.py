"""The orthogonal-loss baseline (SelfAug's Table 1 "LoRA + Orth."): keep each LoRA ``A`` away from the base weight's
principal input directions.

O-LoRA (Wang et al., EMNLP 2023 Findings; repo cmnfriend/O-LoRA) adds to the task loss

    lambda1 * sum_modules sum |A_old @ A_new^T|  +  lambda2 * sum_params (||A_new||_2 + ||B_new||_2)

(torch ``[r, in]`` A matrices; an absolute-value sum; plain, not squared, Frobenius norms per parameter tensor).
With a single task ``A_old`` is empty and the first term is exactly zero, so SelfAug's "LoRA + Orthogonal loss"
cannot be O-LoRA verbatim, and the paper does not say what it orthogonalised against.

**This project's reading** (an option set, documented in the README): the old task's subspace is the frozen base
weight's own principal subspace (as OPLoRA, arXiv 2510.13003, and CLoRA, arXiv 2410.16801, constrain LoRA against
``W0``). For every adapted projection and every layer

    orth = sum |V_k^T A|            V_k: the top-``top_k`` right-singular vectors of W0 in torch's [out, in] layout
    l2   = sum (||A||_F + ||B||_F)  per layer and module (O-LoRA sums torch.norm(p=2) over its per-layer tensors)
    term = lambda1 * orth + lambda2 * l2

Conventions (``selfaug_jax/models/decoder.py``, ``selfaug_jax/lora.py``): layers are stacked on a leading axis, base
kernels are ``[L, in, out]`` with ``y = x @ W`` (``W = W_torch^T``), ``A`` is ``[L, in, r]`` (``A_torch^T``) and ``B``
``[L, r, out]``. If ``W_torch = U S V^T`` then our ``W = V S U^T``: torch's *right* singular vectors ``V`` (the
input-space directions, ``[in, k]``) are the *left* singular vectors of our ``[in, out]`` kernel. So
``V_k = svd(W[l]).U[:, :k]`` (``[in, k]``) and ``V_k^T A[l]`` is ``[k, r]`` -- in torch terms ``V_k^T A_torch^T``,
the transpose of O-LoRA's ``A_old A_new^T`` with ``A_old = V_k^T``.

``V_k`` is computed once per run, when the train state is built (:func:`orth_constants`, one SVD per layer of each
adapted weight, in float32), and carried in ``TrainState.constants["orth"]``; the step only does the ``[k, in] x
[in, r]`` products. At step 0 ``B = 0``: ``orth`` is nonzero (``A`` is random) and the ``||B||`` part of ``l2`` is 0.
The absolute-value sum depends on the basis chosen inside ``V_k``'s span only through signs (which ``|.|`` removes)
unless singular values are tied.

Like ``loss.py`` this module imports only jax, numpy, flax and the project's model / LoRA modules.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

BASIS_LEAF = "orth_basis"
"""Leaf name of a module's ``[L, in, k]`` basis in ``constants["orth"]`` (``train/sharding.py`` has its rule)."""


@dataclasses.dataclass(frozen=True)
class OrthConfig:
    """Options of the orthogonal loss (the experiment config's ``orth:`` section).

    Attributes:
        lambda1: weight of ``sum |V_k^T A|`` (O-LoRA's scripts: 0.5).
        lambda2: weight of ``sum (||A||_F + ||B||_F)`` (O-LoRA's scripts: 0, 0.1 or 0.3).
        top_k: how many principal input directions of each base weight ``A`` is kept orthogonal to.
    """

    lambda1: float = 0.5
    lambda2: float = 0.0
    top_k: int = 8

    def __post_init__(self) -> None:
        for name in ("lambda1", "lambda2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise ValueError(f"orth.{name} must be a finite number >= 0, got {value!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 1:
            raise ValueError(f"orth.top_k must be a positive int, got {self.top_k!r}")


@functools.partial(jax.jit, static_argnums=1)
def top_input_basis(kernel_lio: jax.Array, k: int) -> jax.Array:
    """``[L, in, k]``: per layer, the top-``k`` left singular vectors of the ``[in, out]`` kernel (float32).

    These are torch's top-``k`` *right* singular vectors of ``W_torch = kernel^T`` (see the module docstring). One
    layer at a time (``lax.map``), so the peak is one layer's thin SVD, not ``L`` of them.
    """

    def one(w_io: jax.Array) -> jax.Array:
        u_im, _, _ = jnp.linalg.svd(w_io.astype(jnp.float32), full_matrices=False)
        return u_im[:, :k]

    return jax.lax.map(one, kernel_lio)


def _adapted_modules(model: Any) -> list[tuple[tuple[str, ...], Any]]:
    from selfaug_jax.lora import ALL_LINEAR_TARGETS, lora_targets

    return [(tuple(str(p) for p in path), lin) for path, lin in lora_targets(model, ALL_LINEAR_TARGETS)
            if lin.lora_a is not None]


def orth_constants(model: Any, spec: Any, config: Any) -> dict[str, Any]:
    """The ``"orth"`` entry of ``TrainState.constants``: ``{layers: {self_attn: {q_proj: {orth_basis: V_k}}}}``.

    ``model`` is the model with its adapters attached; ``config`` the ``StepConfig`` (``None``: defaults). One SVD
    per layer of each adapted kernel, here, never in the step.
    """
    cfg = getattr(config, "orth", None) or OrthConfig()
    if not spec.uses_lora:
        raise ValueError(f"method {spec.name!r}: the 'orth' loss term constrains LoRA adapters; it needs trains='lora'")
    modules = _adapted_modules(model)
    if not modules:
        raise ValueError(f"method {spec.name!r}: the 'orth' loss term found no LoRA adapter in the model")
    tree: dict[str, Any] = {}
    for path, linear in modules:
        smallest = min(linear.in_features, linear.out_features)
        if cfg.top_k > smallest:
            raise ValueError(f"orth.top_k={cfg.top_k} exceeds the rank bound {smallest} of {'/'.join(path)}/kernel "
                             f"[{linear.in_features}, {linear.out_features}]; choose orth.top_k <= {smallest}")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[BASIS_LEAF] = top_input_basis(linear.kernel[...], cfg.top_k)
    return tree


def _iter_bases(tree: dict[str, Any], prefix: tuple[str, ...] = ()):
    """``(module path, basis)`` pairs of a :func:`orth_constants` tree, in sorted (deterministic) order."""
    for key in sorted(tree):
        value = tree[key]
        if key == BASIS_LEAF:
            yield prefix, value
        else:
            yield from _iter_bases(value, prefix + (key,))


def _lookup(state: Any, path: tuple[str, ...]) -> Any:
    node = state
    for part in path:
        node = node[part]
    return node


def _frobenius_per_layer(x_lab: jax.Array) -> jax.Array:
    """``[L]`` Frobenius norms, with gradient 0 (not NaN) at a zero matrix (torch's ``norm`` subgradient)."""
    sq_l = jnp.sum(jnp.square(x_lab.astype(jnp.float32)), axis=(1, 2))
    positive = sq_l > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq_l, 1.0)), 0.0)


def orth_penalty(bases: dict[str, Any], trainable: Any, config: OrthConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(lambda1 * orth + lambda2 * l2, orth, l2)`` of the adapters in ``trainable`` (float32 scalars).

    ``orth = sum |V_k^T A|`` and ``l2 = sum (||A||_F + ||B||_F)`` over every layer of every module in ``bases``
    (see the module docstring). With ``lambda2 = 0`` the ``l2`` value is reported but not differentiated.
    """
    orth = jnp.zeros((), jnp.float32)
    l2 = jnp.zeros((), jnp.float32)
    for path, basis_lik in _iter_bases(bases):
        module = _lookup(trainable, path)
        a_lir, b_lro = module["lora_a"][...], module["lora_b"][...]
        proj_lkr = jnp.einsum("lik,lir->lkr", jax.lax.stop_gradient(basis_lik), a_lir.astype(jnp.float32),
                              precision=jax.lax.Precision.HIGHEST)
        orth = orth + jnp.sum(jnp.abs(proj_lkr))  # O-LoRA: torch.abs(...).sum()
        l2 = l2 + jnp.sum(_frobenius_per_layer(a_lir)) + jnp.sum(_frobenius_per_layer(b_lro))
    if config.lambda2 == 0:
        l2 = jax.lax.stop_gradient(l2)
    return config.lambda1 * orth + config.lambda2 * l2, orth, l2


def orth_term(ctx: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The ``"orth"`` additive loss term (``objective.ADDITIVE_TERMS``): ``(weighted value, {orth, orth_l2})``.

    A per-batch (not per-token) term: each micro-batch adds its share (``ctx.batch_share``), so the accumulated
    step counts it once under both accumulation normalisations, and the metrics ``orth`` / ``orth_l2`` (the
    unweighted sums) accumulate to their full values.
    """
    cfg = ctx.config.orth
    if not ctx.constants or "orth" not in ctx.constants:
        raise ValueError("the 'orth' loss term needs TrainState.constants['orth']; build the state with "
                         "init_train_state (it computes them for methods with the 'orth' term)")
    value, orth, l2 = orth_penalty(ctx.constants["orth"], ctx.trainable, cfg)
    share = ctx.batch_share
    return value * share, {"orth": jax.lax.stop_gradient(orth) * share, "orth_l2": jax.lax.stop_gradient(l2) * share}
