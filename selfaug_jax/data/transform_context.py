"""What a training-data transform (MAGPIE replay, SDFT rewrite) is given, what it returns, and its disk cache.

A transform maps the raw training examples (:class:`~selfaug_jax.data.schema.RagExample`) to new raw examples,
before tokenisation, using the *base* model to generate text. Generation is the expensive part, so its raw
output is cached on disk as one JSON file per key (:func:`cached_json`): a second run with the same model, chat
template, seed, count and generation options reads the file and generates nothing. The cheap, deterministic steps
around it (filtering, mixing, choosing the replay subset) run every time.

The table of transforms (name -> function) is :data:`selfaug_jax.data.transforms.TRANSFORMS`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selfaug_jax.data.prompts import PromptConfig
from selfaug_jax.data.schema import RagExample

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TransformContext:
    """Everything a transform needs besides the examples.

    Attributes:
        model: the base model (the one the run already loaded for the base evaluation; never a second copy).
        tokenizer: its Hugging Face tokenizer (chat template, decoding).
        model_id: identifies the model's outputs in cache keys (path, layers kept, dtype).
        prompt_config: the run's prompt / length policy: MAGPIE checks that each replay example fits
            ``max_length`` (so the replay:task ratio is exact after tokenisation); SDFT renders documents with
            its ``documents_template``.
        n_task: task examples that will actually be trained (after the length policy): MAGPIE's ratio base.
        options: the transform's own config (:class:`~selfaug_jax.data.magpie.MagpieConfig`,
            :class:`~selfaug_jax.data.sdft.SDFTConfig`), by transform name.
        cache_dir: folder of the JSON cache files; None = no caching.
        generate: the generation function (:func:`selfaug_jax.models.generation.generate_completions`); tests
            pass a stand-in to script outputs or to assert that a cached run generates nothing.
    """

    model: Any
    tokenizer: Any
    model_id: str
    prompt_config: PromptConfig
    n_task: int
    options: dict[str, Any]
    cache_dir: Path | None = None
    generate: Callable[..., Any] | None = None

    def generator(self) -> Callable[..., Any]:
        if self.generate is not None:
            return self.generate
        from selfaug_jax.models.generation import generate_completions

        return generate_completions


@dataclasses.dataclass
class TransformResult:
    """A transform's output.

    Attributes:
        examples: the transformed raw training examples (tokenised by the caller like the task data).
        key: a short content hash of ``examples`` (part of the tokenised-data cache key).
        report: JSON-able counts and settings for the log and ``summary.json``.
    """

    examples: list[RagExample]
    key: str
    report: dict[str, Any]


def fingerprint(obj: Any) -> str:
    """A 16-hex-digit SHA-256 of ``obj``'s canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def examples_fingerprint(examples: list[RagExample]) -> str:
    """Content hash of a list of examples (their JSON form, in order)."""
    return fingerprint([e.to_dict() for e in examples])


def template_fingerprint(tokenizer: Any) -> str:
    """Hash of the tokenizer's chat template (``""`` when it has none)."""
    return fingerprint(getattr(tokenizer, "chat_template", None) or "")


def generate_by_length(ctx: TransformContext, prompt_ids: list[list[int]], config: Any, *,
                       stop_strings: tuple[str, ...] = (), stop_token_ids: tuple[int, ...] = (),
                       batch_size: int) -> list[Any]:
    """``ctx.generator()`` on the prompts sorted by length (stable), its completions returned in input order.

    The generator cuts the prompts into fixed-size batches and left-pads each batch to its longest prompt (rounded
    up to ``config.prompt_bucket``), so in input order a batch holding one long prompt pads every row to it: the
    prefill computes the padding and every decode step attends over it. Sorted, each batch holds prompts of
    similar lengths; the rounding keeps the number of distinct padded lengths (compiled shapes) small. Only
    which prompts share a batch changes (so sampled outputs differ from input-order batching as another seed
    would; greedy outputs are the same up to float rounding); each prompt's completion is returned at its
    input position.
    """
    order = sorted(range(len(prompt_ids)), key=lambda i: (len(prompt_ids[i]), i))
    outs = ctx.generator()(ctx.model, ctx.tokenizer, [prompt_ids[i] for i in order], config,
                           stop_strings=stop_strings, stop_token_ids=stop_token_ids, batch_size=batch_size)
    if len(outs) != len(order):
        raise ValueError(f"generator returned {len(outs)} completions for {len(order)} prompts")
    restored: list[Any] = [None] * len(order)
    for pos, i in enumerate(order):
        restored[i] = outs[pos]
    return restored


def cached_json(cache_dir: Path | None, kind: str, key_obj: dict[str, Any],
                compute: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """``compute()``'s JSON-able result, read from ``cache_dir/<kind>-<hash of key_obj>.json`` when present.

    Returns ``(value, status)`` with status ``"hit"``, ``"miss"`` (computed and written) or ``"off"`` (no cache
    folder). The file is written to a temporary sibling and renamed, so a killed run never leaves half a file.
    """
    if cache_dir is None:
        return compute(), "off"
    path = Path(cache_dir) / f"{kind}-{fingerprint({**key_obj, 'cache_version': CACHE_VERSION})}.json"
    if path.exists():
        logger.info("%s: cached generations %s", kind, path)
        return json.loads(path.read_text())["value"], "hit"
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"key": key_obj, "value": value}, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    logger.info("%s: generations written to %s", kind, path)
    return value, "miss"
