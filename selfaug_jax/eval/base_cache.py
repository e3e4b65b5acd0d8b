"""The base model's evaluation, cached on disk so a second run, a sweep or a run with other methods reuses it.

Every run of the experiment evaluates the same base model on the same prompts before training: its reference
answers (:func:`~selfaug_jax.eval.suite.reference_responses`: the general answers, which are also the shift
measurement's reference responses, and the shift RAG answers) and its full evaluation
(:func:`~selfaug_jax.eval.suite.evaluate_model`). On a 2-core CPU that is several minutes at the default sizes
(``bench/README.md``, "session 4 — evaluation cost"). :func:`base_evaluation` stores both in one JSON file keyed by
everything that can change them and, when the key matches, loads them instead of running the model.

The key (:func:`cache_key`) is a SHA-256 over:

* the **model weights**: every parameter array's path, shape, dtype and bytes (:func:`model_fingerprint`), plus the
  model's structure (its config, compute dtype, attention chunk), since the compiled graph decides the rounding;
* the **evaluation config**: every :class:`~selfaug_jax.eval.suite.EvalConfig` field except the cache's own
  (``cache``, ``cache_dir``), the lm-evaluation-harness fields and the periodic-evaluation fields, which
  :func:`evaluate_model` does not read (a periodic subset is its own config, cached under its own key);
* the **evaluation data**: every prompt, record and multiple-choice example of the
  :class:`~selfaug_jax.eval.suite.EvalData`, and the tokenizer (class, vocabulary size, special ids, chat template,
  and the token ids of every rendered prompt, so a tokenizer that splits differently is another key);
* the **code**: :data:`EVAL_CACHE_VERSION` (bumped by hand whenever generation, scoring or the samples layout
  change), the package version, the JAX version and backend (greedy answers can differ across them).

Safety: files are written atomically (temporary file in the same directory, ``fsync``, ``os.replace``), so a
killed run leaves either the old file or the new one; the file repeats the full key and its inputs, and a file whose
stored key differs from its name, that is not valid JSON, or that lacks a field is reported (one warning line naming
the file and the reason) and recomputed, never reused. ``EvalConfig.cache = False`` (``eval.cache=false``) turns
the cache off; ``EvalConfig.cache_dir`` (default ``$SELFAUG_JAX_CACHE/eval`` or ``~/.cache/selfaug_jax/eval``)
moves it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

__all__ = ["EVAL_CACHE_VERSION", "BaseEvaluation", "default_cache_dir", "model_fingerprint", "cache_key",
           "base_evaluation"]

logger = logging.getLogger(__name__)

EVAL_CACHE_VERSION = 2  # 2: last generation / shift batches padded to eval.shift.row_bucket rows
"""Bump whenever generation, scoring, the metrics or the samples layout change (invalidates every cached file)."""

_NOT_IN_KEY = ("cache", "cache_dir", "lm_eval_tasks", "lm_eval_include_path", "lm_eval_limit", "adapter_scales",
               "periodic", "periodic_parts")


@dataclasses.dataclass
class BaseEvaluation:
    """The base model's reference answers, metrics and samples, and where they came from.

    Attributes:
      reference_responses: :func:`~selfaug_jax.eval.suite.reference_responses` output.
      metrics / samples: :func:`~selfaug_jax.eval.suite.evaluate_model` output for the base model.
      cache_hit: True when loaded from ``path`` (nothing was computed).
      path: the cache file (None when the cache is off).
      key: the cache key (None when the cache is off).
    """

    reference_responses: dict[str, Any]
    metrics: dict[str, float | None]
    samples: dict[str, Any]
    cache_hit: bool
    path: Path | None
    key: str | None


def default_cache_dir() -> Path:
    """``$SELFAUG_JAX_CACHE/eval``, else ``~/.cache/selfaug_jax/eval``."""
    from selfaug_jax.checkpoints.default_model import cache_dir

    return cache_dir() / "eval"


def model_fingerprint(model: Any) -> str:
    """SHA-256 of the model's structure and every parameter's path, shape, dtype and bytes (hex)."""
    graphdef, state = nnx.split(model)
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    structure = {"class": type(model).__name__, "config": repr(cfg), "dtype": str(getattr(model, "dtype", None)),
                 "attention_chunk": getattr(model, "attention_chunk", None)}
    h.update(json.dumps(structure, sort_keys=True, default=str).encode())
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        arr = np.ascontiguousarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{arr.shape}|{arr.dtype}|".encode())
        h.update(arr.view(np.uint8).reshape(-1).data if arr.size else b"")
    return h.hexdigest()


def _config_fields(config: Any) -> dict[str, Any]:
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in _NOT_IN_KEY}
    return json.loads(json.dumps(fields, sort_keys=True, default=_jsonable))


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.asdict(x)
    if isinstance(x, Mapping):
        return dict(x)
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    if isinstance(x, Path):
        return str(x)
    return repr(x)


def _data_fingerprint(data: Any, tokenizer: Any) -> str:
    """SHA-256 of every prompt / record / MC example and of the tokenizer's view of the prompts."""
    from selfaug_jax.eval.shift import encode_prompt

    h = hashlib.sha256()
    payload = {f.name: getattr(data, f.name) for f in dataclasses.fields(data)}
    h.update(json.dumps(payload, sort_keys=True, default=_jsonable).encode())
    tok = {"class": type(tokenizer).__name__, "len": len(tokenizer),
           "chat_template": getattr(tokenizer, "chat_template", None),
           "special": {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}}
    h.update(json.dumps(tok, sort_keys=True, default=str).encode())
    prompts = ([*data.rag_prompts, *[r["prompt"] for r in data.ifeval_records], *data.general_prompts,
                *data.shift_rag_prompts])
    for p in prompts:
        h.update(np.asarray(encode_prompt(tokenizer, p), np.int64).tobytes() + b"|")
    return h.hexdigest()


