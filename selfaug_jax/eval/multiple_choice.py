"""Multiple-choice log-likelihood evaluation (MMLU / ARC / HellaSwag), lm-eval-harness style.

The paper reports MMLU, ARC-C and HellaSwag as "general capability" metrics (OpenCompass). This module lets users
who bring those files score any model that exposes a pure logits function:

    logits_fn(input_ids_bt: np.ndarray[int32], attention_mask_bt: np.ndarray[int32]) -> logits_btv

Scoring (the lm-eval-harness ``loglikelihood`` recipe):

* every example is a ``context`` plus N ``choices``; the continuation scored for choice i is
  ``target_delimiter + choices[i]`` (a single space by default);
* context and continuation are tokenised as in lm-eval-harness ``_encode_pair``: trailing spaces of the context move
  to the continuation, ``whole = encode(context + continuation)``, ``ctx = encode(context)`` and the continuation
  tokens are ``whole[len(ctx):]`` (so a BPE merge across the boundary is attributed to the continuation);
* the model reads ``(ctx + cont)[:-1]``; the logits at position ``t`` predict token ``t + 1``, so the continuation's
  log-likelihood is ``sum_{t = len(ctx)-1}^{len(ctx)+len(cont)-2} log_softmax(logits[t])[tokens[t + 1]]``;
* ``acc``: argmax of the summed log-likelihood; ``acc_norm``: argmax of the sum divided by the character length of
  the choice text (lm-eval-harness' ``acc_norm``); ``acc_mean``: argmax of the per-token mean log-likelihood.
  Ties go to the lowest choice index (``np.argmax``).

Sequences longer than ``max_length`` lose context tokens from the left (counted in ``n_truncated``); a continuation
that alone does not fit is an error. Choices are batched with right padding to bucketed lengths (powers of two
from ``min_bucket``, capped at ``max_length``) and a fixed batch size, so a jitted ``logits_fn`` compiles only a
handful of shapes. Record readers live in :mod:`selfaug_jax.eval.mc_readers`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from selfaug_jax.eval.mc_readers import (
    MCExample,
    load_mc_dataset,
    read_arc_jsonl,
    read_hellaswag_jsonl,
    read_mmlu_csv,
    read_mmlu_jsonl,
)

__all__ = [
    "MCConfig",
    "MCExample",
    "ChoiceRequest",
    "ExampleScore",
    "load_mc_dataset",
    "read_arc_jsonl",
    "read_hellaswag_jsonl",
    "read_mmlu_csv",
    "read_mmlu_jsonl",
    "bucket_lengths",
    "build_requests",
    "score_requests",
    "score_examples",
    "summarize_scores",
    "evaluate_multiple_choice",
]

LogitsFn = Callable[[np.ndarray, np.ndarray], Any]


@dataclasses.dataclass(frozen=True)
class MCConfig:
    """Options of the multiple-choice scorer.

    Attributes:
      batch_size: choices (rows) per ``logits_fn`` call; the last batch is padded with dummy rows to this size
        when ``pad_batch`` so the batch dimension is static.
      max_length: longest model input (tokens); longer requests lose context tokens from the left.
      min_bucket: shortest padded length; padded lengths are powers of two >= this, capped at ``max_length``.
      pad_id: id used for padding; ``None`` -> ``tokenizer.pad_token_id``, then ``eos_token_id``, then 0.
      add_bos: prepend ``tokenizer.bos_token_id`` to every context (lm-eval-harness default: False).
      pad_batch: pad the final batch to ``batch_size`` rows (dummy rows have one real token so attention
        implementations never see an all-masked row).
      limit: score only the first ``limit`` examples of each dataset (``None`` = all).
    """

    batch_size: int = 16
    max_length: int = 2048
    min_bucket: int = 16
    pad_id: int | None = None
    add_bos: bool = False
    pad_batch: bool = True
    limit: int | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_length", "min_bucket"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"MCConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"MCConfig.limit must be >= 0 or None, got {self.limit!r}")


@dataclasses.dataclass(frozen=True)
class ChoiceRequest:
    """One (example, choice) pair, tokenised.

    ``input_ids`` is ``(ctx + cont)[:-1]`` after left truncation; ``targets`` the next tokens; the continuation's
    log-probs are read at positions ``[len(input_ids) - n_cont, len(input_ids))``.
    """

    example_index: int
    choice_index: int
    input_ids: tuple[int, ...]
    targets: tuple[int, ...]
    n_cont: int
    truncated: bool


@dataclasses.dataclass(frozen=True)
class ExampleScore:
    """Per-example result: one entry per choice, plus the predictions of the three rules."""

    example: MCExample
    loglikelihoods: tuple[float, ...]
    n_tokens: tuple[int, ...]
    is_greedy: tuple[bool, ...]
    pred: int
    pred_norm: int
    pred_mean: int
    n_truncated: int

    @property
    def correct(self) -> bool:
        return self.pred == self.example.label

    @property
    def correct_norm(self) -> bool:
        return self.pred_norm == self.example.label


def bucket_lengths(max_length: int, min_bucket: int = 16) -> tuple[int, ...]:
    """Padded lengths used for batches: powers of two from ``min_bucket`` below ``max_length``, then ``max_length``."""
    out: list[int] = []
    b = 1
    while b < min_bucket:
        b *= 2
    while b < max_length:
        out.append(b)
        b *= 2
    out.append(max_length)
    return tuple(out)


def _pick_bucket(length: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if b >= length:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def _encode(tokenizer: Any, text: str) -> list[int]:
    """``tokenizer.encode(text, add_special_tokens=False)`` as a list of ints (HF tokenizer API)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [int(i) for i in ids]


