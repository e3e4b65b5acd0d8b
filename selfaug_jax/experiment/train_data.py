"""The training set of a run: read, split per host, tokenized into a per-host cache, equal in size on every host.

On ``P`` processes (hosts), process ``p`` keeps the examples ``p, p + P, p + 2P, ...`` of the file (a
deterministic split of the validated examples: every host parses the file, so a bad line is reported identically
everywhere, but each tokenizes only its own share). Each host tokenizes into its *own* cache entry (the shard is
part of the cache key), written into a temporary folder and renamed into place when complete: no host ever reads
a file that another host -- or an interrupted earlier run -- may still be writing, whether the cache is local or
shared.

Equal batch counts: hosts may keep different numbers of examples (the length policy skips some), so after
tokenizing they agree (one ``process_allgather`` of the counts) on the smallest count and each uses the first
that many of its examples; the surplus is counted and logged. With equal local sizes, one seed and one row length
(a single bucket on several hosts), every host's :class:`~selfaug_jax.data.EpochSampler` is in the same state
after every step, so the one ``data_state`` in a checkpoint resumes every host exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from selfaug_jax.checkpoints.default_model import cache_dir
from selfaug_jax.data import (
    DataFormatError,
    PromptConfig,
    RagExample,
    load_tfds_source,
    read_examples,
    tokenize_examples,
    write_tfds_dataset,
)
from selfaug_jax.data.default_task import load_default_task
from selfaug_jax.experiment.config import ExperimentConfig

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 3  # 3: per-host shards; 2: documents that still fit are kept, zero-document skips


class HeadSource:
    """The first ``n`` examples of a random-access source (equal per-host sizes)."""

    def __init__(self, source: Any, n: int):
        if not 0 <= n <= len(source):
            raise ValueError(f"cannot take {n} examples of a source of {len(source)}")
        self.source, self.n = source, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Any:
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} examples")
        return self.source[int(index) % self.n]


def load_train_examples(cfg: ExperimentConfig) -> list[RagExample]:
    """The training examples (the shipped default task, or a file in a supported format), all hosts' shares."""
    if cfg.data.train == "default":
        records = load_default_task("train")
        examples = [RagExample.from_dict(r, where=f"default_task/train.jsonl:{i + 1}") for i, r in enumerate(records)]
    else:
        kwargs = {"split": cfg.data.crag_split} if cfg.data.format == "crag" or "crag" in cfg.data.train else {}
        if cfg.data.columns:
            kwargs["columns"] = cfg.data.columns
        examples = list(read_examples(cfg.data.train, cfg.data.format.replace("-", "_"), **kwargs))
    if cfg.data.max_train_examples is not None:
        examples = examples[: cfg.data.max_train_examples]
    if not examples:
        raise DataFormatError(f"data.train: {cfg.data.train} holds no training examples (empty file?)")
    return examples


def host_shard(examples: list[RagExample], process_index: int, process_count: int) -> list[RagExample]:
    """This host's deterministic share: every ``process_count``-th example starting at ``process_index``."""
    return examples[process_index::process_count]


def cache_key(cfg: ExperimentConfig, examples: list[RagExample], model_dir: Path, shard: tuple[int, int],
              transform: tuple[str, str] | None = None) -> str:
    """The cache entry name of one host's tokenized shard (data, length policy, tokenizer, shard, format; and the
    data transform's name and content hash for transformed examples)."""
    tokenizer_file = model_dir / "tokenizer.json"
    key_src = json.dumps(
        {
            "data": cfg.data.train,
            "format": cfg.data.format,
            **({"columns": dict(sorted(cfg.data.columns.items()))} if cfg.data.columns else {}),
            "n": len(examples),
            "first_last": [examples[0].id, examples[-1].id],
            "max_length": cfg.data.max_length,
            "truncation": cfg.data.truncation,
            "no_documents": cfg.data.no_documents,
            "tokenizer": hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()
            if tokenizer_file.exists() else str(model_dir),
            "shard": list(shard),
            "version": CACHE_FORMAT_VERSION,
            **({"transform": list(transform)} if transform else {}),
        },
        sort_keys=True,
    )
    return hashlib.sha256(key_src.encode()).hexdigest()[:16]


def prompt_config_of(cfg: ExperimentConfig) -> PromptConfig:
    """The run's prompt rendering and length policy."""
    return PromptConfig(max_length=cfg.data.max_length, truncation=cfg.data.truncation,
                        no_documents=cfg.data.no_documents)


