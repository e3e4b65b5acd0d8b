"""Device mesh, logical axis rules and ``NamedSharding``s of the train state and batches.

The mesh has three axes, ``("data", "fsdp", "tensor")``, all ``AxisType.Auto`` (GSPMD propagates shardings from the
jit in/out shardings and a few ``with_sharding_constraint``s on activations):

* ``data``: pure data parallelism (parameters replicated);
* ``fsdp``: data parallelism *and* the ``embed`` dimension of every weight sharded (ZeRO-3 style);
* ``tensor``: Megatron-style tensor parallelism of heads / MLP / vocabulary.

Parameters get their layout in two table lookups, both below in one place: a parameter path (``layers/mlp/
up_proj/kernel``) matches a regex in :data:`PARAM_RULES` giving *logical* axes (``("embed", "mlp")``), and
:data:`LOGICAL_TO_MESH` maps each logical axis to mesh axes. Decoder-layer parameters (paths under ``layers/``) are
stacked over the layers and get the replicated ``"layers"`` axis in front of their rule's axes. Optimizer states
(optax ``mu`` / ``nu``) mirror the parameter tree, so their paths end with the parameter path and match the same
rules; scalars are replicated. Term constants (``TrainState.constants``, e.g. the ``orth`` term's singular bases)
have their own path rules, placed like the parameters they multiply.

Multi-host: every process builds the same plan; :meth:`ShardingPlan.put_batch` takes this process's rows of the
global batch (see :meth:`ShardingPlan.process_batch_slice`) and assembles the global array.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from selfaug_jax.models import decoder as decoder_lib

logger = logging.getLogger(__name__)

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes (None = replicated).
LOGICAL_TO_MESH: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "layers": None,  # the stacked-layer axis of decoder-layer parameters: each device holds every layer's slice
    "length": None,
    "embed": "fsdp",
    "heads": "tensor",  # q / o projections: heads * head_dim
    "kv_heads": "tensor",  # k / v projections: kv_heads * head_dim
    "mlp": "tensor",
    "vocab": "tensor",
    "norm": None,  # RMSNorm scales (and [D] biases): tiny, replicated
    "rank": None,  # LoRA rank
    "act_embed": None,  # the D dimension of activations (the batch already uses fsdp)
}

# Linear projections: (in, out) logical axes of the kernel. LoRA A is (in, rank), B is (rank, out); a bias is (out,).
_PROJECTIONS: dict[str, tuple[str, str]] = {
    "q_proj": ("embed", "heads"),
    "k_proj": ("embed", "kv_heads"),
    "v_proj": ("embed", "kv_heads"),
    "o_proj": ("heads", "embed"),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
    "lm_head": ("embed", "vocab"),
}


def _bias_axis(out_axis: str) -> str:
    return "norm" if out_axis == "embed" else out_axis  # [D] biases are replicated like norms


# Parameter path regex (searched at the end of a "/"-joined path) -> logical axes, one per dimension.
PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"(^|/)embed_tokens/embedding$", ("vocab", "embed")),
    *[(rf"(^|/){name}/kernel$", axes) for name, axes in _PROJECTIONS.items()],
    *[(rf"(^|/){name}/lora_a$", (axes[0], "rank")) for name, axes in _PROJECTIONS.items()],
    *[(rf"(^|/){name}/lora_b$", ("rank", axes[1])) for name, axes in _PROJECTIONS.items()],
    *[(rf"(^|/){name}/bias$", (_bias_axis(axes[1]),)) for name, axes in _PROJECTIONS.items()],
    # TrainState.constants["orth"]: the [in, k] top singular basis of a kernel, laid out like the LoRA A it
    # multiplies (in-axis sharded as the kernel's, k replicated), so V_k^T A is shard-local plus a [k, r] reduction.
    *[(rf"(^|/){name}/orth_basis$", (axes[0], "rank")) for name, axes in _PROJECTIONS.items()],
    (r"(^|/)(input_layernorm|post_attention_layernorm|norm|q_norm|k_norm)/scale$", ("norm",)),
)

# Parameters under a ``layers/`` module are stacked over the decoder layers (a leading layer axis).
_STACKED_PATTERN = r"(^|/)layers/"

# Activations the decoder constrains (``decoder_lib.constrain_activation`` names) -> logical axes.
ACTIVATION_RULES: dict[str, tuple[str | None, ...]] = {
    "hidden_btd": ("batch", "length", "act_embed"),
}


class ShardingError(ValueError):
    """A mesh that does not fit the devices, or a tensor dimension that does not divide its mesh axis."""


def path_str(path: Sequence[Any]) -> str:
    """``"layers/self_attn/q_proj/kernel"`` from a jax key path (a trailing ``.value`` of nnx Variables dropped)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    if parts and parts[-1] == "value":
        parts.pop()
    return "/".join(parts)


