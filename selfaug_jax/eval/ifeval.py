"""IFEval-style verifiable-instruction checkers and the strict / loose accuracy metrics.

Instruction ids and kwargs follow google-research ``instruction_following_eval`` (IFEval), and so do
the checking rules unless noted; the code is written for this project. A probe record is::

    {"id": str, "prompt": str, "instructions": [{"type": "<group>:<name>", "kwargs": {...}}, ...]}

``CHECKERS[type](response, kwargs) -> bool``. :func:`check_instruction` validates the kwargs first
(missing / unknown kwargs raise ``ValueError`` naming the type and field; ``None``-valued kwargs are
ignored, as in IFEval's own input files).

Counting rules (as IFEval unless marked *ours*):

* words: runs of ``\\w`` characters (IFEval's ``RegexpTokenizer(r"\\w+")``).
* sentences (*ours*, IFEval uses NLTK punkt, which we do not depend on): split after ``.``, ``!``,
  ``?`` (runs count once, closing quotes/brackets included) followed by whitespace or the end; a
  single ``.`` does not split after common abbreviations (Mr., Dr., e.g., etc., P.S., ...), single-letter
  initials or "No." before a digit (a lowercase next word still splits, so all-lowercase answers
  count normally); numbers like ``3.5`` never split; segments without a word character are not sentences. Line breaks alone do not end a
  sentence (as with punkt).
* relations: ``"less than"`` (<) and ``"at least"`` (>=) as IFEval, plus ``"at most"`` (<=, *ours*).
* ``length_constraints:number_paragraphs``: IFEval splits on the markdown divider ``***`` (an empty
  paragraph other than the first/last fails); with ``separator="blank_line"`` (*ours*) paragraphs are
  separated by one or more blank lines.
* ``detectable_format:number_bullet_lists``: lines starting with ``*`` (not ``**``) or ``-``, exact count.
* ``keywords:existence`` / ``keywords:frequency``: case-insensitive *substring* matches (IFEval),
  the keyword is taken literally (``re.escape``, *ours*); ``keywords:forbidden_words``: whole words.
* ``change_case:*``: ``str.islower()`` / ``str.isupper()`` and ``langdetect`` says English (True when it cannot
  decide), as IFEval; our detector is seeded (0), lm-eval's is not (``language:response_language`` is not offered).
* ``startend:start_checker`` (*ours*; IFEval's unregistered start checker accepts the phrase at the
  start of any line): the response, stripped of leading whitespace, starts with the phrase
  (case-insensitive).

Loose scoring (IFEval): an instruction is followed if any of the response, the response without its
first line, without its last line, without both, or any of these with all ``*`` removed, is
non-empty and passes.

**Parity with lm-evaluation-harness** (``lm_eval/tasks/ifeval``, version 0.4.13; ``tests/test_ifeval_parity.py``):
on every shipped probe and hand-written records, times 49 fixture responses (``tests/fixtures/
ifeval_parity_responses.json``), the per-instruction strict and loose results -- hence the prompt- and
instruction-level strict and loose accuracies -- are identical, for every instruction type the probes use except
the two below. Remaining deviations, all of them:

1. ``length_constraints:number_sentences`` is *not verified*: lm-eval counts sentences with NLTK's punkt model,
   which it downloads at import time; offline there is no punkt data, so our rule above (written to agree with punkt
   on ordinary prose) cannot be compared. Expect differences on unusual punctuation.
2. ``startend:start_checker`` (ours; not registered in lm-eval), ``number_paragraphs`` with
   ``separator="blank_line"`` (ours) and the relation ``"at most"`` (ours; compared as lm-eval's ``"less than" N+1``).
3. Keywords are matched literally (``re.escape``); lm-eval passes them to ``re.search`` as patterns (identical for
   plain words, which is all the probes use).
4. Kwargs: we drop only ``None`` values and raise on a missing or unknown one; lm-eval drops every falsy value
   (e.g. ``num_placeholders=0``) and draws a *random* value for a missing one.
5. ``change_case:*``: our ``langdetect`` detector is seeded (0); lm-eval's is not, so on borderline short texts
   lm-eval's own result can vary from run to run (the parity test seeds lm-eval's too).
6. Types not offered: ``language:response_language``, ``change_case:capital_word_frequency`` (punkt again),
   ``keywords:letter_frequency``, ``length_constraints:nth_paragraph_first_word``,
   ``detectable_format:constrained_response``, ``detectable_format:multiple_sections``.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Callable

__all__ = ["CHECKERS", "INSTRUCTION_KWARGS", "RELATIONS", "count_words", "count_sentences", "split_sentences",
           "check_instruction", "loose_variants", "evaluate_ifeval"]

RELATIONS = ("less than", "at least", "at most")


# ------------------------------------------------------------------------------------ counting
def count_words(text: str) -> int:
    """Number of ``\\w+`` tokens."""
    return len(re.findall(r"\w+", text))


_ABBREVIATIONS = ("mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "inc", "ltd", "co", "e.g", "i.e",
                  "fig", "approx", "dept", "est", "mt", "capt", "lt", "gen", "ph.d", "a.m", "p.m", "u.s", "p.s", "p.p.s")
_SENT_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences (see the module docstring for the rule)."""
    sentences, start = [], 0
    for m in _SENT_END.finditer(text):
        before = text[start:m.start()]
        last = re.search(r"([\w.]+)$", before)
        token = last.group(1).lower() if last else ""
        if m.group(0).startswith(".") and len(m.group(0).rstrip("\"'”’)]")) == 1:
            nxt = text[m.end():].lstrip()[:1]
            if token in _ABBREVIATIONS or (len(token) == 1 and token.isalpha()) or (token == "no" and nxt.isdigit()):
                continue  # "Dr. Smith" / "J. Doe" / "e.g. this" / "No. 5": not a sentence end
        sentences.append(text[start:m.end()])
        start = m.end()
    sentences.append(text[start:])
    return [s.strip() for s in sentences if re.search(r"\w", s)]