def _write_entry(data_dir: Path, shard_examples: list[RagExample], tokenizer, cfg: ExperimentConfig) -> None:
    """Tokenize and write one cache entry into a temporary sibling, then rename it to ``data_dir``."""
    tmp = data_dir.with_name(f"{data_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenized, stats = tokenize_examples(shard_examples, tokenizer, prompt_config_of(cfg))
    if not tokenized:
        raise DataFormatError(f"data.train: none of the {len(shard_examples)} examples of {cfg.data.train} fits "
                              f"data.max_length={cfg.data.max_length} ({stats.summary()})")
    dataset_dir = write_tfds_dataset({"train": tokenized}, tmp, if_exists="overwrite")
    record = {"dataset_dir": str(Path(dataset_dir).relative_to(tmp)), "prompt_stats": stats.as_dict()}
    (tmp / "prompt_stats.json").write_text(json.dumps(record, default=str))
    try:
        os.replace(tmp, data_dir)
    except OSError:  # another run of the same host finished the same entry first: keep that one
        shutil.rmtree(tmp, ignore_errors=True)
        if not (data_dir / "prompt_stats.json").exists():
            raise


def _sum_stats(local: dict[str, Any]) -> dict[str, Any]:
    """Prompt statistics over all hosts: counters summed, ``max_tokens`` maxed (id lists stay this host's)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    keys = sorted(k for k, v in local.items() if isinstance(v, int) and not isinstance(v, bool))
    gathered = np.asarray(multihost_utils.process_allgather(np.asarray([local[k] for k in keys], np.int64)))
    out = dict(local)
    for i, k in enumerate(keys):
        out[k] = int(gathered[:, i].max() if k == "max_tokens" else gathered[:, i].sum())
    out["ids_are_from_process"] = jax.process_index()
    return out


def tokenized_train_source(cfg: ExperimentConfig, tokenizer, model_dir: Path, *,
                           examples: list[RagExample] | None = None,
                           transform: tuple[str, str] | None = None) -> tuple[Any, dict[str, Any]]:
    """This host's tokenized training examples (a random-access source) and the prompt statistics of all hosts.

    ``examples`` (default: :func:`load_train_examples`) are the output of a data transform when ``transform`` =
    ``(name, content hash)`` is given (selfaug_jax/data/transforms.py); the pair keys a separate cache entry.
    The source has the same length on every host (see the module docstring).
    """
    p, n_proc = jax.process_index(), jax.process_count()
    if examples is None:
        examples = load_train_examples(cfg)
    shard = host_shard(examples, p, n_proc)
    if not shard:
        raise DataFormatError(f"data.train: {len(examples)} examples cannot give each of {n_proc} hosts one")
    data_dir = cache_dir() / "datasets" / cache_key(cfg, examples, model_dir, (p, n_proc), transform)
    stats_path = data_dir / "prompt_stats.json"
    if not stats_path.exists():
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        _write_entry(data_dir, shard, tokenizer, cfg)
    record = json.loads(stats_path.read_text())
    source = load_tfds_source(data_dir / record["dataset_dir"], "train")
    stats = dict(record["prompt_stats"])
    if n_proc > 1:
        from jax.experimental import multihost_utils

        counts = np.asarray(multihost_utils.process_allgather(np.asarray(len(source), np.int64))).reshape(-1)
        n_equal = int(counts.min())
        stats = _sum_stats(stats)
        stats["host_examples"] = [int(c) for c in counts]
        stats["host_examples_used"] = n_equal
        if n_equal < len(source):
            logger.warning("process %d: using %d of its %d tokenized examples so every host has the same number "
                           "(per host: %s)", p, n_equal, len(source), counts.tolist())
            source = HeadSource(source, n_equal)
    logger.info("training data (process %d of %d: %d examples): %s (%s)", p, n_proc, len(source), data_dir, stats)
    return source, stats


def model_identity(cfg: ExperimentConfig, model_dir: Path) -> str:
    """What decides a loaded model's generations, for the data transforms' cache keys: its folder, the hash of
    its ``config.json`` and weight file sizes, the layers kept and the dtypes."""
    files = sorted(model_dir.glob("*.safetensors"))
    config_file = model_dir / "config.json"
    return json.dumps({
        "dir": str(model_dir.resolve()),
        "config": hashlib.sha256(config_file.read_bytes()).hexdigest()[:16] if config_file.exists() else None,
        "weights": [[f.name, f.stat().st_size] for f in files],
        "num_layers": cfg.model.num_layers, "dtype": cfg.model.dtype, "param_dtype": cfg.model.param_dtype,
    }, sort_keys=True)


def transformed_sources(cfg: ExperimentConfig, tokenizer, model_dir: Path, base_model, names: list[str],
                        n_task: int) -> dict[str, tuple[Any, dict[str, Any]]]:
    """For each data transform in ``names`` (other than ``"none"``): the tokenized source of its output and a
    report (its counts, settings and prompt statistics) for ``summary.json``.

    Each transform runs once, on all hosts' raw training examples, with the already-loaded ``base_model`` (no
    second copy); its generations are cached under ``<cache>/transforms`` and its tokenized output under
    ``<cache>/datasets`` like the task data. ``n_task``: the task examples trained (after the length policy).
    """
    from selfaug_jax.data.transforms import TransformContext, apply_transform

    out: dict[str, tuple[Any, dict[str, Any]]] = {}
    todo = [n for n in dict.fromkeys(names) if n != "none"]
    if not todo:
        return out
    from selfaug_jax.eval.base_cache import model_fingerprint

    examples = load_train_examples(cfg)
    # The files' identity and the loaded weights' bytes (the base evaluation cache's fingerprint, ~1 s): a model
    # folder rewritten with same-sized weights is another key.
    model_id = json.dumps({"files": json.loads(model_identity(cfg, model_dir)),
                           "weights_sha256": model_fingerprint(base_model)}, sort_keys=True)
    ctx = TransformContext(model=base_model, tokenizer=tokenizer, model_id=model_id,
                           prompt_config=prompt_config_of(cfg), n_task=n_task,
                           options={"magpie": cfg.magpie, "sdft": cfg.sdft}, cache_dir=cache_dir() / "transforms")
    for name in todo:
        result = apply_transform(name, examples, ctx)
        source, stats = tokenized_train_source(cfg, tokenizer, model_dir, examples=result.examples,
                                               transform=(name, result.key))
        report = {**result.report, "train_examples": len(source), "prompt_stats": stats}
        if name == "magpie":  # replay pairs were length-checked, so the tokenizer skipped task examples only
            mix = {"task": len(source) - result.report["n_replay"], "replay": result.report["n_replay"]}
            report["epoch_mix"] = mix
            if jax.process_count() == 1 and mix["task"] != n_task:
                logger.warning("magpie: %d task examples trained, the replay count assumed %d", mix["task"], n_task)
        logger.info("data transform %s: %d training examples (%s)", name, len(source), result.report)
        out[name] = (source, report)
    return out
