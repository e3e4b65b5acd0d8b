"""Readers for multiple-choice benchmark files, as published, into :class:`MCExample` records.

Formats (prompt templates follow lm-eval-harness' zero-shot defaults):

* **MMLU, hendrycks CSV** (``data/test/<subject>_test.csv``): no header, rows ``question,A,B,C,D,answer`` with
  ``answer`` a letter A-D; the subject comes from the file name (``abstract_algebra_test.csv`` ->
  ``abstract_algebra``). A directory reads every ``*.csv`` in it, sorted.
* **MMLU, HF ``cais/mmlu`` exported as JSONL**: ``{"question", "subject", "choices": [4 str], "answer": int}``.
  MMLU prompt: ``"The following are multiple choice questions (with answers) about {subject}.\\n\\n{question}\\n
  A. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:"``; the choices scored are the letters ``" A"`` .. ``" D"``.
* **ARC, AI2 JSONL** (``ARC-Challenge-Test.jsonl``): ``{"id", "question": {"stem", "choices": [{"text",
  "label"}]}, "answerKey"}``; labels may be ``A..E`` or ``1..5``. The HF ``allenai/ai2_arc`` layout
  (``"question": str, "choices": {"text": [...], "label": [...]}``) is accepted too. Prompt
  ``"Question: {stem}\\nAnswer:"``, choices = the answer texts.
* **HellaSwag JSONL** (``hellaswag_val.jsonl``): ``{"ind", "ctx", "ctx_a", "ctx_b", "activity_label", "endings",
  "label"}`` (``label`` int or digit string). Context ``preprocess(activity_label + ": " + ctx_a + " " +
  ctx_b.capitalize())``, choices ``preprocess(ending)``, where ``preprocess`` strips, turns ``" [title]"`` into
  ``". "``, drops ``[...]`` tags and collapses double spaces (lm-eval-harness ``hellaswag/utils.py``).

Every record keeps its ``source`` (``path:line``); malformed records raise ``ValueError`` naming it.
"""

from __future__ import annotations

import csv
import dataclasses
import re
from pathlib import Path
from typing import Any

from selfaug_jax.data.readers import iter_jsonl_objects

__all__ = [
    "MCExample",
    "MC_FORMATS",
    "read_mmlu_csv",
    "read_mmlu_jsonl",
    "read_arc_jsonl",
    "read_hellaswag_jsonl",
    "load_mc_dataset",
]

MC_FORMATS = ("mmlu_csv", "mmlu_jsonl", "arc", "hellaswag")
_LETTERS = "ABCDEFGHIJ"


@dataclasses.dataclass(frozen=True)
class MCExample:
    """One multiple-choice question.

    Attributes:
      context: prompt text the choices continue (no trailing delimiter).
      choices: choice texts; the scored continuation is ``target_delimiter + choices[i]``.
      label: index of the gold choice.
      source: ``path:line`` of the record (for error messages and debugging).
      dataset: ``"mmlu"``, ``"arc"``, ``"hellaswag"`` or a user name.
      subject: MMLU subject (``""`` otherwise).
      target_delimiter: text between context and choice (lm-eval-harness default ``" "``).
    """

    context: str
    choices: tuple[str, ...]
    label: int
    source: str
    dataset: str = ""
    subject: str = ""
    target_delimiter: str = " "

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise ValueError(f"{self.source}: need at least 2 choices, got {len(self.choices)}")
        if not 0 <= self.label < len(self.choices):
            raise ValueError(f"{self.source}: label {self.label} out of range for {len(self.choices)} choices")


