"""Torch-free Hugging Face checkpoint import and export (``config.json`` + ``*.safetensors``).

Hugging Face names map onto NNX parameter paths (see ``docs/ARCHITECTURE.md``). Decoder-layer parameters are
stacked over the layers, so ``model.layers.3.self_attn.q_proj.weight`` [out, in] is slice 3 of
``layers/self_attn/q_proj/kernel`` [L, in, out]; the other tensors map one to one (``model.norm.weight`` <->
``norm/scale``). Tensors are read with ``safetensors``' flax backend (bf16 without torch) one at a time, checked
against the expected shape, cast to the parameter dtype and written into a host buffer per stacked parameter of an
abstract (``nnx.eval_shape``) model, so loading never initialises random weights first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from selfaug_jax.models.config import ModelConfig
from selfaug_jax.models.decoder import DEFAULT_ATTENTION_CHUNK, DEFAULT_SCAN_UNROLL, DecoderLM

logger = logging.getLogger(__name__)

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
# Tensors that old checkpoints carry but that are derived, not learned: ignored on load.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint does not match the model: missing, unexpected or wrongly shaped tensors."""


# ---------------------------------------------------------------------- name mapping
def is_stacked(path: tuple[Any, ...]) -> bool:
    """Whether an NNX parameter path is a decoder-layer parameter (leading layer axis)."""
    return bool(path) and str(path[0]) == "layers"


def nnx_path_to_hf(path: tuple[Any, ...], layer: int | None = None) -> tuple[str, bool]:
    """NNX parameter path (+ layer index for stacked ``layers/...`` paths) -> (HF tensor name, whether the tensor
    is transposed between the two layouts)."""
    *parents, leaf = (str(p) for p in path)
    if is_stacked(path):
        if layer is None:
            raise ValueError(f"{'/'.join(map(str, path))} is stacked over layers: give the layer index")
        parents = [parents[0], str(layer), *parents[1:]]
    transposed = leaf == "kernel"
    hf_leaf = "bias" if leaf == "bias" else "weight"
    prefix = [] if parents[:1] == ["lm_head"] else ["model"]
    return ".".join(prefix + parents + [hf_leaf]), transposed


def hf_names(path: tuple[Any, ...], num_layers: int) -> list[tuple[str, bool, int | None]]:
    """Every ``(HF name, transposed, layer index or None)`` an NNX parameter path stands for."""
    if is_stacked(path):
        return [(*nnx_path_to_hf(path, i), i) for i in range(num_layers)]
    return [(*nnx_path_to_hf(path), None)]


def hf_safetensors_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory (single file or sharded index)."""
    index = model_dir / SAFETENSORS_INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / f for f in sorted(set(weight_map.values()))]
    single = model_dir / SAFETENSORS_SINGLE
    if single.exists():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return found
    raise FileNotFoundError(
        f"no safetensors weights in {model_dir} (expected {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}); "
        "PyTorch .bin checkpoints are not supported (convert them with transformers' save_pretrained)"
    )


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, Path, Any]]:
    for f in files:
        with safe_open(str(f), framework="flax") as handle:
            for name in handle.keys():
                yield name, f, handle


# ---------------------------------------------------------------------- loading
def load_hf_model(
    model_dir: str | Path,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any | None = None,
    remat_policy: str = "none",
    num_layers: int | None = None,
    attention_chunk: int | None = DEFAULT_ATTENTION_CHUNK,
    attention_impl: str = "auto",
    scan_unroll: int = DEFAULT_SCAN_UNROLL,
) -> DecoderLM:
    """Load a Hugging Face model directory into a :class:`DecoderLM`.

    Args:
        model_dir: directory with ``config.json`` and ``model.safetensors`` (or a sharded index).
        dtype: compute dtype.
        param_dtype: parameter storage dtype (default: ``dtype``). fp32, bf16 and fp16 checkpoints are cast.
        remat_policy: per-layer rematerialisation policy (see ``selfaug_jax.models.decoder.REMAT_POLICIES``).
        num_layers: keep only the first ``num_layers`` decoder layers; the checkpoint's deeper layers are skipped.
        attention_chunk: query-chunk length of the attention kernel (``None``: unchunked); see ``DecoderLM``.
        attention_impl: attention kernel of the training / evaluation forward; see ``DecoderLM``.
        scan_unroll: layers per iteration of the layer scan; see ``DecoderLM``.

    Raises:
        CheckpointError: naming each missing, unexpected or wrongly shaped tensor (with both shapes).
    """
    model_dir = Path(model_dir)
    config = ModelConfig.from_json_file(model_dir / "config.json")
    n_full = config.num_hidden_layers
    if num_layers is not None:
        if not 1 <= num_layers <= n_full:
            raise ValueError(f"num_layers={num_layers} must be in [1, {n_full}] for {model_dir}")
        hf_config = dict(config.hf_config)
        if isinstance(hf_config.get("layer_types"), list):
            hf_config["layer_types"] = hf_config["layer_types"][:num_layers]
        config = dataclasses.replace(config, num_hidden_layers=num_layers, hf_config=hf_config)
        if config.sliding_windows is not None:
            config.sliding_windows = config.sliding_windows[:num_layers]
    param_dtype = param_dtype or dtype
    abstract = nnx.eval_shape(
        lambda: DecoderLM(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            remat_policy=remat_policy,
            attention_chunk=attention_chunk,
            attention_impl=attention_impl,
            scan_unroll=scan_unroll,
            rngs=nnx.Rngs(0),
        )
    )
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    n_layers = config.num_hidden_layers
    expected: dict[str, tuple[Any, Any, bool, int | None]] = {}
    for path, var in flat:
        for name, transposed, layer in hf_names(path, n_layers):
            expected[name] = (path, var, transposed, layer)
    # One host buffer per stacked parameter, filled layer by layer (the full array exists once, never per layer).
    buffers = {id(var): np.empty(var.shape, np.dtype(param_dtype)) for path, var in flat if is_stacked(path)}

    seen: set[str] = set()
    errors: list[str] = []
    for name, file, handle in _iter_tensors(hf_safetensors_files(model_dir)):
        if name.endswith(_IGNORED_SUFFIXES) or _layer_index(name) >= n_layers:
            continue  # derived buffers; layers beyond num_layers
        if name not in expected:
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # tied checkpoints sometimes store the (identical) head too; HF ignores it as well.
            errors.append(f"unexpected tensor {name!r} in {file.name}")
            continue
        path, var, transposed, layer = expected[name]
        tensor = handle.get_tensor(name)
        hf_shape = _hf_shape(expected[name])
        if tuple(tensor.shape) != hf_shape:
            layer_note = "" if layer is None else f", layer {layer}"
            errors.append(
                f"tensor {name!r} in {file.name} has shape {tuple(tensor.shape)}, expected {hf_shape} "
                f"(for NNX parameter {'/'.join(map(str, path))} of shape {tuple(var.shape)}{layer_note})"
            )
            continue
        value = jnp.asarray(tensor).astype(param_dtype)
        value = value.T if transposed else value
        if layer is None:
            var.set_value(value)
        else:
            buffers[id(var)][layer] = np.asarray(value)
        seen.add(name)
    missing = sorted(set(expected) - seen)
    errors.extend(f"missing tensor {n!r} (expected shape {_hf_shape(expected[n])})" for n in missing)
    if errors:
        raise CheckpointError(f"checkpoint {model_dir} does not match the {config.model_type} model:\n  " + "\n  ".join(errors))
    for path, var in flat:
        if is_stacked(path):
            var.set_value(jnp.asarray(buffers.pop(id(var))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _layer_index(name: str) -> int:
    """The decoder-layer index of an HF tensor name (-1 for non-layer tensors)."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2])
    return -1