def logical_axes_of(path: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of the array at ``path`` from :data:`PARAM_RULES`; scalars and unmatched leaves are replicated.

    Raises:
        ShardingError: a rule matches but names a different number of dimensions than the array has.
    """
    if ndim == 0:
        return ()
    for pattern, axes in PARAM_RULES:
        if re.search(pattern, path):
            if re.search(_STACKED_PATTERN, path):
                axes = ("layers",) + axes
            if len(axes) != ndim:
                raise ShardingError(f"{path}: rule {pattern!r} gives {len(axes)} axes {axes} for a {ndim}-d array")
            return axes
    return (None,) * ndim


@dataclasses.dataclass
class ShardingPlan:
    """A ``(data, fsdp, tensor)`` mesh plus the rules placing the train state and batches on it.

    Attributes:
        mesh: the device mesh.
        allow_replicate: when a dimension does not divide its mesh axis, replicate that dimension (with a warning)
            instead of raising :class:`ShardingError`.
    """

    mesh: jax.sharding.Mesh
    allow_replicate: bool = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, mesh_section: Any, *, allow_replicate: bool = False) -> "ShardingPlan":
        """Build the mesh from a config ``mesh`` section (attributes ``data``, ``fsdp``, ``tensor``; others ignored).

        ``cpu_devices`` / ``distributed`` must already have been acted on (``experiments/run.py`` does it before
        JAX initialises); here the mesh size is checked against the (global) device count.
        """
        sizes = tuple(int(getattr(mesh_section, name, 1) or 1) for name in MESH_AXES)
        return cls(make_mesh(sizes), allow_replicate=allow_replicate)

    @property
    def axis_sizes(self) -> dict[str, int]:
        return dict(zip(self.mesh.axis_names, self.mesh.devices.shape))

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        """The mesh axes a logical axis maps to (empty = replicated)."""
        if logical is None:
            return ()
        if logical not in LOGICAL_TO_MESH:
            raise ShardingError(f"unknown logical axis {logical!r}; known: {sorted(LOGICAL_TO_MESH)}")
        target = LOGICAL_TO_MESH[logical]
        if target is None:
            return ()
        return (target,) if isinstance(target, str) else tuple(target)

    # ------------------------------------------------------------------ specs
    def spec_for(self, name: str, shape: Sequence[int], logical: Sequence[str | None]) -> P:
        """PartitionSpec of an array ``name`` of ``shape`` with ``logical`` axes, checking divisibility."""
        entries: list[Any] = []
        for dim, (size, axis) in enumerate(zip(shape, logical)):
            mesh_axes = tuple(a for a in self.mesh_axes(axis) if self.axis_sizes[a] > 1)
            n = math.prod(self.axis_sizes[a] for a in mesh_axes)
            if n > 1 and size % n:
                msg = (
                    f"cannot shard {name}: dim {dim} ({axis}, size {size}) is not divisible by mesh axis "
                    f"{'x'.join(mesh_axes)} of size {n}"
                )
                if axis == "vocab":
                    msg += f"; pad the vocabulary to a multiple of {n} (e.g. {-(-size // n) * n})"
                elif axis == "batch":
                    msg += f"; use a batch size that is a multiple of {n} (data x fsdp)"
                else:
                    msg += "; choose a mesh whose axis divides it"
                if not self.allow_replicate:
                    raise ShardingError(msg + " (or allow_replicate=True to replicate this dimension)")
                logger.warning("%s: replicating this dimension", msg)
                mesh_axes = ()
            entries.append(None if not mesh_axes else (mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes))
        while entries and entries[-1] is None:
            entries.pop()
        return P(*entries)

    def sharding_for(self, name: str, shape: Sequence[int], logical: Sequence[str | None]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec_for(name, shape, logical))

    def tree_shardings(self, tree: Any) -> Any:
        """NamedShardings for every array leaf of ``tree`` (params or optimizer state), by path rules."""

        def one(path, x):
            name = path_str(path)
            shape = np.shape(x)
            return self.sharding_for(name, shape, logical_axes_of(name, len(shape)))

        return jax.tree_util.tree_map_with_path(one, tree)

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def state_shardings(self, state: Any) -> Any:
        """The sharding pytree of a :class:`~selfaug_jax.train.state.TrainState` (same structure)."""
        return state.replace(
            trainable=self.tree_shardings(state.trainable),
            frozen=self.tree_shardings(state.frozen),
            opt_state=self.tree_shardings(state.opt_state),
            step=self.replicated(),
            rng=self.replicated(),
            constants=self.tree_shardings(state.constants),
        )

    def shard_state(self, state: Any) -> Any:
        """Place every array of ``state`` with :meth:`state_shardings` (identical copies expected on every host)."""
        return put_global(state, self.state_shardings(state))

    # ------------------------------------------------------------------ batches
    def batch_sharding(self) -> NamedSharding:
        """``P(("data", "fsdp"), None)``: rows split over data x fsdp, replicated over tensor."""
        return NamedSharding(self.mesh, P(self.mesh_axes("batch"), None))

    def process_batch_slice(self, global_batch_size: int) -> slice:
        """The rows of a global batch that this process loads and passes to :meth:`put_batch`."""
        self.spec_for("batch", (global_batch_size, 1), ("batch", None))
        index_map = self.batch_sharding().addressable_devices_indices_map((global_batch_size, 1))
        rows = sorted({(idx[0].start or 0, global_batch_size if idx[0].stop is None else idx[0].stop)
                       for idx in index_map.values()})
        start, stop = rows[0][0], rows[-1][1]
        if sum(b - a for a, b in rows) != stop - start:
            raise ShardingError(
                f"process {jax.process_index()} owns non-contiguous batch rows {rows}; use a mesh whose data/fsdp "
                "axes are process-major (jax.make_mesh's default)"
            )
        return slice(start, stop)

    def put_batch(self, batch: dict[str, Any], *, is_global: bool = False) -> dict[str, jax.Array]:
        """Global ``[B, T]`` arrays from this process's rows (``is_global``: ``batch`` is the whole global batch and
        this process takes its :meth:`process_batch_slice`). With one process local = global."""
        sharding = self.batch_sharding()
        out = {}
        for name, value in batch.items():
            local = np.asarray(value)
            if local.ndim != 2:
                raise ShardingError(f"batch array {name!r} has shape {local.shape}; expected [B, T]")
            if is_global:
                local = local[self.process_batch_slice(local.shape[0])]
            global_shape = (local.shape[0] * jax.process_count(), local.shape[1])
            self.spec_for(f"batch[{name!r}]", global_shape, ("batch", None))
            out[name] = jax.make_array_from_process_local_data(sharding, local, global_shape)
        return out

    # ------------------------------------------------------------------ activations
    def constrain(self, x: jax.Array, kind: str) -> jax.Array:
        """``with_sharding_constraint`` of an activation by its :data:`ACTIVATION_RULES` name (no-op if unknown or
        if it does not divide)."""
        logical = ACTIVATION_RULES.get(kind)
        if logical is None or len(logical) != x.ndim:
            return x
        try:
            spec = ShardingPlan(self.mesh).spec_for(kind, x.shape, logical)
        except ShardingError:
            return x  # e.g. an eval batch that does not divide: let GSPMD decide
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    @contextlib.contextmanager
    def activation_sharding(self) -> Iterator[None]:
        """While active (i.e. while a step is traced), the decoder constrains its hidden states on this mesh."""
        with decoder_lib.activation_hook(self.constrain):
            yield


# ---------------------------------------------------------------------- helpers
def make_mesh(sizes: Sequence[int]) -> jax.sharding.Mesh:
    """``jax.make_mesh(sizes, ("data", "fsdp", "tensor"))`` (Auto axes), with a clear device-count error."""
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) != len(MESH_AXES) or any(s < 1 for s in sizes):
        raise ShardingError(f"mesh sizes must be three positive integers (data, fsdp, tensor), got {sizes}")
    n = math.prod(sizes)
    have = jax.device_count()
    if n != have:
        desc = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
        raise ShardingError(
            f"mesh {desc} needs {n} devices but JAX sees {have} ({jax.devices()[0].platform}, "
            f"{jax.process_count()} process(es)); the mesh sizes must multiply to the device count. To test on CPU, "
            f"fake devices with --cpu-devices {n} (mesh.cpu_devices={n}, or "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n}) before JAX starts"
        )
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def put_global(tree: Any, shardings: Any) -> Any:
    """``device_put`` of host-identical values onto (possibly multi-process) shardings."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, sharding):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)
        value = np.asarray(x)
        return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])

    return jax.tree.map(one, tree, shardings)


def per_device_param_bytes(tree: Any) -> int:
    """Bytes one device holds of the arrays in ``tree`` (the largest shard of each leaf)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if isinstance(x, jax.Array) else np.shape(x)
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def total_param_bytes(tree: Any) -> int:
    """Bytes of the full (unsharded) arrays in ``tree``."""
    return sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def with_activation_sharding(fn: Callable, state_shardings: Any) -> Callable:
    """Wrap a step function so that, while it is traced, the decoder constrains activations on the mesh of
    ``state_shardings`` (used by ``make_train_step`` / ``make_eval_step`` when shardings are given)."""
    meshes = {s.mesh for s in jax.tree.leaves(state_shardings) if isinstance(s, NamedSharding)}
    if len(meshes) != 1 or set(next(iter(meshes)).axis_names) != set(MESH_AXES):
        return fn
    plan = ShardingPlan(next(iter(meshes)))

    def wrapped(*args, **kwargs):
        with plan.activation_sharding():
            return fn(*args, **kwargs)

    return wrapped
