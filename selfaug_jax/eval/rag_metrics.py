"""Text-level RAG answer metrics: SQuAD normalisation, exact match, token F1, answer containment,
and scoring of "not in the documents" (unanswerable) examples.

Normalisation (SQuAD v1.1): lowercase, drop ASCII punctuation (so ``"48,200"`` -> ``"48200"``), drop the
articles *a / an / the*, collapse whitespace.

Every metric takes the maximum over the gold answer and its aliases (``answer_aliases``).

Unanswerable examples (``answerable`` is false, or the gold answer is
:data:`~selfaug_jax.data.default_task.UNANSWERABLE_ANSWER`) are scored by :func:`is_refusal`: a prediction
counts as correct when it says the documents do not contain the answer. The rule: after lowercasing
and mapping curly apostrophes to ``'``, the prediction (a) contains the normalised
``UNANSWERABLE_ANSWER``, or (b) matches one of :data:`REFUSAL_PATTERNS` (phrasings such as "does not
contain", "not mentioned", "no information", "cannot be determined", "unable to answer", "I don't
know", "unknown", "not enough information"). For those examples EM = F1 = contained = 1 if the
prediction is a refusal, else 0. The same rule gives the *false refusal* rate on answerable examples.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from selfaug_jax.data.default_task import UNANSWERABLE_ANSWER

__all__ = ["UNANSWERABLE_ANSWER", "REFUSAL_PATTERNS", "normalize_answer", "exact_match", "token_f1",
           "answer_contained", "is_refusal", "gold_answers", "is_unanswerable", "score_example", "evaluate_rag"]

_PUNCT = set(string.punctuation)

REFUSAL_PATTERNS: tuple[str, ...] = (
    r"\b(?:does|do|did)\s*(?:not|n't)\s+(?:contain|mention|provide|include|specify|say|state|give|list|"
    r"indicate|have|discuss|tell)",
    r"\bnot\s+(?:mentioned|provided|specified|stated|given|included|contained|found|available|listed|"
    r"present|indicated|known)\b",
    r"\bno\s+(?:information|mention|data|details?|answer|record)\b",
    r"\b(?:not|insufficient|isn't)\s+(?:enough|sufficient)?\s*information\b",
    r"\binsufficient\s+(?:information|context|data)\b",
    r"\b(?:cannot|can't|can\s+not|could\s*not|couldn't|unable\s+to)\s+(?:be\s+)?(?:determined?|answer(?:ed)?|"
    r"find|found|tell|say|know|provide|identify|locate)",
    r"\b(?:i|we)\s+(?:do\s*not|don't)\s+know\b",
    r"^\W*unknown\W*$",
    r"\bthere\s+is\s+no\s+(?:information|mention|answer)",
)
"""Regexes (searched in the lowercased prediction) that mark a refusal / "not in the documents"."""
_REFUSAL_RE = [re.compile(p) for p in REFUSAL_PATTERNS]


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, remove punctuation, articles and extra whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _as_list(golds: str | Sequence[str]) -> list[str]:
    golds = [golds] if isinstance(golds, str) else list(golds)
    if not golds:
        raise ValueError("at least one gold answer is required")
    return golds


def exact_match(prediction: str, golds: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(g) for g in _as_list(golds)))


def _f1(prediction: str, gold: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:  # SQuAD v2 convention: both empty -> 1, one empty -> 0
        return float(p == g)
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, golds: str | Sequence[str]) -> float:
    """Max over golds of the SQuAD bag-of-tokens F1 between normalised prediction and gold."""
    return max(_f1(prediction, g) for g in _as_list(golds))


def answer_contained(prediction: str, golds: str | Sequence[str]) -> float:
    """1.0 if any non-empty normalised gold is a whole-token substring of the normalised prediction."""
    p = f" {normalize_answer(prediction)} "
    return float(any(normalize_answer(g) and f" {normalize_answer(g)} " in p for g in _as_list(golds)))


def is_refusal(prediction: str) -> bool:
    """True if ``prediction`` says the answer is not in the documents (rule in the module docstring)."""
    text = prediction.lower().replace("\u2019", "'").replace("\u2018", "'")
    if normalize_answer(UNANSWERABLE_ANSWER) in normalize_answer(text):
        return True
    return any(r.search(text) for r in _REFUSAL_RE)


def gold_answers(example: Mapping[str, Any]) -> list[str]:
    """``[answer] + answer_aliases`` (duplicates removed, order kept)."""
    out = [example["answer"], *example.get("answer_aliases", [])]
    return list(dict.fromkeys(out))


def is_unanswerable(example: Mapping[str, Any]) -> bool:
    """``not example["answerable"]`` when present, else whether the answer is ``UNANSWERABLE_ANSWER``."""
    if "answerable" in example:
        return not example["answerable"]
    return normalize_answer(example["answer"]) == normalize_answer(UNANSWERABLE_ANSWER)


def score_example(example: Mapping[str, Any], prediction: str) -> dict[str, float]:
    """Per-example ``em``, ``f1``, ``contained`` and ``refusal`` (1.0 / 0.0) scores."""
    refusal = float(is_refusal(prediction))
    if is_unanswerable(example):
        return {"em": refusal, "f1": refusal, "contained": refusal, "refusal": refusal}
    golds = gold_answers(example)
    return {"em": exact_match(prediction, golds), "f1": token_f1(prediction, golds),
            "contained": answer_contained(prediction, golds), "refusal": refusal}


def _mean(rows: list[dict[str, float]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows) if rows else float("nan")


def evaluate_rag(examples: Sequence[Mapping[str, Any]], predictions: Sequence[str] | Mapping[str, str]
                 ) -> dict[str, Any]:
    """Score ``predictions`` (aligned list, or ``{id: prediction}``) against RAG ``examples``.

    Returns::

        {"count", "em", "f1", "contained",                       # over all examples
         "answerable":   {"count", "em", "f1", "contained", "false_refusal_rate"},
         "unanswerable": {"count", "accuracy"},                  # fraction of refusals
         "by_hops":      {"1": {"count", "em", "f1", "contained"}, "2": {...}}   # if ``hops`` present
         "per_example":  [{"id", "em", "f1", "contained", "refusal"}, ...]}

    Overall scores use the refusal rule on unanswerable examples (module docstring). Means of empty
    subsets are NaN.
    """
    if isinstance(predictions, Mapping):
        missing = [e["id"] for e in examples if e["id"] not in predictions]
        if missing:
            raise ValueError(f"evaluate_rag: no prediction for ids {missing[:5]}{'...' if len(missing) > 5 else ''}")
        preds = [predictions[e["id"]] for e in examples]
    else:
        if len(predictions) != len(examples):
            raise ValueError(f"evaluate_rag: {len(examples)} examples but {len(predictions)} predictions")
        preds = list(predictions)
    rows, ans, unans, hops = [], [], [], {}
    for i, (ex, pred) in enumerate(zip(examples, preds)):
        if not isinstance(pred, str):
            raise TypeError(f"evaluate_rag: prediction {i} (id {ex.get('id')!r}) must be a str, "
                            f"got {type(pred).__name__}")
        s = score_example(ex, pred)
        rows.append({"id": ex.get("id"), **s})
        (unans if is_unanswerable(ex) else ans).append(s)
        if "hops" in ex:
            hops.setdefault(str(ex["hops"]), []).append(s)
    metrics = ("em", "f1", "contained")
    return {
        "count": len(rows),
        **{m: _mean(rows, m) for m in metrics},
        "answerable": {"count": len(ans), **{m: _mean(ans, m) for m in metrics},
                       "false_refusal_rate": _mean(ans, "refusal")},
        "unanswerable": {"count": len(unans), "accuracy": _mean(unans, "refusal")},
        "by_hops": {h: {"count": len(v), **{m: _mean(v, m) for m in metrics}} for h, v in sorted(hops.items())},
        "per_example": rows,
    }
