"""Tiny random Hugging Face PyTorch models used as references by the parity tests (tests only: imports torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)

# name -> (config class, extra kwargs). Covers llama3 rope scaling, mistral (sliding window), qwen2 bias, qwen3 qk-norm,
# tied and untied heads.
TINY_CONFIGS = {
    "llama3-untied": ("LlamaConfig", dict(rope_theta=500000.0, tie_word_embeddings=False, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})),
    "llama-tied": ("LlamaConfig", dict(rope_theta=100000.0, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(rope_theta=10000.0, sliding_window=8, tie_word_embeddings=False)),
    "qwen2-bias-tied": ("Qwen2Config", dict(rope_theta=1000000.0, tie_word_embeddings=True)),
    "qwen3-qknorm": ("Qwen3Config", dict(rope_theta=1000000.0, head_dim=24, tie_word_embeddings=False)),
}


def make_tiny_hf_model(name: str, out_dir: Path, seed: int = 0, dtype=torch.float32, init_std: float | None = None):
    """Create, randomise (biases and norms too) and ``save_pretrained`` a tiny HF model; returns it (eval mode).

    ``init_std`` overrides HF's ``initializer_range`` (0.02): larger embeddings let a tied head reach confident
    logits through the final RMSNorm, which a LoRA-only fit (embeddings frozen) needs to overfit a batch.
    """
    cls_name, extra = TINY_CONFIGS[name]
    config = getattr(transformers, cls_name)(**TINY, **extra)
    if init_std is not None:
        config.initializer_range = init_std
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in pname else 0.0))
    model = model.to(dtype).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def torch_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                 position_ids: np.ndarray | None = None) -> np.ndarray:
    """Float32 numpy logits of a HF model."""
    kwargs = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    if position_ids is not None:
        kwargs["position_ids"] = torch.as_tensor(np.asarray(position_ids), dtype=torch.long)
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(input_ids), dtype=torch.long), **kwargs)
    return out.logits.float().numpy()