def _hf_shape(entry) -> tuple[int, ...]:
    """The HF shape of one tensor: a stacked parameter's per-layer shape, reversed for transposed kernels."""
    _, var, transposed, layer = entry
    shape = tuple(var.shape) if layer is None else tuple(var.shape[1:])
    return shape[::-1] if transposed else shape


# ---------------------------------------------------------------------- export
def hf_state_dict(model: DecoderLM, dtype: Any | None = None) -> dict[str, jax.Array]:
    """The model's parameters under HF names and layouts, stacked layers split per layer (LoRA adapters, if any,
    are not included)."""
    out: dict[str, jax.Array] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        for name, transposed, layer in hf_names(path, model.config.num_hidden_layers):
            value = var[...] if layer is None else var[...][layer]
            value = value.T if transposed else value
            out[name] = value.astype(dtype) if dtype is not None else value
    return out


def save_hf_model(
    model: DecoderLM,
    out_dir: str | Path,
    *,
    dtype: Any | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Write ``config.json`` + safetensors (sharded with an index above ``max_shard_bytes``).

    The result loads with ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` and with
    :func:`load_hf_model` (bitwise round trip when ``dtype`` is unchanged). Tokenizer files found in
    ``tokenizer_dir`` are copied alongside.
    """
    from safetensors.flax import save_file

    if any(True for _ in nnx.to_flat_state(nnx.state(model, _lora_filter()))):
        raise ValueError("model has LoRA adapters: merge them first (selfaug_jax.lora.merge_lora)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model, dtype)
    hf_cfg = model.config.to_hf_dict()
    saved_dtype = next(iter(tensors.values())).dtype
    hf_cfg["torch_dtype"] = hf_cfg["dtype"] = str(np.dtype(saved_dtype).name) if saved_dtype != jnp.bfloat16 else "bfloat16"
    (out_dir / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")

    shards: list[dict[str, jax.Array]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].size * tensors[name].dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    for stale in list(out_dir.glob("model*.safetensors")) + [out_dir / SAFETENSORS_INDEX]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / SAFETENSORS_SINGLE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in shard})
        total = sum(t.size * t.dtype.itemsize for t in tensors.values())
        index = {"metadata": {"total_size": int(total)}, "weight_map": weight_map}
        (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out_dir)
    return out_dir


def copy_tokenizer_files(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Copy the tokenizer / generation-config files present in ``src_dir``; returns the copied names."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    copied = []
    for name in TOKENIZER_FILES:
        if (src_dir / name).exists() and src_dir.resolve() != dst_dir.resolve():
            shutil.copy2(src_dir / name, dst_dir / name)
            copied.append(name)
    return copied


def _lora_filter():
    from selfaug_jax.models.decoder import LoRAParam

    return LoRAParam
