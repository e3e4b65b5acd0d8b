"""Distribution shift: mean per-token KL(p_original || p_finetuned) on inputs and on responses (paper Fig. 2).

SelfAug's claim is that fine-tuning moves the model's next-token distributions on *inputs* (prompt tokens) and that
this shift tracks the loss of general abilities; its objective penalises exactly that KL on the prompt positions.
This module measures it for any pair of models sharing a tokenizer:

* each example is a chat prompt, rendered with the tokenizer's chat template and the generation prompt (the
  **input** region, ``region == 1``), optionally followed by a response (the **response** region, ``region == 2``):
  the tokens of ``tokenizer(response)`` and the end-of-turn token (``<|im_end|>`` when the vocabulary has it, else
  EOS). The runner passes the *original* model's own greedy responses, so the response region measures how far the
  fine-tuned model drifts on text the original model would have written;
* at every position ``t`` of a region the divergence ``KL(p_o(. | x_<=t) || p_f(. | x_<=t))`` of the next-token
  distributions (the logits at ``t``, full vocabulary, float32) is computed; positions are labelled by the token
  they sit on, the loss' convention (``selfaug_kl`` uses the *unshifted* ``labels == -100`` positions), so the
  last prompt token, which predicts the first response token, belongs to the input region;
* the result is the **pooled** mean over all tokens of a region (sum of KLs / number of tokens, like the loss),
  0.0 when a region is empty.

Examples longer than ``ShiftConfig.max_length`` lose prompt tokens from the left (a response that alone does not
fit is cut at its end, keeping one prompt token); both are counted (``n_truncated``) and logged.

Hot path: jitted pure functions of ``(graphdef, state)`` pairs, one per model structure, compiled once per
bucketed length (rows are right-padded to ``ShiftConfig.buckets``; the last batch is padded with dummy rows to
:func:`row_bucket` rows): the final hidden states of each model, then the two LM heads applied per chunk of
positions inside a ``lax.scan``, so at most ``[B, chunk, V]`` float32 logits exist at a time (``ShiftConfig.chunk_tokens``
positions per step). The original model's hidden states are kept in a :class:`ReferenceCache`, so measuring
several fine-tuned models (or checkpoints) against one original runs the original's forward pass only once.

```python
from selfaug_jax.eval.shift import ShiftConfig, measure_shift
shift = measure_shift(original, finetuned, tokenizer, [[{"role": "user", "content": "Hi"}]], ["Hello!"])
shift["input_kl"], shift["response_kl"], shift["n_input_tokens"], shift["n_response_tokens"]
```
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from selfaug_jax.chunking import to_chunks

__all__ = [
    "REGION_PAD",
    "REGION_INPUT",
    "REGION_RESPONSE",
    "ShiftConfig",
    "end_of_turn_id",
    "encode_prompt",
    "build_shift_batches",
    "ReferenceCache",
    "DEFAULT_REFERENCE_CACHE",
    "token_kl_stats",
    "measure_shift",
]

logger = logging.getLogger(__name__)

REGION_PAD = 0
"""Region id of padding / ignored positions."""
REGION_INPUT = 1
"""Region id of prompt (input) positions, chat template and generation prompt included."""
REGION_RESPONSE = 2
"""Region id of response positions (the response tokens and the end-of-turn token)."""

ChatPrompt = str | Sequence[Mapping[str, str]]
Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ShiftConfig:
    """Batching of the shift measurement.

    Attributes:
      batch_size: rows per forward pass (the last batch is padded with dummy rows to :func:`row_bucket`'s size).
      buckets: padded lengths; a batch uses the smallest bucket holding its longest row. Buckets above
        ``max_length`` are ignored and ``max_length`` itself is always a bucket.
      max_length: longest row in tokens; longer examples lose prompt tokens from the left.
      chunk_tokens: positions (summed over the batch) projected onto the vocabulary per scan step; bounds the
        float32 logits buffer to about ``2 * chunk_tokens * V`` floats (both models).
      end_of_turn_token: token appended after a response; ``None`` = ``<|im_end|>`` if the vocabulary has it,
        else the tokenizer's EOS.
    """

    batch_size: int = 8
    buckets: tuple[int, ...] = (128, 256, 512, 1024)
    max_length: int = 1024
    chunk_tokens: int = 1024
    end_of_turn_token: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"ShiftConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.max_length < 2:
            raise ValueError(f"ShiftConfig.max_length must be >= 2, got {self.max_length}")
        if self.chunk_tokens < 1:
            raise ValueError(f"ShiftConfig.chunk_tokens must be >= 1, got {self.chunk_tokens}")
        if any(int(b) < 1 for b in self.buckets):
            raise ValueError(f"ShiftConfig.buckets must be positive, got {self.buckets}")

    def resolved_buckets(self) -> tuple[int, ...]:
        """Sorted buckets below ``max_length``, then ``max_length``."""
        return tuple(sorted({int(b) for b in self.buckets if int(b) < self.max_length} | {self.max_length}))


# ----------------------------------------------------------------------------------------------- tokenization
def end_of_turn_id(tokenizer: Any, token: str | None = None) -> int:
    """Id of the end-of-turn token: ``token`` if given, else ``<|im_end|>`` when in the vocabulary, else EOS."""
    vocab = tokenizer.get_vocab()
    if token is not None:
        if token not in vocab:
            raise ValueError(f"end-of-turn token {token!r} is not in the tokenizer's vocabulary")
        return int(vocab[token])
    if "<|im_end|>" in vocab:
        return int(vocab["<|im_end|>"])
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has neither <|im_end|> nor an EOS token; set ShiftConfig.end_of_turn_token")
    return int(tokenizer.eos_token_id)


def row_bucket(n_rows: int, batch_size: int) -> int:
    """Rows of a padded batch that holds ``n_rows`` real rows: ``batch_size``, halved while the half still holds them
    and has at least 8 rows.

    A last, short batch (e.g. 8 prompts at ``batch_size`` 32) then computes 8 rows instead of 32, for at most
    ``log2(batch_size / 8)`` extra compiled shapes. Shared by the shift batches and the evaluation's generation.
    """
    rows = batch_size
    while rows // 2 >= max(n_rows, 8):
        rows //= 2
    return rows


def encode_prompt(tokenizer: Any, prompt: ChatPrompt) -> list[int]:
    """Token ids of a chat prompt rendered with the chat template and the generation prompt.

    Identical to what :func:`selfaug_jax.models.generation.generate_text` feeds the model (a string is one user
    turn; the text is tokenized with ``add_special_tokens=False``: the template decides about BOS).
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))