def count_sentences(text: str) -> int:
    """Number of sentences of ``text`` (:func:`split_sentences`)."""
    return len(split_sentences(text))


def _compare(value: int, relation: str, threshold: int, type_: str) -> bool:
    if relation == "less than":
        return value < threshold
    if relation == "at least":
        return value >= threshold
    if relation == "at most":
        return value <= threshold
    raise ValueError(f"{type_}: kwarg 'relation' must be one of {RELATIONS}, got {relation!r}")


# ------------------------------------------------------------------------------------ checkers
@functools.lru_cache(maxsize=1)
def _language_detector_factory() -> Any:
    """langdetect's profiles, loaded once, in a factory of our own whose detectors are seeded (langdetect samples;
    lm-eval uses the unseeded global factory, so its result on borderline texts can vary between runs)."""
    from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory

    factory = DetectorFactory()
    factory.load_profile(PROFILES_DIRECTORY)
    factory.seed = 0
    return factory


def is_english(text: str) -> bool:
    """langdetect's verdict ``== "en"``; True when it cannot decide (e.g. no letters), as IFEval's checkers."""
    from langdetect.lang_detect_exception import LangDetectException

    try:
        detector = _language_detector_factory().create()
        detector.append(text)
        return detector.detect() == "en"
    except LangDetectException:
        return True


def _lowercase(r: str, kw: dict) -> bool:
    return r.islower() and is_english(r)


def _uppercase(r: str, kw: dict) -> bool:
    return r.isupper() and is_english(r)


def _number_words(r: str, kw: dict) -> bool:
    return _compare(count_words(r), kw["relation"], kw["num_words"], "length_constraints:number_words")


def _number_sentences(r: str, kw: dict) -> bool:
    return _compare(count_sentences(r), kw["relation"], kw["num_sentences"], "length_constraints:number_sentences")


def _number_paragraphs(r: str, kw: dict) -> bool:
    sep = kw.get("separator", "***")
    if sep == "***":
        parts = re.split(r"\s?\*\*\*\s?", r)
        n = len(parts)
        for i, p in enumerate(parts):
            if not p.strip():
                if i in (0, len(parts) - 1):
                    n -= 1
                else:
                    return False
        return n == kw["num_paragraphs"]
    if sep == "blank_line":
        return len([p for p in re.split(r"\n[ \t]*\n", r) if p.strip()]) == kw["num_paragraphs"]
    raise ValueError(f"length_constraints:number_paragraphs: kwarg 'separator' must be '***' or 'blank_line', "
                     f"got {sep!r}")


def _keywords_existence(r: str, kw: dict) -> bool:
    return all(re.search(re.escape(k), r, flags=re.IGNORECASE) for k in kw["keywords"])


def _forbidden_words(r: str, kw: dict) -> bool:
    return not any(re.search(r"\b" + re.escape(w) + r"\b", r, flags=re.IGNORECASE) for w in kw["forbidden_words"])


def _keyword_frequency(r: str, kw: dict) -> bool:
    n = len(re.findall(re.escape(kw["keyword"].strip()), r, flags=re.IGNORECASE))
    return _compare(n, kw["relation"], kw["frequency"], "keywords:frequency")


def _json_format(r: str, kw: dict) -> bool:
    v = r.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):
        if v.startswith(prefix):
            v = v[len(prefix):]
            break
    if v.endswith("```"):
        v = v[:-3]
    try:
        json.loads(v.strip())
    except ValueError:
        return False
    return True


