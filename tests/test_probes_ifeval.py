"""Probe sets (committed, deterministic) and the IFEval-style checkers / metrics."""

import json
from collections import Counter

import pytest

import selfaug_jax.eval.ifeval as ifeval_module

from selfaug_jax.data import probes
from selfaug_jax.eval import ifeval
from selfaug_jax.eval.ifeval import CHECKERS, check_instruction, evaluate_ifeval


# ------------------------------------------------------------------------------------ probe sets
def test_committed_probes_equal_generator_output(tmp_path):
    paths = probes.write_probes(tmp_path)
    for key, name in (("ifeval", probes.IFEVAL_FILE), ("general", probes.GENERAL_FILE)):
        assert paths[key].read_bytes() == (probes.ASSETS_DIR / name).read_bytes(), (
            f"{name} is stale: run python -m selfaug_jax.data.probes")


def test_ifeval_probes_structure():
    recs = probes.load_ifeval_probes()
    assert len(recs) == 300 and len({r["id"] for r in recs}) == 300
    counts = Counter(i["type"] for r in recs for i in r["instructions"])
    assert set(counts) == set(probes.TYPES) == set(CHECKERS)
    assert min(counts.values()) >= 15
    for r in recs:
        assert 1 <= len(r["instructions"]) <= 3
        shorts = [i["type"].split(":")[1] for i in r["instructions"]]
        assert len(set(shorts)) == len(shorts)
        for a in shorts:
            assert not probes.CONFLICTS[a] & set(shorts), (r["id"], shorts)
        for ins in r["instructions"]:
            ifeval.validate_kwargs(ins["type"], ins["kwargs"])  # raises on bad kwargs
        if "repeat_prompt" in shorts:
            assert shorts == ["repeat_prompt"]
            assert r["prompt"].startswith(r["instructions"][0]["kwargs"]["prompt_to_repeat"])
            # repeating the request then answering passes the check
            assert check_instruction("combination:repeat_prompt",
                                     r["instructions"][0]["kwargs"]["prompt_to_repeat"] + " Sure.",
                                     r["instructions"][0]["kwargs"])


def test_general_prompts_structure():
    recs = probes.load_general_prompts()
    assert len(recs) == 200 and len({r["prompt"] for r in recs}) == 200
    assert Counter(r["category"] for r in recs) == {"explain": 30, "summarise": 25, "list": 30, "rewrite": 25,
                                                     "math": 30, "classify": 30, "translate": 30}
    assert all("{" not in r["prompt"] for r in recs if r["category"] == "math")


def test_probes_do_not_mention_rag_entities():
    from selfaug_jax.data.default_task import T, load_default_task

    vocab = {w.lower() for w in [*T.DEVICES, *T.COMPANY_SUFFIXES, *T.FIRST_NAMES_M, *T.FIRST_NAMES_F]}
    names = {w.lower() for r in load_default_task("dev") for d in r["documents"] for w in d["title"].split()} - vocab
    assert len(names) > 100
    words = {w.strip(".,?!'\"").lower() for r in probes.load_ifeval_probes() + probes.load_general_prompts()
             for w in r["prompt"].split()}
    assert not names & words