def _fit(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """Cut the prompt from the left (and, if the response alone is too long, the response's end)."""
    if len(prompt) + len(response) <= max_length:
        return prompt, response, False
    response = response[:max_length - 1]
    return prompt[len(prompt) - (max_length - len(response)):], response, True


def build_shift_batches(tokenizer: Any, prompts: Sequence[ChatPrompt], responses: Sequence[str] | None = None,
                        config: ShiftConfig = ShiftConfig()) -> list[Batch]:
    """Tokenize prompts (+ responses) into right-padded, length-bucketed batches.

    Args:
      tokenizer: HF tokenizer with a chat template.
      prompts: chat message lists ``[{"role", "content"}, ...]`` (or plain strings = one user turn), without the
        answer; rendered with the generation prompt.
      responses: one response text per prompt (appended as ``tokenizer(response)`` + end-of-turn), or ``None``
        for input-only measurement.
      config: :class:`ShiftConfig`.

    Returns:
      Batches (dicts) with ``input_ids_bt`` / ``attention_mask_bt`` / ``region_bt`` int32 ``[batch_size, L]``
      (``L`` a bucket), plus ``n_rows`` (real rows; the rest are dummy rows with region 0 everywhere) and
      ``n_truncated`` (rows of this batch that were cut to ``max_length``) and ``row_index_b`` (the prompt index of
      each row, -1 for dummy rows). Rows are sorted by length, longest
      first, so each batch pads little.
    """
    if responses is not None and len(responses) != len(prompts):
        raise ValueError(f"build_shift_batches: {len(prompts)} prompts but {len(responses)} responses")
    eot = end_of_turn_id(tokenizer, config.end_of_turn_token) if responses is not None else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    rows: list[tuple[list[int], list[int], bool]] = []
    for i, prompt in enumerate(prompts):
        p_ids = encode_prompt(tokenizer, prompt)
        if not p_ids:
            raise ValueError(f"build_shift_batches: prompt {i} renders to no tokens")
        r_ids: list[int] = []
        if responses is not None:
            if not isinstance(responses[i], str):
                raise TypeError(f"build_shift_batches: response {i} must be a str, got {type(responses[i]).__name__}")
            r_ids = list(tokenizer.encode(responses[i], add_special_tokens=False)) + [eot]
        rows.append(_fit(p_ids, r_ids, config.max_length))
    n_trunc = sum(t for _, _, t in rows)
    if n_trunc:
        logger.warning("shift: %d of %d example(s) exceeded max_length=%d and lost prompt tokens from the left",
                       n_trunc, len(rows), config.max_length)
    buckets = config.resolved_buckets()
    order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][0]) + len(rows[i][1])))
    batches = []
    for start in range(0, len(order), config.batch_size):
        idx = order[start:start + config.batch_size]
        longest = max(len(rows[i][0]) + len(rows[i][1]) for i in idx)
        length = next(b for b in buckets if b >= longest)
        n_rows = row_bucket(len(idx), config.batch_size)
        ids_bt = np.full((n_rows, length), pad_id, np.int32)
        mask_bt = np.zeros((n_rows, length), np.int32)
        region_bt = np.zeros((n_rows, length), np.int32)
        mask_bt[len(idx):, 0] = 1  # dummy rows: one real token (no all-masked attention row), region 0
        for r, i in enumerate(idx):
            p_ids, r_ids, _ = rows[i]
            n_p, n = len(p_ids), len(p_ids) + len(r_ids)
            ids_bt[r, :n] = p_ids + r_ids
            mask_bt[r, :n] = 1
            region_bt[r, :n_p] = REGION_INPUT
            region_bt[r, n_p:n] = REGION_RESPONSE
        row_index_b = np.full((n_rows,), -1, np.int64)
        row_index_b[:len(idx)] = idx
        batches.append(dict(input_ids_bt=ids_bt, attention_mask_bt=mask_bt, region_bt=region_bt, n_rows=len(idx),
                            n_truncated=sum(rows[i][2] for i in idx), row_index_b=row_index_b))
    return batches


