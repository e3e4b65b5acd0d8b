"""selfaug_jax.experiment.progress: stage lines, ETA arithmetic, per-stage peak RSS."""

import io
import time

import numpy as np
import pytest

from selfaug_jax.experiment.progress import StageTracker, format_seconds, memory_status


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_stage_lines_and_eta():
    clock, out = FakeClock(), io.StringIO()
    tr = StageTracker(["data", "base eval", "lora 1/2", "selfaug 2/2", "report"],
                      kinds=["data", "eval", "method", "method", "report"],
                      weights={"data": 1.0, "eval": 2.0, "method": 4.0, "report": 1.0}, stream=out, clock=clock)
    with tr.stage("data"):
        clock.t += 10.0
    # 10 s for 1 unit: base eval 2 units (20 s) + two methods 4 units each (80 s) + report 1 unit (10 s)
    assert tr.eta_s(1) == pytest.approx(110.0)
    with tr.stage("base eval"):
        clock.t += 50.0
    with tr.stage("lora 1/2"):
        clock.t += 100.0
    # a finished kind predicts its own: selfaug ~ lora's 100 s; report: 1 unit at 160 s / 7 units
    assert tr.eta_s(3) == pytest.approx(100.0 + 160.0 / 7.0)
    lines = out.getvalue().splitlines()
    assert lines[0] == "[stage 1/5] data | elapsed 0s"
    assert lines[2] == "[stage 2/5] base eval | elapsed 10s | ETA ~1m50s"
    assert lines[4].startswith("[stage 3/5] lora 1/2 | elapsed 1m00s | ETA ~")
    recs = tr.records()
    assert [r["stage"] for r in recs] == ["data", "base eval", "lora 1/2"]
    assert [r["wall_s"] for r in recs] == [10.0, 50.0, 100.0]
    assert all(r["peak_rss_mb"] >= r["rss_end_mb"] > 0 for r in recs)


def test_unknown_stage_and_mismatched_kinds_are_rejected():
    with pytest.raises(ValueError, match="not a planned stage"):
        with StageTracker(["a"], stream=None).stage("b"):
            pass
    with pytest.raises(ValueError, match="2 stages but 1 kinds"):
        StageTracker(["a", "b"], kinds=["x"])


def test_per_stage_peak_sees_an_allocation_and_resets_after_it():
    tr = StageTracker(["big", "small"], stream=None)
    with tr.stage("big"):
        block = np.ones(300 * 1024 * 1024 // 8)  # 300 MB, touched
        time.sleep(0.1)  # several sampling intervals
        del block
    with tr.stage("small"):
        pass
    big, small = tr.records()
    assert big["peak_rss_mb"] - small["peak_rss_mb"] > 250  # the second stage's peak no longer includes the block
    # The process's own high-water mark is never reset (so /usr/bin/time -v still sees the true peak).
    assert small["process_peak_rss_mb"] >= big["peak_rss_mb"] - 1
    assert memory_status()["peak_rss_mb"] >= memory_status()["rss_mb"] - 1


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 59.4, 125, 3720)] == ["0s", "59s", "2m05s", "1h02m"]
