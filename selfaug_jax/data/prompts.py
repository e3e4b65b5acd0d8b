"""Prompt building with the tokenizer's own chat template, exact label masks, and the length policy.

Rendering
---------
Each user turn that carries retrieved documents is rendered with a :class:`DocumentsTemplate`
(default, RAG-Instruct style)::

    ### Paragraph:
    [1] <doc 1>
    [2] <doc 2>

    ### Instruction:
    <question>

The chat is then rendered with ``tokenizer.apply_chat_template(..., tokenize=False)`` and the text
is tokenized with ``add_special_tokens=False``: the template itself decides about BOS, so no second
BOS is ever added (a doubled BOS raises).  A tokenizer without a chat template raises
:class:`PromptError` unless the caller passes an explicit ``chat_template`` string or a
:class:`PlainTemplate` in :class:`PromptConfig`.

Label mask
----------
The prompt (all turns before the final assistant turn, rendered *with* the generation prompt, so
it includes the assistant header) must be an exact token prefix of the full rendering; otherwise
:class:`PromptError` names the example.  Labels are ``-100`` on every prompt token (system prompt,
including a default system prompt injected by the template, documents, question, assistant
header).  The response is the answer followed by the end-of-turn token (by default the first
special token after the prompt, e.g. ChatML ``<|im_end|>``); those tokens keep their ids.  The
decoded answer tokens must equal the answer text (whitespace-stripped), else :class:`PromptError`.

Tokens the template renders *after* the end-of-turn token (ChatML's trailing ``"\\n"``) are
**dropped** by default (``after_end_of_turn="drop"``): the sequence ends with the end-of-turn
token, exactly like a generation that stops there, and no non-prompt position leaks into the
``labels == -100`` (KL) mask.  ``after_end_of_turn="mask"`` keeps them with label ``-100``.

Length policy
-------------
With ``max_length`` set, documents are considered best-ranked first and each one is kept if it still fits
next to those already kept (``truncation="drop"``): a document that does not fit is dropped, but a
lower-ranked one that does fit is kept, so a short gold document survives a long distractor ranked above
it.  With ``truncation="truncate"`` the best-ranked dropped document is then cut token-wise to fill the
remaining room.  The question, the system prompt, earlier turns and the answer are never cut.  An
example that does not fit even with no documents is skipped.  An example that had documents but keeps
none is skipped too (``no_documents="skip"``, the default: it would teach answering without evidence) or
kept with a warning (``no_documents="keep"``).  Counts are returned in :class:`PromptStats` and logged.
In multi-turn examples documents are ranked by rank (rank 1 first), ties broken by turn (later turns
first).
"""

from __future__ import annotations

import dataclasses
import logging
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from selfaug_jax.data.schema import IGNORE_INDEX, Document, Message, RagExample, TokenizedExample

__all__ = [
    "PromptError",
    "DocumentsTemplate",
    "PlainTemplate",
    "PromptConfig",
    "PromptStats",
    "render_documents_block",
    "build_chat",
    "tokenize_example",
    "tokenize_examples",
]

logger = logging.getLogger(__name__)


class PromptError(ValueError):
    """Prompt rendering / masking failed for a named example (or the tokenizer lacks a template)."""


def _check_format(fmt: str, allowed: set[str], name: str) -> None:
    fields = {f for _, f, _, _ in string.Formatter().parse(fmt) if f is not None}
    bad = fields - allowed
    if bad:
        raise ValueError(f"{name}={fmt!r} uses unknown placeholders {sorted(bad)}; allowed: {sorted(allowed)}")


@dataclasses.dataclass(frozen=True)
class DocumentsTemplate:
    """How a user turn with retrieved documents becomes text.

    ``document`` / ``titled_document`` are ``str.format`` strings with ``{index}`` (1-based rank),
    ``{text}`` and (titled only) ``{title}``.  ``instruction`` wraps the question (``{question}``).
    With no document left after the length policy the header is omitted and only the instruction
    is rendered.
    """

    header: str = "### Paragraph:\n"
    document: str = "[{index}] {text}"
    titled_document: str | None = "[{index}] {title}\n{text}"
    separator: str = "\n"
    block_separator: str = "\n\n"
    instruction: str = "### Instruction:\n{question}"

    def __post_init__(self) -> None:
        _check_format(self.document, {"index", "text"}, "document")
        if self.titled_document is not None:
            _check_format(self.titled_document, {"index", "text", "title"}, "titled_document")
        _check_format(self.instruction, {"question"}, "instruction")

    def render(self, question: str, documents: Sequence[Document]) -> str:
        """Render the user content for ``question`` with ``documents`` (already in rank order)."""
        instruction = self.instruction.format(question=question)
        if not documents:
            return instruction
        parts = []
        for i, doc in enumerate(documents, start=1):
            if doc.title and self.titled_document is not None:
                parts.append(self.titled_document.format(index=i, title=doc.title, text=doc.text))
            else:
                parts.append(self.document.format(index=i, text=doc.text))
        return self.header + self.separator.join(parts) + self.block_separator + instruction


