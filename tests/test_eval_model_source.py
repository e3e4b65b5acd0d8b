"""pretrained= / method= / adapter= resolution of selfaug_jax/eval/eval_model_source.py (no model is loaded)."""

from __future__ import annotations

import json

import pytest

from selfaug_jax.eval.eval_model_source import EvalModelSpec, resolve_eval_model
from selfaug_jax.models import DEFAULT_MODEL, resolve_model_dir


@pytest.fixture()
def run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"name": DEFAULT_MODEL, "num_layers": 2},
                                                 "train": {"methods": ["lora", "sft"]}}))
    adapter = run / "lora" / "export" / "adapter"
    adapter.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (adapter / name).write_text("{}")
    (run / "sft" / "export" / "hf").mkdir(parents=True)
    return run


def test_run_directory_methods(run_dir):
    sft = resolve_eval_model(EvalModelSpec(str(run_dir)))  # default: the last method, a full fine-tune
    assert (sft.base_dir, sft.adapter_dir, sft.num_layers) == (run_dir / "sft" / "export" / "hf", None, None)
    lora = resolve_eval_model(EvalModelSpec(str(run_dir), method="lora"))
    assert lora.base_dir == resolve_model_dir(DEFAULT_MODEL)
    assert (lora.adapter_dir, lora.num_layers) == (run_dir / "lora" / "export" / "adapter", 2)
    assert resolve_eval_model(EvalModelSpec(str(run_dir / "lora"))) == lora  # a method's directory


def test_bad_specs_are_one_line(run_dir, tmp_path):
    with pytest.raises(ValueError, match=r"selfaug/export: no exported model for method 'selfaug'.*methods of this "
                                         r"run: lora, sft$"):
        resolve_eval_model(EvalModelSpec(str(run_dir), method="selfaug"))
    with pytest.raises(ValueError, match=r"^method='lora' needs pretrained= to be a run output directory"):
        resolve_eval_model(EvalModelSpec(DEFAULT_MODEL, method="lora"))
    with pytest.raises(ValueError, match=r"^adapter=.*nowhere: missing adapter_config.json$"):
        resolve_eval_model(EvalModelSpec(DEFAULT_MODEL, adapter=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match=r"^dtype='float16' is not one of float32, bfloat16$"):
        EvalModelSpec(DEFAULT_MODEL, dtype="float16")