# ----------------------------------------------------------------------------------------------- the jitted KL
def _hidden_impl(graphdef: Any, state: Any, ids_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """Final hidden states ``[B, L, D]`` of one model."""
    return nnx.merge(graphdef, state).hidden_states(ids_bt, attention_mask=mask_bt)


def _kl_impl(graphdef_f: Any, graphdef_o: Any, state_f: Any, state_o: Any, h_f_btd: jax.Array, h_o_btd: jax.Array,
             region_bt: jax.Array, *, chunk_t: int) -> tuple[jax.Array, jax.Array]:
    """Per-row sums of per-token KL(p_o || p_f) over region 1 and region 2 (float32 ``[B, 2]``) and the per-row
    counts (int32 ``[B, 2]``).

    The LM heads are applied ``chunk_t`` positions at a time inside a ``lax.scan`` (only the heads of the two states
    are read; XLA drops the rest of the merged models).
    """
    w_f_dv = nnx.merge(graphdef_f, state_f).lm_head_weight().astype(h_f_btd.dtype)
    w_o_dv = nnx.merge(graphdef_o, state_o).lm_head_weight().astype(h_o_btd.dtype)
    def body(acc_b2, xs):
        hf_btd, ho_btd, reg_bt = xs
        logp_f_btv = jax.nn.log_softmax(jnp.dot(hf_btd, w_f_dv, preferred_element_type=jnp.float32), axis=-1)
        logp_o_btv = jax.nn.log_softmax(jnp.dot(ho_btd, w_o_dv, preferred_element_type=jnp.float32), axis=-1)
        kl_bt = jnp.sum(jnp.exp(logp_o_btv) * (logp_o_btv - logp_f_btv), axis=-1)
        sums_b2 = jnp.stack([jnp.sum(jnp.where(reg_bt == REGION_INPUT, kl_bt, 0.0), axis=-1),
                             jnp.sum(jnp.where(reg_bt == REGION_RESPONSE, kl_bt, 0.0), axis=-1)], axis=-1)
        return acc_b2 + sums_b2, None

    xs = (to_chunks(h_f_btd, chunk_t), to_chunks(h_o_btd, chunk_t), to_chunks(region_bt, chunk_t, REGION_PAD))
    kl_b2, _ = jax.lax.scan(body, jnp.zeros((region_bt.shape[0], 2), jnp.float32), xs)
    counts_b2 = jnp.stack([jnp.sum(region_bt == REGION_INPUT, axis=-1), jnp.sum(region_bt == REGION_RESPONSE, axis=-1)],
                          axis=-1)
    return kl_b2, counts_b2.astype(jnp.int32)


_JITTED: list[tuple[tuple[Any, ...], Callable[..., Any]]] = []  # ((kind, *graphdefs), fn), most recent last
_MAX_JITTED = 16


def _jitted(kind: str, *graphdefs: Any) -> Callable[..., Any]:
    """One ``jax.jit`` per function kind and model structure(s). Graphdefs compare by value but are not hashable (the
    ModelConfig is not), so they are closed over, as in :mod:`selfaug_jax.models.generation`; models with equal
    graphdefs share one executable, so identical models give bitwise identical hidden states."""
    key = (kind, *graphdefs)
    for i, (k, fn) in enumerate(_JITTED):
        if len(k) == len(key) and all(a == b for a, b in zip(k, key)):
            _JITTED.append(_JITTED.pop(i))
            return fn
    if kind == "hidden":
        (graphdef,) = graphdefs
        jitted = jax.jit(lambda state, ids_bt, mask_bt: _hidden_impl(graphdef, state, ids_bt, mask_bt))
    else:
        graphdef_f, graphdef_o = graphdefs
        jitted = jax.jit(lambda state_f, state_o, h_f, h_o, region_bt, chunk_t: _kl_impl(
            graphdef_f, graphdef_o, state_f, state_o, h_f, h_o, region_bt, chunk_t=chunk_t), static_argnums=5)
    _JITTED.append((key, jitted))
    del _JITTED[:-_MAX_JITTED]
    return jitted


class ReferenceCache:
    """The original model's final hidden states per batch, reused by later evaluations against the same model.

    The original model does not change during a run, so its forward pass over the (fixed) shift batches is done
    once; each later measurement only runs the fine-tuned model (half the cost). Entries are valid for one
    original model: the cache holds weak references to its parameter arrays and its graphdef, and empties itself
    when another model, or the same model with new parameter arrays, comes in. Batches are keyed by a hash of their
    ids and mask. At most ``max_bytes`` of hidden states are kept (further batches are computed, not stored).
    """

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._graphdef: Any = None
        self._refs: list[weakref.ref] = []
        self._hidden: dict[bytes, jax.Array] = {}
        self._bytes = 0

    def clear(self) -> None:
        self._graphdef, self._refs, self._hidden, self._bytes = None, [], {}, 0

    def _bind(self, graphdef: Any, state: Any) -> None:
        leaves = jax.tree.leaves(state)
        same = (self._graphdef is not None and len(self._refs) == len(leaves)
                and all(r() is x for r, x in zip(self._refs, leaves)) and self._graphdef == graphdef)
        if not same:
            self.clear()
            self._graphdef, self._refs = graphdef, [weakref.ref(x) for x in leaves]

    def hidden(self, graphdef: Any, state: Any, ids_bt: np.ndarray, mask_bt: np.ndarray) -> jax.Array:
        """Hidden states of ``(graphdef, state)`` on a batch, from the cache or computed (and stored)."""
        self._bind(graphdef, state)
        key = hashlib.sha1(np.asarray(ids_bt.shape, np.int64).tobytes() + ids_bt.tobytes() + mask_bt.tobytes()).digest()
        if key in self._hidden:
            self.hits += 1
            return self._hidden[key]
        self.misses += 1
        h_btd = _jitted("hidden", graphdef)(state, jnp.asarray(ids_bt), jnp.asarray(mask_bt))
        if self._bytes + h_btd.nbytes <= self.max_bytes:
            self._hidden[key] = h_btd
            self._bytes += h_btd.nbytes
        return h_btd


DEFAULT_REFERENCE_CACHE = ReferenceCache()
"""Process-wide cache used by :func:`token_kl_stats` unless another (or ``None``) is passed."""


def token_kl_stats(original_model: Any | None, finetuned_model: Any, batches: Iterable[Mapping[str, Any]], *,
                   chunk_tokens: int = 1024, reference_cache: ReferenceCache | None = DEFAULT_REFERENCE_CACHE
                   ) -> dict[str, float | int]:
    """Pooled mean per-token KL(p_original || p_finetuned) on the input and response regions.

    Args:
      original_model: the reference :class:`~selfaug_jax.models.DecoderLM` (``None``, or ``finetuned_model``
        itself, = no shift: every KL is 0 and no forward pass runs).
      finetuned_model: the model under evaluation (LoRA adapters, if any, are used). Both models must share the
        vocabulary.
      batches: dicts with int ``input_ids_bt``, ``attention_mask_bt`` and ``region_bt`` ``[B, L]`` arrays
        (0 = ignore, 1 = input, 2 = response), e.g. from :func:`build_shift_batches`.
      chunk_tokens: positions (summed over the batch) projected onto the vocabulary per scan step.
      reference_cache: where the original model's hidden states are kept between calls (:class:`ReferenceCache`;
        ``None`` = recompute every time).

    Returns:
      ``{"input_kl", "response_kl"}`` (float, 0.0 for an empty region), ``{"n_input_tokens",
      "n_response_tokens"}`` (int), and ``per_example`` = ``{"input_kl_sum", "n_input_tokens", "response_kl_sum",
      "n_response_tokens"}`` lists in prompt order (for batches that carry ``row_index_b``, as
      :func:`build_shift_batches`'s do; the bootstrap of :mod:`selfaug_jax.eval.stats` resamples these prompts).
      Sums are accumulated across batches in float64.
    """
    if original_model is finetuned_model:
        original_model = None
    if original_model is not None and original_model.config.vocab_size != finetuned_model.config.vocab_size:
        raise ValueError(f"token_kl_stats: vocabularies differ ({original_model.config.vocab_size} vs "
                         f"{finetuned_model.config.vocab_size})")
    kl_sum = np.zeros(2, np.float64)
    counts = np.zeros(2, np.int64)
    per_row: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # prompt index -> (kl sums [2], counts [2])
    if original_model is not None:
        graphdef_f, state_f = nnx.split(finetuned_model)
        graphdef_o, state_o = nnx.split(original_model)
        hidden_f = _jitted("hidden", graphdef_f)
        kl_fn = _jitted("kl", graphdef_f, graphdef_o)
        cache = reference_cache if reference_cache is not None else ReferenceCache(max_bytes=0)
    for batch in batches:
        ids_bt = np.ascontiguousarray(batch["input_ids_bt"], np.int32)
        mask_bt = np.ascontiguousarray(batch["attention_mask_bt"], np.int32)
        region_bt = np.asarray(batch["region_bt"], np.int32)
        if not (ids_bt.shape == mask_bt.shape == region_bt.shape) or ids_bt.ndim != 2:
            raise ValueError(f"token_kl_stats: input_ids_bt {ids_bt.shape}, attention_mask_bt {mask_bt.shape} and "
                             f"region_bt {region_bt.shape} must be equal [B, L] shapes")
        if np.any((region_bt != REGION_PAD) & (mask_bt == 0)):
            raise ValueError("token_kl_stats: a padding position (attention_mask 0) has a non-zero region")
        counts_b2 = np.stack([np.sum(region_bt == REGION_INPUT, -1), np.sum(region_bt == REGION_RESPONSE, -1)], -1)
        if original_model is None:
            kl_b2 = np.zeros(counts_b2.shape, np.float64)
        else:
            h_o_btd = cache.hidden(graphdef_o, state_o, ids_bt, mask_bt)
            h_f_btd = hidden_f(state_f, jnp.asarray(ids_bt), jnp.asarray(mask_bt))
            chunk_t = max(1, min(ids_bt.shape[1], chunk_tokens // ids_bt.shape[0]))
            kl_b2, counts_b2 = jax.device_get(kl_fn(state_f, state_o, h_f_btd, h_o_btd, jnp.asarray(region_bt),
                                                    chunk_t))
        kl_b2, counts_b2 = np.asarray(kl_b2, np.float64), np.asarray(counts_b2, np.int64)
        kl_sum += kl_b2.sum(0)
        counts += counts_b2.sum(0)
        rows_b = batch.get("row_index_b")
        if rows_b is not None:
            for r, i in enumerate(np.asarray(rows_b)):
                if i >= 0:
                    per_row[int(i)] = (kl_b2[r], counts_b2[r])
    means = [float(s / c) if c else 0.0 for s, c in zip(kl_sum, counts)]
    order = sorted(per_row)
    return {"input_kl": means[0], "response_kl": means[1], "n_input_tokens": int(counts[0]),
            "n_response_tokens": int(counts[1]),
            "per_example": {"input_kl_sum": [float(per_row[i][0][0]) for i in order],
                            "n_input_tokens": [int(per_row[i][1][0]) for i in order],
                            "response_kl_sum": [float(per_row[i][0][1]) for i in order],
                            "n_response_tokens": [int(per_row[i][1][1]) for i in order]}}


def measure_shift(original_model: Any | None, finetuned_model: Any, tokenizer: Any, prompts: Sequence[ChatPrompt],
                  responses: Sequence[str] | None = None, config: ShiftConfig = ShiftConfig()) -> dict[str, Any]:
    """:func:`build_shift_batches` + :func:`token_kl_stats`.

    Returns:
      The :func:`token_kl_stats` dict plus ``n_examples`` and ``n_truncated`` (examples cut to ``max_length``).
    """
    batches = build_shift_batches(tokenizer, prompts, responses, config)
    stats: dict[str, Any] = token_kl_stats(original_model, finetuned_model, batches, chunk_tokens=config.chunk_tokens)
    stats["n_examples"] = len(prompts)
    stats["n_truncated"] = int(sum(b["n_truncated"] for b in batches))
    return stats
