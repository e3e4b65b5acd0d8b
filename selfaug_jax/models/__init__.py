"""Decoder-only LMs in Flax NNX, loaded from Hugging Face checkpoints.

```python
from selfaug_jax.models import load_pretrained
model = load_pretrained("path/to/hf_dir", dtype=jnp.float32)   # or "smollm2-135m-instruct", or a .gguf file
logits_btv = model(input_ids_bt, attention_mask=mask_bt)       # float32 [B, T, V]
```
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from selfaug_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig, UnsupportedModelError
from selfaug_jax.models.decoder import (
    DEFAULT_ATTENTION_CHUNK,
    DEFAULT_SCAN_UNROLL,
    REMAT_POLICIES,
    DecoderLM,
    LoRAParam,
    default_positions,
)

DEFAULT_MODEL = "smollm2-135m-instruct"


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A Hugging Face model directory for a name, directory or ``.gguf`` file.

    ``"smollm2-135m-instruct"`` (the default model) and ``.gguf`` files are converted once into the cache
    (``$SELFAUG_JAX_CACHE``, default ``~/.cache/selfaug_jax``); directories are returned as they are.
    """
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from selfaug_jax.checkpoints.default_model import resolve_model_path

    return Path(resolve_model_path(name_or_path))


def load_pretrained(
    name_or_path: str | Path = DEFAULT_MODEL,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any | None = None,
    remat_policy: str = "none",
    num_layers: int | None = None,
    attention_chunk: int | None = DEFAULT_ATTENTION_CHUNK,
    attention_impl: str = "auto",
    scan_unroll: int = DEFAULT_SCAN_UNROLL,
) -> DecoderLM:
    """Load a model from an HF directory (``config.json`` + safetensors), a GGUF file or the default name.

    Args:
        name_or_path: HF directory, ``.gguf`` file (llama architecture) or ``"smollm2-135m-instruct"``.
        dtype: compute dtype (``jnp.float32`` or ``jnp.bfloat16``); logits are always float32.
        param_dtype: parameter storage dtype; defaults to ``dtype``.
        remat_policy: per-layer gradient checkpointing ("none", "full", "dots", "dots_and_acts", "dots_saveable").
        num_layers: keep only the first ``num_layers`` decoder layers (a cheap stand-in model for smoke tests and
            debugging; the checkpoint's deeper layers are skipped).
        attention_chunk: query-chunk length of training / prefill attention; longer sequences are processed in
            chunks so no ``[b, heads, t, t]`` float32 score tensor is ever held whole. ``None``: unchunked.
        attention_impl: attention kernel of the training / evaluation forward (``auto``, ``xla_chunked``,
            ``dot_product``, ``cudnn``, ``splash``; see ``selfaug_jax/models/attention_kernels.py``).
        scan_unroll: layers per iteration of the training / evaluation layer scan (see ``DecoderLM``).
    """
    from selfaug_jax.checkpoints.hf import load_hf_model

    return load_hf_model(
        resolve_model_dir(name_or_path),
        dtype=dtype,
        param_dtype=param_dtype,
        remat_policy=remat_policy,
        num_layers=num_layers,
        attention_chunk=attention_chunk,
        attention_impl=attention_impl,
        scan_unroll=scan_unroll,
    )


# ``tokenizer_config.json`` classes that are plain ``tokenizer.json`` tokenizers with no model-specific code: the
# class ``AutoTokenizer`` resolves them to is ``PreTrainedTokenizerFast`` itself (transformers 5: an alias of
# ``TokenizersBackend``), so loading that class directly gives the same tokenizer.
_PLAIN_FAST_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def load_tokenizer(name_or_path: str | Path = DEFAULT_MODEL):
    """The Hugging Face tokenizer (with chat template) of a model directory / name / GGUF file.

    A directory whose ``tokenizer_config.json`` names a plain fast tokenizer (the default model's does) and that has
    a ``tokenizer.json`` is loaded with ``PreTrainedTokenizerFast`` directly: ``AutoTokenizer`` would give the same
    object but first imports transformers' model-config registry, which imports torch wherever torch is installed
    (about 4 s of every ``experiments/run.py`` start on this project's 2-core test machine, against 0.9 s).
    Every other tokenizer class goes through ``AutoTokenizer`` (model-specific code, e.g. BOS handling).
    """
    model_dir = resolve_model_dir(name_or_path)
    config_path = model_dir / "tokenizer_config.json"
    tokenizer_class = None
    if config_path.is_file() and (model_dir / "tokenizer.json").is_file():
        try:
            tokenizer_class = json.loads(config_path.read_text()).get("tokenizer_class")
        except (ValueError, AttributeError):  # not a JSON object: let AutoTokenizer report it
            tokenizer_class = None
    if tokenizer_class in _PLAIN_FAST_TOKENIZER_CLASSES:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


__all__ = [
    "DEFAULT_ATTENTION_CHUNK",
    "DEFAULT_SCAN_UNROLL",
    "DEFAULT_MODEL",
    "DecoderLM",
    "LoRAParam",
    "ModelConfig",
    "REMAT_POLICIES",
    "SUPPORTED_MODEL_TYPES",
    "UnsupportedModelError",
    "default_positions",
    "load_pretrained",
    "load_tokenizer",
    "resolve_model_dir",
]
