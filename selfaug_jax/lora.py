"""LoRA adapters for :class:`~selfaug_jax.models.decoder.DecoderLM`, kept in their own pytree.

``add_lora`` gives each target :class:`~selfaug_jax.models.decoder.Linear` of the stacked decoder layers two
``LoRAParam`` variables, stacked over the ``L`` layers like the kernels: ``lora_a [L, in, r]`` (PEFT's default init:
uniform in ``±1/sqrt(in)``, i.e. kaiming-uniform with ``a=sqrt(5)``) and ``lora_b [L, r, out] = 0``, and the update
``(dropout(x) @ A @ B) * alpha / r``. Because adapters are a separate variable type,

    graphdef, lora_params, base_params = nnx.split(model, LoRAParam, nnx.Param)

separates the trainable adapters from the frozen base, and the SelfAug reference is the same base params merged
into the graph *without* adapters (:func:`split_lora_model`). Embeddings and the LM head are never adapted.

``save_peft_adapter`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` with PEFT's per-layer tensor
names (``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``, one per layer slice), so
``peft.PeftModel.from_pretrained(hf_model, dir)`` reproduces our logits (see ``tests/test_lora.py``);
``load_peft_adapter`` stacks them back.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from selfaug_jax.models.decoder import DecoderLM, Linear, LoRAParam

ALL_LINEAR_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA hyper-parameters. The paper adapts all seven linear projections; rank/alpha/dropout are unstated
    there, so the defaults are common choices (r=16, alpha=32, dropout 0.05)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ALL_LINEAR_TARGETS

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = set(self.target_modules) - set(ALL_LINEAR_TARGETS)
        if unknown:
            raise ValueError(
                f"unknown LoRA target module(s) {sorted(unknown)}; choose from {list(ALL_LINEAR_TARGETS)} "
                "(embeddings and the LM head are never adapted)"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_targets(model: DecoderLM, target_modules: tuple[str, ...]) -> list[tuple[tuple[Any, ...], Linear]]:
    """``(path, Linear)`` pairs of the (stacked) decoder-layer projections named in ``target_modules``.

    Paths are module paths without a layer index, e.g. ``("layers", "self_attn", "q_proj")``: each ``Linear``
    holds the projection of every layer (kernel ``[L, in, out]``).
    """
    out = []
    for path, module in nnx.iter_graph(model):
        if isinstance(module, Linear) and path and path[0] == "layers" and path[-1] in target_modules:
            out.append((tuple(path), module))
    return out


def add_lora(model: DecoderLM, config: LoRAConfig, rngs: nnx.Rngs | None = None) -> DecoderLM:
    """Attach LoRA adapters in place (A random, B zero, so the model's output is unchanged); returns the model."""
    rngs = rngs if rngs is not None else nnx.Rngs(params=0)
    targets = lora_targets(model, config.target_modules)
    if not targets:
        raise ValueError(f"no LoRA target modules {config.target_modules} found in the model")
    n_layers = model.config.num_hidden_layers
    for _, linear in targets:
        if linear.lora_a is not None:
            raise ValueError("the model already has LoRA adapters")
        # adapters are master weights: float32 even over a bf16 frozen base
        bound = 1.0 / math.sqrt(linear.in_features)
        a = jax.random.uniform(rngs.params(), (n_layers, linear.in_features, config.rank), jnp.float32, -bound, bound)
        linear.lora_a = nnx.data(LoRAParam(a))
        linear.lora_b = nnx.data(LoRAParam(jnp.zeros((n_layers, config.rank, linear.out_features), jnp.float32)))
        linear.lora_scale = config.scale
        linear.lora_dropout = config.dropout
    return model


def split_lora_model(model: DecoderLM):
    """Split a LoRA model into ``(policy_graphdef, base_graphdef, lora_params, base_params)``.

    ``nnx.merge(policy_graphdef, lora_params, base_params)`` is the adapted model and
    ``nnx.merge(base_graphdef, base_params)`` the original one (the SelfAug reference): the same frozen arrays.
    """
    policy_graphdef, lora_params, base_params = nnx.split(model, LoRAParam, nnx.Param)
    base_graphdef = nnx.graphdef(strip_lora(nnx.merge(policy_graphdef, lora_params, base_params)))
    return policy_graphdef, base_graphdef, lora_params, base_params


def strip_lora(model: DecoderLM) -> DecoderLM:
    """Remove adapters in place (without merging them) and return the model."""
    for _, linear in lora_targets(model, ALL_LINEAR_TARGETS):
        linear.lora_a = nnx.data(None)
        linear.lora_b = nnx.data(None)
        linear.lora_scale = 0.0
        linear.lora_dropout = 0.0
    return model


def merge_lora(model: DecoderLM, scale: float = 1.0) -> DecoderLM:
    """Fold every adapter into its base kernel and remove the adapters, in place:
    ``W = W0 + scale * (alpha / r) * A @ B`` (in float32, cast back to the kernel's dtype).

    ``scale`` in (0, 1] is WiSE-FT's weight-space interpolation (Wortsman et al., arXiv 2109.01903):
    ``(1 - s) * W0 + s * W_ft`` with ``W_ft = W0 + (alpha / r) * A @ B`` equals ``W0 + s * (alpha / r) * A @ B``,
    so for LoRA it is exactly merging the adapter at scale ``s`` (1 = the fine-tuned model).
    """
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"merge_lora: scale must be in (0, 1] (WiSE-FT interpolation), got {scale}")
    for _, linear in lora_targets(model, ALL_LINEAR_TARGETS):
        if linear.lora_a is None:
            continue
        kernel = linear.kernel[...]
        # [L, in, r] @ [L, r, out] -> [L, in, out] (a batched matmul over the layer axis)
        delta = jnp.matmul(linear.lora_a[...].astype(jnp.float32), linear.lora_b[...].astype(jnp.float32))
        linear.kernel.set_value(
            (kernel.astype(jnp.float32) + delta * (linear.lora_scale * scale)).astype(kernel.dtype))
    return strip_lora(model)