def _encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval-harness ``_encode_pair``: move trailing context spaces into the continuation, split ``whole``."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def _resolve_pad_id(tokenizer: Any, config: MCConfig) -> int:
    if config.pad_id is not None:
        return int(config.pad_id)
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def build_requests(examples: Sequence[MCExample], tokenizer: Any, config: MCConfig) -> list[ChoiceRequest]:
    """Tokenise every (example, choice) pair; see the module docstring for the exact recipe.

    Raises:
      ValueError: naming the example's ``file:line`` when a continuation tokenises to nothing, when the context
        is empty and the tokenizer has neither BOS nor EOS to condition on, or when a continuation alone is
        longer than ``config.max_length``.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    prefix = bos if bos is not None else getattr(tokenizer, "eos_token_id", None)
    requests: list[ChoiceRequest] = []
    for ei, ex in enumerate(examples):
        for ci, choice in enumerate(ex.choices):
            ctx, cont = _encode_pair(tokenizer, ex.context, ex.target_delimiter + choice)
            if not cont:
                raise ValueError(f"{ex.source}: choice {ci} ({choice!r}) tokenises to no continuation tokens")
            if config.add_bos and bos is not None:
                ctx = [int(bos)] + ctx
            if not ctx:
                if prefix is None:
                    raise ValueError(f"{ex.source}: empty context and the tokenizer has no bos/eos token")
                ctx = [int(prefix)]
            if len(cont) > config.max_length:
                raise ValueError(
                    f"{ex.source}: choice {ci} has {len(cont)} continuation tokens > MCConfig.max_length="
                    f"{config.max_length}"
                )
            full = ctx + cont
            truncated = len(full) - 1 > config.max_length
            if truncated:
                full = full[-(config.max_length + 1):]
            requests.append(
                ChoiceRequest(ei, ci, tuple(full[:-1]), tuple(full[1:]), len(cont), truncated)
            )
    return requests


@jax.jit
def _target_logprobs(logits_btv: jax.Array, targets_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``log_softmax(logits)[target]`` and ``argmax == target`` per position (float32; no [B,T,V] log-softmax)."""
    logits = logits_btv.astype(jnp.float32)
    lse_bt = jax.nn.logsumexp(logits, axis=-1)
    tgt_bt = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
    greedy_bt = jnp.argmax(logits, axis=-1) == targets_bt
    return tgt_bt - lse_bt, greedy_bt


def score_requests(
    requests: Sequence[ChoiceRequest], logits_fn: LogitsFn, config: MCConfig, pad_id: int = 0
) -> list[tuple[float, bool]]:
    """Run ``logits_fn`` over right-padded, length-bucketed batches; return ``(loglik, is_greedy)`` per request.

    Requests are sorted by length (longest first) so each batch pads little; results come back in input order.
    """
    buckets = bucket_lengths(config.max_length, config.min_bucket)
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].input_ids))
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    for start in range(0, len(order), config.batch_size):
        idx = order[start:start + config.batch_size]
        length = _pick_bucket(max(len(requests[i].input_ids) for i in idx), buckets)
        rows = config.batch_size if config.pad_batch else len(idx)
        ids_bt = np.full((rows, length), pad_id, dtype=np.int32)
        mask_bt = np.zeros((rows, length), dtype=np.int32)
        tgt_bt = np.full((rows, length), pad_id, dtype=np.int32)
        mask_bt[len(idx):, 0] = 1  # dummy rows: one real token, never read
        for r, i in enumerate(idx):
            n = len(requests[i].input_ids)
            ids_bt[r, :n] = requests[i].input_ids
            mask_bt[r, :n] = 1
            tgt_bt[r, :n] = requests[i].targets
        logits_btv = logits_fn(ids_bt, mask_bt)
        shape = tuple(np.shape(logits_btv))
        if len(shape) != 3 or shape[:2] != (rows, length):
            raise ValueError(f"logits_fn returned shape {shape}; expected ({rows}, {length}, vocab)")
        logp_bt, greedy_bt = jax.device_get(_target_logprobs(logits_btv, jnp.asarray(tgt_bt)))
        for r, i in enumerate(idx):
            n, k = len(requests[i].input_ids), requests[i].n_cont
            ll = float(np.sum(logp_bt[r, n - k:n], dtype=np.float64))
            out[i] = (ll, bool(np.all(greedy_bt[r, n - k:n])))
    missing = [i for i, o in enumerate(out) if o is None]
    if missing:  # cannot happen unless batching is broken; never return misaligned scores
        raise RuntimeError(f"requests {missing[:5]} were not scored")
    return out  # type: ignore[return-value]


