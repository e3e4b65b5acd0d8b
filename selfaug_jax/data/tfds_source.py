"""A TensorFlow-free tensorflow-datasets store of tokenized examples, and a resumable sampler.

Writing
-------
:func:`write_tfds_dataset` prepares a ``tfds.core.GeneratorBasedBuilder`` (:class:`TokenizedRagBuilder`,
registered as ``selfaug_tokenized_rag``) with ``file_format="array_record"``.  tfds 4.9.10 serialises
examples with its own protobuf copies and writes ``.array_record`` shards through the ``array_record``
package, so neither preparing nor reading imports TensorFlow.  Features::

    input_ids: Tensor(shape=(None,), int32)    labels: Tensor(shape=(None,), int32)
    id:        Text                             meta:   Text (JSON)

Examples keep their input order (``disable_shuffling=True``); shuffling is the sampler's job.  The
layout is ``<data_dir>/selfaug_tokenized_rag/<name>/1.0.0/`` with ``features.json``,
``dataset_info.json``, ``metadata.json`` (free-form, e.g. the tokenizer name and the
:class:`~selfaug_jax.data.prompts.PromptStats`) and one ``<prefix>-<split>.array_record-*`` per split.

Reading
-------
:func:`load_tfds_source` opens a prepared directory with ``tfds.builder_from_directory(...)
.as_data_source(split)`` (random access, no builder class needed); ``tfds.data_source(
"selfaug_tokenized_rag/<name>", data_dir=...)`` works as well once this module is imported.

Sampling
--------
:class:`EpochSampler` walks any random-access source (a :class:`TokenizedSource`, a list...) epoch by
epoch in a deterministic order: ``numpy.random.default_rng([seed, epoch]).permutation(n)`` (or
identity without shuffling).  Its state is a small JSON-able dict ``{"epoch", "index", "seed",
"num_examples", "shuffle"}``; restoring it resumes exactly where the saved run stopped.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from selfaug_jax.data.schema import TokenizedExample

__all__ = [
    "BUILDER_NAME",
    "TokenizedRagBuilder",
    "write_tfds_dataset",
    "load_tfds_source",
    "TokenizedSource",
    "RandomAccessSource",
    "EpochSampler",
]

logger = logging.getLogger(__name__)

BUILDER_NAME = "selfaug_tokenized_rag"
DATASET_VERSION = "1.0.0"


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "input_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "labels": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "id": tfds.features.Text(),
        "meta": tfds.features.Text(),
    })


class TokenizedRagBuilder(tfds.core.GeneratorBasedBuilder):
    """tfds builder whose splits are given in memory as iterables of :class:`TokenizedExample`."""

    name = BUILDER_NAME
    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Tokenized RAG SFT examples (input_ids, labels, id, meta JSON)."}

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This file. (tfds' default probes ``importlib_resources``, which tfds 4.9.10 only
        installs on Python < 3.9, so the lookup fails on 3.11 for classes inside a package.)"""
        return epath.Path(__file__)

    def __init__(self, *, splits: Mapping[str, Iterable[TokenizedExample]] | None = None,
                 metadata: Mapping[str, Any] | None = None, **kwargs: Any):
        self._splits_in = splits
        self._metadata_in = dict(metadata or {})
        self._counts: dict[str, int] = {}
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Tokenized RAG SFT examples for selfaug-jax (labels = -100 on prompt tokens).",
            features=_features(),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(self._metadata_in),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        if self._splits_in is None:
            raise ValueError("TokenizedRagBuilder needs splits= to prepare a dataset")
        return {name: self._generate_examples(name, exs) for name, exs in self._splits_in.items()}

    def _generate_examples(self, split: str, examples: Iterable[TokenizedExample]) -> Iterator[tuple[int, dict]]:
        n = 0
        for i, ex in enumerate(examples):
            if not isinstance(ex, TokenizedExample):
                raise TypeError(f"split {split!r} item {i}: expected TokenizedExample, got {type(ex).__name__}")
            try:
                meta = json.dumps(dict(ex.meta), sort_keys=True, ensure_ascii=False)
            except TypeError as e:
                raise TypeError(f"split {split!r} example {ex.id!r}: meta is not JSON-serialisable ({e})") from None
            yield i, {"input_ids": ex.input_ids, "labels": ex.labels, "id": ex.id, "meta": meta}
            n += 1
        self._counts[split] = n


def write_tfds_dataset(
    splits: Mapping[str, Iterable[TokenizedExample]],
    data_dir: str | Path,
    *,
    name: str = "default",
    metadata: Mapping[str, Any] | None = None,
    if_exists: Literal["error", "overwrite"] = "error",
) -> Path:
    """Write tokenized splits as an array_record tfds dataset; returns the dataset directory.

    Args:
      splits: split name -> iterable of examples (consumed once, order preserved).
      data_dir: tfds data dir; the dataset goes to ``data_dir/selfaug_tokenized_rag/<name>/1.0.0``.
      name: builder config name (e.g. ``"crag_smollm2_2048"``).
      metadata: JSON-able dict stored in ``metadata.json`` (tokenizer, prompt config, stats...).
      if_exists: ``"error"`` (default) or ``"overwrite"`` an existing dataset of that name.
    """
    if not splits:
        raise ValueError("no splits given")
    config = tfds.core.BuilderConfig(name=name, description=f"selfaug tokenized RAG data: {name}")
    builder = TokenizedRagBuilder(splits=splits, metadata=metadata, data_dir=str(data_dir), config=config,
                                  file_format="array_record")
    out = Path(builder.data_dir)
    if out.exists():
        if if_exists != "overwrite":
            raise FileExistsError(f"{out} already exists; pass if_exists='overwrite' to replace it")
        shutil.rmtree(out)
        builder = TokenizedRagBuilder(splits=splits, metadata=metadata, data_dir=str(data_dir), config=config,
                                      file_format="array_record")
    with tempfile.TemporaryDirectory(prefix="selfaug_tfds_dl_") as dl:
        builder.download_and_prepare(download_dir=dl, file_format="array_record")
    logger.info("wrote tfds array_record dataset %s: %s", out,
                {k: v.num_examples for k, v in builder.info.splits.items()})
    return out


