"""``bench/side_by_side.py``: interleaved rounds in alternating order, medians over rounds with their range, the
worst round's loss agreement (the subprocesses are faked here; tests/test_bench_step.py runs real ones)."""

import argparse
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import side_by_side  # noqa: E402


def _args(**kw):
    base = dict(method="selfaug", batch=2, seq=8, steps=3, model=None, num_layers=None, dtype="float32",
                remat="dots", attention_chunk=None, attention_impl="auto", lora_rank=4, chunk_size=16, seed=0,
                peak_n=64, torch_attn="sdpa", tag="t", remeasure_peak=False, rounds=3, out="-", loss_rtol=0.02)
    base.update(kw)
    return argparse.Namespace(**base)


class FakeChildren:
    """Stands in for ``run_child``: each call returns the next step time of its side and logs the call order."""

    def __init__(self, step_s: dict[str, list[float]], losses: dict[str, list[list[float]]] | None = None):
        self.step_s, self.losses, self.calls = step_s, losses or {}, []

    def __call__(self, argv, what, log):
        side = next(s for s in self.step_s if what.startswith(f"{s} side"))
        i = sum(1 for c in self.calls if c == side)
        self.calls.append(side)
        t = self.step_s[side][i]
        rec = {"median_step_s": t, "tokens_per_s": 16 / t, "peak_rss_mb": 100.0, "steps_peak_rss_mb": 50.0,
               "first_loss": 1.0, "num_layers": 30, "model": "m", "platform": "cpu", "model_flops_per_step": 1e9,
               "peak_flops": 1e10, "losses": self.losses.get(side, [[1.0, 2.0]] * 9)[i], "round": i,
               "compile_s": 10.0 + i, "mfu": 0.5, "peak_flops_date": "today"}
        return rec


def test_vs_torch_rounds_alternate_and_report_the_median_with_its_range(monkeypatch):
    fake = FakeChildren({"jax": [1.0, 2.0, 1.0], "torch": [2.0, 2.0, 1.5]})  # per-round ratios 2.0, 1.0, 1.5
    monkeypatch.setattr(side_by_side, "run_child", fake)
    recs = []
    rec = side_by_side.vs_torch(_args(), "m", lambda m: None, lambda r, out, path: recs.append(r), Path("."))
    assert fake.calls == ["jax", "torch", "torch", "jax", "jax", "torch"]  # A B, B A, A B
    assert rec["n_rounds"] == 3
    assert rec["tokens_per_s_ratio"] == pytest.approx(1.5)
    assert rec["tokens_per_s_ratio_range"] == pytest.approx([1.0, 2.0])
    assert [r["tokens_per_s_ratio"] for r in rec["rounds"]] == pytest.approx([2.0, 1.0, 1.5])
    # the side records kept are the median round's own (round 3: jax 1.0 s, torch 1.5 s), not a mixture
    assert rec["jax"]["round"] == 2 and rec["torch"]["round"] == 2
    assert rec["torch"]["mfu"] == pytest.approx(1e9 / 1.5 / 1e10)
    assert recs == [rec]


def test_compare_dtypes_keeps_the_worst_rounds_loss_agreement(monkeypatch):
    fake = FakeChildren({"float32": [2.0, 2.0], "bfloat16": [1.0, 1.25]},
                        losses={"float32": [[1.0, 2.0], [1.0, 2.0]], "bfloat16": [[1.0, 2.0], [1.0, 2.2]]})
    monkeypatch.setattr(side_by_side, "run_child", fake)
    rec = side_by_side.compare_dtypes(_args(rounds=2), lambda m: None, lambda *a: None, Path("."))
    assert fake.calls == ["float32", "bfloat16", "bfloat16", "float32"]
    assert rec["tokens_per_s_ratio"] == pytest.approx((2.0 + 1.6) / 2)  # median of two = their mean
    assert rec["loss_max_rel_diff"] == pytest.approx(0.1) and not rec["losses_agree"]  # round 2 disagrees


def test_one_round_is_the_plain_side_by_side(monkeypatch):
    monkeypatch.setattr(side_by_side, "run_child", FakeChildren({"jax": [1.0], "torch": [1.2]}))
    rec = side_by_side.vs_torch(_args(rounds=1), "m", lambda m: None, lambda *a: None, Path("."))
    assert rec["n_rounds"] == 1 and rec["tokens_per_s_ratio"] == pytest.approx(1.2)
    assert rec["tokens_per_s_ratio_range"] == pytest.approx([1.2, 1.2])


def test_rounds_must_be_positive():
    with pytest.raises(SystemExit, match="--rounds must be >= 1"):
        side_by_side.interleaved_rounds([("a", ["x"])], 0, lambda m: None)


def test_acceptance_summary_divides_the_median_compiles_of_all_rounds(monkeypatch, tmp_path):
    """The compile-in-depth ratio: median of every round's full-model compile over the median 2-layer compile."""
    import json

    import report

    monkeypatch.setattr(side_by_side, "run_child", FakeChildren({"jax": [1.0, 1.0, 1.0], "torch": [2.0, 2.0, 2.0]}))
    rec = side_by_side.vs_torch(_args(tag="acc"), "m", lambda m: None, lambda *a: None, Path("."))
    assert [r["round_compile_s"] for r in rec["rounds"]] == [10.0, 11.0, 12.0]
    two_layer = [{"impl": "jax", "method": "selfaug", "num_layers": 2, "batch": 4, "seq": 8, "median_step_s": 0.1,
                  "compile_s": c, "tag": "acc"} for c in (9.0, 7.0, 8.0)]
    (tmp_path / "vs_torch_cpu.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp_path / "step_cpu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in two_layer))
    table = report.acceptance_summary(tmp_path, "acc")
    assert "| compile s, selfaug 2 x 8, 30 layers | 11.0 s (10.0-12.0 s over 3 runs) | <= 15 s | met |" in table
    row = next(line for line in table.splitlines() if line.startswith("| compile 30 / 2 layers"))
    assert "1.38 (11.0 / 8.0 s; medians of 30 layers 10.0-12.0 s over 3 runs, 2 layers 7.0-9.0 s over 3 runs)" in row
    assert row.endswith("| <= 1.5 | met |")
