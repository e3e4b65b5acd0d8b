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
  :class:`~selfaug_jax.data.prompts.DocumentsTemplate`. Earlier turns of a multi-turn example are not shown; the
  final assistant turn is the one rewritten.
* ``documents="trained"`` (default): the final user turn holds the documents the run's length policy
  (``data.max_length``, ``data.truncation``) keeps for the trained example -- SDFT rewrites a response given the
  instruction it is trained on, and after the length policy that instruction has only those documents
  (:func:`~selfaug_jax.data.prompts.trained_chat`). An example the policy skips is not trained, so it is not
  rewritten (counted as ``not_trained``). ``documents="all"``: every document, before the length policy (the
  first sessions' behaviour; longer prompts, ~2x the prefill at ``max_length=384``).
* ``prompt_format="raw"`` (default, as the repo feeds the template: plain text, a BOS only where the tokenizer
  adds one) or ``"chat"`` (the SDFT system text as the system turn and the rest as the user turn of the model's
  chat template). Raw generations are cut at ``"\\n###"`` (the model starting a new template section); the
  cut also ends the row inside the generation loop (:mod:`selfaug_jax.models.stop_strings`: ``"\\n###"`` is two
  tokens in SmolLM2's vocabulary, so a stop on single tokens never fired and every raw row ran its whole budget).
* ``max_new_tokens=64`` (SDFT: 512): RAG answers are short spans (the shipped task's 2000 training answers: median
  4, at most 9 SmolLM2 tokens), so a rewrite that restates the answer in a sentence ends well within 64 tokens
  (measured at compare-cpu's sizes: 853 tokens for 24 rewrites, stop included); the rows that hit the budget are
  ones that ramble on. They are counted (``rewrites_truncated``) and, with ``keep_truncated`` (SDFT keeps them),
  still judged.

Cost: the prompts are generated in length order (:func:`~selfaug_jax.data.transform_context.generate_by_length`:
little padding, few compiled shapes) and the rewrites are cached on disk per (model weights, chat template,
examples, length policy, options), like MAGPIE's generations: a second run generates nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from typing import Any, Literal

from selfaug_jax.data.prompts import DocumentsTemplate, PromptConfig, trained_chat
from selfaug_jax.data.schema import Message, RagExample
from selfaug_jax.data.transform_context import (
    TransformContext,
    TransformResult,
    cached_json,
    examples_fingerprint,
    fingerprint,
    generate_by_length,
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
KEEP_REASONS = ("not_trained", "empty", "leakage", "task_check", "truncated")


@dataclasses.dataclass(frozen=True)
class SDFTConfig:
    """SDFT rewrite options (the ``sdft:`` section of an experiment config).

    Attributes:
        temperature / top_p / top_k: SDFT's sampling (0.95 / 0.7 / 50).
        greedy: decode greedily instead (the sampling values are then unused).
        max_new_tokens: rewrite budget (SDFT: 512; 64 here: RAG answers are short, see the module docstring;
            rewrites that hit it are counted).
        seed: sampling seed.
        prompt_format: ``"raw"`` (the repo's plain-text template) or ``"chat"`` (wrapped in the chat template).
        keep_truncated: use a rewrite that hit ``max_new_tokens`` if it passes the checks (SDFT keeps them).
        batch_size: rows per generation call (prompts are batched in length order).
        documents: ``"trained"`` (the documents the length policy keeps) or ``"all"`` (module docstring).
        prompt_bucket: padded prompt lengths are multiples of this (fewer compiled shapes vs less padding).
    """

    temperature: float = 0.95
    top_p: float = 0.7
    top_k: int = 50
    greedy: bool = False
    max_new_tokens: int = 64
    seed: int = 0
    prompt_format: Literal["raw", "chat"] = "raw"
    keep_truncated: bool = True
    batch_size: int = 8
    documents: Literal["trained", "all"] = "trained"
    prompt_bucket: int = 64

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"sdft.temperature must be > 0 (use sdft.greedy=true for greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sdft.top_p must be in (0, 1], got {self.top_p}")
        for name in ("top_k", "max_new_tokens", "batch_size", "prompt_bucket"):
            if getattr(self, name) < 1:
                raise ValueError(f"sdft.{name} must be >= 1, got {getattr(self, name)}")
        if self.prompt_format not in ("raw", "chat"):
            raise ValueError(f"sdft.prompt_format must be 'raw' or 'chat', got {self.prompt_format!r}")
        if self.documents not in ("trained", "all"):
            raise ValueError(f"sdft.documents must be 'trained' or 'all', got {self.documents!r}")


def instruction_of(example: RagExample, template: DocumentsTemplate) -> str:
    """The ``{instruction}`` of the SDFT prompt (module docstring): system prompt + the final user turn with its
    documents."""
    messages = example.to_messages()
    system = next((m.content for m in messages if m.role == "system"), None)
    user = next(m for m in reversed(messages[:-1]) if m.role == "user")
    body = template.render(user.content, user.documents) if user.documents else user.content
    return f"{system}\n\n{body}" if system else body


def trained_instruction(example: RagExample, tokenizer: Any, prompt_config: PromptConfig) -> str | None:
    """The ``{instruction}`` with the documents the length policy keeps (``documents="trained"``): system prompt
    + the final user turn of :func:`~selfaug_jax.data.prompts.trained_chat`; None if the policy skips the
    example."""
    chat = trained_chat(example, tokenizer, prompt_config)
    if chat is None:
        return None
    system = next((m["content"] for m in chat if m["role"] == "system"), None)
    user = next(m["content"] for m in reversed(chat[:-1]) if m["role"] == "user")
    return f"{system}\n\n{user}" if system else user


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


def _instructions(examples: list[RagExample], ctx: TransformContext, cfg: SDFTConfig) -> list[str | None]:
    """Each example's ``{instruction}`` (None: not trained, not rewritten) for ``cfg.documents``."""
    if cfg.documents == "all":
        return [instruction_of(ex, ctx.prompt_config.documents_template) for ex in examples]
    return [trained_instruction(ex, ctx.tokenizer, ctx.prompt_config) for ex in examples]


def _rewrite(examples: list[RagExample], instructions: list[str | None], ctx: TransformContext,
             cfg: SDFTConfig) -> dict[str, Any]:
    """The cached part: one rewrite per example (None where the instruction is None), and the costs."""
    from selfaug_jax.models.generation import GenerationConfig, special_token_ids

    tok = ctx.tokenizer
    t0 = time.process_time()
    todo = [k for k, ins in enumerate(instructions) if ins is not None]
    ids = [sdft_prompt_ids(tok, instructions[k], examples[k].target, cfg.prompt_format) for k in todo]
    gen_cfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0 if cfg.greedy else cfg.temperature,
                               top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed, prompt_bucket=cfg.prompt_bucket)
    outs = generate_by_length(ctx, ids, gen_cfg, stop_token_ids=special_token_ids(tok),
                              stop_strings=RAW_STOP_STRINGS if cfg.prompt_format == "raw" else (),
                              batch_size=cfg.batch_size) if ids else []
    rewrites: list[dict[str, Any] | None] = [None] * len(examples)
    for k, o in zip(todo, outs):
        rewrites[k] = {"text": o.text.strip(), "finished": o.finished, "num_tokens": o.num_tokens}
    return {"rewrites": rewrites, "cpu_seconds": round(time.process_time() - t0, 2),
            "prompt_tokens": {"min": min(map(len, ids), default=0), "max": max(map(len, ids), default=0),
                              "mean": round(sum(map(len, ids)) / max(1, len(ids)), 1)}}


def sdft_transform(examples: list[RagExample], ctx: TransformContext) -> TransformResult:
    """Each example with its answer replaced by the base model's checked rewrite (module docstring)."""
    cfg: SDFTConfig = ctx.options["sdft"]
    instructions = _instructions(examples, ctx, cfg)
    key = {"kind": "sdft", "model": ctx.model_id, "template": template_fingerprint(ctx.tokenizer),
           "examples": examples_fingerprint(examples), "n": len(examples),
           "instructions": fingerprint(instructions),  # documents template and, for "trained", length policy
           "batching": "by_length",
           **{k: v for k, v in dataclasses.asdict(cfg).items() if k != "keep_truncated"}}  # a post-filter
    if cfg.greedy:
        key.update(temperature=None, top_p=None, top_k=None, seed=None)
    gen, cache = cached_json(ctx.cache_dir, "sdft", key, lambda: _rewrite(examples, instructions, ctx, cfg))
    if len(gen["rewrites"]) != len(examples):
        raise ValueError(f"sdft: {len(gen['rewrites'])} rewrites for {len(examples)} examples (stale cache?)")
    kept_original: Counter[str] = Counter()
    out, n_truncated = [], 0
    for ex, r in zip(examples, gen["rewrites"]):
        if r is None:
            kept_original["not_trained"] += 1
            out.append(ex)
            continue
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
        "prompt_tokens": gen.get("prompt_tokens"), "documents": cfg.documents,
        "rewrite_tokens": sum(r.get("num_tokens", 0) for r in gen["rewrites"] if r is not None),
        "sample_rewrites": [{"id": ex.id, "original": ex.target, "rewrite": r["text"]}
                            for ex, r in list(zip(examples, gen["rewrites"])) if r is not None][:3],
    }
    logger.info("sdft: %d of %d answers rewritten, original kept for %d (%s)", report["rewritten"], len(examples),
                n_kept, report["kept_original_by_reason"])
    return TransformResult(out, examples_fingerprint(out), report)
