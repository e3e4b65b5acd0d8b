"""Batching: pad to bucketed lengths, or pack several examples per row with segment ids.

Every batch is a :class:`Batch` of int32 numpy arrays of static shape ``[batch_size, length]``
where ``length`` is one of a small set of bucket lengths (bounded recompilation):

* ``input_ids_bt``      token ids, ``pad_id`` on padding
* ``labels_bt``         ``-100`` on prompt tokens and on padding, token ids on targets
* ``attention_mask_bt`` 1 = real token, 0 = padding
* ``positions_bt``      0..n-1 within each example (restarting per packed segment), 0 on padding
* ``segment_ids_bt``    packed batches only: 0 = padding, 1..k = the k-th example of the row

Padding is on the right by default (``padding_side="left"`` is available for unpacked batches).
In a packed row every example starts with a prompt token (label ``-100``, checked), so the shifted
CE never pairs the last token of one segment with a target of the next; the model restricts
attention to within a segment using ``segment_ids_bt``.

:class:`BatchIterator` draws examples from an :class:`~selfaug_jax.data.tfds_source.EpochSampler`
and never lets a batch cross an epoch boundary.  With ``drop_remainder`` (default) the examples at
the end of an epoch that do not fill a batch are dropped and counted (:class:`BatchStats`);
otherwise the last batch is completed with all-padding rows.  Examples longer than the largest
bucket raise, or are skipped and counted with ``on_too_long="skip"``.  ``state`` / ``set_state``
checkpoint the position: a packed example that did not fit is not consumed, so a restored iterator
yields exactly the same next batches.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from selfaug_jax.data.schema import IGNORE_INDEX, TokenizedExample
from selfaug_jax.data.tfds_source import EpochSampler, RandomAccessSource

__all__ = [
    "BatchConfig",
    "Batch",
    "BatchStats",
    "BatchIterator",
    "bucket_length",
    "pad_batch",
    "pack_batch",
    "iter_batches",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """Batch geometry.

    Attributes:
      batch_size: rows per batch.
      buckets: allowed padded lengths (sorted, unique); a batch uses the smallest that fits its
        longest example.  Packed batches always use ``pack_length`` (default: the largest bucket).
      pad_id: token id used for padding (e.g. the tokenizer's pad/eos id).
      padding_side: ``"right"`` (default) or ``"left"`` (unpacked only).
      pack: pack several examples per row (first-fit, in sampling order).
      pack_length: row length when packing.
      max_segments_per_row: cap on examples per packed row (``None`` = no cap).
      drop_remainder: drop (and count) the examples of an epoch's last incomplete batch.
      on_too_long: ``"error"`` or ``"skip"`` (counted) for examples longer than the row length.
    """

    batch_size: int
    buckets: tuple[int, ...] = (256, 512, 1024, 2048)
    pad_id: int = 0
    padding_side: Literal["right", "left"] = "right"
    pack: bool = False
    pack_length: int | None = None
    max_segments_per_row: int | None = None
    drop_remainder: bool = True
    on_too_long: Literal["error", "skip"] = "error"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        b = tuple(int(x) for x in self.buckets)
        if not b or any(x < 1 for x in b) or list(b) != sorted(set(b)):
            raise ValueError(f"buckets must be sorted, unique, positive lengths, got {self.buckets}")
        object.__setattr__(self, "buckets", b)
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
        if self.pack and self.padding_side != "right":
            raise ValueError("packing only supports padding_side='right'")
        if self.on_too_long not in ("error", "skip"):
            raise ValueError(f"on_too_long must be 'error' or 'skip', got {self.on_too_long!r}")
        if self.max_segments_per_row is not None and self.max_segments_per_row < 1:
            raise ValueError("max_segments_per_row must be >= 1 or None")

    @property
    def row_length(self) -> int:
        """Longest row: ``pack_length`` when packing, else the largest bucket."""
        if self.pack:
            return int(self.pack_length or self.buckets[-1])
        return self.buckets[-1]


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch of int32 arrays ``[B, T]`` plus the example ids per row (empty for filler rows)."""

    input_ids_bt: np.ndarray
    labels_bt: np.ndarray
    attention_mask_bt: np.ndarray
    positions_bt: np.ndarray
    segment_ids_bt: np.ndarray | None
    example_ids: tuple[tuple[str, ...], ...]

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays as a dict (``segment_ids_bt`` only when packed), ready for ``jax.device_put``."""
        d = {"input_ids_bt": self.input_ids_bt, "labels_bt": self.labels_bt,
             "attention_mask_bt": self.attention_mask_bt, "positions_bt": self.positions_bt}
        if self.segment_ids_bt is not None:
            d["segment_ids_bt"] = self.segment_ids_bt
        return d

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids_bt.shape)  # type: ignore[return-value]

    @property
    def num_examples(self) -> int:
        return sum(len(r) for r in self.example_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask_bt.sum())

    @property
    def num_target_tokens(self) -> int:
        return int(np.count_nonzero(self.labels_bt != IGNORE_INDEX))


@dataclasses.dataclass
class BatchStats:
    """Counts kept by :class:`BatchIterator` (not part of the checkpointed state)."""

    n_batches: int = 0
    n_examples: int = 0
    n_dropped_remainder: int = 0
    n_too_long: int = 0
    n_tokens: int = 0
    n_slots: int = 0
    bucket_counts: dict[int, int] = dataclasses.field(default_factory=dict)

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.n_tokens / self.n_slots if self.n_slots else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bucket_counts"] = {str(k): v for k, v in self.bucket_counts.items()}
        d["padding_fraction"] = self.padding_fraction
        return d


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= ``length``; ``ValueError`` if none."""
    i = bisect.bisect_left(buckets, length)
    if i == len(buckets):
        raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")
    return int(buckets[i])


def _check(ex: TokenizedExample) -> None:
    if int(ex.labels[0]) != IGNORE_INDEX:
        raise ValueError(f"example {ex.id!r}: first label must be {IGNORE_INDEX} (a prompt token)")


def pad_batch(examples: Sequence[TokenizedExample], *, length: int, pad_id: int = 0,
              padding_side: Literal["right", "left"] = "right", batch_size: int | None = None) -> Batch:
    """Pad ``examples`` (one per row) to ``[batch_size or len(examples), length]``."""
    b = batch_size if batch_size is not None else len(examples)
    if len(examples) > b:
        raise ValueError(f"{len(examples)} examples do not fit in batch_size {b}")
    ids = np.full((b, length), pad_id, np.int32)
    labels = np.full((b, length), IGNORE_INDEX, np.int32)
    mask = np.zeros((b, length), np.int32)
    pos = np.zeros((b, length), np.int32)
    for r, ex in enumerate(examples):
        n = len(ex)
        if n > length:
            raise ValueError(f"example {ex.id!r} has {n} tokens > row length {length}")
        sl = slice(0, n) if padding_side == "right" else slice(length - n, length)
        ids[r, sl] = ex.input_ids
        labels[r, sl] = ex.labels
        mask[r, sl] = 1
        pos[r, sl] = np.arange(n, dtype=np.int32)
    rows = tuple((ex.id,) for ex in examples) + ((),) * (b - len(examples))
    return Batch(ids, labels, mask, pos, None, rows)


def pack_batch(rows: Sequence[Sequence[TokenizedExample]], *, length: int, pad_id: int = 0,
               batch_size: int | None = None) -> Batch:
    """Concatenate each row's examples into one right-padded row with segment ids 1..k."""
    b = batch_size if batch_size is not None else len(rows)
    if len(rows) > b:
        raise ValueError(f"{len(rows)} rows do not fit in batch_size {b}")
    ids = np.full((b, length), pad_id, np.int32)
    labels = np.full((b, length), IGNORE_INDEX, np.int32)
    pos = np.zeros((b, length), np.int32)
    seg = np.zeros((b, length), np.int32)
    for r, row in enumerate(rows):
        start = 0
        for k, ex in enumerate(row, start=1):
            _check(ex)
            n = len(ex)
            if start + n > length:
                raise ValueError(f"row {r}: examples {[e.id for e in row]} exceed row length {length}")
            ids[r, start:start + n] = ex.input_ids
            labels[r, start:start + n] = ex.labels
            pos[r, start:start + n] = np.arange(n, dtype=np.int32)
            seg[r, start:start + n] = k
            start += n
    ex_ids = tuple(tuple(e.id for e in row) for row in rows) + ((),) * (b - len(rows))
    return Batch(ids, labels, (seg > 0).astype(np.int32), pos, seg, ex_ids)


class BatchIterator:
    """Iterate :class:`Batch` es over an :class:`EpochSampler` (resumable via ``state``)."""

    def __init__(self, sampler: EpochSampler, config: BatchConfig):
        self.sampler = sampler
        self.config = config
        self.stats = BatchStats()

    @property
    def state(self) -> dict[str, Any]:
        """JSON-able position after the last yielded batch (the sampler state)."""
        return dict(self.sampler.state)

    def set_state(self, state: dict[str, Any]) -> None:
        self.sampler.set_state(state)

    def __iter__(self) -> "BatchIterator":
        return self

    # ------------------------------------------------------------------------------------------
    def _epoch_has_more(self, epoch: int) -> bool:
        return not self.sampler.exhausted and self.sampler.state["epoch"] == epoch

    def _admit(self, ex: TokenizedExample, limit: int) -> bool:
        if len(ex) <= limit:
            return True
        if self.config.on_too_long == "error":
            raise ValueError(f"example {ex.id!r} has {len(ex)} tokens > row length {limit}; "
                             "raise the buckets / pack_length or use on_too_long='skip'")
        self.stats.n_too_long += 1
        logger.warning("skipping example %r: %d tokens > row length %d", ex.id, len(ex), limit)
        return False

    def _finish(self, batch: Batch) -> Batch:
        st = self.stats
        st.n_batches += 1
        st.n_examples += batch.num_examples
        st.n_tokens += batch.num_tokens
        st.n_slots += batch.input_ids_bt.size
        t = batch.input_ids_bt.shape[1]
        st.bucket_counts[t] = st.bucket_counts.get(t, 0) + 1
        return batch

    def _drop(self, n: int, epoch: int) -> None:
        if n:
            self.stats.n_dropped_remainder += n
            logger.info("drop_remainder: dropped %d example(s) at the end of epoch %d", n, epoch)

    def __next__(self) -> Batch:
        cfg = self.config
        while True:
            if self.sampler.exhausted:
                raise StopIteration
            epoch = self.sampler.state["epoch"]
            if cfg.pack:
                batch, n_partial = self._next_packed(epoch)
            else:
                batch, n_partial = self._next_padded(epoch)
            if batch is not None:
                return self._finish(batch)
            self._drop(n_partial, epoch)

    def _next_padded(self, epoch: int) -> tuple[Batch | None, int]:
        cfg = self.config
        rows: list[TokenizedExample] = []
        while len(rows) < cfg.batch_size and self._epoch_has_more(epoch):
            ex = next(self.sampler)
            if self._admit(ex, cfg.row_length):
                rows.append(ex)
        if not rows or (len(rows) < cfg.batch_size and cfg.drop_remainder):
            return None, len(rows)
        length = bucket_length(max(len(e) for e in rows), cfg.buckets)
        return pad_batch(rows, length=length, pad_id=cfg.pad_id, padding_side=cfg.padding_side,
                         batch_size=cfg.batch_size), 0

    def _next_packed(self, epoch: int) -> tuple[Batch | None, int]:
        cfg = self.config
        length = cfg.row_length
        rows: list[list[TokenizedExample]] = [[] for _ in range(cfg.batch_size)]
        used = [0] * cfg.batch_size
        full = False
        while self._epoch_has_more(epoch):
            before = self.sampler.state
            ex = next(self.sampler)
            if not self._admit(ex, length):
                continue
            n = len(ex)
            r = next((i for i in range(cfg.batch_size) if used[i] + n <= length and
                      (cfg.max_segments_per_row is None or len(rows[i]) < cfg.max_segments_per_row)), None)
            if r is None:  # fits nowhere: the batch is complete; leave ex for the next batch
                self.sampler.set_state(before)
                full = True
                break
            rows[r].append(ex)
            used[r] += n
        n_ex = sum(len(r) for r in rows)
        complete = full or all(rows)
        if n_ex == 0 or (not complete and cfg.drop_remainder):
            return None, n_ex
        return pack_batch([r for r in rows if r], length=length, pad_id=cfg.pad_id,
                          batch_size=cfg.batch_size), 0


def iter_batches(source: RandomAccessSource, config: BatchConfig, *, seed: int = 0, shuffle: bool = False,
                 num_epochs: int | None = 1) -> BatchIterator:
    """Convenience: a :class:`BatchIterator` over ``source`` (default: one pass, in order)."""
    return BatchIterator(EpochSampler(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs), config)