def render_documents_block(question: str, documents: Sequence[Document],
                           template: DocumentsTemplate | None = None) -> str:
    """Convenience wrapper around :meth:`DocumentsTemplate.render`."""
    return (template or DocumentsTemplate()).render(question, documents)


@dataclasses.dataclass(frozen=True)
class PlainTemplate:
    """An explicit non-chat template for tokenizers without a chat template.

    It is compiled to a Jinja chat template, so it goes through exactly the same prefix check:
    ``[bos] system_format ... user_format ... assistant_prefix answer eos assistant_suffix``.
    """

    system_format: str = "{content}\n\n"
    user_format: str = "{content}\n\n"
    assistant_prefix: str = "### Response:\n"
    assistant_suffix: str = "\n\n"
    add_bos: bool = True

    def to_jinja(self) -> str:
        def lit(s: str) -> str:  # a Jinja string literal
            return "{{ " + repr(s) + " }}"

        def fmt(f: str) -> str:
            _check_format(f, {"content"}, "format")
            pre, _, post = f.partition("{content}")
            return lit(pre) + "{{ message['content'] }}" + lit(post)

        bos = "{% if bos_token %}{{ bos_token }}{% endif %}" if self.add_bos else ""
        return (
            bos
            + "{% for message in messages %}"
            + "{% if message['role'] == 'system' %}" + fmt(self.system_format)
            + "{% elif message['role'] == 'user' %}" + fmt(self.user_format)
            + "{% else %}" + lit(self.assistant_prefix) + "{{ message['content'] }}{{ eos_token }}"
            + lit(self.assistant_suffix) + "{% endif %}{% endfor %}"
            + "{% if add_generation_prompt %}" + lit(self.assistant_prefix) + "{% endif %}"
        )


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """Prompt rendering, masking and length policy.

    Attributes:
      documents_template: how documents + question form the user turn.
      chat_template: a Jinja chat template overriding the tokenizer's own (``None`` = tokenizer's).
      plain_template: explicit plain template (mutually exclusive with ``chat_template``).
      template_kwargs: extra keyword arguments for ``apply_chat_template`` (e.g. ``enable_thinking``).
      end_of_turn_token: the token that ends the answer; ``None`` = first special token after it.
      after_end_of_turn: ``"drop"`` (default) or ``"mask"`` the tokens rendered after end-of-turn.
      max_length: token budget per example (``None`` = unlimited).
      truncation: ``"drop"`` whole documents (keeping every one that still fits, best-ranked first), or
        also ``"truncate"`` the best-ranked dropped one into the remaining room.
      min_truncated_document_tokens: a document cut to fewer tokens than this is dropped instead.
      no_documents: an example that had documents but keeps none after the length policy is ``"skip"``-ped
        (counted) or ``"keep"``-ed (counted, with a warning).
    """

    documents_template: DocumentsTemplate = DocumentsTemplate()
    chat_template: str | None = None
    plain_template: PlainTemplate | None = None
    template_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    end_of_turn_token: str | None = None
    after_end_of_turn: Literal["drop", "mask"] = "drop"
    max_length: int | None = None
    truncation: Literal["drop", "truncate"] = "drop"
    min_truncated_document_tokens: int = 8
    no_documents: Literal["skip", "keep"] = "skip"

    def __post_init__(self) -> None:
        if self.chat_template is not None and self.plain_template is not None:
            raise ValueError("give at most one of chat_template and plain_template")
        if self.after_end_of_turn not in ("drop", "mask"):
            raise ValueError(f"after_end_of_turn must be 'drop' or 'mask', got {self.after_end_of_turn!r}")
        if self.truncation not in ("drop", "truncate"):
            raise ValueError(f"truncation must be 'drop' or 'truncate', got {self.truncation!r}")
        if self.no_documents not in ("skip", "keep"):
            raise ValueError(f"no_documents must be 'skip' or 'keep', got {self.no_documents!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")

    def resolved_chat_template(self, tokenizer: Any) -> str | None:
        """The template string to pass to ``apply_chat_template`` (``None`` = the tokenizer's)."""
        if self.plain_template is not None:
            return self.plain_template.to_jinja()
        if self.chat_template is not None:
            return self.chat_template
        if not getattr(tokenizer, "chat_template", None):
            raise PromptError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)!r} has no chat "
                "template; pass PromptConfig(chat_template=...) or PromptConfig(plain_template=PlainTemplate())")
        return None


