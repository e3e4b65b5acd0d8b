"""The lm-evaluation-harness backend (selfaug_jax/eval/lm_eval_backend.py) against lm-eval's own HF backend.

One tiny random llama (the real default tokenizer, 2 layers, 64 positions so rolling windows and truncation are
exercised) is exported as an HF directory; lm-eval runs three local tasks (tests/fixtures/lm_eval: 20-item multiple
choice, 10-item generation, 5-text perplexity) through ``selfaug-jax`` and through ``hf`` (torch, CPU, float32).
Per-request log-likelihoods agree within 1e-4, greedy generations and every metric exactly. Offline: local YAML +
JSONL only.
"""

from __future__ import annotations

import os

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from flax import nnx

from selfaug_jax.checkpoints.hf import save_hf_model
from selfaug_jax.models import DEFAULT_MODEL, DecoderLM, ModelConfig, load_tokenizer, resolve_model_dir

REPO = Path(__file__).resolve().parents[1]
TASK_DIR = REPO / "tests" / "fixtures" / "lm_eval"
TASKS = ["selfaug_tiny_mc", "selfaug_tiny_gen", "selfaug_tiny_rolling"]


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory) -> Path:
    tok = load_tokenizer(DEFAULT_MODEL)
    cfg = ModelConfig(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      tie_word_embeddings=True, max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = DecoderLM(cfg, rngs=nnx.Rngs(3))
    # Sharper next-token distributions than the 0.02 init (greedy decoding far from argmax ties).
    model.embed_tokens.embedding.set_value(model.embed_tokens.embedding[...] * 8.0)
    return save_hf_model(model, tmp_path_factory.mktemp("tiny") / "hf", tokenizer_dir=resolve_model_dir(DEFAULT_MODEL))


def _evaluate(model: str, model_args: str, batch_size: int, monkeypatch, tmp_path) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import selfaug_jax.eval.lm_eval_backend  # noqa: F401  (registers selfaug-jax)

    monkeypatch.chdir(REPO)  # the task YAMLs name their JSONL files relative to the repository root
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=TASKS, batch_size=batch_size,
                                   task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=False), log_samples=True,
                                   random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)


