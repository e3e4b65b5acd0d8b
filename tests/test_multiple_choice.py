"""Tests for selfaug_jax.eval.multiple_choice / mc_readers with a char-level fake tokenizer and numpy models."""

from __future__ import annotations

import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from selfaug_jax.eval.multiple_choice import (
    MCConfig,
    MCExample,
    bucket_lengths,
    build_requests,
    evaluate_multiple_choice,
    load_mc_dataset,
    read_arc_jsonl,
    read_hellaswag_jsonl,
    read_mmlu_csv,
    read_mmlu_jsonl,
    score_examples,
)

FIX = Path(__file__).parent / "fixtures" / "mc"
VOCAB = 131  # 0 pad, 1 bos, 2 eos, ord(c) + 3 for ASCII


class CharTokenizer:
    """One token per character: id = ord(c) + 3 (ASCII), 3 for anything else."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [ord(c) + 3 if ord(c) < 128 else 3 for c in text]
        return ([self.bos_token_id] if add_special_tokens else []) + ids

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens)}


class BigramModel:
    """logits[b, t] = table[ids[b, t]] (+ pos[t]); records every call's arrays."""

    def __init__(self, table: np.ndarray, pos: np.ndarray | None = None):
        self.table, self.pos, self.calls = table, pos, []

    def __call__(self, ids_bt: np.ndarray, mask_bt: np.ndarray) -> np.ndarray:
        self.calls.append((ids_bt.copy(), mask_bt.copy()))
        out = self.table[ids_bt]
        if self.pos is not None:
            out = out + self.pos[None, : ids_bt.shape[1]]
        return out.astype(np.float32)