def _bullet_lists(r: str, kw: dict) -> bool:
    stars = re.findall(r"^\s*\*[^\*].*$", r, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", r, flags=re.MULTILINE)
    return len(stars) + len(dashes) == kw["num_bullets"]


def _start_checker(r: str, kw: dict) -> bool:
    return r.lstrip().lower().startswith(kw["starter"].strip().lower())


def _end_checker(r: str, kw: dict) -> bool:
    return r.strip().strip('"').lower().endswith(kw["end_phrase"].strip().lower())


def _no_comma(r: str, kw: dict) -> bool:
    return "," not in r


def _title(r: str, kw: dict) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", r))


def _quotation(r: str, kw: dict) -> bool:
    v = r.strip()
    return len(v) > 1 and v[0] == '"' and v[-1] == '"'


def _placeholders(r: str, kw: dict) -> bool:
    return len(re.findall(r"\[.*?\]", r)) >= kw["num_placeholders"]


def _highlighted_sections(r: str, kw: dict) -> bool:
    n = sum(1 for h in re.findall(r"\*[^\n\*]*\*", r) if h.strip("*").strip())
    n += sum(1 for h in re.findall(r"\*\*[^\n\*]*\*\*", r) if h[2:-2].strip())
    return n >= kw["num_highlights"]


def _postscript(r: str, kw: dict) -> bool:
    marker = kw["postscript_marker"].strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.findall(pattern, r.lower(), flags=re.MULTILINE))


def _two_responses(r: str, kw: dict) -> bool:
    parts = r.split("******")
    valid = []
    for i, p in enumerate(parts):
        if not p.strip():
            if i not in (0, len(parts) - 1):
                return False
        else:
            valid.append(p.strip())
    return len(valid) == 2 and valid[0] != valid[1]


def _repeat_prompt(r: str, kw: dict) -> bool:
    return r.strip().lower().startswith(kw["prompt_to_repeat"].strip().lower())


CHECKERS: dict[str, Callable[[str, dict], bool]] = {
    "change_case:english_lowercase": _lowercase,
    "change_case:english_capital": _uppercase,
    "length_constraints:number_words": _number_words,
    "length_constraints:number_sentences": _number_sentences,
    "length_constraints:number_paragraphs": _number_paragraphs,
    "keywords:existence": _keywords_existence,
    "keywords:forbidden_words": _forbidden_words,
    "keywords:frequency": _keyword_frequency,
    "detectable_format:json_format": _json_format,
    "detectable_format:number_bullet_lists": _bullet_lists,
    "detectable_format:title": _title,
    "detectable_format:number_highlighted_sections": _highlighted_sections,
    "detectable_content:number_placeholders": _placeholders,
    "detectable_content:postscript": _postscript,
    "startend:start_checker": _start_checker,
    "startend:end_checker": _end_checker,
    "startend:quotation": _quotation,
    "punctuation:no_comma": _no_comma,
    "combination:two_responses": _two_responses,
    "combination:repeat_prompt": _repeat_prompt,
}
"""Instruction type -> ``checker(response, kwargs) -> bool`` (kwargs already validated)."""

# type -> (required kwargs with their Python types, optional kwargs with their types)
INSTRUCTION_KWARGS: dict[str, tuple[dict[str, type], dict[str, type]]] = {
    "change_case:english_lowercase": ({}, {}),
    "change_case:english_capital": ({}, {}),
    "length_constraints:number_words": ({"num_words": int, "relation": str}, {}),
    "length_constraints:number_sentences": ({"num_sentences": int, "relation": str}, {}),
    "length_constraints:number_paragraphs": ({"num_paragraphs": int}, {"separator": str}),
    "keywords:existence": ({"keywords": list}, {}),
    "keywords:forbidden_words": ({"forbidden_words": list}, {}),
    "keywords:frequency": ({"keyword": str, "frequency": int, "relation": str}, {}),
    "detectable_format:json_format": ({}, {}),
    "detectable_format:number_bullet_lists": ({"num_bullets": int}, {}),
    "detectable_format:title": ({}, {}),
    "detectable_format:number_highlighted_sections": ({"num_highlights": int}, {}),
    "detectable_content:number_placeholders": ({"num_placeholders": int}, {}),
    "detectable_content:postscript": ({"postscript_marker": str}, {}),
    "startend:start_checker": ({"starter": str}, {}),
    "startend:end_checker": ({"end_phrase": str}, {}),
    "startend:quotation": ({}, {}),
    "punctuation:no_comma": ({}, {}),
    "combination:two_responses": ({}, {}),
    "combination:repeat_prompt": ({"prompt_to_repeat": str}, {}),
}