@dataclasses.dataclass
class PromptStats:
    """Counts from :func:`tokenize_examples` (returned alongside the examples, and logged)."""

    n_examples: int = 0
    n_kept: int = 0
    n_truncated: int = 0
    n_skipped: int = 0  # all skipped examples: too long + no documents left
    n_skipped_too_long: int = 0  # question + answer alone exceed max_length
    n_skipped_no_documents: int = 0  # had documents, none fits (no_documents="skip")
    n_kept_no_documents: int = 0  # had documents, none fits, kept anyway (no_documents="keep")
    n_documents: int = 0
    n_documents_dropped: int = 0
    n_documents_cut: int = 0
    n_tokens: int = 0
    n_target_tokens: int = 0
    max_tokens: int = 0
    skipped_ids: list[str] = dataclasses.field(default_factory=list)
    truncated_ids: list[str] = dataclasses.field(default_factory=list)
    no_document_ids: list[str] = dataclasses.field(default_factory=list)  # skipped or kept without documents

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        return (f"{self.n_examples} examples: kept {self.n_kept}, truncated {self.n_truncated} "
                f"(documents dropped {self.n_documents_dropped}, cut {self.n_documents_cut} of "
                f"{self.n_documents}), skipped {self.n_skipped} ({self.n_skipped_too_long} question+answer alone "
                f"too long, {self.n_skipped_no_documents} with no document left), kept without any document "
                f"{self.n_kept_no_documents}; "
                f"{self.n_tokens} tokens, {self.n_target_tokens} target tokens, longest {self.max_tokens}")


# ---------------------------------------------------------------------------------------------
# rendering helpers

DocKey = tuple[int, int]  # (turn index, rank index)


def _doc_removal_order(messages: Sequence[Message]) -> list[DocKey]:
    """All documents in *keep* order: best first (rank, then later turns first)."""
    keys = [(t, r) for t, m in enumerate(messages) for r in range(len(m.documents))]
    return sorted(keys, key=lambda k: (k[1], -k[0]))


def build_chat(messages: Sequence[Message], template: DocumentsTemplate,
               keep: set[DocKey] | None = None, cut: Mapping[DocKey, str] | None = None
               ) -> list[dict[str, str]]:
    """Turn :class:`Message`s into ``[{"role", "content"}]`` for ``apply_chat_template``.

    ``keep`` selects documents (``None`` = all); ``cut`` replaces the text of some kept documents.
    A turn that carries documents is rendered with ``template`` (instruction only when none is
    kept); a turn without documents keeps its content verbatim.
    """
    cut = cut or {}
    chat = []
    for t, m in enumerate(messages):
        if m.documents:
            docs = [dataclasses.replace(d, text=cut.get((t, r), d.text))
                    for r, d in enumerate(m.documents) if keep is None or (t, r) in keep]
            content = template.render(m.content, docs)
        else:
            content = m.content
        chat.append({"role": m.role, "content": content})
    return chat


def fit_prompt_documents(messages: Sequence[Message], template: DocumentsTemplate,
                         length_of: Callable[[list[dict[str, str]]], int], max_length: int
                         ) -> tuple[list[dict[str, str]], int]:
    """The chat of ``messages`` with the "drop" length policy applied to the prompt alone.

    Documents are kept best-ranked first, each one if the rendered prompt still has at most ``max_length`` tokens
    (``length_of(chat)``), exactly as the training data's ``truncation="drop"`` chooses them (the evaluation uses
    it to see the contexts the model was trained on). Returns ``(chat, n_documents_dropped)``; a question too long
    even without documents keeps none (the caller counts it).
    """
    order = _doc_removal_order(messages)
    full = build_chat(messages, template)
    if length_of(full) <= max_length:
        return full, 0
    cache: dict[frozenset[DocKey], int] = {}

    def total(keep: frozenset[DocKey]) -> int:
        if keep not in cache:
            cache[keep] = length_of(build_chat(messages, template, set(keep)))
        return cache[keep]

    keep = _select_documents(order, total, max_length)
    return build_chat(messages, template, set(keep)), len(order) - len(keep)


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