def test_bad_sources_are_reported(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("ifeval_tasks: [{task: t, keywords: [a], forbidden: [a], freq: b}]\n" +
                 "".join(f"{c}: [x]\n" for c in probes.GENERAL_CATEGORIES), encoding="utf-8")
    with pytest.raises(ValueError, match=r"ifeval_tasks\[0\]"):
        probes.load_sources(p)


# ------------------------------------------------------------------------------------ counting
def test_count_words_and_sentences():
    assert ifeval.count_words("Hello, world! It's 3.5 km.") == 7  # hello world it s 3 5 km: \w+ runs
    assert ifeval.count_sentences("Dr. Smith arrived at 3.30 p.m. today. He was late! Why? Nobody knows...") == 4
    assert ifeval.count_sentences("One line without a stop") == 1
    assert ifeval.count_sentences("") == 0
    assert ifeval.split_sentences('He said "stop." Then he left.') == ['He said "stop."', "Then he left."]


# ------------------------------------------------------------------------------------ checkers
P, F = True, False
CASES = [
    ("change_case:english_lowercase", {}, "all lower here.", P),
    ("change_case:english_lowercase", {}, "Not lower.", F),
    ("change_case:english_capital", {}, "THIS ANSWER IS WRITTEN IN CAPITAL LETTERS, 100%!", P),
    ("change_case:english_lowercase", {}, "ceci est une phrase entièrement écrite en français.", F),  # not English
    ("change_case:english_capital", {}, "ALL CAPS but one", F),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"}, "one two three", P),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"}, "one two", F),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at most"}, "one two three", P),
    ("length_constraints:number_words", {"num_words": 3, "relation": "less than"}, "one two three", F),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at most"}, "A b. C d.", P),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at most"}, "Yes. No. Maybe.", F),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"}, "Go. Stop! Why?", P),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First part.\n***\nSecond part.", P),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n***\n***\nSecond.", F),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, "First.\n***\nSecond.", F),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2, "separator": "blank_line"}, "A.\n\n \nB.\n", P),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2, "separator": "blank_line"}, "A.\nB.", F),
    ("keywords:existence", {"keywords": ["kettle", "Leaves"]}, "Boil the KETTLE, add leaves.", P),
    ("keywords:existence", {"keywords": ["kettle", "leaves"]}, "Boil the kettle.", F),
    ("keywords:forbidden_words", {"forbidden_words": ["car"]}, "I took the cart and the carpet.", P),
    ("keywords:forbidden_words", {"forbidden_words": ["car"]}, "My Car broke.", F),
    ("keywords:frequency", {"keyword": "tea", "frequency": 2, "relation": "at least"}, "Tea is tea.", P),
    ("keywords:frequency", {"keyword": "tea", "frequency": 2, "relation": "less than"}, "Tea and teapot.", F),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', P),
    ("detectable_format:json_format", {}, '{"a": 1} trailing', F),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "Intro\n* one\n- two\n**bold** line", P),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two\n* three", F),
    ("detectable_format:title", {}, "<<My Title>>\nText", P),
    ("detectable_format:title", {}, "<< >> no title", F),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and **two**", P),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and ** **", F),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], at [address].", P),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name].", F),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\n\nP.S. see you", P),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi. PS see you", F),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\np.p.s. later", P),
    ("startend:start_checker", {"starter": "My answer is"}, "  my answer is yes.", P),
    ("startend:start_checker", {"starter": "My answer is"}, "Well, My answer is yes.", F),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, 'Done. any other questions?"\n', P),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Any other questions? Bye.", F),
    ("startend:quotation", {}, ' "wrapped" ', P),
    ("startend:quotation", {}, '"not wrapped', F),
    ("punctuation:no_comma", {}, "No commas here.", P),
    ("punctuation:no_comma", {}, "Yes, a comma.", F),
    ("combination:two_responses", {}, "First answer.\n******\nSecond answer.", P),
    ("combination:two_responses", {}, "Same.\n******\nSame.", F),
    ("combination:two_responses", {}, "A\n******\n\n******\nB", F),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."}, "write a poem. Roses are red.", P),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."}, "Sure! Write a poem.", F),
]


@pytest.mark.parametrize("type_,kwargs,response,expected", CASES)
def test_checker(type_, kwargs, response, expected):
    assert check_instruction(type_, response, kwargs) is expected


def test_every_checker_has_pass_and_fail_cases():
    seen = {(t, e) for t, _, _, e in CASES}
    for t in CHECKERS:
        assert (t, True) in seen and (t, False) in seen, t


def test_bad_instructions_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown instruction type 'language:response_language'"):
        check_instruction("language:response_language", "hola", {"language": "es"})
    with pytest.raises(ValueError, match="number_words: missing kwarg 'relation'"):
        check_instruction("length_constraints:number_words", "x", {"num_words": 3})
    with pytest.raises(ValueError, match="unknown kwarg 'bogus'"):
        check_instruction("punctuation:no_comma", "x", {"bogus": 1})
    with pytest.raises(ValueError, match="relation"):
        check_instruction("length_constraints:number_words", "x", {"num_words": 3, "relation": "about"})
    with pytest.raises(ValueError, match="'num_bullets' must be int"):
        check_instruction("detectable_format:number_bullet_lists", "x", {"num_bullets": "3"})
    # None-valued kwargs (as in IFEval's files) are ignored
    assert check_instruction("punctuation:no_comma", "ok", {"language": None})


# ------------------------------------------------------------------------------------ metrics
RECORDS = [
    {"id": "a", "prompt": "p", "instructions": [{"type": "punctuation:no_comma", "kwargs": {}},
                                                  {"type": "change_case:english_lowercase", "kwargs": {}}]},
    {"id": "b", "prompt": "p", "instructions": [{"type": "startend:start_checker", "kwargs": {"starter": "Yes"}},
                                                  {"type": "punctuation:no_comma", "kwargs": {}}]},
    {"id": "c", "prompt": "p", "instructions": [{"type": "detectable_format:json_format", "kwargs": {}}]},
]


