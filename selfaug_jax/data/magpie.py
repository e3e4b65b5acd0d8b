"""MAGPIE replay: general instructions the base model writes itself, answered by itself, mixed into the task data.

Magpie (Xu et al. 2024, repo magpie-align/magpie), as SelfAug's Table 1 uses it (facts: BASELINES.md "MAGPIE"):

1. **Instructions.** The base model gets *only* its chat template's pre-query prefix -- the system block and the
   user header, e.g. for SmolLM2 ``"<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by
   Hugging Face<|im_end|>\\n<|im_start|>user\\n"`` -- and samples a continuation (top-p 1). Generation stops at
   the template's special tokens, at a newline, or at "assistant" / "Assistant" (Magpie's stop list), so every
   instruction is one line; it is stripped. The prefix is derived from the tokenizer's own template
   (:func:`pre_query_template`: render a user turn holding a sentinel, cut at the sentinel).
2. **Filter** (this project's offline reading: the release's LLM-judged quality tags, reward threshold and
   embedding dedup need models we do not have, so only the cheap rules are applied, in this order, each dropped
   instruction counted under its first failing reason):
   ``too_long`` (no end of line within ``max_instruction_tokens``, or more than ``max_words`` words),
   ``empty``, ``special_token`` (the text spells one of the tokenizer's special tokens), ``too_short`` (fewer
   than ``min_words`` words), ``ends_with_colon`` (Magpie drops these), ``duplicate`` (same normalised text as
   a kept one: SQuAD normalisation -- lowercase, no punctuation or articles, single spaces), ``near_duplicate``
   (token-set Jaccard similarity of the normalised words >= ``near_duplicate_jaccard`` with a kept one).
3. **Responses.** Each kept instruction is answered greedily by the same model in its normal chat template
   (generation prompt on, same system prompt), stopped at its end-of-turn. An empty response drops the pair
   (``empty_response``); a response that hit ``max_new_tokens`` is counted (``responses_truncated``) and kept,
   or dropped with ``drop_truncated_responses``. A pair whose tokenisation does not fit ``data.max_length`` is
   dropped (``too_long_for_max_length``), so every replay example is trained.
4. **Mix** (SelfAug: 1:9 replay:task, ``ratio``). With ``n_task`` task examples trained per epoch,
   ``n_replay = floor(n_task * r / t + 1/2)`` (round half up; integer arithmetic) replay examples are added:
   the first ``n_replay`` kept pairs in generation order. Each epoch then visits exactly ``n_task`` task and
   ``n_replay`` replay examples (the epoch sampler shuffles them together). If fewer pairs were kept the pool
   is cycled (counted as ``repeated``, with a warning); ``n=None`` (the default) samples
   ``max(32, 2 * n_replay)`` instructions, enough for the cheap filter's usual losses.

Steps 1-3 run once per (model, chat template, seed, count, generation and filter options) and are cached
(:func:`~selfaug_jax.data.transform_context.cached_json`); step 4 and the length check run every time.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from typing import Any

from selfaug_jax.data.prompts import PromptError, tokenize_example
from selfaug_jax.data.schema import Message, RagExample
from selfaug_jax.data.transform_context import (
    TransformContext,
    TransformResult,
    cached_json,
    examples_fingerprint,
    generate_by_length,
    template_fingerprint,
)
from selfaug_jax.eval.rag_metrics import normalize_answer

logger = logging.getLogger(__name__)

STOP_STRINGS: tuple[str, ...] = ("\n", "assistant", "Assistant")
"""Magpie's instruction stop strings besides the special tokens (its early stop at a newline included)."""

_SENTINEL = "\ufffcMAGPIE-QUERY\ufffc"

INSTRUCTION_DROP_REASONS = ("too_long", "empty", "special_token", "too_short", "ends_with_colon", "duplicate",
                            "near_duplicate")
PAIR_DROP_REASONS = ("empty_response", "truncated_response", "too_long_for_max_length", "untokenizable")


