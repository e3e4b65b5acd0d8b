"""Readers for RAG SFT data: our JSONL schema, CRAG task 1, RAG-Instruct; :func:`read_examples` dispatches to
them and to :mod:`selfaug_jax.data.formats` (Alpaca, ShareGPT, OpenAI messages, a column mapping, Parquet / Arrow
/ ``save_to_disk`` files).

All readers are generators of :class:`~selfaug_jax.data.schema.RagExample` and raise
:class:`~selfaug_jax.data.schema.DataFormatError` (or its subclass ``SchemaError``) whose message
starts with ``path:line`` for malformed input.  Files ending in ``.bz2``, ``.gz`` or ``.xz`` are
decompressed transparently.  Whatever a reader leaves out (records of another split, empty
documents, pages cut to ``max_page_chars``) is counted in an optional :class:`ReaderStats` and
logged when the file has been read completely.

Formats
-------
* **Ours** (``.jsonl``): one :meth:`RagExample.from_dict` object per line; blank lines are allowed.
* **CRAG task 1** (``crag_task_1_dev_v4_release.jsonl.bz2``; facebookresearch/CRAG
  ``docs/dataset.md``): one record per line with ``interaction_id``, ``query``, ``answer``,
  ``alt_ans``, ``split`` (0 = validation, 1 = public test), ``domain``, ``question_type``,
  ``static_or_dynamic``, ``query_time`` and ``search_results`` (list of ``page_name``,
  ``page_url``, ``page_snippet``, ``page_result`` (full HTML), ``page_last_modified``), 5 pages.
  Documents are the snippets (default) or the HTML page bodies converted to text (BeautifulSoup
  ``get_text`` or ``html2text``), cut to ``max_page_chars``.
* **RAG-Instruct** (FreedomIntelligence/RAG-Instruct, ``rag_instruct.json``): a JSON array of
  records with ``question``, ``answer`` and ``documents`` (list of passage strings, 10 per record
  in the release); ``instruction``/``output`` are accepted as aliases, a JSON-lines file too.
  Other fields are kept in ``meta``.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import io
import json
import logging
import lzma
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TextIO

from selfaug_jax.data.schema import DataFormatError, Document, RagExample, SchemaError

__all__ = [
    "ReaderStats",
    "open_text",
    "iter_jsonl_records",
    "iter_json_array_records",
    "read_jsonl",
    "write_jsonl",
    "html_to_text",
    "read_crag_task1",
    "read_rag_instruct",
    "read_examples",
    "CRAG_SPLITS",
    "READER_FORMATS",
    "resolve_format",
]

logger = logging.getLogger(__name__)

CRAG_SPLITS = {"validation": 0, "public_test": 1}


@dataclasses.dataclass
class ReaderStats:
    """What a reader read, produced and left out."""

    n_records: int = 0
    n_examples: int = 0
    n_other_split: int = 0
    n_documents: int = 0
    n_empty_documents: int = 0
    n_page_fallbacks: int = 0
    n_truncated_pages: int = 0
    n_documents_over_limit: int = 0
    n_skipped: int = 0  # records that gave no example (the alpaca / sharegpt / openai readers), by reason below
    skip_reasons: dict[str, int] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def open_text(path: str | Path) -> TextIO:
    """Open a (possibly bz2/gzip/xz compressed) UTF-8 text file."""
    p = str(path)
    if p.endswith(".bz2"):
        return io.TextIOWrapper(bz2.open(p, "rb"), encoding="utf-8")
    if p.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(p, "rb"), encoding="utf-8")
    if p.endswith(".xz"):
        return io.TextIOWrapper(lzma.open(p, "rb"), encoding="utf-8")
    return open(p, encoding="utf-8")


def iter_jsonl_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, parsed_json)`` for every non-blank line; bad JSON -> file:line error."""
    with open_text(path) as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataFormatError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        except (OSError, EOFError, UnicodeDecodeError) as e:  # corrupt archive, bad encoding
            raise DataFormatError(f"{path}:{lineno + 1}: cannot read ({e})") from None