class RandomAccessSource(Protocol):
    """What :class:`EpochSampler` needs: ``len()`` and integer indexing."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


class TokenizedSource:
    """Random-access view of one split of a prepared dataset, yielding :class:`TokenizedExample`."""

    def __init__(self, dataset_dir: str | Path, split: str = "train"):
        self.dataset_dir = Path(dataset_dir)
        if not (self.dataset_dir / "features.json").exists():
            raise FileNotFoundError(f"{self.dataset_dir} is not a prepared tfds dataset (no features.json)")
        builder = tfds.builder_from_directory(str(self.dataset_dir))
        if split not in builder.info.splits:
            raise KeyError(f"{self.dataset_dir}: no split {split!r}; available: {sorted(builder.info.splits)}")
        self.split = split
        self.metadata: dict[str, Any] = dict(builder.info.metadata or {})
        self._source = builder.as_data_source(split=split)

    def __len__(self) -> int:
        return len(self._source)

    @staticmethod
    def _convert(rec: Mapping[str, Any]) -> TokenizedExample:
        ex_id = rec["id"].decode("utf-8") if isinstance(rec["id"], bytes) else str(rec["id"])
        meta = rec["meta"].decode("utf-8") if isinstance(rec["meta"], bytes) else rec["meta"]
        return TokenizedExample(id=ex_id, input_ids=rec["input_ids"], labels=rec["labels"], meta=json.loads(meta))

    def __getitem__(self, index: int) -> TokenizedExample:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for split {self.split!r} of size {n}")
        return self._convert(self._source[int(index) % n])

    def __getitems__(self, indices: Sequence[int]) -> list[TokenizedExample]:
        return [self._convert(r) for r in self._source.__getitems__([int(i) for i in indices])]

    def __repr__(self) -> str:
        return f"TokenizedSource({str(self.dataset_dir)!r}, split={self.split!r}, n={len(self)})"


def load_tfds_source(dataset_dir: str | Path, split: str = "train") -> TokenizedSource:
    """Open one split of a dataset written by :func:`write_tfds_dataset`."""
    return TokenizedSource(dataset_dir, split)


class EpochSampler:
    """Deterministic, resumable epoch-by-epoch iterator over a random-access source.

    Iterating yields ``source[order_e[i]]`` for ``i = index..n-1`` of epoch ``e``, then moves to the
    next epoch (until ``num_epochs`` epochs are done; ``None`` = forever).  ``state`` /
    :meth:`set_state` save and restore the position as a small JSON-able dict; a fresh sampler on
    the same source and seed restored from a state yields exactly the same continuation.
    """

    def __init__(self, source: RandomAccessSource, *, seed: int = 0, shuffle: bool = True,
                 num_epochs: int | None = None):
        n = len(source)
        if n == 0:
            raise ValueError("cannot sample from an empty source")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
        self.source = source
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.num_epochs = num_epochs
        self.num_examples = n
        self.epoch = 0
        self.index = 0
        self._order_epoch = -1
        self._order: np.ndarray | None = None

    # -- order -------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> np.ndarray:
        """Indices of the source in the order they are visited in ``epoch``."""
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_examples)

    def _current_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = self.epoch_order(self.epoch)
            self._order_epoch = self.epoch
        assert self._order is not None
        return self._order

    # -- state -------------------------------------------------------------------------------
    def _normalise(self) -> None:
        if self.index >= self.num_examples:
            self.epoch += 1
            self.index = 0

    @property
    def state(self) -> dict[str, Any]:
        """``{"epoch", "index", "seed", "num_examples", "shuffle"}`` of the *next* example."""
        self._normalise()
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "num_examples": self.num_examples, "shuffle": self.shuffle}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore a state saved from a sampler over the same source (checked) and seed."""
        for key in ("seed", "num_examples", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"iterator state has {key}={state[key]!r} but this sampler has "
                                 f"{key}={getattr(self, key)!r}")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.num_examples:
            raise ValueError(f"invalid iterator state {dict(state)!r}")
        self.epoch, self.index = epoch, index

    @property
    def exhausted(self) -> bool:
        self._normalise()
        return self.num_epochs is not None and self.epoch >= self.num_epochs

    @property
    def remaining_in_epoch(self) -> int:
        self._normalise()
        return self.num_examples - self.index

    def skip_rest_of_epoch(self) -> int:
        """Jump to the start of the next epoch; returns how many examples were skipped."""
        self._normalise()
        skipped = self.num_examples - self.index
        if skipped:
            self.epoch, self.index = self.epoch + 1, 0
        return skipped

    # -- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> "EpochSampler":
        return self

    def __next__(self) -> Any:
        if self.exhausted:
            raise StopIteration
        i = int(self._current_order()[self.index])
        self.index += 1
        return self.source[i]
