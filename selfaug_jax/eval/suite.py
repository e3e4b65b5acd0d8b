"""Every evaluation of one model: RAG answers, IFEval-style instructions, distribution shift, multiple choice.

Three steps, so that nothing is computed twice in a run (base, LoRA, SelfAug ... evaluations)::

    data = prepare_eval_data(tokenizer, EvalConfig())                    # once: prompts, nothing model-dependent
    refs = reference_responses(original, tokenizer, data, config)        # once, before training: original's answers
    metrics, samples = evaluate_model(model, tokenizer, data, config, original_model=original,
                                      reference_responses=refs)         # per model / checkpoint

What is measured (keys follow :data:`selfaug_jax.eval.report.DEFAULT_METRIC_INFO`; extra keys are described in
:data:`EXTRA_METRIC_INFO`, in the ``results["metric_info"]`` format, to pass to the report):

* **RAG** (``rag_em``, ``rag_f1``, ``rag_contains``, ``rag_refusal_acc``, ``rag_false_refusal``): greedy answers
  (``max_new_tokens_rag``) to the RAG prompts, rendered exactly like the training data: the example's system prompt
  (the default task's ``SYSTEM_PROMPT``), the user turn through the documents template
  (``config.documents_template``, the data module's default) and the tokenizer's chat template with the generation
  prompt; scored by :func:`selfaug_jax.eval.rag_metrics.evaluate_rag`. ``rag_refusal_acc`` is the accuracy on
  unanswerable examples (None when the subset has none), ``rag_false_refusal`` the refusal rate on answerable ones.
* **IFEval** (``ifeval_{prompt,inst}_{strict,loose}``): greedy responses (``max_new_tokens_ifeval``) to the
  IFEval-style probes, scored by :func:`selfaug_jax.eval.ifeval.evaluate_ifeval`.
* **General answers** (``general_collapse``, ``general_length_ratio``): greedy answers (``max_new_tokens_shift``)
  to the general prompts; ``general_collapse`` = share of answers with at most ``collapse_words`` (5) words,
  ``general_length_ratio`` = total words / the original model's total words on the same prompts (1 for the
  original). These see a model that collapses to RAG-style fragments, which brevity-friendly IFEval checks (word or
  sentence limits) reward. The original model's answers are :func:`reference_responses`' (generated once).
* **Shift** (``shift_{general,rag}_{input,response}``): mean per-token KL(p_original || p_model) on the general
  prompts and on RAG prompts (the ``shift_rag_split`` of the default task, other examples than the RAG evaluation)
  followed by the *original* model's own greedy responses (:func:`reference_responses`); see
  :mod:`selfaug_jax.eval.shift`. Exactly 0 for the original model itself (no forward pass is run then); the
  original's hidden states are cached after the first measurement, so later evaluations only run the model.
* **Knowledge** (``knowledge_acc``, ``knowledge_acc_norm``): the shipped 197-item four-option general-knowledge
  probe (``data.probes.KNOWLEDGE_MC_PATH``), scored by log-likelihood like the files below (``n_knowledge``).
* **Multiple choice** (``{name}_acc``, ``{name}_acc_norm``), for the files in ``config.mc_files``
  (``{"mmlu": path, "arc_c": path, "hellaswag": path}`` gives the report's ``mmlu_acc``, ``arc_c_acc_norm``,
  ``hellaswag_acc_norm``); see :mod:`selfaug_jax.eval.multiple_choice`.

Subsets are deterministic: each set is a seeded sample (``random.Random(f"{seed}:{set name}")``) of ``n`` items,
kept in file order, or the whole set when ``n`` is None or larger than the set; RAG samples are stratified on
answerable / unanswerable (proportional, at least one of each when both exist and ``n >= 2``), so
``rag_refusal_acc`` is defined. ``n = 0`` skips a part (its keys are then absent). Within a part, prompts are
generated in order of token length so batches pad little, each until its end-of-turn token or its budget
(``samples["generation"]`` counts the answers that hit the budget). Every metric also comes per item
(``samples["items"]``), so the report can put a bootstrap interval on it (:mod:`selfaug_jax.eval.stats`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from selfaug_jax.data.default_task import load_default_task
from selfaug_jax.data.probes import KNOWLEDGE_MC_PATH, load_general_prompts, load_ifeval_probes
from selfaug_jax.data.prompts import DocumentsTemplate, build_chat, fit_prompt_documents
from selfaug_jax.data.schema import RagExample
from selfaug_jax.eval.ifeval import evaluate_ifeval
from selfaug_jax.eval.mc_readers import MCExample, load_mc_dataset
from selfaug_jax.eval.multiple_choice import MCConfig, score_examples, summarize_scores
from selfaug_jax.eval.rag_metrics import evaluate_rag, is_unanswerable
from selfaug_jax.eval.shift import ShiftConfig, encode_prompt, measure_shift, row_bucket
from selfaug_jax.models.generation import GenerationConfig, generate

__all__ = ["PARTS", "EvalConfig", "EvalData", "EXTRA_METRIC_INFO", "select_subset", "rag_record", "rag_chat",
           "prepare_eval_data", "reference_responses", "evaluate_model"]

logger = logging.getLogger(__name__)

Chat = list[dict[str, str]]
PARTS = ("rag", "ifeval", "general", "shift", "mc")
"""The parts of :func:`evaluate_model`, in run order."""

EXTRA_METRIC_INFO: dict[str, dict[str, Any]] = {
    "shift_rag_response": {"label": "KL on RAG responses", "higher_is_better": False, "group": "shift",
                           "decimals": 4},
    "rag_false_refusal": {"label": "RAG false refusals", "higher_is_better": False, "group": "downstream",
                          "scale": 100.0},
}
"""Report settings (``results["metric_info"]`` format) of the metrics that ``DEFAULT_METRIC_INFO`` lacks. MC keys
other than the report's (e.g. ``mmlu_acc_norm``) are shown with the report's generic defaults."""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Sizes and decoding budgets of one evaluation (see the module docstring for the subset rule).

    Attributes:
      n_rag: RAG examples scored (from ``rag_split`` of the default task, or the ``rag_examples`` given).
      rag_split: default-task split of the RAG evaluation.
      n_ifeval: IFEval-style probes.
      n_shift_general: general prompts of the shift measurement.
      n_shift_rag: RAG prompts of the shift measurement.
      shift_rag_split: default-task split of the shift RAG prompts (another split than ``rag_split``).
      rag_max_length: longest RAG prompt (evaluation and shift RAG prompts), in tokens: documents that do not fit
        are dropped lowest-ranked first, as the training data's ``truncation: drop`` policy does (so a model is
        evaluated on contexts of the length it was trained on; this project's option for CPU-sized presets).
        None = every document (prompts of 300-1300 tokens on the shipped task). The prompts that lost documents
        and the documents dropped are counted in the evaluation's ``info``.
      max_new_tokens_rag / max_new_tokens_ifeval / max_new_tokens_shift: greedy budgets; generation stops at the
        end-of-turn token, so a budget only bounds answers that would run on (the count that hit it is reported).
        ``max_new_tokens_shift`` is the budget of the answers to the general prompts: every model's (length /
        collapse) and the original model's, which are also the shift measurement's reference responses.
      collapse_words: a general answer with at most this many words (``\\w+`` runs) counts as collapsed.
      n_knowledge: items of the shipped knowledge multiple-choice probe (``data.probes.KNOWLEDGE_MC_PATH``, 197
        items; None = all, 0 = skip), scored like ``mc_files``.
      batch_size: rows per generation batch and per multiple-choice forward batch.
      shift_batch_size: rows per shift forward batch (None = ``batch_size``). A forward pass is compute-bound, so
        small batches cost no speed and pad less (rows are padded to the longest of their batch): at the default
        preset's sizes 16 rows instead of 48 cut the shift's padded tokens by about a third.
      generation_buckets: padded prompt lengths of generation batches (few compiled shapes; RAG prompts are
        300-1300 tokens); prompts longer than the largest are padded to a multiple of ``prompt_bucket``.
      prompt_bucket: see ``generation_buckets``.
      shift_max_length / shift_buckets: :class:`~selfaug_jax.eval.shift.ShiftConfig` length policy (buckets finer
        than ShiftConfig's default: RAG prompts are 300-1300 tokens, and a compile is cheaper than the padding).
      mc_files: ``{name: path}`` of multiple-choice files (format sniffed, see ``load_mc_dataset``).
      n_mc: examples per MC file (first ``n_mc``, ``MCConfig.limit``; None = all).
      mc_max_length: longest MC input.
      documents_template: how a user turn with documents is rendered (must match the training data's).
      n_samples: predictions per part kept in the ``samples`` side output.
      seed: subset seed.
      lm_eval_tasks / lm_eval_include_path / lm_eval_limit: lm-evaluation-harness tasks for every model (run by
        the experiment runner, not by :func:`evaluate_model`), an extra task directory, documents per task.
      adapter_scales: WiSE-FT scales in (0, 1): the runner also evaluates every LoRA run with its adapter merged at
        each scale (columns ``lora@0.5``; :func:`selfaug_jax.lora.merge_lora`). Not read by :func:`evaluate_model`.
      periodic / periodic_parts: the evaluation during training (``train.eval_every_steps`` / ``eval_every_epoch``,
        the paper's Figure 2): ``periodic`` overrides fields of this config for it (e.g. ``{n_ifeval: 16, n_rag:
        0, max_new_tokens_ifeval: 128}``: a fixed seeded subset, the same for every method and step, whose step-0
        point is the base model on it), ``periodic_parts`` the parts it runs (None = every part). Empty overrides
        and None parts = the final evaluation's sizes. Read by the experiment runner only.
      cache / cache_dir: whether the experiment runner reuses the base model's evaluation from disk, and where
        (:func:`selfaug_jax.eval.base_cache.base_evaluation`; the key covers the weights, every other field here,
        the data and the code version).
    """

    n_rag: int | None = 64
    rag_split: str = "test"
    n_ifeval: int | None = 64
    n_shift_general: int | None = 64
    n_shift_rag: int | None = 32
    shift_rag_split: str = "dev"
    rag_max_length: int | None = None
    max_new_tokens_rag: int = 32
    max_new_tokens_ifeval: int = 256
    max_new_tokens_shift: int = 256
    collapse_words: int = 5
    n_knowledge: int | None = None
    batch_size: int = 8
    shift_batch_size: int | None = None
    prompt_bucket: int = 64
    # Finer than powers of two: a compile (once per run, none with the persistent XLA cache) is cheaper than the
    # padding every evaluation pays (default sizes, batch 16: RAG prompts padded 1.29x -> 1.15x, IFEval 1.55x ->
    # 1.14x; bench/README.md "session 4 - evaluation cost").
    generation_buckets: tuple[int, ...] = (64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 576, 640,
                                           704, 768, 832, 896, 960, 1024, 1152, 1280, 1408, 1536, 1792, 2048)
    shift_max_length: int = 1024
    shift_buckets: tuple[int, ...] = (128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024)
    mc_files: Mapping[str, str] = dataclasses.field(default_factory=dict)
    n_mc: int | None = 100
    mc_max_length: int = 1024
    documents_template: DocumentsTemplate = DocumentsTemplate()
    n_samples: int = 3
    seed: int = 0
    # lm-evaluation-harness tasks run on the base model and every method (selfaug_jax/eval/lm_eval_tasks.py).
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_include_path: str | None = None  # directory of extra task YAMLs (lm-eval's --include_path)
    lm_eval_limit: int | None = None  # documents per task (None = all)
    # WiSE-FT for LoRA (arXiv 2109.01903): every LoRA run is also evaluated with its adapter merged at each scale s
    # in (0, 1) -- (1 - s) * W0 + s * W_ft -- as extra report columns "lora@0.5" (read by the experiment runner).
    adapter_scales: tuple[float, ...] = ()
    # The base model's evaluation cached on disk (selfaug_jax/eval/base_cache.py): reused when the weights, this
    # config, the data and the code version are the same; null cache_dir = $SELFAUG_JAX_CACHE/eval.
    periodic: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    periodic_parts: tuple[str, ...] | None = None
    cache: bool = True
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        names = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(self.periodic) - names | set(self.periodic) & {"periodic", "periodic_parts"})
        if bad:
            raise ValueError(f"EvalConfig.periodic: unknown or nested field(s) {bad}; give fields of the eval section")
        if self.periodic_parts is not None and set(self.periodic_parts) - set(PARTS):
            raise ValueError(f"EvalConfig.periodic_parts: {sorted(set(self.periodic_parts) - set(PARTS))} are not "
                             f"evaluation parts; choose from {PARTS}")
        if self.periodic:
            self.periodic_config()  # validates the overridden values with the same checks
        for s in self.adapter_scales:
            if not 0.0 < s < 1.0:
                raise ValueError(f"EvalConfig.adapter_scales: {s} must be in (0, 1) (1 is the run's own column)")
        if len(set(self.adapter_scales)) != len(self.adapter_scales):
            raise ValueError(f"EvalConfig.adapter_scales: {list(self.adapter_scales)} repeats a scale")
        for name in ("n_rag", "n_ifeval", "n_shift_general", "n_shift_rag", "n_mc", "n_knowledge"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"EvalConfig.{name} must be >= 0 or None, got {v}")
        if self.rag_max_length is not None and self.rag_max_length < 64:
            raise ValueError(f"EvalConfig.rag_max_length must be >= 64 tokens or None, got {self.rag_max_length}")
        if self.shift_batch_size is not None and self.shift_batch_size < 1:
            raise ValueError(f"EvalConfig.shift_batch_size must be >= 1 or None, got {self.shift_batch_size}")
        for name in ("max_new_tokens_rag", "max_new_tokens_ifeval", "max_new_tokens_shift", "batch_size",
                     "collapse_words"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalConfig.{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def for_cpu(cls, **overrides: Any) -> "EvalConfig":
        """Sizes for the default 135M model on a 2-core CPU: about 85-90 s per (warm) evaluation.

        32 RAG examples (16 new tokens), 32 IFEval probes (96 new tokens), 32 general + 8 RAG shift prompts
        (48-token reference responses). Measured cost model of this machine (float32, uncontended): prefill about
        600 tokens/s, decoding about 0.055 s per step of a batch of 8; the first evaluation of a new model
        structure adds the compilations (30-60 s) and the first shift measurement the original's forward pass.
        """
        sizes = dict(n_rag=32, n_ifeval=32, n_shift_general=32, n_shift_rag=8, max_new_tokens_rag=16,
                     max_new_tokens_ifeval=96, max_new_tokens_shift=48)
        return cls(**{**sizes, **overrides})

    def periodic_config(self) -> "EvalConfig":
        """This config with the ``periodic`` overrides applied (the evaluation config during training)."""
        if not self.periodic:
            return self
        return dataclasses.replace(self, periodic={}, periodic_parts=None, **dict(self.periodic))

    def shift_config(self) -> ShiftConfig:
        return ShiftConfig(batch_size=self.shift_batch_size or self.batch_size, buckets=tuple(self.shift_buckets),
                           max_length=self.shift_max_length)


@dataclasses.dataclass
class EvalData:
    """Prompts of every part (model-independent), each list in generation order (longest prompt first).

    Attributes:
      rag_examples: RAG records (dicts with ``id``, ``answer``, ``answer_aliases``, ``answerable`` ...).
      rag_prompts: their chats (system + user turn with documents), aligned with ``rag_examples``.
      ifeval_records: IFEval probe records (``id``, ``prompt``, ``instructions``).
      general_ids / general_prompts: shift general prompts (one user turn each).
      shift_rag_ids / shift_rag_prompts: shift RAG prompts (chats as for ``rag_prompts``).
      mc_datasets: ``{name: [MCExample]}`` (already limited to ``n_mc``).
      info: counts and prompt token lengths per part.
    """

    rag_examples: list[dict[str, Any]]
    rag_prompts: list[Chat]
    ifeval_records: list[dict[str, Any]]
    general_ids: list[str]
    general_prompts: list[Chat]
    shift_rag_ids: list[str]
    shift_rag_prompts: list[Chat]
    mc_datasets: dict[str, list[MCExample]]
    info: dict[str, Any]


# ----------------------------------------------------------------------------------------------------- data
def select_subset(items: Sequence[Any], n: int | None, seed: int, name: str) -> list[Any]:
    """A seeded sample of ``n`` items in their original order (all items when ``n`` is None or >= len)."""
    if n is None or n >= len(items):
        return list(items)
    idx = random.Random(f"{seed}:{name}").sample(range(len(items)), n)
    return [items[i] for i in sorted(idx)]


def _select_rag(records: Sequence[dict[str, Any]], n: int | None, seed: int, name: str) -> list[dict[str, Any]]:
    """Seeded sample stratified on answerable / unanswerable (proportional, >= 1 of each if possible)."""
    if n is None or n >= len(records):
        return list(records)
    unans = [i for i, r in enumerate(records) if is_unanswerable(r)]
    ans = [i for i, r in enumerate(records) if not is_unanswerable(r)]
    k = round(n * len(unans) / len(records))
    if n >= 2 and unans and ans:
        k = min(max(k, 1), n - 1)
    k = min(k, len(unans))
    rng = random.Random(f"{seed}:{name}")
    chosen = rng.sample(unans, k) + rng.sample(ans, min(n - k, len(ans)))
    return [records[i] for i in sorted(chosen)]


def rag_record(example: RagExample | Mapping[str, Any]) -> dict[str, Any]:
    """A RAG example as the flat dict the metrics read (``meta`` fields such as ``answer_aliases`` lifted)."""
    if isinstance(example, RagExample):
        rec = {**dict(example.meta), **example.to_dict()}
        rec.pop("meta", None)
        rec.setdefault("answer", example.target)
        return rec
    return dict(example)


def rag_chat(record: Mapping[str, Any], template: DocumentsTemplate = DocumentsTemplate()) -> Chat:
    """The prompt chat of a RAG record (every turn but the final answer), rendered as the training data is."""
    example = RagExample.from_dict({k: v for k, v in record.items() if k != "meta"} | {"meta": {}})
    return build_chat(example.to_messages()[:-1], template)


def rag_chats(tokenizer: Any, records: Sequence[Mapping[str, Any]], template: DocumentsTemplate,
              max_length: int | None) -> tuple[list[Chat], dict[str, int]]:
    """The prompt chats of RAG records, with ``EvalConfig.rag_max_length``'s document policy when set.

    Returns the chats and counts ``{"n_prompts_fitted", "n_documents_dropped", "n_prompts_too_long"}``
    (prompts that lost documents, documents dropped, prompts over ``max_length`` even without documents).
    """
    counts = {"n_prompts_fitted": 0, "n_documents_dropped": 0, "n_prompts_too_long": 0}
    if max_length is None:
        return [rag_chat(r, template) for r in records], counts
    chats = []
    for r in records:
        example = RagExample.from_dict({k: v for k, v in r.items() if k != "meta"} | {"meta": {}})
        chat, dropped = fit_prompt_documents(example.to_messages()[:-1], template,
                                             lambda c: len(encode_prompt(tokenizer, c)), max_length)
        counts["n_prompts_fitted"] += dropped > 0
        counts["n_documents_dropped"] += dropped
        counts["n_prompts_too_long"] += len(encode_prompt(tokenizer, chat)) > max_length
        chats.append(chat)
    if counts["n_prompts_fitted"]:
        logger.info("RAG prompts: %d of %d lost documents to rag_max_length=%d (%d documents dropped, lowest-ranked "
                    "first; %d still longer)", counts["n_prompts_fitted"], len(records), max_length,
                    counts["n_documents_dropped"], counts["n_prompts_too_long"])
    return chats, counts


def _by_length(tokenizer: Any, prompts: Sequence[Any], *aligned: Sequence[Any]) -> tuple[list[int], list[list]]:
    """Sort prompts (and aligned lists) by rendered token length, longest first; returns lengths + lists."""
    lengths = [len(encode_prompt(tokenizer, p)) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    return [lengths[i] for i in order], [[seq[i] for i in order] for seq in (prompts, *aligned)]


def _length_info(lengths: Sequence[int]) -> dict[str, Any]:
    if not lengths:
        return {"n": 0}
    return {"n": len(lengths), "prompt_tokens_mean": float(np.mean(lengths)), "prompt_tokens_max": int(max(lengths))}


def prepare_eval_data(tokenizer: Any, config: EvalConfig = EvalConfig(), *,
                      rag_examples: Sequence[RagExample | Mapping[str, Any]] | None = None,
                      shift_rag_examples: Sequence[RagExample | Mapping[str, Any]] | None = None) -> EvalData:
    """Select and render every prompt set (nothing model-dependent).

    Args:
      tokenizer: the HF tokenizer (chat template), used to order prompts by length.
      config: :class:`EvalConfig`.
      rag_examples: RAG evaluation examples (default: the default task's ``config.rag_split``).
      shift_rag_examples: examples whose prompts measure the RAG shift (default: the default task's
        ``config.shift_rag_split`` when ``rag_examples`` is None, else ``rag_examples`` itself, sampled
        independently).
    """
    seed = config.seed
    rag_pool = ([rag_record(e) for e in rag_examples] if rag_examples is not None
                else load_default_task(config.rag_split))
    if shift_rag_examples is not None:
        shift_pool = [rag_record(e) for e in shift_rag_examples]
    else:
        shift_pool = rag_pool if rag_examples is not None else load_default_task(config.shift_rag_split)
    rag = _select_rag(rag_pool, config.n_rag, seed, "rag")
    rag_chats_, rag_fit = rag_chats(tokenizer, rag, config.documents_template, config.rag_max_length)
    rag_len, (rag_prompts, rag) = _by_length(tokenizer, rag_chats_, rag)
    ifeval = select_subset(load_ifeval_probes(), config.n_ifeval, seed, "ifeval")
    if_len, (_, ifeval) = _by_length(tokenizer, [r["prompt"] for r in ifeval], ifeval)
    general = select_subset(load_general_prompts(), config.n_shift_general, seed, "shift_general")
    gen_len, (general_prompts, general_ids) = _by_length(
        tokenizer, [[{"role": "user", "content": r["prompt"]}] for r in general], [r["id"] for r in general])
    shift_rag = select_subset(shift_pool, config.n_shift_rag, seed, "shift_rag")
    srag_chats, srag_fit = rag_chats(tokenizer, shift_rag, config.documents_template, config.rag_max_length)
    srag_len, (shift_rag_prompts, shift_rag_ids) = _by_length(tokenizer, srag_chats, [r.get("id") for r in shift_rag])
    mc = {name: load_mc_dataset(path)[:config.n_mc] if config.n_mc is not None else load_mc_dataset(path)
          for name, path in config.mc_files.items()}
    if config.n_knowledge != 0:
        if "knowledge" in mc:
            raise ValueError("EvalConfig.mc_files: the name 'knowledge' is the shipped knowledge probe's; rename it "
                             "or set n_knowledge=0")
        mc["knowledge"] = select_subset(load_mc_dataset(KNOWLEDGE_MC_PATH), config.n_knowledge, seed, "knowledge")
    info = {"rag": {**_length_info(rag_len), **rag_fit}, "ifeval": _length_info(if_len),
            "shift_general": _length_info(gen_len), "shift_rag": {**_length_info(srag_len), **srag_fit},
            "mc": {k: len(v) for k, v in mc.items()},
            "rag_unanswerable": sum(is_unanswerable(r) for r in rag)}
    return EvalData(rag, rag_prompts, ifeval, general_ids, general_prompts, shift_rag_ids, shift_rag_prompts, mc,
                    info)


# ----------------------------------------------------------------------------------------------------- models
@dataclasses.dataclass
class Generations:
    """Greedy answers of one model to one prompt list, and how their generation ended.

    Attributes:
      texts: decoded answers (special tokens skipped), in prompt order.
      new_tokens: generated tokens per answer (the end-of-turn token included).
      hit_cap: per answer, True when the budget ran out before an end-of-turn token (the answer may be cut).
      max_new_tokens: the budget.
    """

    texts: list[str]
    new_tokens: list[int]
    hit_cap: list[bool]
    max_new_tokens: int

    def stats(self) -> dict[str, Any]:
        """``{"n", "hit_cap", "max_new_tokens", "new_tokens_mean", "new_tokens_max"}`` for the report."""
        n = len(self.texts)
        return {"n": n, "hit_cap": int(sum(self.hit_cap)), "max_new_tokens": self.max_new_tokens,
                "new_tokens_mean": float(np.mean(self.new_tokens)) if n else 0.0,
                "new_tokens_max": int(max(self.new_tokens)) if n else 0}


def _generate(model: Any, tokenizer: Any, prompts: Sequence[Any], max_new_tokens: int, config: "EvalConfig"
              ) -> Generations:
    """Greedy answers, ``config.batch_size`` prompts per call, until end-of-turn or ``max_new_tokens``.

    Prompts arrive sorted by token length (:func:`prepare_eval_data`), so each batch holds prompts of similar length;
    a batch is left-padded to the smallest of ``config.generation_buckets`` that fits its longest prompt (beyond
    them: a multiple of ``prompt_bucket``), so a whole run compiles the decode loop for a handful of shapes; the
    decode loop of a batch stops as soon as all its rows have ended. The last batch of several is filled with
    copies of its first prompt up to :func:`~selfaug_jax.eval.shift.row_bucket` rows (few shapes, little waste).
    Stop ids: the model's EOS ids plus the tokenizer's EOS (``<|im_end|>`` for ChatML models).
    """
    if not prompts:
        return Generations([], [], [], max_new_tokens)
    eos = [int(e) for e in model.config.eos_token_ids]
    if tokenizer.eos_token_id is not None and int(tokenizer.eos_token_id) not in eos:
        eos.append(int(tokenizer.eos_token_id))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else tokenizer.pad_token_id
    gen = GenerationConfig(max_new_tokens=max_new_tokens, prompt_bucket=config.prompt_bucket,
                           eos_token_ids=tuple(eos), pad_token_id=None if pad is None else int(pad))
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    out = Generations([], [], [], max_new_tokens)
    bs = config.batch_size
    for start in range(0, len(encoded), bs):
        chunk = encoded[start:start + bs]
        real = len(chunk)
        if len(encoded) > bs:
            chunk = chunk + [chunk[0]] * (row_bucket(real, bs) - real)
        longest = max(len(p) for p in chunk)
        target = next((b for b in config.generation_buckets if b >= longest),
                      -(-longest // config.prompt_bucket) * config.prompt_bucket)
        result = generate(model, chunk, dataclasses.replace(gen, prompt_bucket=target))  # pads to exactly `target`
        for row, n, stopped in zip(result.sequences()[:real], result.lengths[:real], result.stopped_on_eos[:real]):
            out.texts.append(tokenizer.decode(row, skip_special_tokens=True))
            out.new_tokens.append(int(n))
            out.hit_cap.append(not bool(stopped))
    return out


def reference_responses(original_model: Any, tokenizer: Any, data: EvalData,
                        config: EvalConfig = EvalConfig()) -> dict[str, Any]:
    """The original model's greedy answers (``max_new_tokens_shift``) to the shift prompts, computed once per run.

    Returns ``{"general": [...], "rag": [...]}`` aligned with ``data.general_prompts`` / ``data.shift_rag_prompts``,
    plus ``"generation": {"general": Generations.stats(), "rag": ...}``. The general answers are also the base
    model's answers in :func:`evaluate_model` (length / collapse), so they are generated once.
    """
    n = config.max_new_tokens_shift
    general = _generate(original_model, tokenizer, data.general_prompts, n, config)
    rag = _generate(original_model, tokenizer, data.shift_rag_prompts, n, config)
    return {"general": general.texts, "rag": rag.texts,
            "generation": {"general": general.stats(), "rag": rag.stats()}}


_LOGITS_FNS: list[tuple[Any, Callable[..., Any]]] = []


def _logits_fn(model: Any) -> Callable[[np.ndarray, np.ndarray], jax.Array]:
    """``(ids_bt, mask_bt) -> float32 logits`` of ``model``, jitted once per model structure."""
    graphdef, state = nnx.split(model)
    fn = next((f for g, f in _LOGITS_FNS if g == graphdef), None)
    if fn is None:
        fn = jax.jit(lambda st, ids, mask: nnx.merge(graphdef, st)(ids, attention_mask=mask))
        _LOGITS_FNS.append((graphdef, fn))
        del _LOGITS_FNS[:-4]
    return lambda ids_bt, mask_bt: fn(state, jnp.asarray(ids_bt), jnp.asarray(mask_bt))


def _finite_or_none(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _words(text: str) -> int:
    return len(re.findall(r"\w+", text))


def evaluate_model(model: Any, tokenizer: Any, data: EvalData, config: EvalConfig = EvalConfig(), *,
                   original_model: Any | None, reference_responses: Mapping[str, Any] | None,
                   parts: Sequence[str] = PARTS) -> tuple[dict[str, float | None], dict[str, Any]]:
    """Run every evaluation of ``model``.

    Args:
      model: the model under evaluation (a :class:`~selfaug_jax.models.DecoderLM`, LoRA adapters included).
      tokenizer: its HF tokenizer.
      data: :func:`prepare_eval_data` output.
      config: the same :class:`EvalConfig`.
      original_model: the model before fine-tuning, for the shift (None, or ``model`` itself, gives 0 shift
        without a forward pass).
      reference_responses: :func:`reference_responses` output (None: shift on prompts only, response KL 0, and no
        general length ratio). When ``model is original_model`` its general answers are these (not regenerated).
      parts: the parts to run (subset of :data:`PARTS`), e.g. ``("ifeval", "shift")`` for cheap evaluations
        during training; a part also stays silent when its data is empty.

    Returns:
      ``(metrics, samples)``: ``metrics`` a flat ``{key: float | None}`` (module docstring; None = undefined,
      e.g. no unanswerable example), ``samples`` = ``{"rag": [...], "ifeval": [...], "general": [...], "shift":
      {...}, "details": {...}, "items": {...}, "generation": {...}, "timing_s": {...}}``: a few predictions, the
      per-part breakdowns, per-item values of every metric (``items[key] = {"num": [...], "den": [...] | None}``,
      ``metric = sum(num) / sum(den)``, den None = all ones; the input of :mod:`selfaug_jax.eval.stats`), the
      generation statistics per part (:meth:`Generations.stats`, incl. how many answers hit the budget) and the wall
      time of each part.
    """
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"evaluate_model: unknown parts {sorted(unknown)}; choose from {PARTS}")
    t_start, c_start = time.perf_counter(), time.process_time()
    metrics: dict[str, float | None] = {}
    samples: dict[str, Any] = {"rag": [], "ifeval": [], "general": [], "shift": {}, "details": {}, "items": {},
                               "generation": {}, "timing_s": {}, "cpu_s": {}}
    items = samples["items"]
    k = config.n_samples

    t0, c0 = time.perf_counter(), time.process_time()
    if "rag" in parts and data.rag_examples:
        gen = _generate(model, tokenizer, data.rag_prompts, config.max_new_tokens_rag, config)
        preds = gen.texts
        samples["generation"]["rag"] = gen.stats()
        rag = evaluate_rag(data.rag_examples, preds)
        metrics.update(rag_em=rag["em"], rag_f1=rag["f1"], rag_contains=rag["contained"],
                       rag_refusal_acc=_finite_or_none(rag["unanswerable"]["accuracy"]),
                       rag_false_refusal=_finite_or_none(rag["answerable"]["false_refusal_rate"]))
        per = rag["per_example"]
        unans = [float(is_unanswerable(ex)) for ex in data.rag_examples]
        items.update(rag_em={"num": [r["em"] for r in per], "den": None},
                     rag_f1={"num": [r["f1"] for r in per], "den": None},
                     rag_contains={"num": [r["contained"] for r in per], "den": None})
        if any(unans):
            items["rag_refusal_acc"] = {"num": [r["refusal"] * u for r, u in zip(per, unans)], "den": unans}
        if not all(unans):
            items["rag_false_refusal"] = {"num": [r["refusal"] * (1 - u) for r, u in zip(per, unans)],
                                          "den": [1.0 - u for u in unans]}
        samples["rag"] = [{"id": ex.get("id"), "question": ex.get("question"), "answer": ex.get("answer"),
                           "prediction": p} for ex, p in zip(data.rag_examples[:k], preds[:k])]
        samples["details"]["rag"] = {key: rag[key] for key in ("count", "answerable", "unanswerable", "by_hops")}
    samples["timing_s"]["rag"] = time.perf_counter() - t0
    samples["cpu_s"]["rag"] = time.process_time() - c0

    t0, c0 = time.perf_counter(), time.process_time()
    if "ifeval" in parts and data.ifeval_records:
        prompts = [r["prompt"] for r in data.ifeval_records]
        gen = _generate(model, tokenizer, prompts, config.max_new_tokens_ifeval, config)
        responses = gen.texts
        samples["generation"]["ifeval"] = gen.stats()
        ife = evaluate_ifeval(data.ifeval_records, responses)
        metrics.update(ifeval_prompt_strict=ife["prompt_level_strict"],
                       ifeval_inst_strict=ife["instruction_level_strict"],
                       ifeval_prompt_loose=ife["prompt_level_loose"],
                       ifeval_inst_loose=ife["instruction_level_loose"])
        res = ife["results"]
        n_ins = [float(len(r["strict"])) for r in res]
        items.update(ifeval_prompt_strict={"num": [float(all(r["strict"])) for r in res], "den": None},
                     ifeval_inst_strict={"num": [float(sum(r["strict"])) for r in res], "den": n_ins},
                     ifeval_prompt_loose={"num": [float(all(r["loose"])) for r in res], "den": None},
                     ifeval_inst_loose={"num": [float(sum(r["loose"])) for r in res], "den": n_ins})
        samples["ifeval"] = [{"id": r["id"], "prompt": r["prompt"], "response": resp, "strict": rr["strict"]}
                             for r, resp, rr in zip(data.ifeval_records[:k], responses[:k], res[:k])]
        samples["details"]["ifeval"] = {"per_type": ife["per_type"], "num_prompts": ife["num_prompts"],
                                        "num_instructions": ife["num_instructions"]}
    samples["timing_s"]["ifeval"] = time.perf_counter() - t0
    samples["cpu_s"]["ifeval"] = time.process_time() - c0

    t0, c0 = time.perf_counter(), time.process_time()
    refs = reference_responses or {}
    if "general" in parts and data.general_prompts:
        base_texts = refs.get("general")
        if base_texts is not None and len(base_texts) != len(data.general_prompts):
            raise ValueError(f"evaluate_model: {len(data.general_prompts)} general prompts but {len(base_texts)} "
                             "reference responses (computed with another EvalData?)")
        if model is original_model and base_texts is not None:
            texts = list(base_texts)
            samples["generation"]["general"] = dict(refs.get("generation", {}).get("general", {}), reused=True)
        else:
            gen = _generate(model, tokenizer, data.general_prompts, config.max_new_tokens_shift, config)
            texts = gen.texts
            samples["generation"]["general"] = gen.stats()
        words = [float(_words(t)) for t in texts]
        collapsed = [float(w <= config.collapse_words) for w in words]
        metrics["general_collapse"] = float(np.mean(collapsed))
        items["general_collapse"] = {"num": collapsed, "den": None}
        if base_texts is not None:
            base_words = [float(_words(t)) for t in base_texts]
            metrics["general_length_ratio"] = None  # undefined when the original's answers have no word at all
            if sum(base_words) > 0:
                metrics["general_length_ratio"] = sum(words) / sum(base_words)
                items["general_length_ratio"] = {"num": words, "den": base_words}
        samples["general"] = [{"id": i, "response": t} for i, t in zip(data.general_ids[:k], texts[:k])]
        samples["details"]["general"] = {"words_mean": float(np.mean(words)), "collapse_words": config.collapse_words}
    samples["timing_s"]["general"] = time.perf_counter() - t0
    samples["cpu_s"]["general"] = time.process_time() - c0

    t0, c0 = time.perf_counter(), time.process_time()
    reference = None if original_model is model else original_model
    for part, prompts in (("general", data.general_prompts), ("rag", data.shift_rag_prompts)):
        if "shift" not in parts or not prompts:
            continue
        responses = refs.get(part)
        if responses is not None and len(responses) != len(prompts):
            raise ValueError(f"evaluate_model: {len(prompts)} shift {part} prompts but {len(responses)} reference "
                             "responses (computed with another EvalData?)")
        stats = measure_shift(reference, model, tokenizer, prompts, responses, config.shift_config())
        metrics[f"shift_{part}_input"] = stats["input_kl"]
        metrics[f"shift_{part}_response"] = stats["response_kl"]
        per = stats.pop("per_example")
        if sum(per["n_input_tokens"]):
            items[f"shift_{part}_input"] = {"num": per["input_kl_sum"], "den": [float(n) for n in per["n_input_tokens"]]}
        if sum(per["n_response_tokens"]):
            items[f"shift_{part}_response"] = {"num": per["response_kl_sum"],
                                               "den": [float(n) for n in per["n_response_tokens"]]}
        samples["shift"][part] = stats
    samples["timing_s"]["shift"] = time.perf_counter() - t0
    samples["cpu_s"]["shift"] = time.process_time() - c0

    t0, c0 = time.perf_counter(), time.process_time()
    if "mc" in parts and data.mc_datasets:
        mc_cfg = MCConfig(batch_size=config.batch_size, max_length=config.mc_max_length)
        logits_fn = _logits_fn(model)
        summaries = {}
        for name, examples in data.mc_datasets.items():
            scores = score_examples(examples, logits_fn, tokenizer, mc_cfg)
            summaries[name] = s = summarize_scores(scores)
            metrics[f"{name}_acc"] = _finite_or_none(s["acc"])
            metrics[f"{name}_acc_norm"] = _finite_or_none(s["acc_norm"])
            if scores:
                items[f"{name}_acc"] = {"num": [float(x.correct) for x in scores], "den": None}
                items[f"{name}_acc_norm"] = {"num": [float(x.correct_norm) for x in scores], "den": None}
        samples["details"]["mc"] = summaries
    samples["timing_s"]["mc"] = time.perf_counter() - t0
    samples["cpu_s"]["mc"] = time.process_time() - c0
    samples["timing_s"]["total"] = time.perf_counter() - t_start
    samples["cpu_s"]["total"] = time.process_time() - c_start
    logger.info("evaluation took %.1f s (%s)", samples["timing_s"]["total"],
                ", ".join(f"{k} {v:.1f}" for k, v in samples["timing_s"].items() if k != "total"))
    return metrics, samples