def iter_jsonl_objects(path: str | Path, required: tuple[str, ...] = ()) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``("path:line", record)`` for every non-blank line, each a JSON object with the ``required`` fields.

    Blank lines are skipped (and counted in the line numbers); bad JSON, a non-object line or a missing field
    raises :class:`DataFormatError` naming ``path:line``. Compressed files are read as by :func:`open_text`.
    """
    for lineno, rec in iter_jsonl_records(path):
        where = f"{path}:{lineno}"
        if not isinstance(rec, dict):
            raise DataFormatError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        missing = [k for k in required if k not in rec]
        if missing:
            raise DataFormatError(f"{where}: missing fields {missing}")
        yield where, rec


_WS = re.compile(r"[ \t\r\n]*")


def iter_json_array_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, element)`` for each element of a top-level JSON array.

    The line number is where the element starts, so schema errors can name it.  A file that does
    not start with ``[`` is read as JSON lines instead.
    """
    with open_text(path) as f:
        text = f.read()
    pos = _WS.match(text, 0).end()  # type: ignore[union-attr]
    if pos >= len(text) or text[pos] != "[":
        yield from iter_jsonl_records(path)
        return
    decoder = json.JSONDecoder()
    line, counted_to = 1, 0

    def line_at(i: int) -> int:
        nonlocal line, counted_to
        line += text.count("\n", counted_to, i)
        counted_to = i
        return line

    pos += 1
    while True:
        pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
        if pos >= len(text):
            raise DataFormatError(f"{path}:{line_at(pos)}: unexpected end of file inside the JSON array")
        if text[pos] == "]":
            return
        start_line = line_at(pos)
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        yield start_line, obj
        pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos < len(text) and text[pos] == "]":
            return
        else:
            raise DataFormatError(f"{path}:{line_at(pos)}: expected ',' or ']' after an array element")


# ---------------------------------------------------------------------------------------------
# our JSONL schema

def read_jsonl(path: str | Path, *, strict: bool = False) -> Iterator[RagExample]:
    """Read our JSONL schema (see :mod:`selfaug_jax.data.schema`).

    Examples without an ``id`` get ``"<file name>:<line>"``.
    """
    name = Path(path).name
    n = 0
    for lineno, obj in iter_jsonl_records(path):
        yield RagExample.from_dict(obj, where=f"{path}:{lineno}", default_id=f"{name}:{lineno}", strict=strict)
        n += 1
    logger.info("read %d examples from %s", n, path)


