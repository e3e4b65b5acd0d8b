"""RAG answer metrics against hand-computed values."""

import math

import pytest

from selfaug_jax.data.default_task import UNANSWERABLE_ANSWER
from selfaug_jax.eval import rag_metrics as rm


def test_normalize_answer():
    assert rm.normalize_answer("  The  Quorvel-Loom, an  A.I. ") == "quorvelloom ai"
    assert rm.normalize_answer("48,200") == "48200"
    assert rm.normalize_answer("A cat and THE hat!") == "cat and hat"
    assert rm.normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_exact_match_with_aliases():
    assert rm.exact_match("the Velmora River.", ["Velmora", "Velmora River"]) == 1.0
    assert rm.exact_match("Velmora city", ["Velmora", "Velmora River"]) == 0.0
    assert rm.exact_match("48200", "48,200") == 1.0
    with pytest.raises(ValueError, match="at least one gold"):
        rm.exact_match("x", [])


def test_token_f1_hand_computed():
    # pred tokens: [born, in, 1843, in, tovrik]; gold: [1843] -> overlap 1, P=1/5, R=1 -> F1=2*0.2/1.2
    assert rm.token_f1("born in 1843 in Tovrik", "1843") == pytest.approx(1 / 3)
    # pred [ada, vrell]; gold [ada, vrell, jr] -> P=1, R=2/3 -> 0.8
    assert rm.token_f1("Ada Vrell", "Ada Vrell Jr") == pytest.approx(0.8)
    # max over aliases
    assert rm.token_f1("Ada Vrell", ["Ada Vrell Jr", "Ada Vrell"]) == 1.0
    assert rm.token_f1("nothing shared", "1843") == 0.0
    assert rm.token_f1("the", "a") == 1.0  # both normalise to empty (SQuAD v2 convention)
    assert rm.token_f1("", "1843") == 0.0
    # repeated tokens count with multiplicity: pred [in, in, in], gold [in, tovrik] -> common 1
    assert rm.token_f1("in in in", "in Tovrik") == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))


def test_answer_contained_is_token_aligned():
    assert rm.answer_contained("It was founded in 1843, I think.", "1843") == 1.0
    assert rm.answer_contained("It was founded in 18435.", "1843") == 0.0
    assert rm.answer_contained("about 48,200 residents", ["48,200"]) == 1.0
    assert rm.answer_contained("Ada", ["Ada Vrell", "Vrell"]) == 0.0
    assert rm.answer_contained("Dr Ada Vrell", ["Ada Vrell"]) == 1.0


@pytest.mark.parametrize("text", [
    UNANSWERABLE_ANSWER,
    "the documents do not contain this information",
    "The provided documents don't mention his birth year.",
    "This is not mentioned in the passages.",
    "There is no information about that.",
    "I cannot determine the answer from the documents.",
    "Unable to answer based on the context.",
    "I don’t know.",
    "Unknown",
    "Not enough information to say.",
])
def test_refusals_detected(text):
    assert rm.is_refusal(text)


@pytest.mark.parametrize("text", ["1843", "Ada Vrell", "The city of Tovrik.", "It is known as the Red loom.",
                                  "The documents say it was founded in 1843.", "Notably, 48,200 people."])
def test_answers_are_not_refusals(text):
    assert not rm.is_refusal(text)


EXAMPLES = [
    {"id": "q1", "answer": "1843", "answer_aliases": [], "answerable": True, "hops": 1},
    {"id": "q2", "answer": "Ada Vrell", "answer_aliases": [], "answerable": True, "hops": 2},
    {"id": "q3", "answer": "48,200", "answer_aliases": ["48200"], "answerable": True, "hops": 1},
    {"id": "q4", "answer": UNANSWERABLE_ANSWER, "answer_aliases": [], "answerable": False, "hops": 1},
    {"id": "q5", "answer": UNANSWERABLE_ANSWER, "answer_aliases": [], "answerable": False, "hops": 2},
]
PREDS = ["1843", "Ada", "about 48200 people", "Not mentioned in the documents.", "1901"]


def test_evaluate_rag_hand_computed():
    out = rm.evaluate_rag(EXAMPLES, PREDS)
    # per example (em, f1, contained):
    # q1 (1, 1, 1); q2 (0, 2/3, 0) [P=1, R=1/2]; q3 (0, 0.5, 1) [P=1/3, R=1]; q4 refusal (1, 1, 1); q5 (0, 0, 0)
    f1_q2, f1_q3 = 2 / 3, 0.5
    assert out["count"] == 5
    assert out["em"] == pytest.approx(2 / 5)
    assert out["f1"] == pytest.approx((1 + f1_q2 + f1_q3 + 1 + 0) / 5)
    assert out["contained"] == pytest.approx(3 / 5)
    assert out["answerable"] == {"count": 3, "em": pytest.approx(1 / 3), "f1": pytest.approx((1 + f1_q2 + f1_q3) / 3),
                                 "contained": pytest.approx(2 / 3), "false_refusal_rate": 0.0}
    assert out["unanswerable"] == {"count": 2, "accuracy": 0.5}
    assert out["by_hops"]["1"]["count"] == 3 and out["by_hops"]["1"]["em"] == pytest.approx(2 / 3)
    assert out["by_hops"]["2"]["f1"] == pytest.approx(f1_q2 / 2)
    assert out["per_example"][3] == {"id": "q4", "em": 1.0, "f1": 1.0, "contained": 1.0, "refusal": 1.0}


def test_evaluate_rag_mapping_and_false_refusals():
    preds = {e["id"]: UNANSWERABLE_ANSWER for e in EXAMPLES}
    out = rm.evaluate_rag(EXAMPLES, preds)
    assert out["answerable"]["false_refusal_rate"] == 1.0 and out["answerable"]["em"] == 0.0
    assert out["unanswerable"]["accuracy"] == 1.0
    assert out["em"] == pytest.approx(2 / 5)


def test_unanswerable_inferred_from_answer_when_flag_missing():
    ex = [{"id": "a", "answer": UNANSWERABLE_ANSWER}, {"id": "b", "answer": "Tovrik"}]
    out = rm.evaluate_rag(ex, ["I don't know", "Tovrik"])
    assert out["unanswerable"] == {"count": 1, "accuracy": 1.0}
    assert out["answerable"]["em"] == 1.0 and out["by_hops"] == {}


def test_evaluate_rag_errors_and_empty_subsets():
    with pytest.raises(ValueError, match="5 examples but 1 predictions"):
        rm.evaluate_rag(EXAMPLES, ["x"])
    with pytest.raises(ValueError, match="no prediction for ids"):
        rm.evaluate_rag(EXAMPLES, {"q1": "x"})
    with pytest.raises(TypeError, match="prediction 0"):
        rm.evaluate_rag(EXAMPLES[:1], [None])
    out = rm.evaluate_rag(EXAMPLES[:1], ["1843"])
    assert out["unanswerable"]["count"] == 0 and math.isnan(out["unanswerable"]["accuracy"])
