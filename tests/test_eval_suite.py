"""The evaluation suite (selfaug_jax/eval/suite.py) on a tiny random model with the real default tokenizer."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import pytest
from flax import nnx

from selfaug_jax.data.default_task import SYSTEM_PROMPT
from selfaug_jax.data.prompts import DocumentsTemplate
from selfaug_jax.eval.report import DEFAULT_METRIC_INFO, resolve_metric_info, validate_results
from selfaug_jax.eval.suite import (
    EXTRA_METRIC_INFO,
    EvalConfig,
    evaluate_model,
    prepare_eval_data,
    reference_responses,
    select_subset,
)
from selfaug_jax.models import load_tokenizer
from _tiny_chat_model import tiny_chat_model

ARC = Path(__file__).parent / "fixtures" / "mc" / "arc_challenge.jsonl"
CFG = EvalConfig(n_rag=4, n_ifeval=4, n_shift_general=4, n_shift_rag=4, max_new_tokens_rag=4,
                 max_new_tokens_ifeval=4, max_new_tokens_shift=4, batch_size=4, mc_files={"arc_c": str(ARC)},
                 n_mc=2, mc_max_length=128, n_samples=2, n_knowledge=6)
RANGE_01 = ("rag_", "ifeval_", "arc_c_", "knowledge_", "general_collapse")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def setup(tokenizer):
    original = tiny_chat_model(tokenizer, 0)
    data = prepare_eval_data(tokenizer, CFG)
    refs = reference_responses(original, tokenizer, data, CFG)
    return original, data, refs


def test_prepare_eval_data(setup, tokenizer):
    _, data, refs = setup
    assert len(data.rag_examples) == len(data.rag_prompts) == 4 and len(data.ifeval_records) == 4
    assert len(data.general_prompts) == len(data.general_ids) == 4 and len(data.shift_rag_prompts) == 4
    assert data.info["rag_unanswerable"] >= 1  # stratified sample: the refusal accuracy is defined
    assert all(r["id"].startswith("test-") for r in data.rag_examples)
    assert all(i.startswith("dev-") for i in data.shift_rag_ids)
    chat = data.rag_prompts[0]
    assert chat[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert chat[1]["role"] == "user" and chat[1]["content"].startswith("### Paragraph:\n[1] ")
    assert chat[1]["content"].endswith(data.rag_examples[0]["question"]) and len(chat) == 2
    assert (len(refs["general"]), len(refs["rag"])) == (4, 4) and all(isinstance(s, str) for s in refs["general"])
    assert refs["generation"]["general"]["n"] == 4 and refs["generation"]["general"]["max_new_tokens"] == 4
    assert len(data.mc_datasets["knowledge"]) == 6 and data.mc_datasets["knowledge"][0].context.startswith("Question:")
    again = prepare_eval_data(tokenizer, CFG)  # deterministic
    assert [r["id"] for r in again.rag_examples] == [r["id"] for r in data.rag_examples]
    assert again.general_ids == data.general_ids
    assert select_subset(list(range(10)), 3, 0, "x") == select_subset(list(range(10)), 3, 0, "x")
    assert select_subset(list(range(10)), None, 0, "x") == list(range(10))
    small = EvalConfig.for_cpu(n_rag=5)
    assert (small.n_rag, small.n_ifeval, small.n_shift_rag) == (5, 32, 8)


def test_evaluate_model_metrics(setup, tokenizer):
    original, data, refs = setup
    metrics, samples = evaluate_model(original, tokenizer, data, CFG, original_model=original,
                                      reference_responses=refs)
    expected = {"rag_em", "rag_f1", "rag_contains", "rag_refusal_acc", "rag_false_refusal", "ifeval_prompt_strict",
                "ifeval_inst_strict", "ifeval_prompt_loose", "ifeval_inst_loose", "shift_general_input",
                "shift_general_response", "shift_rag_input", "shift_rag_response", "arc_c_acc", "arc_c_acc_norm",
                "general_collapse", "general_length_ratio", "knowledge_acc", "knowledge_acc_norm"}
    assert set(metrics) == expected
    base_words = sum(len(__import__("re").findall(r"\w+", t)) for t in refs["general"])
    assert (metrics["general_length_ratio"] is None) == (base_words == 0)
    if base_words == 0:  # a random tiny model may answer without any word: the ratio is undefined, not 0
        metrics.pop("general_length_ratio")
    for key, v in metrics.items():
        assert isinstance(v, float) and math.isfinite(v), (key, v)
        if key.startswith(RANGE_01):
            assert 0.0 <= v <= 1.0, (key, v)
    # the original model against itself: exactly zero (short cut: no forward pass)
    assert all(metrics[k] == 0.0 for k in metrics if k.startswith("shift_"))
    assert samples["shift"]["general"]["n_response_tokens"] > 0 and samples["shift"]["rag"]["n_input_tokens"] > 0
    assert len(samples["rag"]) == 2 and {"id", "prediction", "answer"} <= set(samples["rag"][0])
    assert len(samples["ifeval"]) == 2
    assert set(samples["timing_s"]) == {"rag", "ifeval", "general", "shift", "mc", "total"}
    assert metrics.get("general_length_ratio", 1.0) == 1.0  # the original's answers are the references (reused)
    assert samples["generation"]["general"]["reused"] is True
    # per-item values reproduce every metric: sum(num) / sum(den) (the bootstrap's input)
    for key, v in metrics.items():
        if key.startswith("shift_"):
            continue  # zero without a forward pass for the original model
        it = samples["items"][key]
        den = it["den"] if it["den"] is not None else [1.0] * len(it["num"])
        assert sum(it["num"]) / sum(den) == pytest.approx(v, abs=1e-12), key
    assert len(samples["items"]["ifeval_inst_strict"]["num"]) == 4 and len(samples["items"]["knowledge_acc"]["num"]) == 6
    gen = samples["generation"]["ifeval"]
    assert gen["n"] == 4 and gen["max_new_tokens"] == 4 and 0 <= gen["hit_cap"] <= 4 and gen["new_tokens_max"] <= 4
    # every key is known to the report (DEFAULT_METRIC_INFO, or EXTRA_METRIC_INFO passed as metric_info)
    known = set(DEFAULT_METRIC_INFO) | set(EXTRA_METRIC_INFO)
    assert {k for k in metrics if not k.startswith("arc_c_acc")} <= known and "arc_c_acc_norm" in known
    results = {"methods": {"base": metrics}, "metric_info": EXTRA_METRIC_INFO}
    validate_results(results)
    info = resolve_metric_info(results)
    assert all(info[k].group == "shift" and not info[k].higher_is_better for k in metrics if k.startswith("shift_"))


def test_shift_against_copy_and_perturbed(setup, tokenizer):
    original, data, refs = setup
    copy = tiny_chat_model(tokenizer, 0)  # same weights, separate object: goes through the KL computation
    metrics, _ = evaluate_model(copy, tokenizer, data, CFG, original_model=original, reference_responses=refs,
                                parts=("shift",))
    assert set(metrics) == {"shift_general_input", "shift_general_response", "shift_rag_input", "shift_rag_response"}
    assert all(v == 0.0 for v in metrics.values())
    perturbed = tiny_chat_model(tokenizer, 0)
    _, state = nnx.split(perturbed, nnx.Param)
    nnx.update(perturbed, jax.tree.map(lambda x: x * 1.5, state))
    metrics, _ = evaluate_model(perturbed, tokenizer, data, CFG, original_model=original, reference_responses=refs,
                                parts=("shift",))
    assert all(math.isfinite(v) and v > 0 for v in metrics.values()), metrics
    metrics, samples = evaluate_model(perturbed, tokenizer, data, CFG, original_model=original,
                                      reference_responses=refs, parts=("general", "shift"))
    words = [len(__import__("re").findall(r"\w+", t)) for t in refs["general"]]
    if sum(words):
        it = samples["items"]["general_length_ratio"]
        assert it["den"] == words and metrics["general_length_ratio"] == pytest.approx(sum(it["num"]) / sum(words))
    assert samples["generation"]["general"]["n"] == 4 and "reused" not in samples["generation"]["general"]
    it = samples["items"]["shift_general_input"]
    assert sum(it["num"]) / sum(it["den"]) == pytest.approx(metrics["shift_general_input"], rel=1e-6)
    with pytest.raises(ValueError, match="unknown parts"):
        evaluate_model(perturbed, tokenizer, data, CFG, original_model=original, reference_responses=refs,
                       parts=("rag", "speed"))


def test_rag_max_length_drops_lowest_ranked_documents(tokenizer):
    """``rag_max_length``: every prompt fits, documents go lowest-ranked first, and the counts are the real ones.

    Independent check: for each record, the kept documents must be exactly what a greedy pass in rank order keeps
    (each document if the prompt still fits), computed here by re-rendering every candidate prompt.
    """
    from selfaug_jax.data.default_task import load_default_task
    from selfaug_jax.eval.shift import encode_prompt
    from selfaug_jax.eval.suite import rag_chat, rag_chats

    records = load_default_task("test")[:6]
    limit = 300
    chats, counts = rag_chats(tokenizer, records, DocumentsTemplate(), limit)
    full = [rag_chat(r) for r in records]
    n_fitted = n_dropped = 0
    for rec, chat, whole in zip(records, chats, full):
        assert len(encode_prompt(tokenizer, chat)) <= limit
        docs = rec["documents"]
        kept: list[int] = []
        for i in range(len(docs)):  # rank order = list order of the shipped task
            trial = {**rec, "documents": [docs[j] for j in kept + [i]]}
            if len(encode_prompt(tokenizer, rag_chat(trial))) <= limit:
                kept.append(i)
        expected = rag_chat({**rec, "documents": [docs[j] for j in kept]})
        assert chat == expected
        n_fitted += chat != whole
        n_dropped += len(docs) - len(kept)
    assert counts == {"n_prompts_fitted": n_fitted, "n_documents_dropped": n_dropped, "n_prompts_too_long": 0}
    assert n_fitted > 0  # the limit really cuts this fixture
    data = prepare_eval_data(tokenizer, dataclasses.replace(CFG, rag_max_length=limit))
    assert data.info["rag"]["prompt_tokens_max"] <= limit


def test_periodic_config_overrides_and_validation():
    cfg = EvalConfig(n_ifeval=300, periodic={"n_ifeval": 16, "n_rag": 0}, periodic_parts=("ifeval", "shift"))
    sub = cfg.periodic_config()
    assert (sub.n_ifeval, sub.n_rag, sub.periodic, sub.periodic_parts) == (16, 0, {}, None)
    assert sub.n_shift_general == cfg.n_shift_general
    assert EvalConfig().periodic_config() == EvalConfig()
    with pytest.raises(ValueError, match=r"EvalConfig.periodic: unknown or nested field\(s\) \['n_ifevl'\]"):
        EvalConfig(periodic={"n_ifevl": 16})
    with pytest.raises(ValueError, match=r"EvalConfig.n_ifeval must be >= 0"):
        EvalConfig(periodic={"n_ifeval": -1})
    with pytest.raises(ValueError, match=r"periodic_parts: \['ifevl'\]"):
        EvalConfig(periodic_parts=("ifevl",))