def write_jsonl(examples: Iterable[RagExample], path: str | Path) -> int:
    """Write examples in our JSONL schema; returns the number written."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n")
            n += 1
    return n


# ---------------------------------------------------------------------------------------------
# CRAG task 1

def html_to_text(html: str, converter: Literal["bs4", "html2text"] = "bs4") -> str:
    """Visible text of an HTML page: one line per block; blank lines, scripts, styles, ``<head>``,
    ``<nav>`` and ``<footer>`` removed (bs4); html2text keeps its Markdown layout."""
    if converter == "bs4":
        from bs4 import BeautifulSoup

        soup = BeautifulSoup(html, "html.parser")
        for tag in soup(["script", "style", "noscript", "template", "head", "nav", "footer"]):
            tag.decompose()
        raw = soup.get_text(separator="\n")
    elif converter == "html2text":
        import html2text

        h = html2text.HTML2Text()
        h.ignore_links = True
        h.ignore_images = True
        h.ignore_emphasis = True
        h.body_width = 0
        raw = h.handle(html)
    else:
        raise ValueError(f"converter must be 'bs4' or 'html2text', got {converter!r}")
    lines = (" ".join(ln.split()) for ln in raw.splitlines())
    return "\n".join(ln for ln in lines if ln)


def _cut(text: str, max_chars: int | None) -> tuple[str, bool]:
    if max_chars is None or len(text) <= max_chars:
        return text, False
    cut = text[:max_chars]
    space = max(cut.rfind(" "), cut.rfind("\n"))
    if space > max_chars // 2:  # prefer a word boundary when one is near
        cut = cut[:space]
    return cut.rstrip(), True


def _req(rec: Mapping[str, Any], key: str, types: type | tuple[type, ...], where: str) -> Any:
    if key not in rec:
        raise SchemaError(f"{where}: missing field {key!r}")
    v = rec[key]
    if not isinstance(v, types):
        raise SchemaError(f"{where}: field {key!r} has type {type(v).__name__}")
    return v


def read_crag_task1(
    path: str | Path,
    *,
    split: Literal["validation", "public_test", "all"] | int = "all",
    document_source: Literal["snippet", "page"] = "snippet",
    html_converter: Literal["bs4", "html2text"] = "bs4",
    max_page_chars: int | None = 4000,
    fallback_to_snippet: bool = True,
    system: str | None = None,
    stats: ReaderStats | None = None,
) -> Iterator[RagExample]:
    """Read CRAG task 1 records (``.jsonl`` or ``.jsonl.bz2``) as RAG examples.

    Args:
      split: ``"validation"`` (split 0, the paper's training set), ``"public_test"`` (split 1) or
        ``"all"``; an int selects the raw ``split`` value.
      document_source: ``"snippet"`` uses ``page_snippet``; ``"page"`` converts ``page_result``
        HTML to text with ``html_converter`` and cuts it to ``max_page_chars`` characters.
      fallback_to_snippet: in page mode, use the snippet when the page body is empty (counted).
      system: optional system prompt for every example.
      stats: filled with counts (records, other split, empty documents, cut pages...).

    Documents keep the search-result order; empty ones are left out and counted.  ``meta`` holds
    ``alt_ans``, ``domain``, ``question_type``, ``static_or_dynamic``, ``split``, ``query_time``
    and the page URLs.
    """
    if document_source not in ("snippet", "page"):
        raise ValueError(f"document_source must be 'snippet' or 'page', got {document_source!r}")
    if isinstance(split, str):
        if split != "all" and split not in CRAG_SPLITS:
            raise ValueError(f"split must be one of {['all', *CRAG_SPLITS]} or an int, got {split!r}")
        want = None if split == "all" else CRAG_SPLITS[split]
    else:
        want = int(split)
    st = stats if stats is not None else ReaderStats()
    for lineno, rec in iter_jsonl_records(path):
        where = f"{path}:{lineno}"
        st.n_records += 1
        if not isinstance(rec, Mapping):
            raise SchemaError(f"{where}: a CRAG record must be a JSON object, got {type(rec).__name__}")
        rec_split = rec.get("split")
        if want is not None:
            if not isinstance(rec_split, int):
                raise SchemaError(f"{where}: field 'split' must be 0 or 1 to filter by split, got {rec_split!r}")
            if rec_split != want:
                st.n_other_split += 1
                continue
        ex_id = str(rec.get("interaction_id", f"{Path(path).name}:{lineno}"))
        where_id = f"{where}: example {ex_id!r}"
        query = _req(rec, "query", str, where_id)
        answer = _req(rec, "answer", (str, int, float), where_id)
        results = _req(rec, "search_results", list, where_id)
        docs: list[Document] = []
        urls: list[str | None] = []
        for i, page in enumerate(results):
            pw = f"{where_id}: search_results[{i}]"
            if not isinstance(page, Mapping):
                raise SchemaError(f"{pw}: must be an object")
            snippet = page.get("page_snippet") or ""
            if not isinstance(snippet, str):
                raise SchemaError(f"{pw}: field 'page_snippet' must be a string")
            text = snippet.strip()
            if document_source == "page":
                html = page.get("page_result") or ""
                if not isinstance(html, str):
                    raise SchemaError(f"{pw}: field 'page_result' must be a string")
                body, was_cut = _cut(html_to_text(html, html_converter), max_page_chars)
                if body:
                    text = body
                    st.n_truncated_pages += int(was_cut)
                elif fallback_to_snippet and text:
                    st.n_page_fallbacks += 1
                else:
                    text = ""
            if not text:
                st.n_empty_documents += 1
                continue
            title = page.get("page_name")
            docs.append(Document(text=text, title=title.strip() if isinstance(title, str) and title.strip() else None))
            urls.append(page.get("page_url"))
        st.n_documents += len(docs)
        alt = rec.get("alt_ans") or []
        meta = {
            "source": "crag_task1",
            "alt_ans": [str(a) for a in alt] if isinstance(alt, list) else [str(alt)],
            "domain": rec.get("domain"),
            "question_type": rec.get("question_type"),
            "static_or_dynamic": rec.get("static_or_dynamic"),
            "split": rec_split,
            "query_time": rec.get("query_time"),
            "page_urls": urls,
        }
        try:
            ex = RagExample(id=ex_id, question=query, documents=tuple(docs), answer=str(answer),
                            system=system, meta=meta)
        except SchemaError as e:
            raise SchemaError(f"{where}: {e}") from None
        st.n_examples += 1
        yield ex
    logger.info("read CRAG task 1 %s (split=%s, documents=%s): %s", path, split, document_source, st.as_dict())


# ---------------------------------------------------------------------------------------------
# RAG-Instruct

_RI_QUESTION = ("question", "instruction")
_RI_ANSWER = ("answer", "output")


def read_rag_instruct(
    path: str | Path,
    *,
    max_documents: int | None = None,
    system: str | None = None,
    stats: ReaderStats | None = None,
) -> Iterator[RagExample]:
    """Read FreedomIntelligence/RAG-Instruct (``rag_instruct.json``: JSON array, or JSON lines).

    ``max_documents`` keeps the first N documents (the release has 10 per record); the others are
    counted in ``stats.n_documents_over_limit``.  Empty documents are left out and counted.
    Records without ``id`` get ``"rag_instruct-<index>"`` (0-based position in the file).
    """
    st = stats if stats is not None else ReaderStats()
    for index, (lineno, rec) in enumerate(iter_json_array_records(path)):
        where = f"{path}:{lineno}"
        st.n_records += 1
        if not isinstance(rec, Mapping):
            raise SchemaError(f"{where}: a RAG-Instruct record must be a JSON object, got {type(rec).__name__}")
        ex_id = str(rec.get("id", f"rag_instruct-{index:06d}"))
        wid = f"{where}: example {ex_id!r}"
        qkey = next((k for k in _RI_QUESTION if k in rec), None)
        akey = next((k for k in _RI_ANSWER if k in rec), None)
        if qkey is None:
            raise SchemaError(f"{wid}: missing field 'question' (or 'instruction')")
        if akey is None:
            raise SchemaError(f"{wid}: missing field 'answer' (or 'output')")
        raw_docs = rec.get("documents", [])
        if not isinstance(raw_docs, list):
            raise SchemaError(f"{wid}: field 'documents' must be a list, got {type(raw_docs).__name__}")
        docs = []
        for i, d in enumerate(raw_docs):
            doc = Document.from_obj(d, field=f"documents[{i}]", where=where, example_id=ex_id)
            if not doc.text.strip():
                st.n_empty_documents += 1
                continue
            docs.append(doc)
        if max_documents is not None and len(docs) > max_documents:
            st.n_documents_over_limit += len(docs) - max_documents
            docs = docs[:max_documents]
        st.n_documents += len(docs)
        meta = {k: v for k, v in rec.items() if k not in ("id", "documents", qkey, akey)}
        meta["source"] = "rag_instruct"
        try:
            ex = RagExample(id=ex_id, question=rec[qkey], answer=rec[akey], documents=tuple(docs),
                            system=system, meta=meta)
        except SchemaError as e:
            raise SchemaError(f"{where}: {e}") from None
        st.n_examples += 1
        yield ex
    logger.info("read RAG-Instruct %s: %s", path, st.as_dict())


# ---------------------------------------------------------------------------------------------

READER_FORMATS = ("auto", "jsonl", "crag", "rag_instruct", "alpaca", "sharegpt", "openai")


def resolve_format(path: str | Path, format: str = "auto") -> str:
    """The reader ``auto`` picks: ``crag`` in the file name -> CRAG; a Parquet / Arrow file or a dataset directory
    -> sniffed from its first record (alpaca, sharegpt, openai, else our schema); a JSON / JSONL file whose first
    record is clearly Alpaca (``instruction`` + ``input`` + ``output``) or ShareGPT (``conversations``) -> that;
    other ``.json`` -> RAG-Instruct; otherwise our JSONL."""
    if format != "auto":
        return format
    from selfaug_jax.data.formats import sniff_format

    p = Path(path)
    name = p.name.lower()
    if "crag" in name:
        return "crag"
    if p.is_dir() or p.suffix in (".parquet", ".arrow"):
        return sniff_format(p)
    sniffed = sniff_format(p) if p.is_file() else "jsonl"
    if sniffed == "sharegpt" or (sniffed == "alpaca" and _first_has(p, "input")):
        return sniffed
    if re.search(r"\.json(\.(bz2|gz|xz))?$", name):
        return "rag_instruct"
    return "jsonl"


def _first_has(path: Path, key: str) -> bool:
    from selfaug_jax.data.formats import first_record

    first = first_record(path)
    return first is not None and isinstance(first[1], Mapping) and key in first[1]


def read_examples(path: str | Path, format: str = "auto", *, columns: Mapping[str, str] | None = None,
                  **kwargs: Any) -> Iterator[RagExample]:
    """Dispatch to a reader (``format`` one of :data:`READER_FORMATS`; ``auto``: see :func:`resolve_format`).

    ``columns`` (``{key: column}``, see :mod:`selfaug_jax.data.formats`) renames fields; it applies to ``jsonl``,
    ``alpaca``, ``sharegpt`` and ``openai``, which also read Parquet / Arrow files and ``save_to_disk``
    directories. A ``.parquet`` / ``.arrow`` file or a directory in ``jsonl`` format is read as records of our
    schema."""
    format = resolve_format(path, format)
    if format not in READER_FORMATS:
        raise ValueError(f"unknown format {format!r}; one of {', '.join(READER_FORMATS)}")
    if columns and format in ("crag", "rag_instruct"):
        raise DataFormatError(f"data.columns is not supported with format {format} (its fields are fixed)")
    if format in ("alpaca", "sharegpt", "openai") or (format == "jsonl" and (
            columns or Path(path).is_dir() or Path(path).suffix in (".parquet", ".arrow"))):
        from selfaug_jax.data.formats import read_formatted

        return read_formatted(path, format, columns=columns, **kwargs)
    if format == "crag":
        return read_crag_task1(path, **kwargs)
    if format == "rag_instruct":
        return read_rag_instruct(path, **kwargs)
    if format == "jsonl":
        return read_jsonl(path, **kwargs)
    raise ValueError(f"unknown format {format!r}")
