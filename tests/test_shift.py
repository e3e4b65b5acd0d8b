"""Distribution-shift measurement (selfaug_jax/eval/shift.py): KL against a float64 numpy reference, exact zeros,
region bookkeeping, truncation."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from selfaug_jax.eval.shift import (
    REGION_INPUT,
    REGION_RESPONSE,
    ReferenceCache,
    ShiftConfig,
    build_shift_batches,
    encode_prompt,
    end_of_turn_id,
    measure_shift,
    token_kl_stats,
)
from selfaug_jax.models import load_pretrained, load_tokenizer
from torch_reference import make_tiny_hf_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_hf_model("llama-tied", d, seed=0)
    return d


@pytest.fixture(scope="module")
def models(tiny_dir):
    """(original, perturbed, identical copy of the original)."""
    original = load_pretrained(tiny_dir)
    perturbed = load_pretrained(tiny_dir)
    _, state = nnx.split(perturbed, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.update(perturbed, jax.tree.unflatten(treedef, noisy))
    return original, perturbed, load_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


def _batches(seed: int = 0):
    """Two hand-made batches (different lengths): right padding, dummy rows, an all-input row."""
    rng = np.random.default_rng(seed)
    out = []
    for b, t in ((3, 10), (2, 7)):
        ids = rng.integers(0, 128, (b, t)).astype(np.int32)
        mask = np.zeros((b, t), np.int32)
        region = np.zeros((b, t), np.int32)
        for r in range(b):
            n = int(rng.integers(3, t + 1))
            n_p = int(rng.integers(1, n + 1))  # n_p == n: a row without response
            mask[r, :n] = 1
            region[r, :n_p] = REGION_INPUT
            region[r, n_p:n] = REGION_RESPONSE
        out.append(dict(input_ids_bt=ids, attention_mask_bt=mask, region_bt=region))
    out[0]["region_bt"][2] = 0  # a dummy row (region 0 everywhere) is ignored
    out[0]["attention_mask_bt"][2] = 0
    out[0]["attention_mask_bt"][2, 0] = 1
    return out


def _numpy_reference(original, finetuned, batches):
    sums, counts = np.zeros(2), np.zeros(2, np.int64)
    for bt in batches:
        lo = np.asarray(original(bt["input_ids_bt"], attention_mask=bt["attention_mask_bt"]), np.float64)
        lf = np.asarray(finetuned(bt["input_ids_bt"], attention_mask=bt["attention_mask_bt"]), np.float64)

        def log_softmax(x):
            x = x - x.max(-1, keepdims=True)
            return x - np.log(np.exp(x).sum(-1, keepdims=True))

        lpo, lpf = log_softmax(lo), log_softmax(lf)
        kl = (np.exp(lpo) * (lpo - lpf)).sum(-1)
        for j, region in enumerate((REGION_INPUT, REGION_RESPONSE)):
            sel = bt["region_bt"] == region
            sums[j] += kl[sel].sum()
            counts[j] += sel.sum()
    return sums / np.maximum(counts, 1), counts


@pytest.mark.parametrize("chunk_tokens", [12, 1024])  # 12 over B=3: chunks of 4 positions, the last one padded
def test_kl_matches_float64_numpy(models, chunk_tokens):
    original, perturbed, _ = models
    batches = _batches()
    ref, counts = _numpy_reference(original, perturbed, batches)
    got = token_kl_stats(original, perturbed, batches, chunk_tokens=chunk_tokens)
    assert got["n_input_tokens"] == counts[0] and got["n_response_tokens"] == counts[1]
    assert counts.min() > 0 and ref.min() > 1e-3  # a real, non-trivial shift
    np.testing.assert_allclose([got["input_kl"], got["response_kl"]], ref, rtol=2e-5)


def test_identical_models_give_exactly_zero(models):
    original, _, copy = models
    batches = _batches(1)
    got = token_kl_stats(original, copy, batches)
    assert got["input_kl"] == 0.0 and got["response_kl"] == 0.0
    none = token_kl_stats(None, original, batches)
    assert none["input_kl"] == 0.0 and none["response_kl"] == 0.0
    assert (none["n_input_tokens"], none["n_response_tokens"]) == (got["n_input_tokens"], got["n_response_tokens"])


def test_empty_regions_give_zero_not_nan(models):
    original, perturbed, _ = models
    bt = _batches()[1]
    bt["region_bt"] = np.where(bt["region_bt"] == REGION_RESPONSE, REGION_INPUT, bt["region_bt"])
    got = token_kl_stats(original, perturbed, [bt])
    assert got["response_kl"] == 0.0 and got["n_response_tokens"] == 0 and got["input_kl"] > 0
    empty = token_kl_stats(original, perturbed, [])
    assert empty == {"input_kl": 0.0, "response_kl": 0.0, "n_input_tokens": 0, "n_response_tokens": 0,
                     "per_example": {"input_kl_sum": [], "n_input_tokens": [], "response_kl_sum": [],
                                     "n_response_tokens": []}}


def test_padding_with_region_is_rejected(models):
    bt = _batches()[1]
    bt["attention_mask_bt"][0, :] = 0
    with pytest.raises(ValueError, match="padding position"):
        token_kl_stats(None, models[0], [bt])


def test_build_batches_region_bookkeeping(tokenizer):
    prompts = [[{"role": "user", "content": "Explain why the sky is blue."}],
               [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
               "What is two plus two?"]
    responses = ["Because of Rayleigh scattering.", "Red", "Four."]
    cfg = ShiftConfig(batch_size=2, buckets=(16, 64, 128), max_length=128)
    batches = build_shift_batches(tokenizer, prompts, responses, cfg)
    eot = end_of_turn_id(tokenizer)
    assert eot == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert [b["n_rows"] for b in batches] == [2, 1] and all(b["input_ids_bt"].shape[0] == 2 for b in batches)
    seen = {}
    for b in batches:
        assert b["input_ids_bt"].shape[1] in (64, 128) and b["n_truncated"] == 0
        for r in range(b["n_rows"]):
            ids, reg = b["input_ids_bt"][r], b["region_bt"][r]
            p_ids = ids[reg == REGION_INPUT].tolist()
            r_ids = ids[reg == REGION_RESPONSE].tolist()
            assert r_ids[-1] == eot
            assert b["attention_mask_bt"][r].sum() == len(p_ids) + len(r_ids)
            # regions are contiguous: prompt then response then padding
            n = len(p_ids) + len(r_ids)
            assert (reg[:len(p_ids)] == REGION_INPUT).all() and (reg[n:] == 0).all()
            seen[tokenizer.decode(r_ids[:-1])] = p_ids
        assert (b["region_bt"][b["n_rows"]:] == 0).all()  # dummy rows
    for prompt, response in zip(prompts, responses):
        assert seen[response] == encode_prompt(tokenizer, prompt)
    stats = token_kl_stats(None, None, batches)
    n_p = sum(len(encode_prompt(tokenizer, p)) for p in prompts)
    n_r = sum(len(tokenizer.encode(r, add_special_tokens=False)) + 1 for r in responses)
    assert (stats["n_input_tokens"], stats["n_response_tokens"]) == (n_p, n_r)


def test_no_responses_and_truncation(tokenizer, models):
    prompts = [[{"role": "user", "content": "word " * 40}], [{"role": "user", "content": "Hi"}]]
    n_long = len(encode_prompt(tokenizer, prompts[0]))
    cfg = ShiftConfig(batch_size=4, buckets=(32,), max_length=32)
    batches = build_shift_batches(tokenizer, prompts, None, cfg)
    assert len(batches) == 1 and batches[0]["input_ids_bt"].shape == (4, 32)
    assert batches[0]["n_truncated"] == 1 and n_long > 32
    long_row = batches[0]["input_ids_bt"][0].tolist()
    assert long_row == encode_prompt(tokenizer, prompts[0])[-32:]  # cut from the left
    assert not (batches[0]["region_bt"] == REGION_RESPONSE).any()
    # a response longer than max_length keeps one prompt token
    batches = build_shift_batches(tokenizer, prompts[1:], ["a b " * 40], cfg)
    reg = batches[0]["region_bt"][0]
    assert (reg == REGION_INPUT).sum() == 1 and (reg == REGION_RESPONSE).sum() == 31
    stats = measure_shift(None, models[0], tokenizer, prompts, None, cfg)
    assert stats["response_kl"] == 0.0 and stats["n_response_tokens"] == 0 and stats["n_truncated"] == 1
    assert stats["n_examples"] == 2 and stats["input_kl"] == 0.0


def test_reference_cache_reuses_and_invalidates(models):
    original, perturbed, copy = models
    batches = _batches(2)
    cache = ReferenceCache()
    first = token_kl_stats(original, perturbed, batches, reference_cache=cache)
    assert (cache.hits, cache.misses) == (0, 2)
    again = token_kl_stats(original, perturbed, batches, reference_cache=cache)
    assert (cache.hits, cache.misses) == (2, 2) and again == first
    # another original (equal weights, other arrays): the cache empties itself and recomputes
    other = token_kl_stats(copy, perturbed, batches, reference_cache=cache)
    assert (cache.hits, cache.misses) == (2, 4) and other == first
    assert token_kl_stats(original, perturbed, batches, reference_cache=None) == first


def test_per_example_sums_match_numpy_rows_in_prompt_order(models):
    """Per-prompt KL sums and counts (what the bootstrap resamples) equal a float64 per-row reference, in prompt
    order (``row_index_b``, not batch order); dummy rows (-1) are left out; they add up to the pooled sums."""
    original, perturbed, _ = models
    batches = _batches(2)
    batches[0]["row_index_b"] = np.array([3, 0, -1])  # row 2 is the dummy row
    batches[1]["row_index_b"] = np.array([2, 1])
    got = token_kl_stats(original, perturbed, batches)
    per = got["per_example"]
    ref_sums, ref_counts = {}, {}
    for bt in batches:
        lo = np.asarray(original(bt["input_ids_bt"], attention_mask=bt["attention_mask_bt"]), np.float64)
        lf = np.asarray(perturbed(bt["input_ids_bt"], attention_mask=bt["attention_mask_bt"]), np.float64)
        lpo = lo - lo.max(-1, keepdims=True)
        lpo = lpo - np.log(np.exp(lpo).sum(-1, keepdims=True))
        lpf = lf - lf.max(-1, keepdims=True)
        lpf = lpf - np.log(np.exp(lpf).sum(-1, keepdims=True))
        kl = (np.exp(lpo) * (lpo - lpf)).sum(-1)
        for r, i in enumerate(bt["row_index_b"]):
            if i >= 0:
                ref_sums[i] = [kl[r][bt["region_bt"][r] == g].sum() for g in (REGION_INPUT, REGION_RESPONSE)]
                ref_counts[i] = [int((bt["region_bt"][r] == g).sum()) for g in (REGION_INPUT, REGION_RESPONSE)]
    assert sorted(ref_sums) == [0, 1, 2, 3]
    assert per["n_input_tokens"] == [ref_counts[i][0] for i in range(4)]
    assert per["n_response_tokens"] == [ref_counts[i][1] for i in range(4)]
    np.testing.assert_allclose(per["input_kl_sum"], [ref_sums[i][0] for i in range(4)], rtol=5e-5)
    np.testing.assert_allclose(per["response_kl_sum"], [ref_sums[i][1] for i in range(4)], rtol=5e-5, atol=1e-9)
    assert got["input_kl"] == pytest.approx(sum(per["input_kl_sum"]) / sum(per["n_input_tokens"]), rel=1e-6)


def test_build_batches_row_index(tokenizer):
    prompts = ["Hi", "Tell me a long story about a dragon and a knight who become friends.", "Why?"]
    batches = build_shift_batches(tokenizer, prompts, None, ShiftConfig(batch_size=2, buckets=(32, 64),
                                                                        max_length=64))
    assert [b["row_index_b"].tolist() for b in batches] == [[1, 0], [2, -1]] or \
        [b["row_index_b"].tolist() for b in batches] == [[1, 2], [0, -1]]


def test_row_bucket_halves_while_the_rows_fit():
    from selfaug_jax.eval.shift import row_bucket

    assert [row_bucket(n, 32) for n in (1, 8, 9, 16, 17, 31, 32)] == [8, 8, 16, 16, 32, 32, 32]
    assert row_bucket(3, 4) == 4 and row_bucket(5, 48) == 12 and row_bucket(13, 48) == 24


def test_last_shift_batch_is_row_bucketed(tokenizer):
    prompts = [f"Question number {i}?" for i in range(11)]
    batches = build_shift_batches(tokenizer, prompts, None, ShiftConfig(batch_size=32, buckets=(64,), max_length=64))
    assert [(b["n_rows"], b["input_ids_bt"].shape[0]) for b in batches] == [(11, 16)]
    assert (batches[0]["row_index_b"][11:] == -1).all() and (batches[0]["region_bt"][11:] == 0).all()
