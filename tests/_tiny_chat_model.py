"""A tiny llama-shaped model over the default tokenizer's vocabulary (the evaluation tests' stand-in model)."""

from __future__ import annotations

from flax import nnx

from selfaug_jax.models import DecoderLM, ModelConfig


def tiny_chat_model(tokenizer, seed: int) -> DecoderLM:
    """2 layers, width 32, tied embeddings; end-of-turn and padding ids from ``tokenizer`` (SmolLM2's chat template)."""
    cfg = ModelConfig(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      tie_word_embeddings=True, max_position_embeddings=2048,
                      eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id)
    return DecoderLM(cfg, rngs=nnx.Rngs(seed))


def tiny_chat_model_dir(out_dir, seed: int = 0):
    """:func:`tiny_chat_model` saved as a Hugging Face directory (config, safetensors, SmolLM2's tokenizer files).

    For the end-to-end tests whose subject is the runner (resume, multi-host data, sweeps, faults), not the
    model: ``experiments/run.py --model <this dir>`` then compiles and steps in a fraction of the default model's
    time. ``tests/test_experiment.py::test_smoke_preset_end_to_end`` still runs the real default model.
    """
    from pathlib import Path

    from selfaug_jax.checkpoints.hf import save_hf_model
    from selfaug_jax.models import load_tokenizer, resolve_model_dir

    src = resolve_model_dir("smollm2-135m-instruct")
    return save_hf_model(tiny_chat_model(load_tokenizer(str(src)), seed), Path(out_dir), tokenizer_dir=src)
