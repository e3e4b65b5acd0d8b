"""Probe prompt sets: IFEval-style verifiable instructions and plain general prompts.

Both sets are built deterministically from the hand-written ``assets/probes/sources.yaml`` and
committed as JSONL under ``selfaug_jax/data/assets/probes/``:

* ``ifeval_probes.jsonl`` (300 lines): ``{"id", "prompt", "instructions": [{"type", "kwargs"}]}``.
  Each prompt is an everyday request followed by 1 to 3 constraint sentences; instruction types and
  kwargs are those of :mod:`selfaug_jax.eval.ifeval` (IFEval ids). Every type is the *first*
  constraint of 15 prompts (so each type appears at least 15 times); extra constraints are drawn at
  random among those compatible with the ones already chosen (:data:`CONFLICTS`).
  ``combination:repeat_prompt`` is always alone (its ``prompt_to_repeat`` is the request).
* ``general_prompts.jsonl`` (200 lines): ``{"id", "prompt", "category"}`` with categories explain,
  summarise (a short text is given), list, rewrite, math (short word problems), classify, translate.
  Used to measure distribution shift on ordinary instructions.
* ``knowledge_mc.jsonl`` (197 lines, hand-written, not generated): see :data:`KNOWLEDGE_MC_PATH`.

Regenerate with ``python -m selfaug_jax.data.probes [--out DIR]``; the output is a pure function of
``seed`` and the sources file.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import yaml

from selfaug_jax.data.readers import iter_jsonl_objects

ASSETS_DIR = Path(__file__).resolve().parent / "assets" / "probes"
SOURCES_PATH = ASSETS_DIR / "sources.yaml"
IFEVAL_FILE = "ifeval_probes.jsonl"
GENERAL_FILE = "general_prompts.jsonl"
KNOWLEDGE_MC_PATH = ASSETS_DIR / "knowledge_mc.jsonl"
"""197 four-option general-knowledge questions (geography, science, history, language, arithmetic, everyday
facts), written by hand for this project; ARC layout (``question``, ``choices.text/label``, ``answerKey``), gold
positions spread evenly over A-D. Scored by log-likelihood (:mod:`selfaug_jax.eval.multiple_choice`) as the
evaluation suite's ``knowledge_acc`` / ``knowledge_acc_norm``."""
GENERAL_CATEGORIES = ("explain", "summarise", "list", "rewrite", "math", "classify", "translate")

# ------------------------------------------------------------------------------ IFEval-style probes
TYPES = (
    "change_case:english_lowercase", "change_case:english_capital", "length_constraints:number_words",
    "length_constraints:number_sentences", "length_constraints:number_paragraphs", "keywords:existence",
    "keywords:forbidden_words", "keywords:frequency", "detectable_format:json_format",
    "detectable_format:number_bullet_lists", "startend:start_checker", "startend:end_checker",
    "punctuation:no_comma", "detectable_format:title", "startend:quotation", "detectable_content:number_placeholders",
    "detectable_format:number_highlighted_sections", "detectable_content:postscript", "combination:two_responses",
    "combination:repeat_prompt",
)
_SHORT = {t: t.split(":")[1] for t in TYPES}
# whole-response structures: at most one per prompt
_STRUCTURE = {"json_format", "number_bullet_lists", "number_paragraphs", "two_responses", "repeat_prompt",
              "quotation"}
_PAIRS = [
    ("english_lowercase", "english_capital"),
    *[(c, o) for c in ("english_lowercase", "english_capital")
      for o in ("start_checker", "end_checker", "json_format", "postscript")],
    *[("json_format", o) for o in ("number_sentences", "start_checker", "end_checker", "no_comma", "title",
                                   "number_placeholders", "number_highlighted_sections", "postscript")],
    *[("two_responses", o) for o in ("number_words", "number_sentences", "start_checker", "end_checker", "title",
                                     "postscript")],
    ("quotation", "start_checker"), ("start_checker", "title"), ("end_checker", "postscript"),
    ("number_bullet_lists", "number_highlighted_sections"), ("number_sentences", "number_paragraphs"),
]
CONFLICTS: dict[str, set[str]] = {s: set() for s in _SHORT.values()}
for _a, _b in _PAIRS + [(a, b) for a in _STRUCTURE for b in _STRUCTURE if a != b]:
    CONFLICTS[_a].add(_b)
    CONFLICTS[_b].add(_a)
CONFLICTS["repeat_prompt"] = set(_SHORT.values()) - {"repeat_prompt"}
for _s in CONFLICTS:
    if _s != "repeat_prompt":
        CONFLICTS[_s].add("repeat_prompt")

_STARTERS = ("My answer is", "Here is what I think", "In short", "To begin with", "Let me explain")
_ENDINGS = ("Is there anything else I can help with?", "Any other questions?", "Thank you for reading.",
            "That is all for now.", "Let me know what you think.")