class _Encoder:
    """Renders + tokenizes chats for one tokenizer/config and builds exact label masks."""

    def __init__(self, tokenizer: Any, config: PromptConfig):
        self.tok = tokenizer
        self.config = config
        self.template = config.resolved_chat_template(tokenizer)
        if config.end_of_turn_token is not None:
            eot = tokenizer.convert_tokens_to_ids(config.end_of_turn_token)
            if eot is None or eot == getattr(tokenizer, "unk_token_id", None):
                raise PromptError(f"end_of_turn_token {config.end_of_turn_token!r} is not in the vocabulary")
            self.eot_ids = {int(eot)}
        else:
            self.eot_ids = _special_ids(tokenizer)
            if not self.eot_ids:
                raise PromptError("tokenizer has no special tokens; set PromptConfig.end_of_turn_token")
        self.bos_id = getattr(tokenizer, "bos_token_id", None)

    def render(self, chat: list[dict[str, str]], add_generation_prompt: bool) -> str:
        kwargs = dict(self.config.template_kwargs)
        if self.template is not None:
            kwargs["chat_template"] = self.template
        text = self.tok.apply_chat_template(chat, tokenize=False,
                                            add_generation_prompt=add_generation_prompt, **kwargs)
        if not isinstance(text, str):
            raise PromptError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str")
        return text

    def ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, chat: list[dict[str, str]]) -> list[int]:
        """Tokens of all turns but the last, rendered with the generation prompt."""
        return self.ids(self.render(chat[:-1], add_generation_prompt=True))

    def encode(self, chat: list[dict[str, str]], answer: str, ex_id: str,
               prompt_ids: list[int] | None = None) -> tuple[list[int], int, int]:
        """Return (input_ids, prompt_length, n_targets) for a chat whose last turn is the answer.

        ``prompt_ids`` may be passed when already computed by :meth:`prompt_ids` for this chat.
        """
        if prompt_ids is None:
            prompt_ids = self.prompt_ids(chat)
        full_ids = self.ids(self.render(chat, add_generation_prompt=False))
        n_p = len(prompt_ids)
        if full_ids[:n_p] != prompt_ids:
            i = next((k for k, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b),
                     min(n_p, len(full_ids)))
            raise PromptError(
                f"example {ex_id!r}: the prompt rendered with the generation prompt is not an exact token "
                f"prefix of the full rendering (first difference at token {i}: prompt "
                f"{self.tok.decode(prompt_ids[i:i + 8])!r} vs full {self.tok.decode(full_ids[i:i + 8])!r}); "
                "the chat template does not match its generation prompt, or the answer merges with it")
        if self.bos_id is not None and len(full_ids) > 1 and full_ids[0] == full_ids[1] == self.bos_id:
            raise PromptError(f"example {ex_id!r}: doubled BOS token at the start of the rendering")
        response = full_ids[n_p:]
        j = next((k for k, t in enumerate(response) if t in self.eot_ids), None)
        if j is None:
            raise PromptError(f"example {ex_id!r}: no end-of-turn token after the answer in "
                              f"{self.tok.decode(response)!r}")
        decoded = self.tok.decode(response[:j], skip_special_tokens=False)
        if j == 0 or decoded.strip() != answer.strip():
            raise PromptError(f"example {ex_id!r}: the response tokens decode to {decoded!r}, not the "
                              f"answer {answer!r} (template altered the answer, or the answer contains a "
                              "special token)")
        end = n_p + j + 1
        ids = full_ids[:end] if self.config.after_end_of_turn == "drop" else full_ids
        return ids, n_p, j + 1


# ---------------------------------------------------------------------------------------------
# public API

@dataclasses.dataclass(frozen=True)
class _Outcome:
    example: TokenizedExample | None
    n_documents: int
    n_dropped: int
    n_cut: int
    skip_reason: Literal["too_long", "no_documents"] | None = None
    chat: list[dict[str, str]] | None = None  # the rendered chat that was tokenized (None when skipped)


