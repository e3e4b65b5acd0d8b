"""SDFT: Self-Distillation Fine-Tuning -- the base model rewrites each training answer in its own words.

Yang et al., "Self-Distillation Bridges Distribution Gap in Language Model Fine-Tuning", ACL 2024; repo
sail-sg/sdft (facts: BASELINES.md "SDFT"). For each training example the base model sees the task prompt and the
reference answer in SDFT's ``alpaca_distill_using`` template (sail-sg/sdft ``src/llmtuner/data/template.py``)::

    Below are an instruction that describes a task along with a reference answer. Using the reference answer as
    a guide, write your own response.

    ### Instruction:
    {instruction}

    ### Reference Answer:
    {original response}

    ### Response:

and samples a rewrite (SDFT: temperature 0.95, top-p 0.7, top-k 50; ``greedy=True`` decodes greedily). The
rewrite replaces the answer only if it passes the checks of the repo's ``eval/gen_distilled_data.py``, otherwise
the original answer is kept (counted by reason, first failing one):

* ``empty`` -- nothing was generated;
* ``leakage`` -- it contains (case-insensitive) "reference answer", "your response", "my response", "your own
  response" or "now it's your turn", or starts with "Your turn" (case-sensitive, as in the repo);
* ``task_check`` -- the task check fails. For RAG (this project's reading of "the natural task check"): the
  normalised rewrite contains the normalised gold answer or one of its ``answer_aliases`` as whole tokens
  (:func:`selfaug_jax.eval.rag_metrics.score_example`'s ``contained``, the SQuAD normalisation); for an
  unanswerable example it must be a refusal (the same function's rule). The gold is the example's answer;
* ``truncated`` -- only with ``keep_truncated=False``: the rewrite hit ``max_new_tokens``.

This project's readings, where SDFT is silent:

* ``{instruction}`` is what the model is asked in training: the example's system prompt (if any), a blank line,
  then the final user turn rendered with its documents by the run's
  :class:`~selfaug_jax.data.prompts.DocumentsTemplate` (all documents, before the length policy). Earlier turns
  of a multi-turn example are not shown; the final assistant turn is the one rewritten.
* ``prompt_format="raw"`` (default, as the repo feeds the template: plain text, a BOS only where the tokenizer
  adds one) or ``"chat"`` (the SDFT system text as the system turn and the rest as the user turn of the model's
  chat template). Raw generations are cut at ``"\\n###"`` (the model starting a new template section).

The rewrites are cached per (model, chat template, examples, options) like MAGPIE's generations.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from typing import Any, Literal

from selfaug_jax.data.prompts import DocumentsTemplate
from selfaug_jax.data.schema import Message, RagExample
from selfaug_jax.data.transform_context import (
    TransformContext,
    TransformResult,
    cached_json,
    examples_fingerprint,
    template_fingerprint,
)
from selfaug_jax.eval.rag_metrics import score_example

logger = logging.getLogger(__name__)

# sail-sg/sdft, src/llmtuner/data/template.py, template "alpaca_distill_using" (system text, then the prompt).
SDFT_SYSTEM = ("Below are an instruction that describes a task along with a reference answer. "
               "Using the reference answer as a guide, write your own response.")
SDFT_PROMPT = "### Instruction:\n{instruction}\n\n### Reference Answer:\n{response}\n\n### Response:\n"
# sail-sg/sdft, eval/gen_distilled_data.py, verify(): the ban set (lowercase match) and the "Your turn" start.
LEAKAGE_PHRASES: tuple[str, ...] = ("reference answer", "your response", "my response", "your own response",
                                    "now it's your turn")
LEAKAGE_START = "Your turn"
RAW_STOP_STRINGS: tuple[str, ...] = ("\n###",)
KEEP_REASONS = ("empty", "leakage", "task_check", "truncated")


@dataclasses.dataclass(frozen=True)
class SDFTConfig:
    """SDFT rewrite options (the ``sdft:`` section of an experiment config).

    Attributes:
        temperature / top_p / top_k: SDFT's sampling (0.95 / 0.7 / 50).
        greedy: decode greedily instead (the sampling values are then unused).
        max_new_tokens: rewrite budget (SDFT: 512; the RAG answers here are short, so 96 keeps CPU runs fast).
        seed: sampling seed.
        prompt_format: ``"raw"`` (the repo's plain-text template) or ``"chat"`` (wrapped in the chat template).
        keep_truncated: use a rewrite that hit ``max_new_tokens`` if it passes the checks (SDFT keeps them).
        batch_size: rows per generation call.
    """

    temperature: float = 0.95
    top_p: float = 0.7
    top_k: int = 50
    greedy: bool = False
    max_new_tokens: int = 96
    seed: int = 0
    prompt_format: Literal["raw", "chat"] = "raw"
    keep_truncated: bool = True
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"sdft.temperature must be > 0 (use sdft.greedy=true for greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sdft.top_p must be in (0, 1], got {self.top_p}")
        for name in ("top_k", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"sdft.{name} must be >= 1, got {getattr(self, name)}")
        if self.prompt_format not in ("raw", "chat"):
            raise ValueError(f"sdft.prompt_format must be 'raw' or 'chat', got {self.prompt_format!r}")


def instruction_of(example: RagExample, template: DocumentsTemplate) -> str:
    """The ``{instruction}`` of the SDFT prompt (module docstring): system prompt + the final user turn with its
    documents."""
    messages = example.to_messages()
    system = next((m.content for m in messages if m.role == "system"), None)
    user = next(m for m in reversed(messages[:-1]) if m.role == "user")
    body = template.render(user.content, user.documents) if user.documents else user.content
    return f"{system}\n\n{body}" if system else body


def sdft_prompt_ids(tokenizer: Any, instruction: str, response: str, prompt_format: str) -> list[int]:
    """Token ids of the SDFT rewrite prompt (query and response stripped, as the repo does)."""
    body = SDFT_PROMPT.format(instruction=instruction.strip(), response=response.strip())
    if prompt_format == "chat":
        text = tokenizer.apply_chat_template([{"role": "system", "content": SDFT_SYSTEM},
                                              {"role": "user", "content": body}],
                                             add_generation_prompt=True, tokenize=False)
        return list(tokenizer.encode(text, add_special_tokens=False))
    # The repo: bos (if the tokenizer adds one) + system + "\n\n" + prompt.
    bos = ([int(tokenizer.bos_token_id)] if tokenizer.bos_token_id is not None
           and getattr(tokenizer, "add_bos_token", False) else [])
    return bos + list(tokenizer.encode(f"{SDFT_SYSTEM}\n\n{body}", add_special_tokens=False))


def leaks(text: str) -> bool:
    """SDFT's leakage rule (module docstring)."""
    low = text.lower()
    return any(p in low for p in LEAKAGE_PHRASES) or text.startswith(LEAKAGE_START)


def passes_task_check(text: str, example: RagExample) -> bool:
    """The RAG task check: the gold answer (or an alias) is contained; a refusal for unanswerable examples."""
    gold = {"answer": example.target, **{k: example.meta[k] for k in ("answer_aliases", "answerable")
                                         if k in example.meta}}
    return score_example(gold, text)["contained"] == 1.0


def judge(text: str, finished: bool, example: RagExample, cfg: SDFTConfig) -> str | None:
    """None if the rewrite is used, else the reason the original is kept (first failing rule)."""
    if not text:
        return "empty"
    if leaks(text):
        return "leakage"
    if not passes_task_check(text, example):
        return "task_check"
    if not finished and not cfg.keep_truncated:
        return "truncated"
    return None


def with_answer(example: RagExample, answer: str) -> RagExample:
    """``example`` with its trained answer (the final assistant turn) replaced."""
    if example.messages is None:
        return dataclasses.replace(example, answer=answer)
    return dataclasses.replace(example, messages=example.messages[:-1] + (Message("assistant", answer),))


def _rewrite(examples: list[RagExample], ctx: TransformContext, cfg: SDFTConfig) -> dict[str, Any]:
    from selfaug_jax.models.generation import GenerationConfig, special_token_ids

    tok = ctx.tokenizer
    t0 = time.process_time()
    template = ctx.prompt_config.documents_template
    ids = [sdft_prompt_ids(tok, instruction_of(ex, template), ex.target, cfg.prompt_format) for ex in examples]
    gen_cfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0 if cfg.greedy else cfg.temperature,
                               top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed, prompt_bucket=128)
    outs = ctx.generator()(ctx.model, tok, ids, gen_cfg, stop_token_ids=special_token_ids(tok),
                           stop_strings=RAW_STOP_STRINGS if cfg.prompt_format == "raw" else (),
                           batch_size=cfg.batch_size)
    return {"rewrites": [{"text": o.text.strip(), "finished": o.finished} for o in outs],
            "cpu_seconds": round(time.process_time() - t0, 2)}