@dataclasses.dataclass(frozen=True)
class MagpieConfig:
    """MAGPIE replay options (the ``magpie:`` section of an experiment config).

    Attributes:
        n: instructions to sample; None = ``max(32, 2 * n_replay)``.
        ratio: ``"replay:task"``, SelfAug's 1:9.
        temperature: instruction sampling temperature. 0.7 (Magpie's Qwen2.5 script; its Llama-3 script uses
            1.0): a 135M model at 1.0 writes mostly incoherent lines, which the offline filter cannot catch.
        top_p: instruction nucleus (Magpie: 1.0).
        max_instruction_tokens: budget of one instruction line (a line not ended within it is dropped).
        max_new_tokens: budget of a greedy response (Magpie: long; small here for CPU runs).
        seed: sampling seed.
        system: system prompt of both steps; None = the chat template's default (Magpie uses the template's).
        min_words / max_words: instruction length bounds, in whitespace-separated words.
        near_duplicate_jaccard: token-set Jaccard similarity at or above which an instruction is a near
            duplicate of a kept one.
        drop_truncated_responses: drop pairs whose response hit ``max_new_tokens`` (default: keep, counted).
        batch_size: rows per generation call (one compiled shape).
    """

    n: int | None = None
    ratio: str = "1:9"
    temperature: float = 0.7
    top_p: float = 1.0
    max_instruction_tokens: int = 48
    max_new_tokens: int = 128
    seed: int = 0
    system: str | None = None
    min_words: int = 3
    max_words: int = 80
    near_duplicate_jaccard: float = 0.8
    drop_truncated_responses: bool = False
    batch_size: int = 16

    def __post_init__(self) -> None:
        self.ratio_parts()
        for name in ("n", "max_instruction_tokens", "max_new_tokens", "min_words", "max_words", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"magpie.{name} must be >= 1, got {value}")
        if self.temperature <= 0:
            raise ValueError(f"magpie.temperature must be > 0 (instructions are sampled), got {self.temperature}")
        for name in ("top_p", "near_duplicate_jaccard"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"magpie.{name} must be in (0, 1], got {getattr(self, name)}")

    def ratio_parts(self) -> tuple[int, int]:
        """``ratio`` as ``(replay, task)`` positive integers; a malformed value raises naming ``magpie.ratio``."""
        try:
            r, t = (int(x) for x in str(self.ratio).split(":"))
        except ValueError:
            raise ValueError(f"magpie.ratio must look like 'replay:task' (e.g. '1:9'), got {self.ratio!r}") from None
        if r < 0 or t < 1:
            raise ValueError(f"magpie.ratio {self.ratio!r}: replay must be >= 0 and task >= 1")
        return r, t


def replay_count(n_task: int, ratio: tuple[int, int]) -> int:
    """``floor(n_task * r / t + 1/2)``: the replay examples per epoch for ``n_task`` task examples (exact, integer)."""
    r, t = ratio
    return (2 * n_task * r + t) // (2 * t)


def pre_query_template(tokenizer: Any, system: str | None = None) -> str:
    """The chat template's text before a user message: system block (the template's default when ``system`` is
    None) and user header. Raises :class:`PromptError` when the tokenizer has no chat template or the template
    does not render the user message verbatim."""
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError("MAGPIE needs the tokenizer's chat template (the pre-query prefix comes from it); "
                          "this tokenizer has none")
    chat = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": _SENTINEL}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    if text.count(_SENTINEL) != 1:
        raise PromptError("MAGPIE: the chat template does not render the user message verbatim; cannot cut its "
                          "pre-query prefix")
    return text[: text.index(_SENTINEL)]


def _words(text: str) -> set[str]:
    return set(normalize_answer(text).split())


def jaccard(a: set[str], b: set[str]) -> float:
    """|a & b| / |a | b| (1.0 for two empty sets)."""
    return len(a & b) / len(a | b) if a | b else 1.0


def filter_instructions(candidates: list[dict[str, Any]], cfg: MagpieConfig, special_strings: tuple[str, ...]
                        ) -> list[dict[str, Any]]:
    """Mark each candidate ``{"text", "finished"}`` with ``"reason"``: None (kept) or its first failing rule
    (module docstring, step 2), in candidate order. Returns new dicts."""
    kept_keys: set[str] = set()
    kept_sets: list[set[str]] = []
    out = []
    for c in candidates:
        text = c["text"].strip()
        n_words = len(text.split())
        reason = None
        if not c["finished"] or n_words > cfg.max_words:
            reason = "too_long"
        elif not text:
            reason = "empty"
        elif any(s in text for s in special_strings):
            reason = "special_token"
        elif n_words < cfg.min_words:
            reason = "too_short"
        elif text.endswith(":"):
            reason = "ends_with_colon"
        else:
            key, words = normalize_answer(text), _words(text)
            if key in kept_keys:
                reason = "duplicate"
            elif any(jaccard(words, s) >= cfg.near_duplicate_jaccard for s in kept_sets):
                reason = "near_duplicate"
            else:
                kept_keys.add(key)
                kept_sets.append(words)
        out.append({**c, "text": text, "reason": reason})
    return out