def peft_tensor_name(path: tuple[Any, ...], which: str, layer: int) -> str:
    """PEFT name of one layer's adapter, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``
    for ``path=("layers", "self_attn", "q_proj")``, ``which="A"``, ``layer=0``."""
    parts = [str(path[0]), str(layer), *(str(p) for p in path[1:])]
    return "base_model.model.model." + ".".join(parts) + f".lora_{which}.weight"


def save_peft_adapter(
    model: DecoderLM, config: LoRAConfig, out_dir: str | Path, *, base_model_name_or_path: str = ""
) -> Path:
    """Write a PEFT-compatible adapter (``adapter_config.json`` + ``adapter_model.safetensors``, float32)."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, linear in lora_targets(model, config.target_modules):
        if linear.lora_a is None:
            raise ValueError(f"module {'.'.join(map(str, path))} has no LoRA adapter")
        # PEFT stores nn.Linear weights [out, in] per layer: lora_A [r, in], lora_B [out, r].
        for which, var in (("A", linear.lora_a), ("B", linear.lora_b)):
            stacked = np.asarray(var[...], np.float32)
            for layer in range(stacked.shape[0]):
                tensors[peft_tensor_name(path, which, layer)] = stacked[layer].T.copy()
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_name_or_path),
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(config.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    return out_dir


def load_peft_adapter(model: DecoderLM, adapter_dir: str | Path) -> tuple[DecoderLM, LoRAConfig]:
    """Attach the adapters of a PEFT directory to ``model`` (in place)."""
    from safetensors.numpy import load_file

    adapter_dir = Path(adapter_dir)
    cfg_json = json.loads((adapter_dir / "adapter_config.json").read_text())
    targets = cfg_json["target_modules"]
    targets = targets if isinstance(targets, list) else [targets]
    unsupported = sorted(set(targets) - set(ALL_LINEAR_TARGETS))
    if unsupported:
        raise ValueError(f"{adapter_dir / 'adapter_config.json'}: unsupported target_modules {unsupported}")
    config = LoRAConfig(
        rank=int(cfg_json["r"]),
        alpha=float(cfg_json["lora_alpha"]),
        dropout=float(cfg_json.get("lora_dropout", 0.0)),
        target_modules=tuple(t for t in ALL_LINEAR_TARGETS if t in targets),
    )
    add_lora(model, config)
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    file = adapter_dir / "adapter_model.safetensors"
    for path, linear in lora_targets(model, config.target_modules):
        for which, var in (("A", linear.lora_a), ("B", linear.lora_b)):
            stacked = np.empty(var[...].shape, np.dtype(var[...].dtype))
            for layer in range(stacked.shape[0]):
                name = peft_tensor_name(path, which, layer)
                if name not in tensors:
                    raise ValueError(f"{file}: missing tensor {name!r}")
                value = tensors.pop(name).T
                if value.shape != stacked.shape[1:]:
                    raise ValueError(f"{file}: tensor {name!r} has shape {value.T.shape}, expected "
                                     f"{stacked.shape[1:][::-1]}")
                stacked[layer] = value
            var.set_value(jnp.asarray(stacked))
    if tensors:
        raise ValueError(f"{adapter_dir}: unexpected adapter tensors {sorted(tensors)[:5]}")
    return model, config