def test_evaluate_ifeval_hand_computed():
    responses = ["all of this answer is written in lowercase english", "Sure thing.\nYes, I will\nBye", "   "]
    out = evaluate_ifeval(RECORDS, responses)
    # strict: a -> [T, T]; b -> [F (starts with "Sure"), F (comma)]; c -> [F] (empty response)
    assert out["prompt_level_strict"] == pytest.approx(1 / 3)
    assert out["instruction_level_strict"] == pytest.approx(2 / 5)
    # loose: b's first check passes once the first line is removed; the comma stays
    assert out["instruction_level_loose"] == pytest.approx(3 / 5)
    assert out["prompt_level_loose"] == pytest.approx(1 / 3)
    assert out["per_type"]["punctuation:no_comma"] == {"count": 2, "strict": 0.5, "loose": 0.5}
    assert out["per_type"]["startend:start_checker"] == {"count": 1, "strict": 0.0, "loose": 1.0}
    assert out["num_prompts"] == 3 and out["num_instructions"] == 5
    assert out["results"][1] == {"id": "b", "strict": [False, False], "loose": [True, False]}
    # mapping form gives the same numbers
    by_id = evaluate_ifeval(RECORDS, dict(zip("abc", responses)))
    assert by_id["instruction_level_strict"] == out["instruction_level_strict"]


def test_evaluate_ifeval_alignment_errors():
    with pytest.raises(ValueError, match="3 records but 2 responses"):
        evaluate_ifeval(RECORDS, ["x", "y"])
    with pytest.raises(ValueError, match="no response for ids"):
        evaluate_ifeval(RECORDS, {"a": "x"})
    bad = [{"id": "z", "prompt": "p", "instructions": [{"type": "nope", "kwargs": {}}]}]
    with pytest.raises(ValueError, match=r"record 'z' instructions\[0\]"):
        evaluate_ifeval(bad, ["x"])


def test_prompt_echo_scores_low_on_committed_probes():
    """Echoing the prompt is a poor answer: strict prompt-level accuracy must be well below 1."""
    recs = probes.load_ifeval_probes()
    out = evaluate_ifeval(recs, [r["prompt"] for r in recs])
    assert 0.0 < out["prompt_level_strict"] < 0.5
    assert json.dumps({k: v for k, v in out.items() if k != "results"})  # JSON-able summary


def _oracle_response(rec: dict) -> str:
    """A response built to satisfy every constraint of ``rec`` (shows the probe is satisfiable)."""
    ins = {i["type"].split(":")[1]: i["kwargs"] for i in rec["instructions"]}
    if "repeat_prompt" in ins:
        return ins["repeat_prompt"]["prompt_to_repeat"] + " here is my reply."
    n_sent = 1
    if "number_sentences" in ins:
        k = ins["number_sentences"]
        n_sent = k["num_sentences"] if k["relation"] == "at least" else 1
    n_par = ins.get("number_paragraphs", {}).get("num_paragraphs", 1)
    words = []
    if "existence" in ins:
        words += ins["existence"]["keywords"]
    if "frequency" in ins and ins["frequency"]["relation"] == "at least":
        words += [ins["frequency"]["keyword"]] * ins["frequency"]["frequency"]
    words += ["[name]"] * ins.get("number_placeholders", {}).get("num_placeholders", 0)
    words += ["*note*"] * ins.get("number_highlighted_sections", {}).get("num_highlights", 0)
    sentences = [f"reply {i}" for i in range(max(n_sent, n_par))]
    sentences[0] += " " + " ".join(words)
    if "number_words" in ins and ins["number_words"]["relation"] == "at least":
        sentences[-1] += " more" * ins["number_words"]["num_words"]
    sentences = [s.strip() + "." for s in sentences]
    if n_par > 1:
        sep = "\n***\n" if ins["number_paragraphs"].get("separator", "***") == "***" else "\n\n"
        body = sep.join(" ".join(sentences[i::n_par]) for i in range(n_par))
    else:
        body = " ".join(sentences)
    if "number_bullet_lists" in ins:
        body += "\n" + "\n".join("* item" for _ in range(ins["number_bullet_lists"]["num_bullets"]))
    if "json_format" in ins:
        body = json.dumps({"reply": body})
    if "two_responses" in ins:
        body = body + "\n******\n" + body + " again"
    if "title" in ins:
        body = "<<reply>>\n" + body
    if "start_checker" in ins:
        body = ins["start_checker"]["starter"] + " " + body
    if "postscript" in ins:
        body += "\n" + ins["postscript"]["postscript_marker"] + " thanks"
    if "end_checker" in ins:
        body += "\n" + ins["end_checker"]["end_phrase"]
    if "quotation" in ins:
        body = f'"{body}"'
    if "english_lowercase" in ins:
        body = body.lower()
    if "english_capital" in ins:
        body = body.upper()
    return body


def test_every_committed_probe_is_satisfiable(monkeypatch):
    # the oracle's filler text is not recognisably English to langdetect; its language is not what is tested here
    monkeypatch.setattr(ifeval_module, "is_english", lambda text: True)
    recs = probes.load_ifeval_probes()
    out = evaluate_ifeval(recs, [_oracle_response(r) for r in recs])
    failed = [(r["id"], res["strict"]) for r, res in zip(recs, out["results"]) if not all(res["strict"])]
    assert not failed, failed[:5]
    assert out["prompt_level_strict"] == 1.0 and out["instruction_level_strict"] == 1.0