def _log_softmax(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    return row - (row.max() + np.log(np.exp(row - row.max()).sum()))


def _expected_ll(tok: CharTokenizer, model: BigramModel, context: str, continuation: str) -> float:
    """Independent loop: logits at position t (token t) predict token t+1."""
    ctx, full = tok.encode(context), tok.encode(context + continuation)
    ll = 0.0
    for t in range(len(ctx) - 1, len(full) - 1):
        row = model.table[full[t]] + (model.pos[t] if model.pos is not None else 0.0)
        ll += _log_softmax(row)[full[t + 1]]
    return ll


def test_hand_computed_loglikelihood():
    tok = CharTokenizer()
    table = np.zeros((VOCAB, VOCAB), np.float32)
    a, b, c = (ord(ch) + 3 for ch in "abc")
    table[b, c] = math.log(2.0)  # after 'b': p(c) = 2 / (V + 1)
    table[c, c] = math.log(3.0)  # after 'c': p(c) = 3 / (V + 2)
    ex = MCExample("ab", ("c", "cc"), label=1, source="hand:1", target_delimiter="")
    (score,) = score_examples([ex], BigramModel(table), tok, MCConfig(batch_size=2))
    p1 = math.log(2.0 / (VOCAB + 1))
    p2 = p1 + math.log(3.0 / (VOCAB + 2))
    np.testing.assert_allclose(score.loglikelihoods, [p1, p2], rtol=1e-5)
    assert score.n_tokens == (1, 2)
    assert score.pred == 0  # "c" alone is likelier than "cc"
    assert score.pred_mean == 1  # log(3/133) > log(2/132): the mean of "cc" beats "c"
    assert score.pred_norm == 1  # chars == tokens here
    assert score.is_greedy == (True, True)
    # a jitted model returns jax arrays: same numbers
    (score_jax,) = score_examples([ex], lambda i, m: jnp.asarray(table)[i], tok, MCConfig(batch_size=2))
    np.testing.assert_allclose(score_jax.loglikelihoods, [p1, p2], rtol=1e-5)


def test_matches_independent_loop_and_padding_invariance():
    tok = CharTokenizer()
    rng = np.random.default_rng(0)
    model = BigramModel(rng.normal(size=(VOCAB, VOCAB)).astype(np.float32),
                        pos=rng.normal(size=(256, VOCAB)).astype(np.float32))
    examples = read_arc_jsonl(FIX / "arc_challenge.jsonl")
    cfg = MCConfig(batch_size=3, max_length=256, min_bucket=16)
    scores = score_examples(examples, model, tok, cfg)
    for ex, s in zip(examples, scores):
        want = [_expected_ll(tok, model, ex.context, " " + ch) for ch in ex.choices]
        np.testing.assert_allclose(s.loglikelihoods, want, rtol=1e-5, atol=1e-4)
        assert s.n_tokens == tuple(len(ch) + 1 for ch in ex.choices)
    # batches: static batch size, bucketed lengths, right padding (mask = ones then zeros)
    buckets = set(bucket_lengths(256, 16))
    n_rows = sum(len(ex.choices) for ex in examples)
    assert len(model.calls) == math.ceil(n_rows / 3)
    for ids, mask in model.calls:
        assert ids.shape[0] == 3 and ids.shape[1] in buckets and ids.dtype == np.int32
        for row in mask:
            n = int(row.sum())
            assert n >= 1 and row[:n].all() and not row[n:].any()
    # a larger min bucket pads more; the (position-aware, right-padded) scores must not change
    scores_big = score_examples(examples, BigramModel(model.table, model.pos), tok,
                                MCConfig(batch_size=5, max_length=256, min_bucket=128))
    for s, s2 in zip(scores, scores_big):
        np.testing.assert_allclose(s.loglikelihoods, s2.loglikelihoods, rtol=1e-6)


def test_acc_vs_acc_norm_vs_acc_mean():
    tok = CharTokenizer()
    model = BigramModel(np.zeros((VOCAB, VOCAB), np.float32))  # uniform: every token costs log(V)
    ex = MCExample("Q:", ("x", "xyz"), label=1, source="s:1")
    (s,) = score_examples([ex], model, tok, MCConfig(batch_size=4))
    lv = math.log(VOCAB)
    np.testing.assert_allclose(s.loglikelihoods, [-2 * lv, -4 * lv], rtol=1e-5)
    assert s.pred == 0  # fewer tokens wins the raw sum
    assert s.pred_norm == 1  # per character: -2lv/1 < -4lv/3
    assert s.pred_mean == 0  # per token: tie -> first index
    res = evaluate_multiple_choice({"toy": [ex, ex]}, model, tok, MCConfig(batch_size=4))
    assert res["toy"] == {"acc": 0.0, "acc_norm": 1.0, "acc_mean": 0.0, "n": 2, "n_truncated": 0}


def test_truncation_and_limits():
    tok = CharTokenizer()
    rng = np.random.default_rng(1)
    model = BigramModel(rng.normal(size=(VOCAB, VOCAB)).astype(np.float32))
    ex = MCExample(("a long context " * 4).strip(), ("yes", "no"), label=0, source="t:1")
    cfg = MCConfig(batch_size=2, max_length=16, min_bucket=8)
    reqs = build_requests([ex], tok, cfg)
    assert [len(r.input_ids) for r in reqs] == [16, 16] and all(r.truncated for r in reqs)
    full = tok.encode(ex.context + " yes")
    assert list(reqs[0].input_ids) == full[-17:-1] and list(reqs[0].targets) == full[-16:]
    (s,) = score_examples([ex], model, tok, cfg)
    assert s.n_truncated == 2
    # bigram: the truncated left context does not change the continuation's log-likelihood
    want = [_expected_ll(tok, model, ex.context, " " + c) for c in ex.choices]
    np.testing.assert_allclose(s.loglikelihoods, want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match=r"t:2: choice 0 has 21 continuation tokens > MCConfig.max_length=16"):
        build_requests([MCExample("q", ("z" * 20, "n"), 0, "t:2")], tok, cfg)
    # trailing context spaces move to the continuation (lm-eval-harness _encode_pair)
    (r0, _) = build_requests([MCExample("Answer: ", ("A", "B"), 0, "t:3", target_delimiter="")], tok, cfg)
    assert r0.n_cont == 2 and r0.targets[-2:] == tuple(tok.encode(" A"))
    limited = evaluate_multiple_choice({"d": [ex] * 5}, model, tok, MCConfig(batch_size=4, limit=3))
    assert limited["d"]["n"] == 3


def test_readers_parse_fixtures():
    mmlu = read_mmlu_csv(FIX / "astronomy_basics_test.csv")
    assert [e.label for e in mmlu] == [1, 2, 2, 3]
    assert [e.source for e in mmlu] == [f"{FIX / 'astronomy_basics_test.csv'}:{i}" for i in (1, 2, 3, 4)]
    assert mmlu[0].subject == "astronomy_basics" and mmlu[0].choices == ("A", "B", "C", "D")
    assert mmlu[0].context == (
        "The following are multiple choice questions (with answers) about astronomy basics.\n\n"
        "Which planet in our solar system is closest to the Sun?\nA. Venus\nB. Mercury\nC. Earth\nD. Mars\nAnswer:"
    )
    assert "D. Mass, in solar units\n" in mmlu[2].context  # quoted comma kept in one field
    hf = read_mmlu_jsonl(FIX / "mmlu_hf.jsonl")
    assert [e.label for e in hf] == [1, 2, 0] and hf[2].subject == "high_school_chemistry"
    arc = read_arc_jsonl(FIX / "arc_challenge.jsonl")
    assert [e.label for e in arc] == [0, 2, 1, 1] and len(arc[3].choices) == 3
    assert arc[2].context == "Question: Which tool is best for measuring the mass of a rock?\nAnswer:"
    hs = read_hellaswag_jsonl(FIX / "hellaswag_val.jsonl")
    assert [e.label for e in hs] == [2, 0, 1]
    assert hs[0].context == "Making tea: A woman fills a kettle with water and sets it on the stove. She"
    assert hs[1].context == "Home and Garden: How to water a houseplant. Check the soil."
    assert hs[2].choices[1] == "pedals down the street."
    # auto-detection, and a directory of hendrycks CSVs
    assert [e.dataset for e in load_mc_dataset(FIX / "hellaswag_val.jsonl")] == ["hellaswag"] * 3
    assert len(load_mc_dataset(FIX / "arc_challenge.jsonl")) == 4
    assert len(load_mc_dataset(FIX / "mmlu_hf.jsonl")) == 3
    assert len(load_mc_dataset(FIX)) == 4


def test_evaluate_fixtures_against_independent_argmax():
    tok = CharTokenizer()
    rng = np.random.default_rng(2)
    model = BigramModel(rng.normal(size=(VOCAB, VOCAB)).astype(np.float32))
    data = {"mmlu": read_mmlu_jsonl(FIX / "mmlu_hf.jsonl"), "hellaswag": read_hellaswag_jsonl(FIX / "hellaswag_val.jsonl")}
    res = evaluate_multiple_choice(data, model, tok, MCConfig(batch_size=8, max_length=512))
    for name, exs in data.items():
        hits = hits_norm = 0
        for ex in exs:
            lls = np.array([_expected_ll(tok, model, ex.context, " " + c) for c in ex.choices])
            hits += int(np.argmax(lls) == ex.label)
            hits_norm += int(np.argmax(lls / np.array([len(c) for c in ex.choices])) == ex.label)
        assert res[name]["acc"] == pytest.approx(hits / len(exs))
        assert res[name]["acc_norm"] == pytest.approx(hits_norm / len(exs))
        assert res[name]["n"] == len(exs)
    assert set(res["mmlu"]["subjects"]) == {"elementary_mathematics", "high_school_chemistry"}
    assert res["mmlu"]["subjects"]["elementary_mathematics"]["n"] == 2


@pytest.mark.parametrize(
    "reader, name, text, message",
    [
        (read_mmlu_csv, "bad_test.csv", "Q1,a,b,c,d,A\nQ2,a,b,c,d,E\n", r"bad_test.csv:2: field 'answer' must be one of A-D"),
        (read_mmlu_csv, "short_test.csv", "Q1,a,b,c,d,A\n\"multi\nline\",a,b,c,d,B\nQ3,a,b,A\n", r"short_test.csv:4: expected 6 columns"),
        (read_mmlu_jsonl, "m.jsonl", '{"question": "q", "subject": "s", "choices": ["a", "b"], "answer": 0}\n\n{"question": "q", "subject": "s", "choices": ["a", "b"], "answer": 2}\n', r"m.jsonl:3: field 'answer' must be an int in \[0, 2\)"),
        (read_arc_jsonl, "a.jsonl", '{"id": "x", "question": {"stem": "s", "choices": [{"text": "t", "label": "A"}, {"text": "u", "label": "B"}]}, "answerKey": "C"}\n', r"a.jsonl:1: field 'answerKey' 'C' is not one of"),
        (read_arc_jsonl, "b.jsonl", '{"id": "x", "question": {"stem": "s"}, "answerKey": "A"}\n', r"b.jsonl:1 \(question\): missing field 'choices'"),
        (read_hellaswag_jsonl, "h.jsonl", '{"ctx_a": "a", "ctx_b": "b", "activity_label": "x", "endings": ["1", "2"], "label": 0}\n{"ctx_a": "a", "ctx_b": "b", "activity_label": "x", "endings": ["1", "2"], "label": ""}\n', r"h.jsonl:2: missing field 'label'"),
        (read_hellaswag_jsonl, "j.jsonl", '{"ctx_a": "a"\n', r"j.jsonl:1: invalid JSON"),
    ],
)
def test_malformed_records_name_file_and_line(tmp_path, reader, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        reader(path)


def test_bad_logits_shape_and_format_errors(tmp_path):
    tok = CharTokenizer()
    ex = MCExample("q", ("a", "b"), 0, "s:1")
    with pytest.raises(ValueError, match=r"logits_fn returned shape \(2, 16\); expected \(2, 16, vocab\)"):
        score_examples([ex], lambda ids, m: np.zeros(ids.shape, np.float32), tok, MCConfig(batch_size=2))
    with pytest.raises(ValueError, match="unknown multiple-choice format 'piqa'"):
        load_mc_dataset(FIX / "mmlu_hf.jsonl", fmt="piqa")
    with pytest.raises(ValueError, match="label 3 out of range"):
        MCExample("q", ("a", "b"), 3, "s:2")
    assert bucket_lengths(100, 16) == (16, 32, 64, 100)