def load_sources(path: str | Path = SOURCES_PATH) -> dict[str, Any]:
    """Read and check ``sources.yaml`` (errors name the file and the field)."""
    with open(path, encoding="utf-8") as f:
        src = yaml.safe_load(f)
    for key in ("ifeval_tasks", *GENERAL_CATEGORIES):
        if not isinstance(src.get(key), list) or not src[key]:
            raise ValueError(f"{path}: field {key!r} must be a non-empty list")
    for i, t in enumerate(src["ifeval_tasks"]):
        for field, typ in (("task", str), ("keywords", list), ("forbidden", list), ("freq", str)):
            if not isinstance(t.get(field), typ):
                raise ValueError(f"{path}: ifeval_tasks[{i}].{field} must be a {typ.__name__}")
        if set(t["keywords"]) & set(t["forbidden"]) or t["freq"] in t["forbidden"]:
            raise ValueError(f"{path}: ifeval_tasks[{i}]: a forbidden word is also a keyword / the freq word")
    return src


def _build(rng: random.Random, short: str, task: dict) -> tuple[str, dict]:
    """(description sentence, kwargs) of one instruction for ``task``."""
    if short == "english_lowercase":
        return ("Your entire response should be in English, and in all lowercase letters. No capital letters "
                "are allowed.", {})
    if short == "english_capital":
        return "Your entire response should be in English, and in all capital letters.", {}
    if short == "number_words":
        rel, n = rng.choice([("at least", rng.choice([50, 80, 100, 150])), ("at most", rng.choice([30, 50, 80, 100]))])
        return f"Answer with {rel} {n} words.", {"num_words": n, "relation": rel}
    if short == "number_sentences":
        rel, n = rng.choice([("at least", rng.choice([3, 5, 8])), ("at most", rng.choice([2, 3, 5]))])
        return f"Your response should contain {rel} {n} sentences.", {"num_sentences": n, "relation": rel}
    if short == "number_paragraphs":
        n = rng.choice([2, 3, 4])
        if rng.random() < 0.5:
            return (f"There should be {n} paragraphs. Paragraphs are separated with the markdown divider: ***",
                    {"num_paragraphs": n, "separator": "***"})
        return (f"There should be exactly {n} paragraphs, separated from each other by one blank line.",
                {"num_paragraphs": n, "separator": "blank_line"})
    if short == "existence":
        kws = sorted(rng.sample(task["keywords"], rng.choice([1, 2])))
        noun = "keyword" if len(kws) == 1 else "keywords"
        return f"Include the {noun} {' and '.join(repr(k) for k in kws)} in the response.", {"keywords": kws}
    if short == "forbidden_words":
        ws = sorted(rng.sample(task["forbidden"], rng.choice([1, 2])))
        noun = "word" if len(ws) == 1 else "words"
        return f"Do not include the {noun} {' or '.join(repr(w) for w in ws)} in the response.", {"forbidden_words": ws}
    if short == "frequency":
        rel, n = rng.choice([("at least", rng.choice([2, 3, 4])), ("less than", rng.choice([2, 3]))])
        return (f"In your response, the word '{task['freq']}' should appear {rel} {n} times.",
                {"keyword": task["freq"], "frequency": n, "relation": rel})
    if short == "json_format":
        return "Entire output should be wrapped in JSON format. You can use markdown ticks such as ```.", {}
    if short == "number_bullet_lists":
        n = rng.choice([2, 3, 4, 5])
        return (f"Your answer must contain exactly {n} bullet points. Use the markdown bullet points such as:\n"
                "* This is point 1.\n* This is point 2", {"num_bullets": n})
    if short == "start_checker":
        s = rng.choice(_STARTERS)
        return f"Start your response with the exact phrase '{s}'.", {"starter": s}
    if short == "end_checker":
        e = rng.choice(_ENDINGS)
        return (f'Finish your response with this exact phrase: "{e}" No other words should follow this phrase.',
                {"end_phrase": e})
    if short == "no_comma":
        return "In your entire response, refrain from the use of any commas.", {}
    if short == "title":
        return "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.", {}
    if short == "quotation":
        return "Wrap your entire response with double quotation marks.", {}
    if short == "number_placeholders":
        n = rng.choice([1, 2, 3, 4])
        return (f"The response must contain at least {n} placeholders represented by square brackets, such as "
                "[address].", {"num_placeholders": n})
    if short == "number_highlighted_sections":
        n = rng.choice([1, 2, 3])
        return (f"Highlight at least {n} sections in your answer with markdown, i.e. *highlighted section*.",
                {"num_highlights": n})
    if short == "postscript":
        m = rng.choice(["P.S.", "P.S.", "P.P.S"])
        return f"At the end of your response, please explicitly add a postscript starting with {m}", \
            {"postscript_marker": m}
    if short == "two_responses":
        return ("Give two different responses. Responses and only responses should be separated by 6 asterisk "
                "symbols: ******.", {})
    if short == "repeat_prompt":
        return ("First repeat the request word for word without change, then give your answer (1. do not say any "
                "words or characters before repeating the request; 2. the request you need to repeat does not "
                "include this sentence)", {"prompt_to_repeat": task["task"]})
    raise ValueError(f"unknown instruction {short!r}")


