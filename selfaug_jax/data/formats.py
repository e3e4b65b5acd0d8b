"""Fine-tuning data in the formats LLaMA-Factory, TRL and the Hub use, with a column mapping.

Formats (``data.format``)
-------------------------
* ``jsonl`` -- this project's schema (:mod:`selfaug_jax.data.schema`); with ``columns`` its fields may have other
  names (``question``, ``documents``, ``answer``, ``system``, ``id``).
* ``alpaca`` -- ``instruction``, ``input``, ``output`` and optional ``system``, ``history`` (a list of
  ``[user, assistant]`` pairs, earlier turns). The question is ``instruction`` followed by a blank line and
  ``input`` when ``input`` is non-empty (LLaMA-Factory's ``prompt`` + ``query``).
* ``sharegpt`` -- a ``conversations`` list of ``{"from": "human" | "gpt" | "system", "value": ...}`` turns.
* ``openai`` -- a ``messages`` list of ``{"role": "user" | "assistant" | "system", "content": ...}`` turns (TRL's
  conversational format).

In the two chat formats the last turn must be the assistant's answer (the training target); a leading system
turn becomes the system prompt. Retrieved documents come from a named field (``columns.documents``: a list of
strings or ``{"text", "title"?}`` objects, attached to the last user turn), or, when no documents field is
mapped and the default one is absent, they are taken to be **embedded in the prompt text**: the example then has no
separate documents and the whole prompt is the aligned input (the KL term covers every prompt token either way;
only the length policy, which drops whole documents, cannot shorten such a prompt).

Column mapping (``data.columns.<key>=<column>``)
-------------------------------------------------
Keys and their defaults per format (:data:`DEFAULT_COLUMNS`): ``question``, ``input``, ``answer``, ``documents``,
``system``, ``history``, ``id``, ``messages``, ``role``, ``content``, ``user_role``, ``assistant_role``,
``system_role``. The role keys map *values* (``user_role=human``), the others map field names. A mapped column
missing from a record raises :class:`~selfaug_jax.data.schema.DataFormatError` naming the column, the record and
the file (``path:line`` or ``path:row N``); :func:`check_columns` runs that check on the first record before any
expensive work.

File kinds
----------
JSON lines, a JSON array (``.json``), compressed variants (``.gz``, ``.bz2``, ``.xz``), Parquet (``.parquet``),
Arrow IPC (``.arrow``, file or stream format) and a ``datasets.save_to_disk`` directory (a ``Dataset``, or a
``DatasetDict`` whose ``train`` split is read), all through pyarrow (nothing is downloaded; ``datasets`` is not
needed). Records are read in batches, so a large Parquet file is never materialised as Python objects at once.

Counts
------
Each reader fills a :class:`~selfaug_jax.data.readers.ReaderStats` (records read, examples kept, records skipped
and why: an empty answer, no final assistant turn, an empty question) and logs it when the file is done.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from selfaug_jax.data.schema import DataFormatError, Document, Message, RagExample, SchemaError

__all__ = [
    "CHAT_FORMATS",
    "COLUMN_KEYS",
    "DEFAULT_COLUMNS",
    "RECORD_FORMATS",
    "check_columns",
    "first_record",
    "iter_records",
    "read_formatted",
    "resolve_columns",
    "sniff_format",
]

logger = logging.getLogger(__name__)

RECORD_FORMATS = ("jsonl", "alpaca", "sharegpt", "openai")
CHAT_FORMATS = ("sharegpt", "openai")
COLUMN_KEYS = ("question", "input", "answer", "documents", "system", "history", "id", "messages", "role", "content",
               "user_role", "assistant_role", "system_role")
_ROLE_VALUE_KEYS = ("role", "content", "user_role", "assistant_role", "system_role")

DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "jsonl": {"question": "question", "answer": "answer", "documents": "documents", "system": "system", "id": "id"},
    "alpaca": {"question": "instruction", "input": "input", "answer": "output", "documents": "documents",
               "system": "system", "history": "history", "id": "id"},
    "sharegpt": {"messages": "conversations", "role": "from", "content": "value", "user_role": "human",
                 "assistant_role": "gpt", "system_role": "system", "documents": "documents", "system": "system",
                 "id": "id"},
    "openai": {"messages": "messages", "role": "role", "content": "content", "user_role": "user",
               "assistant_role": "assistant", "system_role": "system", "documents": "documents",
               "system": "system", "id": "id"},
}
# Columns that must be present in every record (the others are optional).
_REQUIRED = {"jsonl": (), "alpaca": ("question", "answer"), "sharegpt": ("messages",),
             "openai": ("messages",)}


def resolve_columns(format: str, columns: Mapping[str, str] | None) -> dict[str, str]:
    """The format's default columns updated with ``columns``; unknown keys or keys foreign to the format raise."""
    if format not in DEFAULT_COLUMNS:
        raise ValueError(f"data.format {format!r} has no column mapping; formats with one: {', '.join(RECORD_FORMATS)}")
    out = dict(DEFAULT_COLUMNS[format])
    for key, column in (columns or {}).items():
        if key not in COLUMN_KEYS:
            raise DataFormatError(f"data.columns.{key}: unknown key; valid keys: {', '.join(COLUMN_KEYS)}")
        if key not in out:
            raise DataFormatError(f"data.columns.{key}: not used by data.format={format} "
                                  f"(its keys: {', '.join(DEFAULT_COLUMNS[format])})")
        if not isinstance(column, str) or not column:
            raise DataFormatError(f"data.columns.{key}: expected a column name, got {column!r}")
        out[key] = column
    return out