def _generate_pool(ctx: TransformContext, cfg: MagpieConfig, n: int) -> dict[str, Any]:
    """Steps 1-3 of the module docstring (the cached part): candidates with reasons, responses of the kept."""
    from selfaug_jax.models.generation import GenerationConfig, special_token_ids

    tok, gen = ctx.tokenizer, ctx.generator()
    t0 = time.process_time()
    specials = special_token_ids(tok)
    pre_ids = list(tok.encode(pre_query_template(tok, cfg.system), add_special_tokens=False))
    completions = gen(ctx.model, tok, [pre_ids] * n,
                      GenerationConfig(max_new_tokens=cfg.max_instruction_tokens, temperature=cfg.temperature,
                                       top_p=cfg.top_p, seed=cfg.seed),
                      stop_strings=STOP_STRINGS, stop_token_ids=specials, batch_size=cfg.batch_size)
    special_strings = tuple(s for s in tok.convert_ids_to_tokens(list(specials)) if s)
    candidates = filter_instructions([{"text": c.text, "finished": c.finished} for c in completions], cfg,
                                     special_strings)
    kept = [c for c in candidates if c["reason"] is None]
    t_instr = time.process_time() - t0
    responses = []
    if kept:
        chats = [([{"role": "system", "content": cfg.system}] if cfg.system is not None else [])
                 + [{"role": "user", "content": c["text"]}] for c in kept]
        ids = [list(tok.encode(tok.apply_chat_template(ch, add_generation_prompt=True, tokenize=False),
                               add_special_tokens=False)) for ch in chats]
        answers = generate_by_length(ctx, ids, GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0),
                                     stop_token_ids=specials, batch_size=cfg.batch_size)
        responses = [{"text": a.text.strip(), "finished": a.finished} for a in answers]
    return {"candidates": candidates, "responses": responses,
            "cpu_seconds": {"instructions": round(t_instr, 2), "responses": round(time.process_time() - t0 - t_instr, 2)}}


def magpie_transform(examples: list[RagExample], ctx: TransformContext) -> TransformResult:
    """The task examples followed by ``n_replay`` MAGPIE replay examples (module docstring)."""
    cfg: MagpieConfig = ctx.options["magpie"]
    ratio = cfg.ratio_parts()
    n_replay = replay_count(ctx.n_task, ratio)
    n = cfg.n if cfg.n is not None else max(32, 2 * n_replay)
    key = {"kind": "magpie", "model": ctx.model_id, "template": template_fingerprint(ctx.tokenizer),
           "pre_query": pre_query_template(ctx.tokenizer, cfg.system), "n": n, "batching": "by_length",
           **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
              if f.name not in ("n", "ratio", "drop_truncated_responses")}}  # ratio and this: applied after the cache
    pool, cache = cached_json(ctx.cache_dir, "magpie", key, lambda: _generate_pool(ctx, cfg, n))

    dropped = Counter(c["reason"] for c in pool["candidates"] if c["reason"] is not None)
    kept_instr = [c for c in pool["candidates"] if c["reason"] is None]
    pairs: list[RagExample] = []
    n_truncated = 0
    for i, (c, r) in enumerate(zip(kept_instr, pool["responses"])):
        if not r["text"]:
            dropped["empty_response"] += 1
            continue
        n_truncated += not r["finished"]
        if not r["finished"] and cfg.drop_truncated_responses:
            dropped["truncated_response"] += 1
            continue
        ex = RagExample(messages=(Message("user", c["text"]), Message("assistant", r["text"])), system=cfg.system,
                        id=f"magpie-{i:05d}", meta={"source": "magpie", "response_truncated": not r["finished"]})
        try:
            fits = tokenize_example(ex, ctx.tokenizer, ctx.prompt_config) is not None
        except PromptError as e:
            logger.warning("MAGPIE pair %s dropped: %s", ex.id, e)
            dropped["untokenizable"] += 1
            continue
        if not fits:
            dropped["too_long_for_max_length"] += 1
            continue
        pairs.append(ex)

    if n_replay and not pairs:
        raise ValueError(f"magpie: none of the {n} sampled instructions survived the filter ({dict(dropped)}); "
                         "raise magpie.n or magpie.max_instruction_tokens")
    replay = [pairs[k % len(pairs)] for k in range(n_replay)] if n_replay else []
    repeated = max(0, n_replay - len(pairs))
    if repeated:
        logger.warning("magpie: %d replay examples needed, %d kept: %d are repeats (raise magpie.n)",
                       n_replay, len(pairs), repeated)
    # Distinct ids for repeats (the tokenised store is keyed by position, the id is for reports).
    replay = [dataclasses.replace(ex, id=f"{ex.id}-r{k // len(pairs)}") if k >= len(pairs) else ex
              for k, ex in enumerate(replay)]
    out = list(examples) + replay
    report = {
        "generated": n, "instructions_kept": len(kept_instr), "pairs_kept": len(pairs),
        "dropped": {r: dropped[r] for r in INSTRUCTION_DROP_REASONS + PAIR_DROP_REASONS if dropped[r]},
        "responses_truncated": n_truncated, "ratio": cfg.ratio, "n_task": ctx.n_task, "n_replay": n_replay,
        "repeated": repeated, "cache": cache, "generation_cpu_s": pool.get("cpu_seconds"),
        "sample_instructions": [ex.messages[0].content for ex in pairs[:3]],
    }
    logger.info("magpie: sampled %d instructions, kept %d (dropped %s), %d pairs; replay %d : task %d (%s)%s",
                n, len(kept_instr), report["dropped"], len(pairs), n_replay, ctx.n_task, cfg.ratio,
                f", {repeated} repeats" if repeated else "")
    return TransformResult(out, examples_fingerprint(out), report)