def sdft_transform(examples: list[RagExample], ctx: TransformContext) -> TransformResult:
    """Each example with its answer replaced by the base model's checked rewrite (module docstring)."""
    cfg: SDFTConfig = ctx.options["sdft"]
    key = {"kind": "sdft", "model": ctx.model_id, "template": template_fingerprint(ctx.tokenizer),
           "examples": examples_fingerprint(examples), "n": len(examples),
           "documents_template": dataclasses.asdict(ctx.prompt_config.documents_template),
           **{k: v for k, v in dataclasses.asdict(cfg).items() if k != "keep_truncated"}}  # a post-filter
    if cfg.greedy:
        key.update(temperature=None, top_p=None, top_k=None, seed=None)
    gen, cache = cached_json(ctx.cache_dir, "sdft", key, lambda: _rewrite(examples, ctx, cfg))
    if len(gen["rewrites"]) != len(examples):
        raise ValueError(f"sdft: {len(gen['rewrites'])} rewrites for {len(examples)} examples (stale cache?)")
    kept_original: Counter[str] = Counter()
    out, n_truncated = [], 0
    for ex, r in zip(examples, gen["rewrites"]):
        n_truncated += not r["finished"]
        reason = judge(r["text"], r["finished"], ex, cfg)
        if reason is None:
            out.append(with_answer(ex, r["text"]))
        else:
            kept_original[reason] += 1
            out.append(ex)
    n_kept = sum(kept_original.values())
    report = {
        "examples": len(examples), "rewritten": len(examples) - n_kept, "kept_original": n_kept,
        "kept_original_by_reason": {r: kept_original[r] for r in KEEP_REASONS if kept_original[r]},
        "rewrites_truncated": n_truncated, "cache": cache, "generation_cpu_s": gen.get("cpu_seconds"),
        "sample_rewrites": [{"id": ex.id, "original": ex.target, "rewrite": r["text"]}
                            for ex, r in list(zip(examples, gen["rewrites"]))[:3]],
    }
    logger.info("sdft: %d of %d answers rewritten, original kept for %d (%s)", report["rewritten"], len(examples),
                n_kept, report["kept_original_by_reason"])
    return TransformResult(out, examples_fingerprint(out), report)
