"""The paper-shaped report (report_columns / report_tables / report_plots.plot_pareto) from stand-in results and a
stand-in registry: Table 1's columns in the paper's order with intervals, the extensions / sweep / adapter-scale
table, Table 2's rows per aligned feature, and the Pareto front."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import pytest

from selfaug_jax.eval.report import write_report
from selfaug_jax.eval.report_columns import column_block, method_label, ordered_methods
from selfaug_jax.eval.report_plots import pareto_front, plot_pareto
from selfaug_jax.eval.report_tables import build_table, build_table2, paper_blocks, render_table, render_table2
from selfaug_jax.eval.stats import BootstrapConfig, ratio_interval
from selfaug_jax.methods import Method

# The registry as it will be once every branch is merged (stand-in entries; labels as the paper's columns).
REGISTRY = {m.name: m for m in (
    Method("sft", "SFT", trains="all"),
    Method("lora", "LoRA", trains="lora"),
    Method("lora-magpie", "+MAGPIE", trains="lora"),
    Method("lora-sdft", "+SDFT", trains="lora"),
    Method("lora-orth", "+Orth", trains="lora"),
    Method("selfaug", "+SelfAug", trains="lora", reference="base", terms=("prompt_kl",)),
    Method("selfaug-features", "Feature alignment", trains="lora", reference="base", table=2, options=("features",)),
    Method("sft-selfaug", "SFT + SelfAug", trains="all", reference="copy", terms=("prompt_kl",), table=0),
    Method("lora-response-kl", "LoRA + response KL", trains="lora", reference="base", table=0),
)}
N = 100


def _bern(p: float, offset: int) -> list[float]:
    return [1.0 if ((i * 37 + offset) % N) < p * N else 0.0 for i in range(N)]


def _results(names_and_scores: dict[str, tuple[float, float, float]], runs: dict | None = None) -> dict:
    """``{run: (rag_f1, ifeval, shift)}`` -> results with per-item values (so every metric has an interval)."""
    items, methods = {}, {}
    for k, (name, (rag, ife, shift)) in enumerate(names_and_scores.items()):
        items[name] = {"rag_f1": {"num": _bern(rag, k), "den": None},
                       "ifeval_prompt_strict": {"num": _bern(ife, 3 * k), "den": None}}
        methods[name] = {"rag_f1": sum(items[name]["rag_f1"]["num"]) / N,
                         "ifeval_prompt_strict": sum(items[name]["ifeval_prompt_strict"]["num"]) / N,
                         "shift_general_input": shift}
        if name != "base":
            items[name]["shift_general_input"] = {"num": [shift * 10.0] * N, "den": [10.0] * N}
    return {"methods": methods, "items": items, "runs": runs or {}}


TABLE1 = {  # deliberately shuffled; run names include a sweep value and an adapter scale
    "selfaug[alpha=0.1]": (0.50, 0.60, 0.02), "lora-orth": (0.40, 0.64, 0.03), "selfaug": (0.52, 0.62, 0.01),
    "lora@0.5": (0.35, 0.66, 0.02), "base": (0.10, 0.72, 0.0), "lora-response-kl": (0.5, 0.5, 0.05),
    "lora-sdft": (0.30, 0.55, 0.05), "sft": (0.55, 0.45, 0.2), "lora": (0.50, 0.49, 0.09),
    "lora-magpie": (0.45, 0.58, 0.04), "sft-selfaug": (0.5, 0.5, 0.1),
}


def _header(md: str) -> list[str]:
    return [c.strip() for c in md.splitlines()[0].strip("|").split("|")][1:]


def test_columns_order_labels_and_blocks():
    names = list(TABLE1)
    assert ordered_methods(names, REGISTRY) == [
        "base", "sft", "lora", "lora@0.5", "lora-magpie", "lora-sdft", "lora-orth", "selfaug", "selfaug[alpha=0.1]",
        "sft-selfaug", "lora-response-kl"]
    assert method_label("selfaug[alpha=0.1]@0.5", REGISTRY) == "+SelfAug [alpha=0.1] @0.5"
    assert method_label("lora@0.5", REGISTRY) == "LoRA @0.5" and method_label("mystery", REGISTRY) == "mystery"
    assert [column_block(n, REGISTRY) for n in ("base", "lora", "lora@0.5", "selfaug[alpha=0.1]", "sft-selfaug",
                                                "selfaug-features[site=q]", "selfaug-features@0.5", "mystery")] == [
        "table1", "table1", "extra", "extra", "extra", "table2", "extra", "extra"]


def test_table1_in_paper_order_with_intervals_then_extensions_and_variants():
    res = _results(TABLE1)
    blocks = paper_blocks(res, registry=REGISTRY)
    from selfaug_jax.eval.report_intervals import compute_intervals

    iv = compute_intervals(res["items"], ordered_methods(list(TABLE1), REGISTRY), {"rag_f1": 100.0,
                           "ifeval_prompt_strict": 100.0})
    md1 = render_table(blocks["table1"], iv)
    assert _header(md1) == ["Base", "SFT", "LoRA", "+MAGPIE", "+SDFT", "+Orth", "+SelfAug"]
    md2 = render_table(blocks["extra"], iv)
    assert _header(md2) == ["Base", "LoRA @0.5", "+SelfAug [alpha=0.1]", "SFT + SelfAug", "LoRA + response KL"]
    # a cell = value [95% interval] of the bootstrap over items, in shown units; bold = best of this table only
    want = ratio_interval(res["items"]["selfaug"]["ifeval_prompt_strict"]["num"], None, BootstrapConfig())
    row = next(line for line in md1.splitlines() if line.startswith("| IFEval (prompt, strict)"))
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    assert cells[-1] == f"62.00 [{100 * want.low:.2f}, {100 * want.high:.2f}]"
    assert cells[0].startswith("72.00 [") and cells[5].startswith("**64.00** [")  # base not ranked; +Orth best
    row2 = next(line for line in md2.splitlines() if line.startswith("| IFEval (prompt, strict)"))
    assert "**66.00** [" in row2  # lora@0.5 is best among the extras
    shift = next(line for line in md1.splitlines() if line.startswith("| KL on general inputs"))
    assert "**0.0100** [0.0100, 0.0100]" in shift and "| 0.0000 |" in shift  # base: no items -> no interval


def test_table2_rows_per_aligned_feature_then_logits():
    sites = ["ffn", "q", "residual", "k", "attn", "o", "v"]
    scores = {f"selfaug-features[site={s}]": (0.4 + 0.01 * i, 0.5 + 0.01 * i, 0.02) for i, s in enumerate(sites)}
    scores.update({"base": (0.1, 0.72, 0.0), "lora": (0.5, 0.49, 0.09), "selfaug": (0.52, 0.62, 0.01)})
    runs = {f"selfaug-features[site={s}]": {"method": "selfaug-features", "sweep": {"features.site": s}}
            for s in sites}
    res = _results(scores, runs)
    t2 = build_table2(res, registry=REGISTRY)
    assert [t2["row_labels"][r] for r in t2["runs"]] == [
        "Q", "K", "V", "O", "All attention", "FFN", "All layers", "Input-token logits (SelfAug)"]
    md = render_table2(t2)
    assert md.splitlines()[0] == ("| Aligned feature | RAG F1 ↑ | IFEval (prompt, strict) ↑ | KL on general inputs ↓ "
                                  "| Average (2) ↑ |")
    logits = md.splitlines()[-1]
    assert logits.startswith("| Input-token logits (SelfAug) | **52.00** | **62.00** | **0.0100** | **57.00** |")
    # without a sweep the site comes from the experiment config; other swept keys are appended
    res2 = _results({"selfaug-features": (0.3, 0.6, 0.02), "selfaug-features[distance=cosine]": (0.3, 0.6, 0.02)},
                    {"selfaug-features[distance=cosine]": {"sweep": {"features.distance": "cosine"}}})
    res2["config"] = {"features": {"site": "ffn"}}
    t2b = build_table2(res2, registry=REGISTRY)
    assert list(t2b["row_labels"].values()) == ["FFN", "FFN [distance=cosine]"]
    assert build_table2(_results({"lora": (0.5, 0.5, 0.1)}), registry=REGISTRY) is None


def test_pareto_front_both_directions():
    pts = {"a": (1.0, 5.0), "b": (2.0, 4.0), "c": (2.0, 3.0), "d": (3.0, 1.0), "e": (0.5, 5.0)}
    assert pareto_front(pts) == ["a", "b", "d"]  # c dominated by b, e by a
    # y lower is better (shift): d has the highest x and the lowest y, so it dominates every other point
    assert pareto_front(pts, maximize_y=False) == ["d"]
    assert pareto_front({"x": (1.0, 1.0), "y": (1.0, 1.0)}) == ["x", "y"]  # ties: neither dominates


def test_pareto_plot_and_report_files(tmp_path):
    res = _results(TABLE1)
    table = build_table(res, registry=REGISTRY)
    path = plot_pareto(table, tmp_path / "p.png", downstream="rag_f1",
                       panels=[("ifeval_prompt_strict", True, "IFEval"), ("shift_general_input", False, "KL")])
    img = mpimg.imread(path)
    assert img.shape[1] > img.shape[0] * 1.8 and img.std() > 0  # two panels side by side
    assert plot_pareto(build_table(_results({"base": (0.1, 0.7, 0.0)})), tmp_path / "q.png", downstream="rag_f1",
                       panels=[("ifeval_prompt_strict", True, "IFEval")]) is None  # one point: no front
    write_report(res, tmp_path / "r", registry=REGISTRY, bootstrap=BootstrapConfig(n_resamples=200))
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert "pareto.png" in summary["plots"]
    assert summary["paper_tables"]["table1"] == ["base", "sft", "lora", "lora-magpie", "lora-sdft", "lora-orth",
                                                 "selfaug"]
    assert summary["paper_tables"]["extra"] == ["base", "lora@0.5", "selfaug[alpha=0.1]", "sft-selfaug",
                                                "lora-response-kl"]
    report = (tmp_path / "r" / "report.md").read_text()
    assert "### Extensions and variants" in report and "![pareto.png](pareto.png)" in report
    assert report.index("| Metric | Base | SFT | LoRA | +MAGPIE") < report.index("| Metric | Base | LoRA @0.5")
    # run-vs-run differences: only the pairs with SelfAug in the markdown (all of them in summary.json)
    pairs_head = next(line for line in report.splitlines() if line.startswith("| Metric | +SelfAug − SFT"))
    assert "+SelfAug − LoRA |" in pairs_head and "+SDFT − +MAGPIE" not in report
    assert "lora-sdft vs lora-magpie" in summary["intervals"]["pairs"]["rag_f1"]


@pytest.mark.parametrize("bad", [{"runs": ["lora"]}, {"runs": {"lora": 3}}])
def test_runs_section_is_checked(bad):
    with pytest.raises(ValueError, match=r"results\['runs'\]"):
        build_table({"methods": {"lora": {"rag_f1": 0.5}}, **bad})
