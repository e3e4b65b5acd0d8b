"""The run's training set (``selfaug_jax.experiment.train_data``): the long-distractor fixture keeps its gold
document, a zero-document example is skipped and counted in the statistics that go to ``summary.json``, and the
cache entry is written whole (no temporary folder left)."""

from __future__ import annotations

import json

from selfaug_jax.experiment.config import build_config
from selfaug_jax.experiment.train_data import tokenized_train_source

DISTRACTOR = " ".join(f"Filler sentence {i} about the history of the harbour." for i in range(600))  # ~5,000 words


def _fixture(path):
    rows = [
        {"id": "gold", "question": "When was the lighthouse of Tavelport built?",
         "documents": [DISTRACTOR, "The lighthouse of Tavelport was built in 1871."], "answer": "In 1871."},
        {"id": "nothing-fits", "question": "When was the harbour dredged?", "documents": [DISTRACTOR],
         "answer": "Never."},
        {"id": "short", "question": "Who keeps the lighthouse?", "documents": ["Mira Oddsen keeps it."],
         "answer": "Mira Oddsen."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_long_distractor_fixture_and_zero_document_count(tmp_path, monkeypatch):
    from selfaug_jax.models import load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir("smollm2-135m-instruct")
    tokenizer = load_tokenizer(model_dir)
    monkeypatch.setenv("SELFAUG_JAX_CACHE", str(tmp_path / "cache"))
    cfg = build_config("smoke", [f"data.train={_fixture(tmp_path / 'data.jsonl')}", "data.max_length=384"])
    source, stats = tokenized_train_source(cfg, tokenizer, model_dir)
    kept = {source[i].id: source[i] for i in range(len(source))}
    assert sorted(kept) == ["gold", "short"]
    gold = tokenizer.decode(kept["gold"].input_ids)
    assert "The lighthouse of Tavelport was built in 1871." in gold and "Filler sentence" not in gold
    assert kept["gold"].meta["n_documents_kept"] == 1
    assert (stats["n_examples"], stats["n_kept"], stats["n_skipped"], stats["n_skipped_no_documents"]) == (3, 2, 1, 1)
    assert stats["no_document_ids"] == ["nothing-fits"] and stats["n_documents_dropped"] == 1  # of kept examples
    (entry,) = list((tmp_path / "cache" / "datasets").iterdir())
    assert ".tmp-" not in entry.name and json.loads((entry / "prompt_stats.json").read_text())["prompt_stats"] == stats

    # data.no_documents=keep: the example stays, counted, in a different cache entry
    cfg = build_config("smoke", [f"data.train={tmp_path / 'data.jsonl'}", "data.max_length=384",
                                 "data.no_documents=keep"])
    source, stats = tokenized_train_source(cfg, tokenizer, model_dir)
    assert len(source) == 3 and stats["n_kept_no_documents"] == 1 and stats["n_skipped"] == 0
    assert len(list((tmp_path / "cache" / "datasets").iterdir())) == 2
