"""Which model an external evaluator (lm-evaluation-harness) runs: a base model, an HF directory, or a run's output.

``pretrained`` may be

* the default-model alias (``smollm2-135m-instruct``), an HF directory (``config.json`` + safetensors) or a ``.gguf``
  file: that model, optionally with a PEFT ``adapter`` directory attached;
* the output directory of ``experiments/run.py`` (it holds the run's ``config.json`` with a ``train`` section):
  the run's base model (``model.name`` and ``model.num_layers`` of that config) with the PEFT adapter of one
  method (``<run>/<method>/export/adapter``) attached, or, for a full fine-tune (``sft``), the method's exported
  model (``<run>/<method>/export/hf``); ``method`` defaults to the last method of ``train.methods``;
* a method's directory inside a run (``<run>/<method>``): the same, for that method.

``merge=True`` (default) folds the adapter into the base weights (:func:`selfaug_jax.lora.merge_lora`), so the
model has the base model's structure and compiled functions; ``merge=False`` keeps the adapters as separate
low-rank matmuls (the model as trained). The tokenizer always comes from the base model directory.

Everything here uses only the public model API (``load_pretrained``, ``load_tokenizer``, ``load_peft_adapter``,
``merge_lora``) and does not import lm-eval.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from selfaug_jax.models import DecoderLM, load_pretrained, load_tokenizer, resolve_model_dir

__all__ = ["DTYPES", "EvalModelSpec", "ResolvedModel", "load_eval_model", "resolve_eval_model"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class EvalModelSpec:
    """What to load.

    Attributes:
        pretrained: default-model alias, HF directory, ``.gguf`` file, run output directory or a run's method
            directory (see the module docstring).
        adapter: a PEFT adapter directory to attach (overrides a run's own adapter).
        merge: fold the adapter into the base weights (True) or keep it as separate LoRA matmuls (False).
        method: which method of a run output directory (default: the last of its ``train.methods``).
        dtype: compute and parameter dtype, ``float32`` or ``bfloat16`` (logits are float32 either way).
    """

    pretrained: str
    adapter: str | None = None
    merge: bool = True
    method: str | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """Directories to load: the base model (and its tokenizer), an optional adapter, and a description."""

    base_dir: Path
    adapter_dir: Path | None
    num_layers: int | None
    description: str


def _run_config(path: Path) -> dict[str, Any] | None:
    """The experiment config of a run output directory, or None when ``path`` is not one."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return cfg if isinstance(cfg, dict) and "train" in cfg and "model" in cfg else None


def resolve_eval_model(spec: EvalModelSpec) -> ResolvedModel:
    """Turn ``spec`` into directories, checking each exists (one-line ``ValueError`` naming the path otherwise)."""
    path = Path(spec.pretrained)
    run_cfg = _run_config(path) if path.is_dir() else None
    method = spec.method
    if run_cfg is None and path.is_dir() and _run_config(path.parent) is not None and (path / "export").is_dir():
        run_cfg, method, path = _run_config(path.parent), method or path.name, path.parent  # <run>/<method>
    if run_cfg is None:
        if spec.method is not None:
            raise ValueError(f"method={spec.method!r} needs pretrained= to be a run output directory; "
                             f"{spec.pretrained!r} is not one (no config.json with a train section)")
        base_dir = resolve_model_dir(spec.pretrained)
        adapter_dir = _check_adapter(Path(spec.adapter)) if spec.adapter else None
        return ResolvedModel(base_dir, adapter_dir, None, f"{spec.pretrained}"
                             + (f" + adapter {adapter_dir}" if adapter_dir else ""))
    methods = list(run_cfg["train"].get("methods") or [])
    method = method or (methods[-1] if methods else None)
    if method is None:
        raise ValueError(f"{path / 'config.json'}: train.methods is empty; pass method=NAME")
    from selfaug_jax.run_names import dir_name

    export = path / dir_name(method) / "export"  # a sweep run's name (selfaug[alpha=0.1]) or its folder name
    if not export.is_dir():
        raise ValueError(f"{export}: no exported model for method {method!r} (run with train.export=true); "
                         f"methods of this run: {', '.join(methods)}")
    model_cfg = run_cfg["model"]
    num_layers = model_cfg.get("num_layers")
    if spec.adapter:
        adapter_dir = _check_adapter(Path(spec.adapter))
    elif (export / "adapter").is_dir():
        adapter_dir = _check_adapter(export / "adapter")
    else:  # a full fine-tune: the exported model is the model
        return ResolvedModel(export / "hf", None, None, f"{path} method {method} (exported model)")
    base_dir = resolve_model_dir(model_cfg["name"])
    return ResolvedModel(base_dir, adapter_dir, num_layers,
                         f"{path} method {method}: {model_cfg['name']} + adapter {adapter_dir}")


def _check_adapter(adapter_dir: Path) -> Path:
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (adapter_dir / name).is_file():
            raise ValueError(f"adapter={adapter_dir}: missing {name}")
    return adapter_dir


def load_eval_model(spec: EvalModelSpec) -> tuple[DecoderLM, Any, ResolvedModel]:
    """Load ``(model, tokenizer, resolved)`` for ``spec``: adapters attached and merged as asked."""
    from selfaug_jax.lora import load_peft_adapter, merge_lora

    resolved = resolve_eval_model(spec)
    dtype = DTYPES[spec.dtype]
    model = load_pretrained(resolved.base_dir, dtype=dtype, param_dtype=dtype, num_layers=resolved.num_layers)
    if resolved.adapter_dir is not None:
        load_peft_adapter(model, resolved.adapter_dir)
        if spec.merge:
            merge_lora(model)
    return model, load_tokenizer(resolved.base_dir), resolved