def generate_ifeval_probes(seed: int = 0, n: int = 300, sources: dict | None = None) -> list[dict]:
    """``n`` IFEval-style probe records (see the module docstring)."""
    src = sources or load_sources()
    rng = random.Random(f"selfaug-ifeval-probes-{seed}")
    tasks = list(src["ifeval_tasks"])
    rng.shuffle(tasks)
    firsts = [TYPES[i % len(TYPES)] for i in range(n)]
    rng.shuffle(firsts)
    by_short = {v: k for k, v in _SHORT.items()}
    records = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        first = _SHORT[firsts[i]]
        chosen: dict[str, dict] = {}
        descs = []
        target = 1 if first == "repeat_prompt" else rng.choice([1, 2, 2, 2, 3, 3])
        order = [first] + rng.sample(sorted(_SHORT.values()), len(_SHORT))
        for short in order:
            if len(chosen) == target:
                break
            if short in chosen or any(short in CONFLICTS[c] for c in chosen):
                continue
            desc, kw = _build(rng, short, task)
            chosen[short] = kw
            descs.append(desc)
        prompt = task["task"]
        for d in descs:  # a multi-line description (bullet example) ends its line
            prompt += ("\n" if "\n" in prompt else " ") + d
        records.append({"id": f"ifeval-{i:03d}", "prompt": prompt,
                        "instructions": [{"type": by_short[s], "kwargs": kw} for s, kw in chosen.items()]})
    return records


# ------------------------------------------------------------------------------ general prompts
_SUMMARISE_HEADS = ("Summarise the following text in one or two sentences:", "Give a short summary of this text:",
                    "What is the main point of the following passage? Answer briefly.",
                    "Summarize this news item for a busy reader:")


def generate_general_prompts(seed: int = 0, sources: dict | None = None) -> list[dict]:
    """The plain general prompts, in category order (ids ``general-000`` ...).

    Every source prompt is used once, except the math templates, each instantiated twice with
    random small integers ``a`` (40..400), ``b`` (2..9), ``c`` (3..9).
    """
    src = sources or load_sources()
    rng = random.Random(f"selfaug-general-prompts-{seed}")
    out: list[dict] = []

    def add(prompt: str, category: str) -> None:
        out.append({"id": f"general-{len(out):03d}", "prompt": prompt, "category": category})

    for cat in GENERAL_CATEGORIES:
        for item in src[cat]:
            if cat == "summarise":
                add(f"{rng.choice(_SUMMARISE_HEADS)}\n\n{item}", cat)
            elif cat == "math":
                for _ in range(2):
                    add(item.format(a=rng.randint(40, 400), b=rng.randint(2, 9), c=rng.randint(3, 9)), cat)
            else:
                add(item, cat)
    return out


# ------------------------------------------------------------------------------ files
def _to_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in records)


def write_probes(out_dir: str | Path = ASSETS_DIR, seed: int = 0) -> dict[str, Path]:
    """Generate both probe sets into ``out_dir``; returns ``{"ifeval": path, "general": path}``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = load_sources()
    paths = {"ifeval": out_dir / IFEVAL_FILE, "general": out_dir / GENERAL_FILE}
    paths["ifeval"].write_text(_to_jsonl(generate_ifeval_probes(seed, sources=src)), encoding="utf-8")
    paths["general"].write_text(_to_jsonl(generate_general_prompts(seed, sources=src)), encoding="utf-8")
    return paths


def _load(path: Path, required: tuple[str, ...]) -> list[dict]:
    return [rec for _, rec in iter_jsonl_objects(path, required)]


def load_ifeval_probes(path: str | Path = ASSETS_DIR / IFEVAL_FILE) -> list[dict]:
    """The committed IFEval-style probes (``id``, ``prompt``, ``instructions``)."""
    return _load(Path(path), ("id", "prompt", "instructions"))


def load_general_prompts(path: str | Path = ASSETS_DIR / GENERAL_FILE) -> list[dict]:
    """The committed general prompts (``id``, ``prompt``, ``category``)."""
    return _load(Path(path), ("id", "prompt", "category"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Regenerate the probe prompt sets (JSONL).")
    ap.add_argument("--out", default=str(ASSETS_DIR))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    for name, p in write_probes(a.out, a.seed).items():
        print(f"{name}: {p} ({p.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
