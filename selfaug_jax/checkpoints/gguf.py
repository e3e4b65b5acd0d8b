"""Convert a llama-architecture GGUF file into a Hugging Face model directory.

The output directory is what ``LlamaForCausalLM.from_pretrained`` (and our own ``checkpoints/hf.py``) reads:

- ``config.json``: ``LlamaForCausalLM`` / ``model_type: llama``, every number derived from the GGUF metadata.
- ``model.safetensors``: HF tensor names, ``[out, in]`` layouts, float32 (or bfloat16 on request), with
  llama.cpp's q/k row permutation undone. No ``lm_head.weight`` when the GGUF has no ``output.weight``
  (tied embeddings).
- ``tokenizer.json`` + ``tokenizer_config.json`` (``gguf_tokenizer.py``): a byte-level BPE tokenizer built from the
  ``tokenizer.ggml.*`` metadata (vocabulary, merges, token types, the pre-tokenizer named by
  ``tokenizer.ggml.pre``), the chat template from ``tokenizer.chat_template``, bos/eos/pad/unk tokens.
- ``generation_config.json``: bos / eos / pad ids.
- ``selfaug_convert.json``: a marker written last (format version + source file facts), so a cache can tell a
  complete conversion from an interrupted one.

Weights go through the ``gguf`` package (reader + ``gguf.quants.dequantize``) and numpy only; no torch.
The dequantised GGUF weights are the truth we convert (for a Q4_1 file they are *not* the original bf16 weights).

The directory is written atomically: into a temporary sibling, then renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: Bumped whenever the produced directory changes in a way a cached copy must be rebuilt for.
CONVERT_FORMAT_VERSION = 1
#: Name of the marker file written last into a converted directory.
MARKER_FILE = "selfaug_convert.json"


class GGUFConversionError(ValueError):
    """A GGUF file that cannot be converted (wrong architecture, missing metadata, unexpected tensor)."""


@dataclass(frozen=True)
class GGUFConvertConfig:
    """Options of :func:`convert_gguf_to_hf`.

    Attributes:
        dtype: ``"float32"`` (default; lossless for dequantised weights) or ``"bfloat16"``.
        overwrite: replace an existing non-empty destination instead of raising.
    """

    dtype: str = "float32"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"GGUFConvertConfig.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")


# --------------------------------------------------------------------------------------------------- reading


def open_gguf(path: str | os.PathLike) -> Any:
    """Open ``path`` with ``gguf.GGUFReader``, with a clear error for a missing or non-GGUF file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFConversionError(f"{path} is not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises assorted errors for truncated files
        raise GGUFConversionError(f"could not read GGUF file {path}: {e}") from e


def read_metadata(reader: Any) -> dict[str, Any]:
    """All GGUF key/value metadata as plain Python values (arrays become lists, strings decoded)."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if isinstance(value, np.generic):
            value = value.item()
        meta[key] = value
    return meta


def _require(meta: dict[str, Any], key: str, path: str) -> Any:
    if key not in meta:
        raise GGUFConversionError(f"{path}: missing GGUF metadata key {key!r}")
    return meta[key]


def _f32(x: float) -> float:
    """Shortest decimal that round-trips the float32 value (GGUF stores float32: 9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


# --------------------------------------------------------------------------------------------------- config


def llama_config_from_gguf(meta: dict[str, Any], tensor_names: set[str], path: str = "<gguf>") -> dict[str, Any]:
    """Build the HF ``config.json`` dict of a llama-architecture GGUF from its metadata and tensor names.

    Raises:
        GGUFConversionError: for a non-llama architecture, missing keys or unsupported features.
    """
    arch = _require(meta, "general.architecture", path)
    if arch != "llama":
        raise GGUFConversionError(f"{path}: general.architecture is {arch!r}; only 'llama' is supported")
    p = "llama."
    hidden = int(_require(meta, p + "embedding_length", path))
    n_head = int(_require(meta, p + "attention.head_count", path))
    n_kv = meta.get(p + "attention.head_count_kv", n_head)
    if isinstance(n_kv, list):
        if len(set(n_kv)) != 1:
            raise GGUFConversionError(f"{path}: per-layer {p}attention.head_count_kv {n_kv} is not supported")
        n_kv = n_kv[0]
    n_kv = int(n_kv)
    head_dim = int(meta.get(p + "attention.key_length", hidden // n_head))
    rope_dim = int(meta.get(p + "rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise GGUFConversionError(f"{path}: partial rotary ({p}rope.dimension_count={rope_dim} != {head_dim})")
    if n_head % n_kv:
        raise GGUFConversionError(f"{path}: head_count {n_head} is not a multiple of head_count_kv {n_kv}")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(meta.get(p + "vocab_size", len(tokens) if tokens is not None else 0))
    if vocab <= 0:
        raise GGUFConversionError(f"{path}: neither {p}vocab_size nor tokenizer.ggml.tokens gives a vocab size")

    rope_scaling = None
    scaling_type = meta.get(p + "rope.scaling.type", "none")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": _f32(_require(meta, p + "rope.scaling.factor", path))}
    elif scaling_type not in ("none", None):
        raise GGUFConversionError(f"{path}: {p}rope.scaling.type={scaling_type!r} is not supported")
    if "rope_freqs.weight" in tensor_names:
        raise GGUFConversionError(f"{path}: tensor 'rope_freqs.weight' (llama3 rope scaling) is not supported")

    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(_require(meta, p + "feed_forward_length", path)),
        "num_hidden_layers": int(_require(meta, p + "block_count", path)),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(_require(meta, p + "attention.layer_norm_rms_epsilon", path)),
        "rope_theta": _f32(meta.get(p + "rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": int(_require(meta, p + "context_length", path)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    for hf_key, gguf_key in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        value = meta.get(f"tokenizer.ggml.{gguf_key}_token_id")
        config[hf_key] = int(value) if value is not None else None
    return config


# --------------------------------------------------------------------------------------------------- weights


def unpermute_qk(weight_oi: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (rotary pairs interleaved -> HF's split-halves layout).

    llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel.permute``) writes
    ``w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)``, with ``n_head`` the
    query head count for ``attn_q`` and the key/value head count for ``attn_k``. This is its inverse: view the
    rows as ``[n_head, half, 2]`` and swap back to ``[n_head, 2, half]``. Works for 2-D weights and 1-D biases.
    """
    rows = weight_oi.shape[0]
    if rows % (2 * n_head):
        raise GGUFConversionError(f"cannot unpermute {rows} rows over {n_head} heads (rows % (2*heads) != 0)")
    half = rows // n_head // 2
    rest = weight_oi.shape[1:]
    return weight_oi.reshape(n_head, half, 2, *rest).swapaxes(1, 2).reshape(weight_oi.shape)


_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_tensor_name(gguf_name: str) -> str:
    """HF parameter name of a llama GGUF tensor name (``blk.3.attn_q.weight`` -> ``model.layers.3...``)."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}"
    raise GGUFConversionError(f"unexpected GGUF tensor {gguf_name!r} for the llama architecture")


def llama_weights_from_gguf(reader: Any, config: dict[str, Any], path: str = "<gguf>") -> dict[str, np.ndarray]:
    """Dequantise every tensor to float32 ``[out, in]`` numpy arrays under HF names, q/k unpermuted."""
    from gguf.quants import dequantize

    weights: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        try:
            w = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        except NotImplementedError as e:
            raise GGUFConversionError(
                f"{path}: cannot dequantize tensor {tensor.name!r} of type {tensor.tensor_type.name}: {e}"
            ) from e
        expected = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists ne[0] (the fastest axis) first
        if w.shape != expected:
            w = w.reshape(expected)
        if ".attn_q." in tensor.name:
            w = unpermute_qk(w, config["num_attention_heads"])
        elif ".attn_k." in tensor.name:
            w = unpermute_qk(w, config["num_key_value_heads"])
        weights[name] = np.ascontiguousarray(w)
    _check_llama_shapes(weights, config, path)
    return weights


def _check_llama_shapes(weights: dict[str, np.ndarray], config: dict[str, Any], path: str) -> None:
    """Every expected tensor is present with the shape ``config`` implies (clear error naming the tensor)."""
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    expected = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not config["tie_word_embeddings"]:
        expected["lm_head.weight"] = (v, d)
    for i in range(config["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        expected.update({
            pre + "input_layernorm.weight": (d,), pre + "post_attention_layernorm.weight": (d,),
            pre + "self_attn.q_proj.weight": (q, d), pre + "self_attn.k_proj.weight": (kv, d),
            pre + "self_attn.v_proj.weight": (kv, d), pre + "self_attn.o_proj.weight": (d, q),
            pre + "mlp.gate_proj.weight": (f, d), pre + "mlp.up_proj.weight": (f, d),
            pre + "mlp.down_proj.weight": (d, f),
        })  # fmt: skip
        if config["attention_bias"]:
            expected.update({pre + "self_attn.q_proj.bias": (q,), pre + "self_attn.k_proj.bias": (kv,),
                             pre + "self_attn.v_proj.bias": (kv,)})  # fmt: skip
    for name, shape in expected.items():
        if name not in weights:
            raise GGUFConversionError(f"{path}: missing tensor for {name!r}")
        if weights[name].shape != shape:
            raise GGUFConversionError(f"{path}: tensor {name!r} has shape {weights[name].shape}, expected {shape}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise GGUFConversionError(f"{path}: unexpected tensors {extra[:5]} for this config")


# --------------------------------------------------------------------------------------------------- driver


def source_fingerprint(gguf_path: str | os.PathLike) -> dict[str, Any]:
    """File facts recorded in the marker: name, size in bytes, mtime in ns."""
    st = Path(gguf_path).stat()
    return {"name": Path(gguf_path).name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_marker(hf_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The conversion marker of ``hf_dir``, or None when absent or unreadable (incomplete conversion)."""
    try:
        return json.loads((Path(hf_dir) / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def _write_hf_dir(gguf_path: Path, out_dir: Path, cfg: GGUFConvertConfig) -> None:
    """Write every file of the HF directory into the (empty, existing) ``out_dir``; the marker last."""
    from safetensors.numpy import save_file

    reader = open_gguf(gguf_path)
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    config = llama_config_from_gguf(meta, names, str(gguf_path))
    weights = llama_weights_from_gguf(reader, config, str(gguf_path))
    if cfg.dtype == "bfloat16":
        import ml_dtypes

        weights = {k: v.astype(ml_dtypes.bfloat16) for k, v in weights.items()}
    config["torch_dtype"] = cfg.dtype
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del weights
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    from selfaug_jax.checkpoints.gguf_tokenizer import generation_config_from_gguf, write_tokenizer

    (out_dir / "generation_config.json").write_text(json.dumps(generation_config_from_gguf(meta), indent=2) + "\n")
    write_tokenizer(meta, config, gguf_path, out_dir)
    marker = {"format_version": CONVERT_FORMAT_VERSION, "dtype": cfg.dtype, "source": source_fingerprint(gguf_path)}
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def _apply_umask_permissions(directory: Path) -> None:
    """Give the (mkdtemp-private, 0700) directory and its files the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for f in directory.iterdir():
        os.chmod(f, 0o666 & ~umask)


def convert_gguf_to_hf(
    gguf_path: str | os.PathLike, out_dir: str | os.PathLike, config: GGUFConvertConfig | None = None
) -> Path:
    """Convert the llama GGUF at ``gguf_path`` into a Hugging Face model directory at ``out_dir``.

    The files are written into a temporary sibling directory that is renamed to ``out_dir`` at the end, so
    ``out_dir`` is either absent or complete. Returns ``out_dir``.

    Raises:
        FileNotFoundError: ``gguf_path`` does not exist.
        FileExistsError: ``out_dir`` exists, is not empty, and ``config.overwrite`` is False.
        GGUFConversionError: the file is not a convertible llama GGUF (message names the key/tensor).
    """
    cfg = config or GGUFConvertConfig()
    gguf_path, out_dir = Path(gguf_path).expanduser(), Path(out_dir).expanduser()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not cfg.overwrite:
        raise FileExistsError(
            f"destination {out_dir} exists and is not empty (pass overwrite=True, or --overwrite on the CLI)"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_hf_dir(gguf_path, tmp, cfg)
        _apply_umask_permissions(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s -> %s in %.1fs", gguf_path, out_dir, time.perf_counter() - t0)
    return out_dir