def _fit_cut_document(enc: _Encoder, messages: Sequence[Message], kept: frozenset[DocKey], key: DocKey,
                      chat_for: Any, total: Any, n_response: int, max_len: int
                      ) -> tuple[list[dict[str, str]], list[int]] | None:
    """Longest token-prefix of document ``key`` that fits next to the ``kept`` documents.

    Token counts are nearly additive, so the first guess is the free room minus the per-document
    template overhead; it is corrected with a few probes.  Returns (chat, prompt_ids) or ``None``
    if fewer than ``min_truncated_document_tokens`` tokens fit.
    """
    doc_ids = enc.ids(messages[key[0]].documents[key[1]].text)
    with_key = kept | {key}
    overhead = total(with_key) - total(kept) - len(doc_ids)
    m = min(len(doc_ids) - 1, max_len - total(kept) - overhead)
    lo_fail = len(doc_ids)  # smallest m known not to fit
    best: tuple[int, list[dict[str, str]], list[int]] | None = None
    while m >= enc.config.min_truncated_document_tokens:
        text = enc.tok.decode(doc_ids[:m], skip_special_tokens=False)
        chat = chat_for(with_key, {key: text})
        prompt = enc.prompt_ids(chat)
        length = len(prompt) + n_response
        if length <= max_len:
            best = (m, chat, prompt)
            if m + 1 >= lo_fail:
                break
            m += 1  # try one more token (the estimate may be conservative)
        else:
            lo_fail = m
            if best is not None:
                break
            m -= max(1, length - max_len)
    return None if best is None else (best[1], best[2])


def _select_documents(order: list[DocKey], total: Any, max_len: int) -> frozenset[DocKey]:
    """Documents kept by the "drop" policy: best-ranked first, each one if it still fits next to those kept.

    ``total(keep)`` is the example's length with the documents ``keep``. The longest fitting prefix of
    ``order`` is found by bisection (lengths grow with every added document); each later document is then
    tried once (the one right after the prefix is known not to fit).
    """
    lo, hi = 0, len(order)  # invariant: the first lo documents fit, the first hi + 1 do not (or hi = n)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if total(frozenset(order[:mid])) <= max_len:
            lo = mid
        else:
            hi = mid - 1
    keep = frozenset(order[:lo])
    for key in order[lo + 1:]:
        if total(keep | {key}) <= max_len:
            keep = keep | {key}
    return keep


def _tokenize_one(example: RagExample, enc: _Encoder, ex_id: str) -> _Outcome:
    """Render, validate and mask one example, applying the length policy.

    The response tokens do not depend on the documents, so length probes only tokenize the prompt
    (``len(prompt) + n_response``) and the chosen configuration is encoded and validated in full once.
    """
    cfg = enc.config
    messages = example.to_messages()
    answer = messages[-1].content
    order = _doc_removal_order(messages)
    n_docs = len(order)

    def chat_for(keep: frozenset[DocKey], cut: Mapping[DocKey, str] | None = None) -> list[dict[str, str]]:
        return build_chat(messages, cfg.documents_template, set(keep), cut)

    keep = frozenset(order)
    chosen_chat = chat_for(keep)
    best = enc.encode(chosen_chat, answer, ex_id)
    cut_key = None
    max_len = cfg.max_length
    if max_len is not None and len(best[0]) > max_len:
        n_response = len(best[0]) - best[1]
        cache: dict[frozenset[DocKey], list[int]] = {}

        def total(keep_: frozenset[DocKey]) -> int:
            if keep_ not in cache:
                cache[keep_] = enc.prompt_ids(chat_for(keep_))
            return len(cache[keep_]) + n_response

        if total(frozenset()) > max_len:
            return _Outcome(None, n_docs, 0, 0, "too_long")
        keep = _select_documents(order, total, max_len)
        chosen_chat, chosen_prompt = chat_for(keep), cache[keep]
        if cfg.truncation == "truncate":
            dropped = [k for k in order if k not in keep]
            found = (_fit_cut_document(enc, messages, keep, dropped[0], chat_for, total, n_response, max_len)
                     if dropped else None)
            if found is not None:
                cut_key, chosen_chat, chosen_prompt = dropped[0], found[0], found[1]
        if n_docs and not keep and cut_key is None and cfg.no_documents == "skip":
            return _Outcome(None, n_docs, n_docs, 0, "no_documents")
        best = enc.encode(chosen_chat, answer, ex_id, prompt_ids=chosen_prompt)
        if len(best[0]) > max_len:  # only if the response tokenized differently after the cut
            raise PromptError(f"example {ex_id!r}: length policy produced {len(best[0])} > max_length "
                              f"{max_len} tokens")
    ids, n_prompt, n_targets = best
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
    labels[n_prompt:n_prompt + n_targets] = ids[n_prompt:n_prompt + n_targets]
    n_kept_docs = len(keep) + (1 if cut_key is not None else 0)
    meta = dict(example.meta)
    meta.update(n_documents=n_docs, n_documents_kept=n_kept_docs, document_cut=cut_key is not None,
                prompt_length=n_prompt)
    tex = TokenizedExample(id=ex_id, input_ids=np.asarray(ids, np.int32), labels=labels, meta=meta)
    return _Outcome(tex, n_docs, n_docs - n_kept_docs, 1 if cut_key is not None else 0, chat=chosen_chat)