# --------------------------------------------------------------------------------------------- records
def _arrow_batches(path: Path) -> Iterator[list[dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.is_dir():
        yield from _saved_dataset_batches(path)
        return
    if path.suffix == ".parquet":
        for batch in pq.ParquetFile(str(path)).iter_batches(batch_size=1024):
            yield batch.to_pylist()
        return
    with pa.memory_map(str(path), "r") as source:
        try:
            reader: Any = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            source.seek(0)
            batches = iter(pa.ipc.open_stream(source))
        for batch in batches:
            yield batch.to_pylist()


def _saved_dataset_batches(path: Path) -> Iterator[list[dict[str, Any]]]:
    """Rows of a ``datasets.save_to_disk`` directory: ``state.json`` lists its ``.arrow`` shards (stream format)."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise DataFormatError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(splits)}); "
                                  f"point data.train at one split's directory")
        path = path / "train"
    state = path / "state.json"
    if not state.is_file():
        raise DataFormatError(f"{path}: not a datasets.save_to_disk directory (no state.json or dataset_dict.json)")
    shards = [f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
    if not shards:
        raise DataFormatError(f"{state}: lists no data files")
    for shard in shards:
        yield from _arrow_batches(path / shard)


def _is_table(path: Path) -> bool:
    return path.is_dir() or path.suffix in (".parquet", ".arrow")


def iter_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` for every record of a JSON / JSONL / Parquet / Arrow file or save_to_disk directory.

    ``where`` is ``path:line`` for text files and ``path:row N`` (0-based) for tables.
    """
    from selfaug_jax.data.readers import iter_json_array_records, iter_jsonl_records

    p = Path(path)
    if not p.exists():
        raise DataFormatError(f"{p}: no such file or directory")
    if _is_table(p):
        try:
            row = 0
            for batch in _arrow_batches(p):
                for rec in batch:
                    yield f"{p}:row {row}", rec
                    row += 1
        except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
            if isinstance(e, DataFormatError):
                raise
            raise DataFormatError(f"{p}: cannot read as {'a dataset directory' if p.is_dir() else p.suffix} "
                                  f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        return
    # A ``.jsonl`` file is JSON lines even when a line holds an array (that line is then a bad record, not the file).
    read = iter_jsonl_records if ".jsonl" in p.name else iter_json_array_records
    for lineno, rec in read(p):
        yield f"{p}:{lineno}", rec


def first_record(path: str | Path) -> tuple[str, Any] | None:
    """``(where, record)`` of the first record, without reading a large JSON array whole (None: no records)."""
    p = Path(path)
    # Tables, and JSON lines (even when a line holds an array: that line is then a bad record, not the file).
    if _is_table(p) or not p.is_file() or ".jsonl" in p.name:
        return next(iter_records(p), None)
    from selfaug_jax.data.readers import open_text

    decoder = json.JSONDecoder()
    with open_text(p) as f:
        try:
            text = f.read(1 << 16)
        except (OSError, EOFError, UnicodeDecodeError):  # not UTF-8 text, or a corrupt archive
            return next(iter_records(p), None)  # the full reader names the line and the problem
        start = len(text) - len(text.lstrip())
        if not text[start:start + 1] == "[":  # JSON lines: streamed anyway
            return next(iter_records(p), None)
        while True:  # grow the prefix until the first array element decodes (or the file ends)
            body = text[start + 1:].lstrip()
            if body.startswith("]"):
                return None
            try:
                rec, _ = decoder.raw_decode(body)
                return f"{p}:{text.count(chr(10), 0, len(text) - len(body)) + 1}", rec
            except json.JSONDecodeError:
                more = f.read(len(text))
                if not more:
                    return next(iter_records(p), None)  # malformed: the full reader names the line
                text += more


def sniff_format(path: str | Path) -> str:
    """``alpaca`` / ``sharegpt`` / ``openai`` / ``jsonl`` from the first record's fields (default: ``jsonl``)."""
    first = first_record(path)
    rec = first[1] if first is not None else None
    if not isinstance(rec, Mapping):
        return "jsonl"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    msgs = rec.get("messages")
    if (isinstance(msgs, list) and msgs and isinstance(msgs[0], Mapping) and "role" in msgs[0]
            and not any(isinstance(m, Mapping) and "documents" in m for m in msgs) and "question" not in rec):
        return "openai"
    return "jsonl"


def check_columns(path: str | Path, format: str, columns: Mapping[str, str] | None) -> None:
    """Check the mapping against the first record (one-line :class:`DataFormatError` naming column and file)."""
    cols = resolve_columns(format, columns)
    first = first_record(path)
    if first is None:
        raise DataFormatError(f"{path}: no records")
    _check_record(first[1], first[0], format, cols, columns or {})


def _check_record(rec: Any, where: str, format: str, cols: Mapping[str, str], explicit: Mapping[str, str]) -> None:
    if not isinstance(rec, Mapping):
        raise DataFormatError(f"{where}: an example must be a JSON object, got {type(rec).__name__}")
    needed = [k for k in _REQUIRED[format]] + [k for k in explicit if k not in _ROLE_VALUE_KEYS]
    for key in dict.fromkeys(needed):
        if cols[key] not in rec:
            how = f"data.columns.{key}={cols[key]}" if key in explicit else f"default {key} column {cols[key]!r}"
            raise DataFormatError(f"{where}: missing column {cols[key]!r} ({how}); record has "
                                  f"{', '.join(map(str, list(rec)[:12]))}")


# --------------------------------------------------------------------------------------------- conversion
def _text(rec: Mapping[str, Any], column: str, where: str, key: str, *, required: bool) -> str | None:
    value = rec.get(column)
    if value is None:
        if required:
            raise SchemaError(f"{where}: column {column!r} ({key}) is null")
        return None
    if not isinstance(value, str):
        raise SchemaError(f"{where}: column {column!r} ({key}) must be a string, got {type(value).__name__}")
    return value


def _documents(rec: Mapping[str, Any], cols: Mapping[str, str], where: str, ex_id: str | None) -> tuple[Document, ...]:
    raw = rec.get(cols["documents"])
    if raw is None:
        return ()
    if not isinstance(raw, (list, tuple)):
        raise SchemaError(f"{where}: column {cols['documents']!r} (documents) must be a list, got {type(raw).__name__}")
    docs = []
    for i, d in enumerate(raw):
        if isinstance(d, Mapping):  # Arrow structs carry every struct field; drop the nulls (e.g. a missing title)
            d = {k: v for k, v in d.items() if v is not None}
        docs.append(Document.from_obj(d, field=f"{cols['documents']}[{i}]", where=where, example_id=ex_id))
    return tuple(docs)


def _example_id(rec: Mapping[str, Any], cols: Mapping[str, str], default: str) -> str:
    value = rec.get(cols["id"])
    return default if value is None else str(value)


def _from_alpaca(rec: Mapping[str, Any], cols: Mapping[str, str], where: str, ex_id: str) -> RagExample | str:
    question = _text(rec, cols["question"], where, "question", required=True) or ""
    extra = _text(rec, cols["input"], where, "input", required=False)
    if extra and extra.strip():
        question = f"{question}\n\n{extra}" if question.strip() else extra
    answer = _text(rec, cols["answer"], where, "answer", required=True) or ""
    if not question.strip():
        return "empty question"
    if not answer.strip():
        return "empty answer"
    system = _text(rec, cols["system"], where, "system", required=False) or None
    docs = _documents(rec, cols, where, ex_id)
    history = rec.get(cols["history"]) or []
    if not isinstance(history, (list, tuple)):
        raise SchemaError(f"{where}: column {cols['history']!r} (history) must be a list of [user, assistant] pairs")
    if not history:
        return RagExample(id=ex_id, question=question, documents=docs, answer=answer, system=system)
    msgs = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise SchemaError(f"{where}: {cols['history']}[{i}] must be a [user, assistant] pair of strings")
        msgs += [Message("user", pair[0]), Message("assistant", pair[1])]
    msgs += [Message("user", question, docs), Message("assistant", answer)]
    return RagExample(id=ex_id, messages=tuple(msgs), system=system)


def _from_chat(rec: Mapping[str, Any], cols: Mapping[str, str], where: str, ex_id: str) -> RagExample | str:
    turns = rec[cols["messages"]]
    if not isinstance(turns, (list, tuple)):
        raise SchemaError(f"{where}: column {cols['messages']!r} (messages) must be a list of turns")
    roles = {cols["user_role"]: "user", cols["assistant_role"]: "assistant", cols["system_role"]: "system"}
    msgs: list[Message] = []
    for i, turn in enumerate(turns):
        w = f"{cols['messages']}[{i}]"
        if not isinstance(turn, Mapping):
            raise SchemaError(f"{where}: {w} must be an object")
        for key in ("role", "content"):
            if cols[key] not in turn:
                raise DataFormatError(f"{where}: {w} has no {cols[key]!r} field (data.columns.{key}); "
                                      f"turn has {', '.join(map(str, turn))}")
        role = turn[cols["role"]]
        if role not in roles:
            raise SchemaError(f"{where}: {w}.{cols['role']}={role!r} is none of {', '.join(map(repr, roles))} "
                              f"(data.columns.user_role / assistant_role / system_role)")
        content = turn[cols["content"]]
        if not isinstance(content, str):
            raise SchemaError(f"{where}: {w}.{cols['content']} must be a string, got {type(content).__name__}")
        msgs.append(Message(roles[role], content))
    system = _text(rec, cols["system"], where, "system", required=False) or None
    if msgs and msgs[0].role == "system":
        if system is not None:
            raise SchemaError(f"{where}: both column {cols['system']!r} and a leading system turn")
        system, msgs = msgs[0].content, msgs[1:]
    if not msgs or msgs[-1].role != "assistant":
        return "no final assistant turn"
    if not msgs[-1].content.strip():
        return "empty answer"
    users = [i for i, m in enumerate(msgs) if m.role == "user"]
    if not users:
        return "no user turn"
    docs = _documents(rec, cols, where, ex_id)
    if docs:
        last = users[-1]
        msgs[last] = Message("user", msgs[last].content, docs)
    return RagExample(id=ex_id, messages=tuple(msgs), system=system)


def _from_ours(rec: Mapping[str, Any], cols: Mapping[str, str], where: str, ex_id: str) -> RagExample | str:
    renamed = {k: v for k, v in rec.items() if k not in {cols[c] for c in DEFAULT_COLUMNS["jsonl"]}}
    for key, column in cols.items():
        if column in rec:
            renamed[key] = rec[column]
    renamed["id"] = ex_id
    # A table has every column in every row: a field a record does not use is null there (drop it, also inside
    # documents and turns).
    renamed = {k: _drop_nulls(v) for k, v in renamed.items() if v is not None}
    return RagExample.from_dict(renamed, where=where)


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_nulls(v) for v in value]
    return value


_CONVERTERS = {"jsonl": _from_ours, "alpaca": _from_alpaca, "sharegpt": _from_chat, "openai": _from_chat}


def read_formatted(
    path: str | Path,
    format: str,
    *,
    columns: Mapping[str, str] | None = None,
    system: str | None = None,
    stats: Any | None = None,
) -> Iterator[RagExample]:
    """Read ``path`` (any file kind above) in ``format`` (``jsonl``, ``alpaca``, ``sharegpt``, ``openai``).

    Args:
        columns: ``{key: column}`` overrides of :data:`DEFAULT_COLUMNS`.
        system: a system prompt for records without one.
        stats: a :class:`~selfaug_jax.data.readers.ReaderStats` to fill (records, examples, skipped and why).

    Records without an id get ``"<file name>:<line or row>"``. Skipped records (empty answer or question, no final
    assistant turn) are counted by reason in ``stats.skip_reasons`` and logged, never silently dropped.
    """
    from selfaug_jax.data.readers import ReaderStats

    cols = resolve_columns(format, columns)
    convert = _CONVERTERS[format]
    st = stats if stats is not None else ReaderStats()
    name = Path(path).name
    for where, rec in iter_records(path):
        st.n_records += 1
        _check_record(rec, where, format, cols, columns or {})
        ex_id = _example_id(rec, cols, f"{name}:{where.rsplit(':', 1)[1].replace('row ', '')}")
        try:
            out = convert(rec, cols, where, ex_id)
        except SchemaError as e:
            raise SchemaError(str(e) if str(e).startswith(str(path)) else f"{where}: {e}") from None
        if isinstance(out, str):
            st.n_skipped += 1
            st.skip_reasons[out] = st.skip_reasons.get(out, 0) + 1
            continue
        if system is not None and out.system is None and not (out.messages and out.messages[0].role == "system"):
            out = dataclasses.replace(out, system=system)
        st.n_documents += sum(len(m.documents) for m in out.to_messages())
        st.n_examples += 1
        yield out
    logger.info("read %s %s: %s", format, path, st.as_dict())