def cache_key(model: Any, tokenizer: Any, data: Any, config: Any, *, weights: str | None = None
              ) -> tuple[str, dict[str, Any]]:
    """``(hex key, its inputs)`` of the base evaluation of ``model`` (see the module docstring).

    ``weights`` is :func:`model_fingerprint` of ``model`` when already known.
    """
    import selfaug_jax

    inputs = {
        "version": EVAL_CACHE_VERSION,
        "package": getattr(selfaug_jax, "__version__", "unknown"),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "weights": weights or model_fingerprint(model),
        "config": _config_fields(config),
        "data": _data_fingerprint(data, tokenizer),
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return key, inputs


def _atomic_write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, default=_jsonable)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path, key: str) -> dict[str, Any] | None:
    """The cached entry, or None when absent; a damaged or mismatched file is reported and treated as absent."""
    if not path.exists():
        return None
    try:
        entry = json.loads(path.read_text())
        if not isinstance(entry, dict):
            raise ValueError("not a JSON object")
        if entry.get("key") != key:
            raise ValueError(f"stored key {str(entry.get('key'))[:12]}... differs from the file name")
        missing = [k for k in ("reference_responses", "metrics", "samples") if not isinstance(entry.get(k), dict)]
        if missing:
            raise ValueError(f"missing {missing}")
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        logger.warning("base evaluation cache: %s is damaged (%s); recomputing and overwriting it", path, e)
        return None
    return entry


def base_evaluation(model: Any, tokenizer: Any, data: Any, config: Any) -> BaseEvaluation:
    """The base model's reference answers and evaluation, from the on-disk cache when the key matches.

    Args:
      model: the base model (also the original model of the shift, so its shift is 0 without a forward pass).
      tokenizer / data / config: as for :func:`~selfaug_jax.eval.suite.evaluate_model`.

    The log says which: ``base evaluation: reused from <file>`` or ``... computed, cached in <file>``; the samples
    carry ``samples["cache"] = {"hit", "path", "key"}``.
    """
    from selfaug_jax.eval.suite import evaluate_model, reference_responses

    path = key = inputs = None
    use_cache = getattr(config, "cache", False)
    if use_cache and jax.process_count() > 1:
        # The fingerprint reads every parameter's bytes on this host; sharded weights of a multi-host run are not
        # all addressable here (and hashing a 7B model per run is not free): no cache across hosts.
        logger.info("base evaluation cache: off on %d processes", jax.process_count())
        use_cache = False
    if use_cache:
        key, inputs = cache_key(model, tokenizer, data, config)
        root = Path(config.cache_dir) if getattr(config, "cache_dir", None) else default_cache_dir()
        path = root / f"base_{key[:32]}.json"
        entry = _load(path, key)
        if entry is not None:
            logger.info("base evaluation: reused from %s (same weights, eval config, data and code)", path)
            samples = entry["samples"]
            samples["cache"] = {"hit": True, "path": str(path), "key": key}
            return BaseEvaluation(entry["reference_responses"], entry["metrics"], samples, True, path, key)
    refs = reference_responses(model, tokenizer, data, config)
    metrics, samples = evaluate_model(model, tokenizer, data, config, original_model=model, reference_responses=refs)
    if path is not None:
        try:
            _atomic_write_json(path, {"key": key, "inputs": inputs, "reference_responses": refs, "metrics": metrics,
                                      "samples": samples})
            logger.info("base evaluation: computed, cached in %s", path)
        except OSError as e:  # a read-only or full disk costs the reuse, not the run
            logger.warning("base evaluation cache: could not write %s (%s); continuing without it", path, e)
        samples["cache"] = {"hit": False, "path": str(path), "key": key}
    return BaseEvaluation(refs, metrics, samples, False, path, key)