@pytest.fixture(scope="module")
def both(tiny_hf_dir, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        tmp = tmp_path_factory.mktemp("lm_eval")
        ours = _evaluate("selfaug-jax", f"pretrained={tiny_hf_dir},dtype=float32", 4, mp, tmp)
        ref = _evaluate("hf", f"pretrained={tiny_hf_dir},dtype=float32,device=cpu", 1, mp, tmp)
    finally:
        mp.undo()
    return ours, ref


def _by_doc(samples: list[dict]) -> dict[int, dict]:
    return {s["doc_id"]: s for s in samples}


def test_multiple_choice_loglikelihoods_match_hf(both):
    ours, ref = both
    a, b = _by_doc(ours["samples"]["selfaug_tiny_mc"]), _by_doc(ref["samples"]["selfaug_tiny_mc"])
    assert len(a) == len(b) == 20
    for doc_id in a:
        for (ll_a, g_a), (ll_b, g_b) in zip(
                [r[0] for r in a[doc_id]["resps"]], [r[0] for r in b[doc_id]["resps"]], strict=True):
            assert abs(float(ll_a) - float(ll_b)) < 1e-4, (doc_id, ll_a, ll_b)
            assert bool(g_a) == bool(g_b)
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["selfaug_tiny_mc"][metric] == ref["results"]["selfaug_tiny_mc"][metric]


def test_generations_identical_to_hf(both):
    ours, ref = both
    a, b = _by_doc(ours["samples"]["selfaug_tiny_gen"]), _by_doc(ref["samples"]["selfaug_tiny_gen"])
    assert len(a) == len(b) == 10
    texts = [a[d]["resps"][0][0] for d in sorted(a)]
    assert texts == [b[d]["resps"][0][0] for d in sorted(b)]
    assert any(t.strip() for t in texts)  # the comparison is not between empty strings
    assert ours["results"]["selfaug_tiny_gen"]["exact_match,none"] == ref["results"]["selfaug_tiny_gen"][
        "exact_match,none"]


def test_rolling_loglikelihoods_match_hf(both):
    ours, ref = both
    a, b = _by_doc(ours["samples"]["selfaug_tiny_rolling"]), _by_doc(ref["samples"]["selfaug_tiny_rolling"])
    assert len(a) == len(b) == 5
    for doc_id in a:
        ll_a, ll_b = float(a[doc_id]["resps"][0][0]), float(b[doc_id]["resps"][0][0])
        assert abs(ll_a - ll_b) < 1e-4, (doc_id, ll_a, ll_b)  # sums over up to 5 windows of 64 tokens
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert math.isclose(ours["results"]["selfaug_tiny_rolling"][metric],
                            ref["results"]["selfaug_tiny_rolling"][metric], rel_tol=1e-5)


def test_unknown_model_arg_is_one_line_error():
    from selfaug_jax.eval.lm_eval_backend import BackendConfig

    with pytest.raises(ValueError, match=r"^selfaug-jax: unknown model_args key\(s\) temprature; valid keys: "):
        BackendConfig.from_kwargs({"pretrained": "x", "temprature": 1})
    with pytest.raises(ValueError, match="batch_size=auto is not supported"):
        BackendConfig.from_kwargs({"batch_size": "auto"})
    assert BackendConfig.from_kwargs({"merge": "false", "batch_size": "3", "device": "cpu"}) == BackendConfig(
        merge=False, batch_size=3)


def test_experiment_hook_runs_tasks_on_an_in_memory_model(tiny_hf_dir, both, monkeypatch, tmp_path):
    from selfaug_jax.eval.lm_eval_tasks import lm_eval_markdown, run_lm_eval_tasks
    from selfaug_jax.experiment.config import build_config
    from selfaug_jax.models import load_pretrained

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    model, tok = load_pretrained(tiny_hf_dir), load_tokenizer(tiny_hf_dir)
    res = run_lm_eval_tasks(model, tok, ["selfaug_tiny_mc"], include_path=str(TASK_DIR), limit=8, batch_size=4,
                            include_defaults=False)
    ours = _by_doc(both[0]["samples"]["selfaug_tiny_mc"])
    expected_acc = sum(int(ours[d]["acc"]) for d in range(8)) / 8  # the first 8 documents of the full run
    assert res["selfaug_tiny_mc"]["acc"] == expected_acc and res["_wall_s"] > 0
    md = lm_eval_markdown({"base": res, "lora": res})
    assert f"| selfaug_tiny_mc | acc | {expected_acc:.4f} | {expected_acc:.4f} |" in md
    cfg = build_config("smoke", ["eval.lm_eval_tasks=[selfaug_tiny_mc,selfaug_tiny_gen]",
                                 f"eval.lm_eval_include_path={TASK_DIR}", "eval.lm_eval_limit=4"])
    assert cfg.eval.lm_eval_tasks == ("selfaug_tiny_mc", "selfaug_tiny_gen") and cfg.eval.lm_eval_limit == 4


@pytest.fixture(scope="module")
def tiny_lm(tiny_hf_dir):
    from selfaug_jax.eval.lm_eval_backend import SelfAugJaxLM

    return SelfAugJaxLM(pretrained=str(tiny_hf_dir), batch_size=4)


def test_chat_template_renders_as_lm_eval_hf(tiny_lm):
    from types import SimpleNamespace

    from lm_eval.models.huggingface import HFLM

    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"}]
    hf_like = SimpleNamespace(tokenizer=tiny_lm.tokenizer, chat_template_args={})
    for add in (True, False):
        assert tiny_lm.apply_chat_template(history, add) == HFLM.apply_chat_template(hf_like, history, add)
    assert tiny_lm.chat_template(True) == tiny_lm.tokenizer.chat_template
    assert tiny_lm.apply_chat_template(history).endswith("<|im_start|>assistant\n")


def test_few_compiled_shapes_and_batch_invariance(tiny_lm):
    from lm_eval.api.instance import Instance

    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
    reqs = [Instance("loglikelihood", {}, (" ".join(words[: 1 + i % 17]), " " + words[i % 5]), i)
            for i in range(30)]
    scores = tiny_lm.loglikelihood(reqs)
    assert tiny_lm._scorer._cache_size() == 1  # 30 requests of 2-19 tokens: one [4, 32] shape
    one = [tiny_lm.loglikelihood([r])[0] for r in reqs[:5]]  # alone in a batch of dummy rows: same values
    assert [s[1] for s in one] == [s[1] for s in scores[:5]]
    np.testing.assert_allclose([s[0] for s in one], [s[0] for s in scores[:5]], atol=1e-5)
    long = [Instance("loglikelihood", {}, (" ".join(words * 3), " end"), 0)]
    tiny_lm.loglikelihood(long)  # 52 tokens: the 64 bucket
    assert tiny_lm._scorer._cache_size() == 2


def test_single_token_stops_end_decoding_only_when_safe(tiny_lm):
    newline = tiny_lm.tokenizer.encode("\n", add_special_tokens=False)
    assert len(newline) == 1
    config, until = tiny_lm._generation_config({"until": ["\n", "Q:"], "max_gen_toks": 5, "do_sample": False})
    assert newline[0] in config.eos_token_ids and until == ["\n", "Q:", tiny_lm.tokenizer.eos_token]
    assert config.max_new_tokens == 5 and config.temperature == 0.0
    config, _ = tiny_lm._generation_config({"until": ["\n", "A\nB"]})  # "\n" inside a longer stop string
    assert newline[0] not in config.eos_token_ids and config.max_new_tokens == 256
    with pytest.raises(ValueError, match=r"^selfaug-jax: unsupported generation kwargs num_beams"):
        tiny_lm._generation_config({"until": [], "num_beams": 4})


def test_bfloat16_scores_track_float32(tiny_hf_dir, tiny_lm):
    from lm_eval.api.instance import Instance

    from selfaug_jax.eval.lm_eval_backend import SelfAugJaxLM

    lm16 = SelfAugJaxLM(pretrained=str(tiny_hf_dir), dtype="bfloat16", batch_size=4)
    assert lm16.model.embed_tokens.embedding[...].dtype == np.dtype("bfloat16")
    reqs = [Instance("loglikelihood", {}, ("The capital of Peru is", c), i) for i, c in enumerate([" Lima", " Rome"])]
    ll32 = np.array([s[0] for s in tiny_lm.loglikelihood(reqs)])
    ll16 = np.array([s[0] for s in lm16.loglikelihood(reqs)])
    assert ll16.dtype == np.float64 and np.all(np.isfinite(ll16))
    np.testing.assert_allclose(ll16, ll32, rtol=0.05)


def test_run_directory_adapter_merged_or_not(tiny_hf_dir, tiny_lm, tmp_path):
    import json

    import jax
    from lm_eval.api.instance import Instance

    from selfaug_jax.eval.lm_eval_backend import SelfAugJaxLM
    from selfaug_jax.lora import LoRAConfig, add_lora, save_peft_adapter
    from selfaug_jax.models import LoRAParam, load_pretrained

    run = tmp_path / "run"
    model = add_lora(load_pretrained(tiny_hf_dir), LoRAConfig(rank=4, alpha=8.0, dropout=0.0))
    lora_state = nnx.state(model, LoRAParam)  # non-zero B (A random, B zero after add_lora): a visible change
    leaves, treedef = jax.tree.flatten(lora_state)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape, x.dtype)
                                                   for k, x in zip(keys, leaves)]))
    save_peft_adapter(model, LoRAConfig(rank=4, alpha=8.0, dropout=0.0), run / "lora" / "export" / "adapter")
    (run / "config.json").write_text(json.dumps({"model": {"name": str(tiny_hf_dir), "num_layers": None},
                                                 "train": {"methods": ["lora"]}}))
    reqs = [Instance("loglikelihood", {}, ("The capital of Peru is", c), i) for i, c in enumerate([" Lima", " Rome"])]
    merged = [s[0] for s in SelfAugJaxLM(pretrained=str(run), batch_size=4).loglikelihood(reqs)]
    unmerged = [s[0] for s in SelfAugJaxLM(pretrained=str(run), merge=False, batch_size=4).loglikelihood(reqs)]
    base = [s[0] for s in tiny_lm.loglikelihood(reqs)]
    np.testing.assert_allclose(merged, unmerged, atol=1e-4)
    assert max(abs(a - b) for a, b in zip(merged, base)) > 1e-2


def test_cli_bad_model_args_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "selfaug_jax.eval.lm_eval_cli", "--model", "selfaug-jax", "--model_args",
           f"pretrained={tmp_path / 'missing_dir'},temprature=0", "--tasks", "selfaug_tiny_mc", "--include_path",
           str(TASK_DIR)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: selfaug-jax: unknown model_args key(s) temprature; valid keys: pretrained, adapter, merge, method, "
        "dtype, batch_size, max_length, max_gen_toks, add_bos_token, min_bucket, prompt_bucket, logits_chunk")


def test_missing_model_is_one_line(tmp_path):
    from selfaug_jax.eval.lm_eval_backend import BackendError, SelfAugJaxLM

    with pytest.raises(BackendError, match=r"^selfaug-jax: cannot resolve model '.*nope': expected one of - "):
        SelfAugJaxLM(pretrained=str(tmp_path / "nope"))
    with pytest.raises(BackendError, match=r"^selfaug-jax: method='lora' needs pretrained= to be a run output"):
        SelfAugJaxLM(pretrained=DEFAULT_MODEL, method="lora")
