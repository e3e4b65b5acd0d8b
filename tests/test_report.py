"""Tests for selfaug_jax.eval.report: table values, Average, bold, findings, JSON and PNG outputs."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import pytest

from selfaug_jax.eval.report import build_table, findings, render_table, write_report


def _results() -> dict:
    return {
        "config": {"model": "tiny", "epochs": 2},
        "wall_time_s": 3.5,
        "methods": {  # deliberately not in display order
            "selfaug": {"rag_em": 0.40, "ifeval_prompt_strict": 0.62, "shift_general_input": 0.011, "crag_score": 10.0},
            "sft": {"rag_em": 0.45, "ifeval_prompt_strict": 0.45, "shift_general_input": 0.2, "crag_score": 9.0},
            "lora": {"rag_em": 0.42, "ifeval_prompt_strict": 0.49, "shift_general_input": 0.09, "crag_score": 8.0},
            "base": {"rag_em": 0.10, "ifeval_prompt_strict": 0.72, "shift_general_input": 0.0, "crag_score": -13.0},
        },
        "curves": {
            "lora": [{"step": i, "loss": 2.0 / (i + 1), "ce": 2.0 / (i + 1), "kl": 0.0} for i in range(6)],
            "selfaug": [{"step": i, "ce": 2.1 / (i + 1), "kl": 0.01 * i} for i in range(6)],
        },
        "evals_over_training": {
            "lora": [{"step": 10 * i, "epoch": i, "shift_general_input": 0.03 * i,
                      "ifeval_prompt_strict": 0.70 - 0.05 * i} for i in range(4)],
            "selfaug": [{"step": 10 * i, "epoch": i, "shift_general_input": 0.004 * i,
                         "ifeval_prompt_strict": 0.70 - 0.01 * i} for i in range(4)],
        },
    }


def _line(md: str, start: str) -> list[str]:
    row = next(line for line in md.splitlines() if line.startswith(start))
    return [c.strip() for c in row.strip("|").split("|")][1:]


def test_table_order_average_and_bold():
    md = render_table(build_table(_results()))
    assert md.splitlines()[0] == "| Metric | Base | SFT | LoRA | SelfAug |"
    assert _line(md, "| RAG EM") == ["10.00", "**45.00**", "42.00", "40.00"]
    assert _line(md, "| IFEval (prompt, strict)") == ["72.00", "45.00", "49.00", "**62.00**"]
    # lower is better; Base (0.0) is not ranked
    assert _line(md, "| KL on general inputs ↓") == ["0.0000", "0.2000", "0.0900", "**0.0110**"]
    # CRAG enters the Average as (s + 100) / 2; Average = mean(RAG EM, CRAG', IFEval)
    want = {
        "Base": (10 + (-13 + 100) / 2 + 72) / 3,
        "SFT": (45 + (9 + 100) / 2 + 45) / 3,
        "LoRA": (42 + (8 + 100) / 2 + 49) / 3,
        "SelfAug": (40 + (10 + 100) / 2 + 62) / 3,
    }
    cells = _line(md, "| **Average** (3 metrics)")
    assert cells == ["41.83", "48.17", "48.33", "**52.33**"]
    assert [float(c.strip("*")) for c in cells] == [round(v, 2) for v in want.values()]
    # group headers in paper order
    lines = md.splitlines()
    heads = [i for i, line in enumerate(lines) if line.startswith("| *") and not line.startswith("| **")]
    assert [lines[i].split("*")[1] for i in heads] == ["Downstream (RAG)", "General capabilities", "Distribution shift"]


def test_ties_missing_values_and_overrides():
    res = {
        "methods": {"lora": {"rag_em": 0.5, "mmlu_acc": 0.7, "my_metric": 3.0},
                    "selfaug": {"rag_em": 0.5, "mmlu_acc": None, "my_metric": 4.0}},
        "metric_info": {"my_metric": {"label": "Custom", "group": "general", "higher_is_better": False}},
    }
    md = render_table(build_table(res))
    assert _line(md, "| RAG EM") == ["**50.00**", "**50.00**"]  # tie: both bold
    assert _line(md, "| MMLU") == ["70.00", "—"]  # single ranked value: no bold
    assert _line(md, "| Custom ↓") == ["**3.00**", "4.00"]
    assert _line(md, "| **Average** (2 metrics)") == ["60.00", "—"]  # missing in_average metric -> no average


def test_findings_follow_the_numbers():
    res = _results()
    notes = findings(res, build_table(res))
    text = "\n".join(notes)
    assert "IFEval (prompt, strict): SelfAug 62.00 vs LoRA 49.00 (+13.00, better)." in text
    assert "RAG EM: SelfAug 40.00 vs LoRA 42.00 (-2.00, worse)." in text
    assert "KL on general inputs: SelfAug 0.0110 vs LoRA 0.0900 (88% lower)" in text
    assert "SelfAug avoids 57% of LoRA's drop" in text  # (23 - 10) / 23
    assert "Pearson r(shift, IFEval) = -1.00 over 4 evals" in text
    assert text.splitlines()[-1].startswith("Consistent with the paper")
    # flip the outcome: the conclusion must flip too
    res["methods"]["selfaug"]["shift_general_input"] = 0.5
    res["methods"]["selfaug"]["ifeval_prompt_strict"] = 0.30
    flipped = findings(res, build_table(res))
    assert flipped[-1].startswith("Not consistent with the paper's claim on this run: SelfAug has higher or equal shift")
    assert any("(-19.00, worse)" in n for n in flipped)


def _assert_png(path, min_w=200):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[1] >= min_w and img.std() > 0  # not blank


def test_write_report_outputs(tmp_path):
    res = _results()
    res["methods"]["sft"]["ifeval_inst_loose"] = float("nan")  # not in the Average
    md = write_report(res, tmp_path)
    assert md == (tmp_path / "report.md").read_text().split("## Results\n\n")[1].split("\n\nBold")[0]
    for name in ("curves.png", "shift_vs_ifeval.png", "comparison.png"):
        _assert_png(tmp_path / name)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["schema_version"] == 1 and summary["wall_time_s"] == 3.5
    assert summary["methods"]["sft"]["ifeval_inst_loose"] is None  # NaN -> null (strict JSON)
    assert summary["table"]["average"]["values"]["selfaug"] == pytest.approx((40 + 55 + 62) / 3)
    assert summary["metric_info"]["crag_score"]["avg_offset"] == 50.0
    assert summary["plots"] == ["curves.png", "shift_vs_ifeval.png", "comparison.png"]
    report = (tmp_path / "report.md").read_text()
    assert "## What this shows" in report and "![curves.png](curves.png)" in report
    assert "| IFEval (instruction, loose) ↑ | — | NaN | — | — |" in report


def test_missing_optional_pieces_are_skipped(tmp_path):
    res = {"methods": {"base": {"rag_f1": 0.2}, "lora": {"rag_f1": 0.5}}}
    md = write_report(res, tmp_path)
    assert _line(md, "| RAG F1") == ["20.00", "50.00"]
    assert not (tmp_path / "curves.png").exists() and not (tmp_path / "shift_vs_ifeval.png").exists()
    _assert_png(tmp_path / "comparison.png", min_w=100)
    report = (tmp_path / "report.md").read_text()
    assert "Skipped (no data): curves.png, shift_vs_ifeval.png" in report
    # curves without KL / evals without IFEval still plot what exists
    res["curves"] = {"lora": [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]}
    res["evals_over_training"] = {"lora": [{"step": 1, "shift_general_input": 0.1}]}
    write_report(res, tmp_path / "b")
    _assert_png(tmp_path / "b" / "curves.png")
    _assert_png(tmp_path / "b" / "shift_vs_ifeval.png")


@pytest.mark.parametrize(
    "res, message",
    [
        ({"methods": {}}, r"results\['methods'\]: expected a non-empty mapping"),
        ({"methods": {"lora": {"rag_em": "high"}}}, r"results\['methods'\]\['lora'\]\['rag_em'\]: expected a number"),
        ({"methods": {"lora": {"x": 1}}, "metric_info": {"x": {"colour": "red"}}},
         r"results\['metric_info'\]\['x'\]: unknown keys \['colour'\]"),
        ({"methods": {"lora": {"x": 1}}, "metric_info": {"x": {"in_average": True, "higher_is_better": False}}},
         r"results\['metric_info'\]\['x'\]: .*in_average needs higher_is_better"),
        ({"methods": {"lora": {"x": 1}}, "curves": {"lora": [{"loss": 1.0}]}},
         r"results\['curves'\]\['lora'\]\[0\]: expected a record with a numeric 'step'"),
    ],
)
def test_schema_errors_name_the_field(res, message):
    with pytest.raises(ValueError, match=message):
        build_table(res)


def _items_results() -> dict:
    """Base / LoRA / SelfAug with per-item values: LoRA forgets IFEval (0.8 -> 0.3), SelfAug barely (0.8 -> 0.75);
    both gain on RAG."""
    n = 200

    def bern(p, offset=0):
        return [1.0 if ((i * 37 + offset) % n) < p * n else 0.0 for i in range(n)]

    items = {
        "base": {"rag_f1": {"num": bern(0.2), "den": None}, "ifeval_prompt_strict": {"num": bern(0.8), "den": None},
                 "general_collapse": {"num": [0.0] * n, "den": None}},
        "lora": {"rag_f1": {"num": bern(0.6), "den": None}, "ifeval_prompt_strict": {"num": bern(0.3), "den": None},
                 "general_collapse": {"num": bern(0.5), "den": None},
                 "shift_general_input": {"num": [0.5] * n, "den": [10.0] * n}},
        "selfaug": {"rag_f1": {"num": bern(0.58), "den": None},
                    "ifeval_prompt_strict": {"num": bern(0.75), "den": None},
                    "general_collapse": {"num": bern(0.05), "den": None},
                    "shift_general_input": {"num": [0.2] * n, "den": [10.0] * n}},
    }
    methods = {m: {k: sum(v["num"]) / sum(v["den"] or [1.0] * n) for k, v in per.items()} for m, per in items.items()}
    methods["base"]["shift_general_input"] = 0.0
    return {"methods": methods, "items": items,
            "samples": {"lora": {"generation": {"ifeval": {"n": n, "hit_cap": 7, "max_new_tokens": 256}}},
                        "base": {"generation": {"ifeval": {"n": n, "hit_cap": 2, "max_new_tokens": 256}}}}}


def test_intervals_forgetting_and_pairs_in_report(tmp_path):
    res = _items_results()
    write_report(res, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    iv = summary["intervals"]
    # per-metric intervals in shown units (x100), containing the estimate, ~ +-5.5 points for p=0.8, n=200
    base_if = iv["metrics"]["ifeval_prompt_strict"]["base"]
    assert base_if["estimate"] == pytest.approx(80.0) and base_if["low"] < 80 < base_if["high"]
    assert 4.0 < (base_if["high"] - base_if["low"]) / 2 < 7.0 and base_if["n"] == 200
    # forgetting (method - base): LoRA's drop excludes 0
    lora_drop = iv["vs_base"]["ifeval_prompt_strict"]["lora"]
    assert lora_drop["estimate"] == pytest.approx(-50.0) and lora_drop["high"] < 0 and lora_drop["excludes_zero"]
    assert iv["vs_base"]["rag_f1"]["selfaug"]["excludes_zero"]
    pair = iv["pairs"]["ifeval_prompt_strict"]["selfaug vs lora"]
    assert pair["estimate"] == pytest.approx(45.0) and pair["excludes_zero"]
    shift_pair = iv["pairs"]["shift_general_input"]["selfaug vs lora"]
    assert shift_pair["estimate"] == pytest.approx(-0.03) and shift_pair["low"] == pytest.approx(-0.03)
    assert "base" not in iv["metrics"]["shift_general_input"]  # no items: no interval, no vs-base row
    report = (tmp_path / "report.md").read_text()
    assert "## Uncertainty" in report and "### Change from Base: downstream gain and forgetting" in report
    row = next(line for line in report.splitlines() if line.startswith("| IFEval (prompt, strict) ↑ | -50.00"))
    assert row.count("*") == 2  # both methods' changes are significant here
    assert "SelfAug − LoRA" in report
    assert "ifeval (budget 256 tokens): Base 2/200, LoRA 7/200" in report
    assert "tradeoff.png" in summary["plots"]
    _assert_png(tmp_path / "tradeoff.png")
    _assert_png(tmp_path / "comparison.png")


def test_tradeoff_and_comparison_leave_out_all_zero_panels(tmp_path):
    from selfaug_jax.eval import report_plots

    iv = {"vs_base": {"rag_f1": {"lora": {"estimate": 0.0, "low": 0.0, "high": 0.0}},
                      "ifeval_prompt_strict": {"lora": {"estimate": 0.0, "low": 0.0, "high": 0.0}}}}
    assert report_plots.plot_tradeoff(iv, tmp_path / "t.png", "rag_f1", [("ifeval_prompt_strict", "IFEval")]) is None
    table = {"methods": ["base", "lora"], "average": {"values": {"base": None, "lora": None}},
             "rows": [{"metric": "shift_general_input", "label": "KL", "higher_is_better": False,
                       "values": {"base": 0.0, "lora": 0.0}}]}
    assert report_plots.plot_comparison(table, tmp_path / "c.png") is None
