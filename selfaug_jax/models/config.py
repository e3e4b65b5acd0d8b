"""Model configuration read from (and written back to) a Hugging Face ``config.json``.

One dataclass describes every supported decoder-only architecture; the per-family differences are a handful of
flags (q/k/v bias, per-head q/k RMSNorm, sliding windows, RoPE scaling). ``ModelConfig.from_hf_dict`` accepts both
the transformers 4.x layout (``rope_theta`` + ``rope_scaling``) and the 5.x layout (``rope_parameters``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")

# Architectures written into an exported config.json, so transformers' AutoModelForCausalLM picks the right class.
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


class UnsupportedModelError(ValueError):
    """Raised for a ``model_type`` (or feature) this package does not implement."""


@dataclasses.dataclass
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer (Llama family).

    Attributes mirror the Hugging Face names. ``q_bias``/``k_bias``/``v_bias``/``o_bias`` say which attention
    projections carry a bias (Qwen2: q, k, v; Llama with ``attention_bias``: all four). ``qk_norm`` enables Qwen3's
    per-head RMSNorm on queries and keys. ``sliding_windows`` holds one window length (or None) per layer.
    ``hf_config`` keeps the original dictionary so export writes back every field we do not model.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    q_bias: bool = False
    k_bias: bool = False
    v_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_windows: tuple[int | None, ...] | None = None
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {self.model_type!r} is not supported; supported model types: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ("default", "linear", "llama3"):
            raise UnsupportedModelError(
                f"rope scaling type {rope_type!r} is not supported (supported: default, linear, llama3)"
            )

    @property
    def num_query_groups(self) -> int:
        """Query heads per key/value head (GQA group size)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(int(i) for i in self.eos_token_id)

    def num_params(self) -> int:
        """Number of parameters (embeddings counted once when tied)."""
        d, f, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        h, k = self.num_attention_heads, self.num_key_value_heads
        attn = d * h * hd + 2 * d * k * hd + h * hd * d
        attn += (self.q_bias * h + (self.k_bias + self.v_bias) * k) * hd + self.o_bias * d
        attn += 2 * hd if self.qk_norm else 0
        mlp = 3 * d * f + (2 * f + d if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * d
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + self.num_hidden_layers * per_layer + d + head

    # ------------------------------------------------------------------ HF conversion
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build a config from a Hugging Face ``config.json`` dictionary.

        Raises:
            UnsupportedModelError: unknown ``model_type`` (the message lists the supported ones).
            ValueError: a required field is missing.
        """
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; supported model types: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in hf]
        if missing:
            raise ValueError(f"config.json is missing required field(s): {', '.join(missing)}")
        heads = hf["num_attention_heads"]
        kv_heads = hf.get("num_key_value_heads") or heads
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads

        # RoPE: transformers 5 nests everything under rope_parameters; 4.x uses rope_theta + rope_scaling.
        rope_params = dict(hf.get("rope_parameters") or {})
        rope_theta = float(rope_params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        scaling = rope_params or dict(hf.get("rope_scaling") or {})
        if scaling:
            scaling.setdefault("rope_type", scaling.get("type", "default"))
            scaling.pop("type", None)
            if scaling["rope_type"] == "default":
                scaling = {}

        attention_bias = bool(hf.get("attention_bias", False))
        if model_type == "qwen2":  # Qwen2 hard-codes bias on q, k, v (not o).
            q_bias = k_bias = v_bias = True
            o_bias = False
        else:
            q_bias = k_bias = v_bias = o_bias = attention_bias

        n_layers = hf["num_hidden_layers"]
        window = hf.get("sliding_window")
        if model_type == "mistral":
            windows = tuple([window] * n_layers) if window else None
        elif model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window") and window:
            layer_types = hf.get("layer_types") or [
                "sliding_attention" if i >= hf.get("max_window_layers", n_layers) else "full_attention"
                for i in range(n_layers)
            ]
            windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
        else:
            windows = None

        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling or None,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            q_bias=q_bias,
            k_bias=k_bias,
            v_bias=v_bias,
            o_bias=o_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_windows=windows,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            hf_config=dict(hf),
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            hf = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        return cls.from_hf_dict(hf)

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF ``config.json`` dictionary (original fields kept, modelled fields overwritten)."""
        out = dict(self.hf_config)
        out.update(
            model_type=self.model_type,
            architectures=[_ARCHITECTURES[self.model_type]],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
        rope.update(self.rope_scaling or {})
        out.pop("rope_scaling", None)
        out["rope_theta"] = self.rope_theta
        out["rope_parameters"] = rope
        if self.model_type in ("llama", "qwen3"):
            out["attention_bias"] = self.q_bias
        if self.model_type == "llama":
            out["mlp_bias"] = self.mlp_bias
        return out
