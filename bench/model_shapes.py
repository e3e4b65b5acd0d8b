"""Model shapes the benchmarks can build without a checkpoint: the ``config.json`` fields a model uses.

``bench/step.py --shape NAME`` builds the named shape with random weights (``random_model``): a step's speed,
memory and MFU depend on the shapes, not on the values, so a benchmark of a 0.5B or 7B model needs no weights on
the machine (the GPU check of issue 16 item 8 runs on a machine that cannot download any).
``bench/abstract.py`` lowers the 7B shape without allocating it.

The numbers are the public ``config.json`` of each Hugging Face model (Qwen/Qwen2.5-0.5B-Instruct,
Qwen/Qwen2.5-7B-Instruct), limited to the fields ``selfaug_jax.models.ModelConfig.from_hf_dict`` reads.
"""

from __future__ import annotations

from typing import Any

# Qwen/Qwen2.5-0.5B-Instruct config.json: 24 layers, D 896, 14 query / 2 KV heads of 64, tied embeddings.
QWEN25_05B_CONFIG: dict[str, Any] = {
    "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": True,
    "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151645,
}

# Qwen/Qwen2.5-7B-Instruct config.json (docs/SCALING.md section 2 uses the same numbers).
QWEN25_7B_CONFIG: dict[str, Any] = {
    "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": False,
    "use_sliding_window": False, "bos_token_id": 151643, "eos_token_id": 151645,
}

SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": QWEN25_05B_CONFIG,
    "qwen2.5-7b": QWEN25_7B_CONFIG,
}


def shape_config(name: str, num_layers: int | None = None) -> dict[str, Any]:
    """The named shape's ``config.json`` dictionary (a copy), optionally truncated to ``num_layers`` layers."""
    if name not in SHAPES:
        raise SystemExit(f"--shape: unknown {name!r}; choose from {', '.join(SHAPES)}")
    hf = dict(SHAPES[name])
    if num_layers is not None:
        if not 1 <= num_layers <= hf["num_hidden_layers"]:
            raise SystemExit(f"--num-layers {num_layers} must be in [1, {hf['num_hidden_layers']}] for {name}")
        hf["num_hidden_layers"] = num_layers
    return hf


def random_model(name: str, *, seed: int, num_layers: int | None = None, **model_kwargs: Any) -> Any:
    """A ``DecoderLM`` of the named shape with the model's own random initialisation (``nnx.Rngs(seed)``).

    ``model_kwargs`` are ``DecoderLM``'s options (dtype, param_dtype, remat_policy, attention_chunk,
    attention_impl, scan_unroll), as ``load_pretrained`` takes them.
    """
    from flax import nnx

    from selfaug_jax.models import DecoderLM, ModelConfig

    config = ModelConfig.from_hf_dict(shape_config(name, num_layers))
    return DecoderLM(config, rngs=nnx.Rngs(seed), **model_kwargs)