def score_examples(
    examples: Sequence[MCExample], logits_fn: LogitsFn, tokenizer: Any, config: MCConfig | None = None
) -> list[ExampleScore]:
    """Score every choice of every example; return per-example log-likelihoods and the three predictions."""
    config = config or MCConfig()
    if config.limit is not None:
        examples = list(examples)[:config.limit]
    requests = build_requests(examples, tokenizer, config)
    scored = score_requests(requests, logits_fn, config, _resolve_pad_id(tokenizer, config))
    per_ex: list[list[tuple[ChoiceRequest, float, bool]]] = [[] for _ in examples]
    for req, (ll, greedy) in zip(requests, scored):
        per_ex[req.example_index].append((req, ll, greedy))
    results = []
    for ex, items in zip(examples, per_ex):
        lls = np.array([ll for _, ll, _ in items], dtype=np.float64)
        ntok = np.array([r.n_cont for r, _, _ in items], dtype=np.float64)
        nchar = np.array([max(len(c), 1) for c in ex.choices], dtype=np.float64)
        results.append(
            ExampleScore(
                example=ex,
                loglikelihoods=tuple(float(x) for x in lls),
                n_tokens=tuple(int(x) for x in ntok),
                is_greedy=tuple(g for _, _, g in items),
                pred=int(np.argmax(lls)),
                pred_norm=int(np.argmax(lls / nchar)),
                pred_mean=int(np.argmax(lls / ntok)),
                n_truncated=sum(r.truncated for r, _, _ in items),
            )
        )
    return results


def summarize_scores(scores: Sequence[ExampleScore]) -> dict[str, Any]:
    """``acc``, ``acc_norm``, ``acc_mean`` (fractions in [0, 1]), ``n``, ``n_truncated`` and per-subject accs.

    Accuracies are micro averages over examples; ``subjects`` (only when examples carry a subject, e.g. MMLU)
    maps subject -> ``{"acc", "acc_norm", "n"}``.
    """
    n = len(scores)
    if n == 0:
        return {"acc": math.nan, "acc_norm": math.nan, "acc_mean": math.nan, "n": 0, "n_truncated": 0}
    summary: dict[str, Any] = {
        "acc": sum(s.pred == s.example.label for s in scores) / n,
        "acc_norm": sum(s.pred_norm == s.example.label for s in scores) / n,
        "acc_mean": sum(s.pred_mean == s.example.label for s in scores) / n,
        "n": n,
        "n_truncated": sum(s.n_truncated for s in scores),
    }
    subjects: dict[str, list[ExampleScore]] = {}
    for s in scores:
        if s.example.subject:
            subjects.setdefault(s.example.subject, []).append(s)
    if subjects:
        summary["subjects"] = {
            name: {
                "acc": sum(s.correct for s in group) / len(group),
                "acc_norm": sum(s.correct_norm for s in group) / len(group),
                "n": len(group),
            }
            for name, group in sorted(subjects.items())
        }
    return summary


def evaluate_multiple_choice(
    datasets: Mapping[str, Sequence[MCExample]],
    logits_fn: LogitsFn,
    tokenizer: Any,
    config: MCConfig | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate several datasets; return ``{name: summarize_scores(...)}``.

    Args:
      datasets: name -> examples, e.g. ``{"mmlu": load_mc_dataset("mmlu/test"), "arc_c": load_mc_dataset(...)}``.
      logits_fn: pure function ``(input_ids_bt int32, attention_mask_bt int32) -> logits_btv`` (numpy or jax).
      tokenizer: HF-style tokenizer with ``encode(text, add_special_tokens=False)`` and optional
        ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id``.
      config: :class:`MCConfig`.
    """
    return {
        name: summarize_scores(score_examples(examples, logits_fn, tokenizer, config))
        for name, examples in datasets.items()
    }