def _mmlu_context(subject: str, question: str, options: list[str]) -> str:
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    lines = [question.strip()] + [f"{_LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    return header + "\n".join(lines) + "\nAnswer:"


def _mmlu_example(subject: str, question: str, options: list[str], label: int, source: str) -> MCExample:
    return MCExample(
        context=_mmlu_context(subject, question, options),
        choices=tuple(_LETTERS[: len(options)]),
        label=label,
        source=source,
        dataset="mmlu",
        subject=subject,
    )


def read_mmlu_csv(path: str | Path, subject: str | None = None) -> list[MCExample]:
    """Read one hendrycks MMLU CSV (no header: ``question,A,B,C,D,answer``, answer a letter A-D)."""
    path = Path(path)
    if subject is None:
        subject = re.sub(r"_(test|dev|val|train)$", "", path.stem)
    out = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        start = 1
        for row in reader:
            src = f"{path}:{start}"
            start = reader.line_num + 1
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != 6:
                raise ValueError(f"{src}: expected 6 columns (question,A,B,C,D,answer), got {len(row)}")
            answer = row[5].strip().upper()
            if answer not in _LETTERS[:4] or not answer:
                raise ValueError(f"{src}: field 'answer' must be one of A-D, got {row[5]!r}")
            out.append(_mmlu_example(subject, row[0], row[1:5], _LETTERS.index(answer), src))
    return out


def _field(rec: dict[str, Any], key: str, kind: type | tuple[type, ...], src: str) -> Any:
    if key not in rec:
        raise ValueError(f"{src}: missing field {key!r}")
    value = rec[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ValueError(f"{src}: field {key!r} must be {names}, got {type(value).__name__}")
    return value


def _str_list(value: Any, key: str, src: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{src}: field {key!r} must be a list of strings")
    return value


def _int_label(value: Any, key: str, n: int, src: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
        raise ValueError(f"{src}: field {key!r} must be an int in [0, {n}), got {value!r}")
    return value


def read_mmlu_jsonl(path: str | Path) -> list[MCExample]:
    """Read MMLU in the HF ``cais/mmlu`` layout, one JSON object per line."""
    path = Path(path)
    out = []
    for src, rec in iter_jsonl_objects(path):
        question = _field(rec, "question", str, src)
        subject = _field(rec, "subject", str, src)
        choices = _str_list(_field(rec, "choices", list, src), "choices", src)
        if not 2 <= len(choices) <= len(_LETTERS):
            raise ValueError(f"{src}: field 'choices' must have 2-{len(_LETTERS)} entries, got {len(choices)}")
        label = _int_label(rec.get("answer"), "answer", len(choices), src)
        out.append(_mmlu_example(subject, question, choices, label, src))
    return out


def read_arc_jsonl(path: str | Path) -> list[MCExample]:
    """Read ARC (AI2 nested layout, or the HF flattened layout)."""
    path = Path(path)
    out = []
    for src, rec in iter_jsonl_objects(path):
        q = _field(rec, "question", (dict, str), src)
        if isinstance(q, dict):
            stem = _field(q, "stem", str, src + " (question)")
            raw = _field(q, "choices", list, src + " (question)")
            texts, labels = [], []
            for j, c in enumerate(raw):
                if not isinstance(c, dict) or not isinstance(c.get("text"), str) or "label" not in c:
                    raise ValueError(f"{src}: question.choices[{j}] must be an object with 'text' and 'label'")
                texts.append(c["text"])
                labels.append(str(c["label"]))
        else:
            stem = q
            ch = _field(rec, "choices", dict, src)
            texts = _str_list(ch.get("text"), "choices.text", src)
            labels = [str(x) for x in ch.get("label", [])]
            if len(labels) != len(texts):
                raise ValueError(f"{src}: choices.text and choices.label differ in length")
        key = str(_field(rec, "answerKey", (str, int), src)).strip()
        if key not in labels:
            raise ValueError(f"{src}: field 'answerKey' {key!r} is not one of the choice labels {labels}")
        out.append(
            MCExample(
                context=f"Question: {stem}\nAnswer:",
                choices=tuple(texts),
                label=labels.index(key),
                source=src,
                dataset="arc",
            )
        )
    return out


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag_jsonl(path: str | Path) -> list[MCExample]:
    """Read HellaSwag (rowanz JSONL or the HF export; records without a gold label are an error)."""
    path = Path(path)
    out = []
    for src, rec in iter_jsonl_objects(path):
        ctx_a = _field(rec, "ctx_a", str, src)
        ctx_b = _field(rec, "ctx_b", str, src)
        activity = _field(rec, "activity_label", str, src)
        endings = _str_list(_field(rec, "endings", list, src), "endings", src)
        if len(endings) < 2:
            raise ValueError(f"{src}: field 'endings' needs at least 2 entries, got {len(endings)}")
        if rec.get("label") in (None, ""):
            raise ValueError(f"{src}: missing field 'label' (the HellaSwag test split has no gold labels)")
        label = _int_label(rec["label"], "label", len(endings), src)
        ctx = ctx_a + " " + ctx_b.capitalize()
        out.append(
            MCExample(
                context=_hellaswag_preprocess(activity + ": " + ctx),
                choices=tuple(_hellaswag_preprocess(e) for e in endings),
                label=label,
                source=src,
                dataset="hellaswag",
            )
        )
    return out


def _sniff_jsonl(path: Path) -> str:
    for src, rec in iter_jsonl_objects(path):
        if "endings" in rec and "ctx_a" in rec:
            return "hellaswag"
        if "answerKey" in rec:
            return "arc"
        if "subject" in rec and "choices" in rec:
            return "mmlu_jsonl"
        raise ValueError(f"{src}: cannot tell the format from keys {sorted(rec)}; pass fmt= one of {MC_FORMATS}")
    raise ValueError(f"{path}: empty file")


def load_mc_dataset(path: str | Path, fmt: str = "auto") -> list[MCExample]:
    """Load a file (or, for ``mmlu_csv``, a directory of CSVs) in ``fmt`` (``"auto"`` sniffs it).

    ``auto``: a directory or ``.csv`` -> ``mmlu_csv``; JSON lines -> by keys (``endings``+``ctx_a`` ->
    hellaswag, ``answerKey`` -> arc, ``subject``+``choices`` -> mmlu_jsonl).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if fmt == "auto":
        fmt = "mmlu_csv" if path.is_dir() or path.suffix.lower() == ".csv" else _sniff_jsonl(path)
    if fmt == "mmlu_csv":
        files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
        if not files:
            raise ValueError(f"{path}: no *.csv files")
        return [ex for f in files for ex in read_mmlu_csv(f)]
    readers = {"mmlu_jsonl": read_mmlu_jsonl, "arc": read_arc_jsonl, "hellaswag": read_hellaswag_jsonl}
    if fmt not in readers:
        raise ValueError(f"unknown multiple-choice format {fmt!r}; expected 'auto' or one of {MC_FORMATS}")
    return readers[fmt](path)
