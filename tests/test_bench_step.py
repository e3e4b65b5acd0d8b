"""``bench/step.py``: the FLOP model, the synthetic batch, and one real run of the script on a tiny model."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from selfaug_jax.models import ModelConfig
from torch_reference import make_tiny_hf_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def step_bench():
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "bench" / "step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_step"] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_step", None)


def test_flop_model_by_hand(step_bench):
    cfg = ModelConfig(model_type="llama", vocab_size=100, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    # per layer: q 8x8 + k, v 8x4 each + o 8x8 + gate/up/down 3 x 8x12 = 64 + 64 + 64 + 288 = 480; head 8x100
    n = 2 * 480 + 800
    tok, attn = 3 * 16, 4 * 2 * 16 * 16 * 8 * 3
    lora = step_bench.model_flops(cfg, "lora", 3, 16, lora_params=50)
    assert lora["n_matmul_params"] == n
    assert lora["model_flops_per_step"] == 4 * n * tok + 6 * 50 * tok + 3 * attn
    selfaug = step_bench.model_flops(cfg, "selfaug", 3, 16, lora_params=50)
    assert selfaug["reference_flops"] == 2 * n * tok + attn
    assert selfaug["model_flops_per_step"] == lora["model_flops_per_step"] + 2 * n * tok + attn
    sft = step_bench.model_flops(cfg, "sft-selfaug", 3, 16, lora_params=0)
    assert sft["policy_flops"] == 6 * n * tok + 3 * attn


def test_synthetic_batch_is_75_percent_prompt(step_bench):
    batch = step_bench.synthetic_batch(2, 16, 100, seed=0)
    assert (batch["labels_bt"][:, :12] == -100).all()
    np.testing.assert_array_equal(batch["labels_bt"][:, 12:], batch["input_ids_bt"][:, 12:])
    assert batch["attention_mask_bt"].all()


@pytest.mark.parametrize("method", ["selfaug"])
def test_one_real_run_writes_a_record_and_a_table(step_bench, tmp_path, method):
    make_tiny_hf_model("llama-tied", tmp_path / "model")
    out = tmp_path / "step.jsonl"
    args = ["--method", method, "--batch", "2", "--seq", "24", "--steps", "2", "--model", str(tmp_path / "model"),
            "--attention-chunk", "8", "--lora-rank", "4", "--chunk-size", "16", "--json", "--out", str(out)]
    rec = step_bench.main(args)
    assert json.loads(out.read_text().splitlines()[-1]) == rec
    assert rec["attention_chunk"] == 8 and rec["steps"] == 2 and len(rec["step_times_s"]) == 2
    assert rec["xla_temp_bytes"] > 0 and rec["compile_s"] > 0
    assert rec["tokens_per_s"] == pytest.approx(48 / rec["median_step_s"])
    assert np.isfinite(rec["first_loss"]) and np.isfinite(rec["last_loss"])
    step_bench.main(args[:1] + ["lora"] + args[2:])
    table = step_bench.markdown_table(out)
    assert "| selfaug / lora |" in table and "| 2 x 24 float32 remat=dots attn=8 mesh=- " in table
