"""The run's overall stage line (data -> base eval -> method k/n -> report) and the peak memory of each stage.

```python
tracker = StageTracker(["data", "base eval", "lora 1/2", "selfaug 2/2", "report"],
                       kinds=["data", "eval", "method", "method", "report"])
with tracker.stage("data"):
    ...
tracker.begin("base eval")                 # or begin / end around code that should not be re-indented
...
tracker.end()
results["stages"] = tracker.records()     # -> summary.json
```

Each stage prints one line when it starts and one when it ends (to ``stream``, stderr by default; the per-method
training bars of the trainer are separate): ``[stage 3/5] lora 1/2 | elapsed 2m05s | ETA ~6m40s``.

ETA: the remaining stages' expected durations. A stage of a kind already finished (e.g. the second method after the
first) is expected to last as long as the mean of that kind; any other stage is expected to take ``weight`` units
of the average time per unit so far (``DEFAULT_WEIGHTS``: rough relative costs on CPU). It is a guess, shown with
"~", and is absent before the first stage has finished.

Peak RSS per stage: a daemon thread samples the resident set (``/proc/self/statm``) every ``sample_interval_s``
(20 ms) while a stage runs and keeps the stage's maximum (``peak_rss_mb``; a spike shorter than the interval can be
missed). The process's own high-water mark (``VmHWM``) is never reset -- resetting it (``clear_refs``) would also
hide the true peak from ``/usr/bin/time -v`` and ``getrusage``, which read the same counter -- and each record also
holds it (``process_peak_rss_mb``, the lifetime peak so far). Without ``/proc`` both fall back to ``getrusage``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

__all__ = ["DEFAULT_WEIGHTS", "RssSampler", "StageRecord", "StageTracker", "memory_status", "format_seconds"]

DEFAULT_WEIGHTS = {"data": 0.3, "eval": 2.0, "method": 4.0, "report": 0.1}
"""Relative expected durations per stage kind (before any stage of that kind has been measured)."""

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def memory_status() -> dict[str, float]:
    """``{"rss_mb", "peak_rss_mb"}``: current resident set and its high-water mark (``/proc/self/status``), or the
    ``getrusage`` lifetime peak for both where ``/proc`` is absent."""
    try:
        fields = dict(line.split(":", 1) for line in _STATUS.read_text().splitlines() if ":" in line)
        return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024.0,
                "peak_rss_mb": int(fields["VmHWM"].split()[0]) / 1024.0}
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
        return {"rss_mb": peak, "peak_rss_mb": peak}


def _rss_mb() -> float:
    """Current resident set in MB (``/proc/self/statm``; the ``getrusage`` lifetime peak where it is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class RssSampler:
    """A daemon thread that keeps the maximum resident set seen since the last :meth:`restart`."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.max_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.max_mb = max(self.max_mb, _rss_mb())

    def restart(self) -> None:
        """Forget the maximum (it becomes the current RSS) and make sure the thread runs."""
        self.max_mb = _rss_mb()
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
            self._thread.start()

    def stop(self) -> float:
        """Stop the thread; returns the maximum including the current RSS."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.max_mb = max(self.max_mb, _rss_mb())
        return self.max_mb


def format_seconds(seconds: float) -> str:
    """``"45s"``, ``"2m05s"``, ``"1h02m"``."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


@dataclasses.dataclass
class StageRecord:
    """One finished stage: name, kind, wall seconds, the stage's sampled peak RSS, RSS at its end, and the process's
    lifetime peak so far (MB)."""

    stage: str
    kind: str
    wall_s: float
    peak_rss_mb: float
    rss_end_mb: float
    process_peak_rss_mb: float


class StageTracker:
    """Stage lines with elapsed time and ETA, and per-stage peak RSS (module docstring).

    Args:
      stages: the planned stage names, in order.
      kinds: one kind per stage (keys of ``weights``; default: every stage its own name).
      weights: expected relative duration per kind (default :data:`DEFAULT_WEIGHTS`, 1.0 for unknown kinds).
      stream: where lines go (None = silent; records are kept either way).
      clock: a ``time.perf_counter``-like function (tests pass a fake one).
    """

    def __init__(self, stages: Sequence[str], kinds: Sequence[str] | None = None,
                 weights: dict[str, float] | None = None, stream: TextIO | None = sys.stderr,
                 clock: Any = time.perf_counter):
        if kinds is not None and len(kinds) != len(stages):
            raise ValueError(f"StageTracker: {len(stages)} stages but {len(kinds)} kinds")
        if len(set(stages)) != len(stages):
            raise ValueError(f"StageTracker: stage names must be unique, got {list(stages)}")
        self.stages = list(stages)
        self.kinds = list(kinds) if kinds is not None else list(stages)
        self.weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
        self.stream = stream
        self.clock = clock
        self.t0 = clock()
        self._done: list[StageRecord] = []
        self._current: tuple[int, float] | None = None  # (stage index, start time)
        self._sampler = RssSampler()

    def _weight(self, kind: str) -> float:
        return float(self.weights.get(kind, 1.0))

    def eta_s(self, next_index: int) -> float | None:
        """Expected seconds for stages ``next_index..end`` (None before any stage has finished)."""
        if not self._done:
            return None
        by_kind: dict[str, list[float]] = {}
        for r in self._done:
            by_kind.setdefault(r.kind, []).append(r.wall_s)
        spent = sum(r.wall_s for r in self._done)
        units = sum(self._weight(r.kind) for r in self._done)
        per_unit = spent / units if units > 0 else 0.0
        total = 0.0
        for kind in self.kinds[next_index:]:
            walls = by_kind.get(kind)
            total += sum(walls) / len(walls) if walls else self._weight(kind) * per_unit
        return total

    def _line(self, text: str) -> None:
        if self.stream is not None:
            print(text, file=self.stream, flush=True)

    def begin(self, name: str) -> None:
        """Start planned stage ``name`` (ends the current one first, if any): prints the stage line."""
        if name not in self.stages:
            raise ValueError(f"StageTracker.stage: {name!r} is not a planned stage ({self.stages})")
        if self._current is not None:
            self.end()
        i = self.stages.index(name)
        eta = self.eta_s(i)
        elapsed = self.clock() - self.t0
        self._line(f"[stage {i + 1}/{len(self.stages)}] {name} | elapsed {format_seconds(elapsed)}"
                   + (f" | ETA ~{format_seconds(eta)}" if eta is not None else ""))
        self._sampler.restart()
        self._current = (i, self.clock())

    def end(self) -> None:
        """Finish the current stage: record its wall time and peak RSS (no-op when none is running)."""
        if self._current is None:
            return
        i, start = self._current
        self._current = None
        peak = self._sampler.stop()
        mem = memory_status()
        wall = self.clock() - start
        name = self.stages[i]
        self._done.append(StageRecord(name, self.kinds[i], round(wall, 2), round(peak, 1), round(mem["rss_mb"], 1),
                                      round(mem["peak_rss_mb"], 1)))
        self._line(f"[stage {i + 1}/{len(self.stages)}] {name} done in {format_seconds(wall)} | "
                   f"peak RSS {peak / 1024:.2f} GB (process so far {mem['peak_rss_mb'] / 1024:.2f} GB)")

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """``begin(name)`` ... ``end()`` around a block."""
        self.begin(name)
        try:
            yield
        finally:
            self.end()

    def records(self) -> list[dict[str, Any]]:
        """The finished stages as JSON-ready dicts (``summary.json``'s ``stages``)."""
        return [dataclasses.asdict(r) for r in self._done]

    @property
    def elapsed_s(self) -> float:
        return self.clock() - self.t0
