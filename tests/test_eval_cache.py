"""The base evaluation's disk cache (selfaug_jax/eval/base_cache.py) and compile-once evaluation (issue 13)."""

from __future__ import annotations

import dataclasses
import json
import logging

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from selfaug_jax.eval import base_cache, suite
from selfaug_jax.eval.base_cache import base_evaluation, cache_key, model_fingerprint
from selfaug_jax.eval.suite import EvalConfig, evaluate_model, prepare_eval_data, reference_responses
from selfaug_jax.models import DecoderLM, load_tokenizer
from _tiny_chat_model import tiny_chat_model

CFG = EvalConfig(n_rag=2, n_ifeval=2, n_shift_general=2, n_shift_rag=1, max_new_tokens_rag=3,
                 max_new_tokens_ifeval=3, max_new_tokens_shift=3, batch_size=2, n_knowledge=2, mc_max_length=128,
                 n_samples=1)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def data(tokenizer):
    return prepare_eval_data(tokenizer, CFG)


class _Calls:
    """Counts calls of the suite's two model-running entry points (monkeypatched where base_cache imports them)."""

    def __init__(self, monkeypatch):
        self.n = 0
        real_refs, real_eval = suite.reference_responses, suite.evaluate_model

        def refs(*a, **k):
            self.n += 1
            return real_refs(*a, **k)

        def ev(*a, **k):
            self.n += 1
            return real_eval(*a, **k)

        monkeypatch.setattr(suite, "reference_responses", refs)
        monkeypatch.setattr(suite, "evaluate_model", ev)


def test_hit_reuses_everything_and_says_so(tmp_path, tokenizer, data, monkeypatch, caplog):
    cfg = dataclasses.replace(CFG, cache_dir=str(tmp_path))
    model = tiny_chat_model(tokenizer, 0)
    calls = _Calls(monkeypatch)
    first = base_evaluation(model, tokenizer, data, cfg)
    assert not first.cache_hit and calls.n == 2 and first.path.exists()
    assert first.samples["cache"] == {"hit": False, "path": str(first.path), "key": first.key}
    with caplog.at_level(logging.INFO, logger=base_cache.__name__):
        second = base_evaluation(model, tokenizer, data, cfg)
    assert second.cache_hit and calls.n == 2  # nothing ran
    assert "reused from" in caplog.text and str(first.path) in caplog.text
    assert second.metrics == first.metrics and second.metrics["knowledge_acc"] is not None
    assert second.reference_responses["general"] == first.reference_responses["general"]
    assert second.samples["items"] == json.loads(json.dumps(first.samples["items"]))
    assert second.reference_responses["rag"] == first.reference_responses["rag"]


def test_any_key_change_is_a_miss(tmp_path, tokenizer, data):
    cfg = dataclasses.replace(CFG, cache_dir=str(tmp_path))
    model = tiny_chat_model(tokenizer, 0)
    key, inputs = cache_key(model, tokenizer, data, cfg)
    # weights: one parameter element changed
    perturbed = tiny_chat_model(tokenizer, 0)
    perturbed.norm.scale[...] = perturbed.norm.scale[...].at[0].add(1e-3)
    assert model_fingerprint(perturbed) != inputs["weights"]
    assert cache_key(perturbed, tokenizer, data, cfg)[0] != key
    # same weights, another object: same key (a fresh load of the base model hits)
    assert cache_key(tiny_chat_model(tokenizer, 0), tokenizer, data, cfg)[0] == key
    # compute dtype of the model (another graph, other rounding)
    bf16 = DecoderLM(model.config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert cache_key(bf16, tokenizer, data, cfg)[0] != key
    # eval config: a budget; data: another subset
    assert cache_key(model, tokenizer, data, dataclasses.replace(cfg, max_new_tokens_rag=4))[0] != key
    other_data = prepare_eval_data(tokenizer, dataclasses.replace(CFG, seed=1))
    assert cache_key(model, tokenizer, other_data, cfg)[0] != key
    # code version
    try:
        base_cache.EVAL_CACHE_VERSION += 1
        assert cache_key(model, tokenizer, data, cfg)[0] != key
    finally:
        base_cache.EVAL_CACHE_VERSION -= 1
    # the cache's own options are not part of the key
    assert cache_key(model, tokenizer, data, dataclasses.replace(cfg, cache_dir="/elsewhere"))[0] == key


def test_corrupted_or_stale_file_is_recomputed(tmp_path, tokenizer, data, monkeypatch, caplog):
    cfg = dataclasses.replace(CFG, cache_dir=str(tmp_path))
    model = tiny_chat_model(tokenizer, 0)
    first = base_evaluation(model, tokenizer, data, cfg)
    good = json.loads(first.path.read_text())
    calls = _Calls(monkeypatch)
    for damage in ('{"key": "trunc', json.dumps({**good, "key": "0" * 64}), json.dumps({"key": good["key"]}), "[]"):
        first.path.write_text(damage)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=base_cache.__name__):
            again = base_evaluation(model, tokenizer, data, cfg)
        assert not again.cache_hit and "damaged" in caplog.text and str(first.path) in caplog.text
        assert again.metrics == first.metrics
        assert json.loads(first.path.read_text())["key"] == good["key"]  # rewritten whole
    assert calls.n == 8
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary file


def test_cache_off_writes_nothing(tmp_path, tokenizer, data):
    cfg = dataclasses.replace(CFG, cache=False, cache_dir=str(tmp_path))
    out = base_evaluation(tiny_chat_model(tokenizer, 0), tokenizer, data, cfg)
    assert not out.cache_hit and out.path is None and not any(tmp_path.iterdir())
    assert "cache" not in out.samples


class _CompileCount:
    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.n = 0

    def __call__(self, event, duration, **_):
        if event == self.EVENT:
            self.n += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


def test_every_part_compiles_once_per_shape_across_models(tokenizer, data):
    """A second fine-tuned model of the same structure compiles nothing: generation, shift KL and MC scoring reuse
    the executables of the first (the recorded run recompiled the shift's KL functions for every model)."""
    cfg = dataclasses.replace(CFG, cache=False)
    base = tiny_chat_model(tokenizer, 10)
    refs = reference_responses(base, tokenizer, data, cfg)
    evaluate_model(base, tokenizer, data, cfg, original_model=base, reference_responses=refs)
    with _CompileCount() as first:
        m1, _ = evaluate_model(tiny_chat_model(tokenizer, 11), tokenizer, data, cfg, original_model=base,
                               reference_responses=refs)
    with _CompileCount() as second:
        m2, _ = evaluate_model(tiny_chat_model(tokenizer, 12), tokenizer, data, cfg, original_model=base,
                               reference_responses=refs)
    with _CompileCount() as probe:  # the counter sees compilations
        jax.jit(lambda x: x * 3 + 1)(jnp.ones(5))
    assert probe.n >= 1
    assert second.n == 0, f"{second.n} compilations for a model whose structure was already evaluated"
    assert m1["shift_general_input"] > 0 and m2["shift_general_input"] > 0