def tokenize_example(example: RagExample, tokenizer: Any, config: PromptConfig | None = None, *,
                     default_id: str = "?") -> TokenizedExample | None:
    """Tokenize one example; ``None`` if it must be skipped (question + answer alone too long, or no document
    left with ``no_documents="skip"``)."""
    enc = _Encoder(tokenizer, config or PromptConfig())
    return _tokenize_one(example, enc, example.id if example.id is not None else default_id).example


def trained_chat(example: RagExample, tokenizer: Any, config: PromptConfig | None = None
                 ) -> list[dict[str, str]] | None:
    """The ``[{"role", "content"}]`` chat that training tokenizes for ``example``: its documents rendered as the
    length policy keeps (and cuts) them; ``None`` if the policy skips the example."""
    enc = _Encoder(tokenizer, config or PromptConfig())
    return _tokenize_one(example, enc, example.id if example.id is not None else "?").chat


def tokenize_examples(examples: Iterable[RagExample], tokenizer: Any, config: PromptConfig | None = None,
                      *, log: bool = True) -> tuple[list[TokenizedExample], PromptStats]:
    """Tokenize examples with exact label masks and the length policy.

    Returns the kept examples (in input order) and a :class:`PromptStats`; examples without an id
    get ``"#<index>"``.  Skips and truncations are counted and logged, never silent.
    """
    config = config or PromptConfig()
    enc = _Encoder(tokenizer, config)
    stats = PromptStats()
    out: list[TokenizedExample] = []
    for i, ex in enumerate(examples):
        ex_id = ex.id if ex.id is not None else f"#{i}"
        r = _tokenize_one(ex, enc, ex_id)
        stats.n_examples += 1
        stats.n_documents += r.n_documents
        if r.example is None:
            stats.n_skipped += 1
            stats.skipped_ids.append(ex_id)
            if r.skip_reason == "no_documents":
                stats.n_skipped_no_documents += 1
                stats.no_document_ids.append(ex_id)
            else:
                stats.n_skipped_too_long += 1
            continue
        stats.n_kept += 1
        if r.n_documents and r.example.meta["n_documents_kept"] == 0:
            stats.n_kept_no_documents += 1
            stats.no_document_ids.append(ex_id)
        if r.n_dropped or r.n_cut:
            stats.n_truncated += 1
            stats.truncated_ids.append(ex_id)
            stats.n_documents_dropped += r.n_dropped
            stats.n_documents_cut += r.n_cut
        stats.n_tokens += len(r.example)
        stats.n_target_tokens += r.example.num_targets
        stats.max_tokens = max(stats.max_tokens, len(r.example))
        out.append(r.example)
    if log:
        logger.info("tokenized %s (max_length=%s, truncation=%s)", stats.summary(), config.max_length,
                    config.truncation)
        too_long = [i for i in stats.skipped_ids if i not in set(stats.no_document_ids)]
        if stats.n_skipped_too_long:
            logger.warning("skipped %d example(s) whose question+answer exceed max_length=%s: %s%s",
                           stats.n_skipped_too_long, config.max_length, too_long[:10],
                           " ..." if stats.n_skipped_too_long > 10 else "")
        if stats.n_skipped_no_documents:
            logger.warning("skipped %d example(s) with no document left within max_length=%s "
                           "(data.no_documents=skip): %s%s", stats.n_skipped_no_documents, config.max_length,
                           stats.no_document_ids[:10], " ..." if stats.n_skipped_no_documents > 10 else "")
        if stats.n_kept_no_documents:
            logger.warning("kept %d example(s) with none of their documents (data.no_documents=keep): they "
                           "train answering without evidence: %s%s", stats.n_kept_no_documents,
                           stats.no_document_ids[:10], " ..." if stats.n_kept_no_documents > 10 else "")
        if stats.n_truncated:
            logger.info("truncated documents of %d example(s): %s%s", stats.n_truncated,
                        stats.truncated_ids[:10], " ..." if stats.n_truncated > 10 else "")
    return out, stats
