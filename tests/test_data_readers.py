"""Readers on committed fixtures in the real formats (CRAG task 1 .jsonl.bz2, RAG-Instruct .json, our JSONL)."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfaug_jax.data import (
    DataFormatError,
    Document,
    DocumentsTemplate,
    RagExample,
    ReaderStats,
    SchemaError,
    read_crag_task1,
    read_examples,
    read_jsonl,
    read_rag_instruct,
    write_jsonl,
)

FIX = Path(__file__).parent / "fixtures" / "data"
CRAG = FIX / "crag_task_1_sample.jsonl.bz2"
RAG_INSTRUCT = FIX / "rag_instruct_sample.json"
OURS = FIX / "rag_sample.jsonl"


# ------------------------------------------------------------------------------------------ CRAG

def test_crag_snippets_fields_and_meta():
    st = ReaderStats()
    exs = list(read_crag_task1(CRAG, stats=st))
    assert [e.id for e in exs] == ["7bb29eb4-12f9-45f9-bf8a-66832b3c8962",
                                   "c0ffee00-0000-4000-8000-000000000002",
                                   "c0ffee00-0000-4000-8000-000000000003"]
    first = exs[0]
    assert first.question == "what year did radiohead release ok computer?" and first.answer == "1997"
    # 5 pages, two with empty snippets -> 3 documents in search order, titles from page_name
    assert [d.title for d in first.documents] == ["OK Computer - Wikipedia", "Radiohead discography", "No body page"]
    assert first.documents[0].text.startswith("<b>OK Computer</b> is the third studio album")
    assert first.meta["alt_ans"] == ["in 1997"] and first.meta["domain"] == "music"
    assert first.meta["split"] == 0 and first.meta["question_type"] == "simple"
    assert first.meta["page_urls"][0] == "https://en.wikipedia.org/wiki/OK_Computer"
    assert exs[2].answer == "invalid question" and exs[2].meta["split"] == 1
    assert st.as_dict() == {"n_records": 3, "n_examples": 3, "n_other_split": 0, "n_documents": 6,
                            "n_empty_documents": 2, "n_page_fallbacks": 0, "n_truncated_pages": 0,
                            "n_documents_over_limit": 0, "n_skipped": 0, "skip_reasons": {}}


def test_crag_split_filter_counts():
    st = ReaderStats()
    val = list(read_crag_task1(CRAG, split="validation", stats=st))
    assert len(val) == 2 and st.n_other_split == 1
    test = list(read_crag_task1(CRAG, split="public_test"))
    assert [e.meta["split"] for e in test] == [1]
    with pytest.raises(ValueError, match="split must be one of"):
        list(read_crag_task1(CRAG, split="train"))


def test_crag_html_page_bodies_bs4_and_html2text():
    st = ReaderStats()
    exs = list(read_crag_task1(CRAG, document_source="page", stats=st))
    docs = exs[0].documents
    assert len(docs) == 4  # blank page dropped; "No body page" falls back to its snippet
    body = docs[0].text
    assert "OK Computer is the third studio album by the English rock band Radiohead, released on 21 May 1997" in body
    assert "It was produced by Nigel Godrich & the band." in body  # entities decoded
    for junk in ("<p>", "trackPage", "font-family", "dataLayer", "Home"):  # tags, scripts, styles, nav gone
        assert junk not in body
    assert docs[3].text == "OK Computer turned 25 in 2022."
    assert st.n_page_fallbacks == 1 and st.n_empty_documents == 1 and st.n_truncated_pages == 0
    h2t = list(read_crag_task1(CRAG, document_source="page", html_converter="html2text"))[0].documents[0].text
    assert "released on 21 May 1997" in h2t and "Kid A" in h2t and "<table>" not in h2t


def test_crag_max_page_chars_cuts_and_counts():
    st = ReaderStats()
    exs = list(read_crag_task1(CRAG, document_source="page", max_page_chars=60, stats=st))
    texts = [d.text for e in exs for d in e.documents]
    assert all(len(t) <= 60 for t in texts)
    assert st.n_truncated_pages == 5  # every page body is longer than 60 characters
    assert exs[0].documents[0].text == "OK Computer\nOK Computer is the third studio album by the"


@pytest.mark.parametrize("name, err, msg", [
    ("crag_task_1_bad_json.jsonl.bz2", DataFormatError, r"crag_task_1_bad_json\.jsonl\.bz2:2: invalid JSON"),
    ("crag_task_1_missing_query.jsonl.bz2", SchemaError,
     r"crag_task_1_missing_query\.jsonl\.bz2:3: example 'c0ffee00-0000-4000-8000-000000000003': missing field 'query'"),
])
def test_crag_malformed_file_line(name, err, msg):
    with pytest.raises(err, match=msg):
        list(read_crag_task1(FIX / name))


# ------------------------------------------------------------------------------------------ RAG-Instruct

def test_rag_instruct_records_and_paper_prompt_format():
    st = ReaderStats()
    exs = list(read_rag_instruct(RAG_INSTRUCT, stats=st))
    assert [e.id for e in exs] == ["rag_instruct-000000", "rag_instruct-000001", "rag_instruct-000002"]
    assert [len(e.documents) for e in exs] == [10, 2, 0]
    assert exs[0].answer == "The Royal Artillery Barracks is used by the British Army."
    assert exs[0].meta == {"source": "rag_instruct"}
    assert (st.n_records, st.n_examples, st.n_documents) == (3, 3, 12)
    text = DocumentsTemplate().render(exs[1].question, exs[1].documents)
    assert text == ("### Paragraph:\n[1] Mount Kilimanjaro is a dormant volcano in Tanzania. It is the highest "
                    "mountain in Africa, about 5,895 metres above sea level.\n[2] Mount Kenya is the second-highest "
                    "mountain in Africa.\n\n### Instruction:\nSummarize the passage in one sentence.")
    st2 = ReaderStats()
    capped = list(read_rag_instruct(RAG_INSTRUCT, max_documents=5, stats=st2))
    assert len(capped[0].documents) == 5 and st2.n_documents_over_limit == 5
    assert capped[0].documents[4].text.startswith("passage 5:")


@pytest.mark.parametrize("name, err, msg", [
    ("rag_instruct_missing_answer.json", SchemaError,
     r"rag_instruct_missing_answer\.json:18: example 'rag_instruct-000001': missing field 'answer'"),
    ("rag_instruct_bad_json.json", DataFormatError, r"rag_instruct_bad_json\.json:29: invalid JSON"),
])
def test_rag_instruct_malformed_file_line(name, err, msg):
    with pytest.raises(err, match=msg):
        list(read_rag_instruct(FIX / name))


def test_rag_instruct_accepts_jsonl_and_aliases(tmp_path):
    p = tmp_path / "ri.jsonl"
    p.write_text('{"instruction": "Q1", "output": "A1", "documents": ["d"], "paradigm": "r1"}\n'
                 '{"instruction": "Q2", "output": "A2"}\n')
    exs = list(read_rag_instruct(p))
    assert [(e.question, e.answer, len(e.documents)) for e in exs] == [("Q1", "A1", 1), ("Q2", "A2", 0)]
    assert exs[0].meta == {"paradigm": "r1", "source": "rag_instruct"}


# ------------------------------------------------------------------------------------------ ours

def test_our_jsonl_reader():
    exs = list(read_jsonl(OURS))
    assert [e.id for e in exs] == ["ours-1", "ours-2", "ours-3", "rag_sample.jsonl:5"]
    assert exs[0].documents[2] == Document("Tavelport is a harbour city.")
    assert exs[0].meta == {"answer_aliases": ["Marrow"]}
    assert exs[1].system == "Answer only from the documents." and exs[1].meta == {"hops": 1}
    assert exs[2].messages is not None and exs[2].target == "By Ilse Marrow."
    assert exs[2].messages[0].documents[0].title == "Vaskorin Works"
    assert exs[3].documents == () and exs[3].answer == "Not in the documents."


@pytest.mark.parametrize("name, err, msg", [
    ("rag_bad_json.jsonl", DataFormatError, r"rag_bad_json\.jsonl:3: invalid JSON"),
    ("rag_bad_schema.jsonl", SchemaError,
     r"rag_bad_schema\.jsonl:2: example 'bad-1': field documents\[0\]\.text must be a string"),
    ("rag_bad_messages.jsonl", SchemaError,
     r"rag_bad_messages\.jsonl:1: example 'bad-2': field 'messages': the last turn must be the assistant"),
])
def test_our_jsonl_malformed_file_line(name, err, msg):
    with pytest.raises(err, match=msg):
        list(read_jsonl(FIX / name))


def test_write_jsonl_roundtrip_and_dispatch(tmp_path):
    exs = list(read_jsonl(OURS))
    out = tmp_path / "copy.jsonl"
    assert write_jsonl(exs, out) == 4
    assert list(read_jsonl(out)) == exs
    assert [e.id for e in read_examples(CRAG)][:1] == ["7bb29eb4-12f9-45f9-bf8a-66832b3c8962"]
    assert len(list(read_examples(RAG_INSTRUCT))) == 3
    assert isinstance(next(read_examples(OURS)), RagExample)


def test_iter_jsonl_objects_names_file_and_true_line(tmp_path):
    from selfaug_jax.data.readers import iter_jsonl_objects

    path = tmp_path / "recs.jsonl"
    path.write_text('{"id": 1, "prompt": "a"}\n\n   \n{"id": 2, "prompt": "b"}\n', encoding="utf-8")
    assert [(w.rsplit(":", 1)[1], r["id"]) for w, r in iter_jsonl_objects(path, ("id", "prompt"))] == [("1", 1), ("4", 2)]
    path.write_text('{"id": 1, "prompt": "a"}\n\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"recs\.jsonl:3: expected a JSON object, got list"):
        list(iter_jsonl_objects(path))
    path.write_text('\n{"id": 1}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"recs\.jsonl:2: missing fields \['prompt'\]"):
        list(iter_jsonl_objects(path, ("id", "prompt")))