def validate_kwargs(type_: str, kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return the kwargs without ``None`` values; raise ``ValueError`` naming the type and field on an
    unknown type, a missing / unknown kwarg, a wrongly typed value or a bad relation."""
    if type_ not in CHECKERS:
        raise ValueError(f"unknown instruction type {type_!r}; known: {sorted(CHECKERS)}")
    kw = {k: v for k, v in (kwargs or {}).items() if v is not None}
    required, optional = INSTRUCTION_KWARGS[type_]
    for name, typ in required.items():
        if name not in kw:
            raise ValueError(f"{type_}: missing kwarg {name!r}")
    for name, value in kw.items():
        typ = required.get(name, optional.get(name))
        if typ is None:
            raise ValueError(f"{type_}: unknown kwarg {name!r} (allowed: {sorted({**required, **optional})})")
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ValueError(f"{type_}: kwarg {name!r} must be {typ.__name__}, got {type(value).__name__}")
        if typ is list and not all(isinstance(x, str) for x in value):
            raise ValueError(f"{type_}: kwarg {name!r} must be a list of strings")
    if "relation" in kw and kw["relation"] not in RELATIONS:
        raise ValueError(f"{type_}: kwarg 'relation' must be one of {RELATIONS}, got {kw['relation']!r}")
    return kw


def check_instruction(type_: str, response: str, kwargs: Mapping[str, Any] | None = None) -> bool:
    """Validate ``kwargs`` and run the checker of ``type_`` on ``response``."""
    if not isinstance(response, str):
        raise TypeError(f"{type_}: response must be a str, got {type(response).__name__}")
    kw = validate_kwargs(type_, kwargs)
    return bool(CHECKERS[type_](response, kw))


def loose_variants(response: str) -> list[str]:
    """IFEval's loose-mode variants of a response (see the module docstring)."""
    lines = response.split("\n")
    base = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return base + [v.replace("*", "") for v in base]


# ------------------------------------------------------------------------------------ evaluation
def _align(records: Sequence[Mapping], responses: Sequence[str] | Mapping[str, str]) -> list[str]:
    if isinstance(responses, Mapping):
        missing = [r["id"] for r in records if r["id"] not in responses]
        if missing:
            raise ValueError(f"evaluate_ifeval: no response for ids {missing[:5]}{'...' if len(missing) > 5 else ''}")
        return [responses[r["id"]] for r in records]
    if len(responses) != len(records):
        raise ValueError(f"evaluate_ifeval: {len(records)} records but {len(responses)} responses")
    return list(responses)


def evaluate_ifeval(records: Sequence[Mapping], responses: Sequence[str] | Mapping[str, str]) -> dict[str, Any]:
    """Score ``responses`` (aligned list, or ``{id: response}``) against the probe ``records``.

    Returns ``prompt_level_strict`` (fraction of prompts whose constraints all pass),
    ``instruction_level_strict`` (fraction of all constraints that pass), the ``*_loose`` versions,
    ``per_type`` = ``{type: {"count", "strict", "loose"}}``, ``num_prompts``, ``num_instructions`` and
    ``results`` = per prompt ``{"id", "strict": [bool...], "loose": [bool...]}``. An empty (or
    whitespace-only) response fails every constraint.
    """
    resp = _align(records, responses)
    results, per_type = [], {}
    for rec, response in zip(records, resp):
        if not isinstance(response, str):
            raise TypeError(f"evaluate_ifeval: response for {rec.get('id')!r} must be a str")
        strict, loose = [], []
        variants = loose_variants(response)
        for j, ins in enumerate(rec["instructions"]):
            try:
                kw = validate_kwargs(ins["type"], ins.get("kwargs"))
            except ValueError as err:
                raise ValueError(f"record {rec.get('id')!r} instructions[{j}]: {err}") from err
            fn = CHECKERS[ins["type"]]
            s = bool(response.strip()) and bool(fn(response, kw))
            lo = s or any(v.strip() and fn(v, kw) for v in variants)
            strict.append(s)
            loose.append(bool(lo))
            t = per_type.setdefault(ins["type"], [0, 0, 0])
            t[0], t[1], t[2] = t[0] + 1, t[1] + s, t[2] + bool(lo)
        results.append({"id": rec.get("id"), "strict": strict, "loose": loose})
    n_p = len(results)
    n_i = sum(len(r["strict"]) for r in results)

    def frac(num: int, den: int) -> float:
        return num / den if den else float("nan")

    return {
        "prompt_level_strict": frac(sum(all(r["strict"]) for r in results), n_p),
        "instruction_level_strict": frac(sum(sum(r["strict"]) for r in results), n_i),
        "prompt_level_loose": frac(sum(all(r["loose"]) for r in results), n_p),
        "instruction_level_loose": frac(sum(sum(r["loose"]) for r in results), n_i),
        "per_type": {t: {"count": c, "strict": s / c, "loose": lo / c} for t, (c, s, lo) in sorted(per_type.items())},
        "num_prompts": n_p,
        "num_instructions": n_i,
        "results": results,
    }
