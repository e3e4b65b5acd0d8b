"""Evaluation: RAG answer metrics, IFEval-style instruction checkers (and, in sibling modules,
distribution shift, multiple-choice evaluation and reports)."""

from selfaug_jax.eval.ifeval import CHECKERS, check_instruction, evaluate_ifeval
from selfaug_jax.eval.rag_metrics import (
    UNANSWERABLE_ANSWER,
    answer_contained,
    evaluate_rag,
    exact_match,
    is_refusal,
    normalize_answer,
    token_f1,
)

__all__ = [
    "CHECKERS",
    "check_instruction",
    "evaluate_ifeval",
    "UNANSWERABLE_ANSWER",
    "answer_contained",
    "evaluate_rag",
    "exact_match",
    "is_refusal",
    "normalize_answer",
    "token_f1",
]
