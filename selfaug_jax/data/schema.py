"""Example schema for RAG supervised fine-tuning.

Two equivalent input forms are accepted:

* **Single turn** (the common RAG case)::

      {"id": "q1", "system": "...optional...",
       "question": "Who wrote X?",
       "documents": [{"title": "optional", "text": "..."}, ...],   # retrieval rank order
       "answer": "Y.",
       "meta": {...optional, free-form...}}

  A document may also be given as a bare string (shorthand for ``{"text": ...}``).

* **Multi turn**::

      {"id": "c1",
       "messages": [{"role": "system", "content": "..."},            # optional, first only
                    {"role": "user", "content": "q1", "documents": [...]},
                    {"role": "assistant", "content": "a1"},
                    {"role": "user", "content": "q2"},
                    {"role": "assistant", "content": "a2"}],         # the training target
       "meta": {...}}

  Retrieved documents are attached to user turns.  Only the *final* assistant turn is a training
  target; every earlier turn (including earlier assistant turns) is prompt.

Validation errors raise :class:`SchemaError` whose message starts with ``where`` (``file:line``
when the example came from a file) and names the offending field and the example id.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "DataFormatError",
    "SchemaError",
    "Document",
    "Message",
    "RagExample",
    "TokenizedExample",
    "IGNORE_INDEX",
    "ROLES",
]

IGNORE_INDEX = -100
"""Label value meaning "no target" (HF convention): prompt tokens and padding."""

ROLES = ("system", "user", "assistant")
_KNOWN_FIELDS = frozenset({"id", "system", "question", "documents", "answer", "messages", "meta"})


class DataFormatError(ValueError):
    """A data file is malformed (bad JSON, wrong container type, ...). The message names file:line."""


class SchemaError(DataFormatError):
    """An example violates the schema. The message names where it came from, the example id and the field."""


def _prefix(where: str | None, example_id: str | None) -> str:
    parts = []
    if where:
        parts.append(where)
    if example_id is not None:
        parts.append(f"example {example_id!r}")
    return (": ".join(parts) + ": ") if parts else ""


@dataclasses.dataclass(frozen=True)
class Document:
    """One retrieved document. ``title`` is optional; ``text`` is the body shown to the model."""

    text: str
    title: str | None = None

    @classmethod
    def from_obj(cls, obj: Any, *, field: str, where: str | None = None,
                 example_id: str | None = None) -> "Document":
        """Parse a document from a string or a ``{"text", "title"?}`` mapping."""
        p = _prefix(where, example_id)
        if isinstance(obj, str):
            return cls(text=obj)
        if not isinstance(obj, Mapping):
            raise SchemaError(f"{p}field {field!r} must be a string or an object with 'text', "
                              f"got {type(obj).__name__}")
        unknown = set(obj) - {"text", "title"}
        if unknown:
            raise SchemaError(f"{p}field {field!r} has unknown keys {sorted(unknown)}")
        text = obj.get("text")
        if not isinstance(text, str):
            raise SchemaError(f"{p}field {field}.text must be a string, got {type(text).__name__}")
        title = obj.get("title")
        if title is not None and not isinstance(title, str):
            raise SchemaError(f"{p}field {field}.title must be a string or null, got {type(title).__name__}")
        return cls(text=text, title=title or None)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"text": self.text}
        if self.title is not None:
            d["title"] = self.title
        return d


@dataclasses.dataclass(frozen=True)
class Message:
    """One chat turn. ``documents`` may only be non-empty on user turns."""

    role: str
    content: str
    documents: tuple[Document, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.documents, list):
            object.__setattr__(self, "documents", tuple(self.documents))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.documents:
            d["documents"] = [doc.to_dict() for doc in self.documents]
        return d


def _parse_documents(obj: Any, *, field: str, where: str | None, example_id: str | None
                     ) -> tuple[Document, ...]:
    if obj is None:
        return ()
    if not isinstance(obj, Sequence) or isinstance(obj, (str, bytes)):
        raise SchemaError(f"{_prefix(where, example_id)}field {field!r} must be a list, "
                          f"got {type(obj).__name__}")
    return tuple(Document.from_obj(d, field=f"{field}[{i}]", where=where, example_id=example_id)
                 for i, d in enumerate(obj))


@dataclasses.dataclass(frozen=True)
class RagExample:
    """A RAG SFT example in one of the two forms (see the module docstring).

    Exactly one of (``question`` + ``answer``) or ``messages`` is set.  Construct with
    :meth:`from_dict` to get validation with file:line errors; direct construction validates too.
    """

    question: str | None = None
    documents: tuple[Document, ...] = ()
    answer: str | None = None
    system: str | None = None
    id: str | None = None
    messages: tuple[Message, ...] | None = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.documents, list):
            object.__setattr__(self, "documents", tuple(self.documents))
        if isinstance(self.messages, list):
            object.__setattr__(self, "messages", tuple(self.messages))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self, where: str | None = None) -> None:
        """Raise :class:`SchemaError` if the example is not well formed."""
        p = _prefix(where, self.id)
        if self.id is not None and not isinstance(self.id, str):
            raise SchemaError(f"{p}field 'id' must be a string")
        if self.system is not None and not isinstance(self.system, str):
            raise SchemaError(f"{p}field 'system' must be a string or null")
        if not isinstance(self.meta, Mapping):
            raise SchemaError(f"{p}field 'meta' must be an object")
        if self.messages is None:
            if not isinstance(self.question, str) or not self.question.strip():
                raise SchemaError(f"{p}field 'question' must be a non-empty string")
            if not isinstance(self.answer, str) or not self.answer.strip():
                raise SchemaError(f"{p}field 'answer' must be a non-empty string")
            for i, d in enumerate(self.documents):
                if not isinstance(d, Document):
                    raise SchemaError(f"{p}field 'documents[{i}]' must be a Document")
            return
        if self.question is not None or self.answer is not None or self.documents:
            raise SchemaError(f"{p}give either 'messages' or 'question'/'documents'/'answer', not both")
        msgs = self.messages
        if len(msgs) < 2:
            raise SchemaError(f"{p}field 'messages' needs at least a user and an assistant turn")
        for i, m in enumerate(msgs):
            f = f"messages[{i}]"
            if not isinstance(m, Message):
                raise SchemaError(f"{p}field {f!r} must be a Message")
            if m.role not in ROLES:
                raise SchemaError(f"{p}field {f}.role must be one of {ROLES}, got {m.role!r}")
            if not isinstance(m.content, str):
                raise SchemaError(f"{p}field {f}.content must be a string")
            if m.role == "system" and i != 0:
                raise SchemaError(f"{p}field {f}: a system turn may only come first")
            if m.documents and m.role != "user":
                raise SchemaError(f"{p}field {f}.documents: documents may only be attached to user turns")
        if msgs[0].role == "system" and self.system is not None:
            raise SchemaError(f"{p}both 'system' and a system turn in 'messages' were given")
        if msgs[-1].role != "assistant":
            raise SchemaError(f"{p}field 'messages': the last turn must be the assistant answer "
                              f"(got role {msgs[-1].role!r})")
        if not msgs[-1].content.strip():
            raise SchemaError(f"{p}field 'messages[{len(msgs) - 1}].content': the answer is empty")
        if not any(m.role == "user" for m in msgs):
            raise SchemaError(f"{p}field 'messages' has no user turn")

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_dict(cls, obj: Any, *, where: str | None = None, default_id: str | None = None,
                  strict: bool = False) -> "RagExample":
        """Parse our JSON schema. ``where`` (e.g. ``"file.jsonl:12"``) prefixes every error.

        Top-level fields outside the schema are moved into ``meta`` (explicit ``meta`` keys win),
        or rejected with ``strict=True``.  Unknown keys inside documents and messages are errors.
        """
        if not isinstance(obj, Mapping):
            raise SchemaError(f"{_prefix(where, None)}an example must be a JSON object, "
                              f"got {type(obj).__name__}")
        ex_id = obj.get("id", default_id)
        if ex_id is not None and not isinstance(ex_id, (str, int)):
            raise SchemaError(f"{_prefix(where, None)}field 'id' must be a string or an integer")
        ex_id = None if ex_id is None else str(ex_id)
        p = _prefix(where, ex_id)
        unknown = set(obj) - _KNOWN_FIELDS
        if unknown and strict:
            raise SchemaError(f"{p}unknown fields {sorted(unknown)} (allowed: {sorted(_KNOWN_FIELDS)})")
        meta = obj.get("meta") or {}
        if not isinstance(meta, Mapping):
            raise SchemaError(f"{p}field 'meta' must be an object")
        if unknown:  # extra top-level fields (e.g. answer_aliases) are kept, in meta
            meta = {**{k: obj[k] for k in sorted(unknown)}, **meta}
        system = obj.get("system")
        try:
            if "messages" in obj:
                raw = obj["messages"]
                if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
                    raise SchemaError(f"{p}field 'messages' must be a list")
                msgs = []
                for i, m in enumerate(raw):
                    if not isinstance(m, Mapping):
                        raise SchemaError(f"{p}field 'messages[{i}]' must be an object")
                    unknown = set(m) - {"role", "content", "documents"}
                    if unknown:
                        raise SchemaError(f"{p}field 'messages[{i}]' has unknown keys {sorted(unknown)}")
                    for key in ("role", "content"):
                        if not isinstance(m.get(key), str):
                            raise SchemaError(f"{p}field messages[{i}].{key} must be a string")
                    docs = _parse_documents(m.get("documents"), field=f"messages[{i}].documents",
                                            where=where, example_id=ex_id)
                    msgs.append(Message(role=m["role"], content=m["content"], documents=docs))
                ex = cls(messages=tuple(msgs), system=system, id=ex_id, meta=meta,
                         question=obj.get("question"), answer=obj.get("answer"),
                         documents=_parse_documents(obj.get("documents"), field="documents",
                                                    where=where, example_id=ex_id))
            else:
                ex = cls(question=obj.get("question"), answer=obj.get("answer"), system=system,
                         documents=_parse_documents(obj.get("documents"), field="documents",
                                                    where=where, example_id=ex_id),
                         id=ex_id, meta=meta)
        except SchemaError as e:
            if where and not str(e).startswith(where):
                raise SchemaError(f"{where}: {e}") from None
            raise
        return ex

    def to_dict(self) -> dict[str, Any]:
        """Inverse of :meth:`from_dict` (our JSONL schema)."""
        d: dict[str, Any] = {}
        if self.id is not None:
            d["id"] = self.id
        if self.system is not None:
            d["system"] = self.system
        if self.messages is None:
            d["question"] = self.question
            d["documents"] = [doc.to_dict() for doc in self.documents]
            d["answer"] = self.answer
        else:
            d["messages"] = [m.to_dict() for m in self.messages]
        if self.meta:
            d["meta"] = dict(self.meta)
        return d

    def to_messages(self) -> tuple[Message, ...]:
        """Canonical chat form: optional system turn, ..., final assistant turn (the target)."""
        if self.messages is not None:
            msgs = self.messages
            if self.system is not None:
                msgs = (Message("system", self.system),) + msgs
            return msgs
        out: list[Message] = []
        if self.system is not None:
            out.append(Message("system", self.system))
        out.append(Message("user", self.question or "", self.documents))
        out.append(Message("assistant", self.answer or ""))
        return tuple(out)

    @property
    def target(self) -> str:
        """The answer text that is trained on."""
        return self.answer if self.messages is None else self.messages[-1].content  # type: ignore[return-value]

    @property
    def num_documents(self) -> int:
        if self.messages is None:
            return len(self.documents)
        return sum(len(m.documents) for m in self.messages)


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedExample:
    """A tokenized training example.

    ``input_ids`` and ``labels`` are 1-D int32 arrays of the same length. ``labels`` is
    :data:`IGNORE_INDEX` on every prompt token and equal to ``input_ids`` on the response tokens
    (answer + end-of-turn).  ``meta`` is a JSON-serialisable dict (source metadata plus the length
    policy's bookkeeping, e.g. ``prompt_length``, ``n_documents_kept``).
    """

    id: str
    input_ids: np.ndarray
    labels: np.ndarray
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = np.asarray(self.input_ids, dtype=np.int32)
        labels = np.asarray(self.labels, dtype=np.int32)
        if ids.ndim != 1 or labels.shape != ids.shape:
            raise SchemaError(f"example {self.id!r}: input_ids {ids.shape} and labels {labels.shape} "
                              "must be 1-D arrays of the same length")
        if ids.size == 0:
            raise SchemaError(f"example {self.id!r}: empty input_ids")
        object.__setattr__(self, "input_ids", ids)
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def prompt_length(self) -> int:
        """Number of leading tokens with label IGNORE_INDEX."""
        nz = np.flatnonzero(self.labels != IGNORE_INDEX)
        return int(nz[0]) if nz.size else len(self)

    @property
    def num_targets(self) -> int:
        return int(np.count_nonzero(self.labels != IGNORE_INDEX))
