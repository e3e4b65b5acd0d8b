"""Batched autoregressive generation with a KV cache: greedy, temperature, top-k and top-p (nucleus) sampling,
stop tokens and stop strings.

```python
from selfaug_jax.models import load_pretrained, load_tokenizer
from selfaug_jax.models.generation import GenerationConfig, generate, generate_text

model, tok = load_pretrained("smollm2-135m-instruct"), load_tokenizer("smollm2-135m-instruct")
generate_text(model, tok, ["What is the capital of France?"], GenerationConfig(max_new_tokens=20))
result = generate(model, [[1, 2, 3], [4, 5]], GenerationConfig(max_new_tokens=8, temperature=0.7, top_p=0.9))
result.tokens    # [b, max_new_tokens], pad_token_id after a row's EOS
```

How it runs: prompts are LEFT-padded to a common length (bucketed to a multiple of ``prompt_bucket`` so varying
prompt lengths reuse one compilation), one ``model.decode`` call pre-fills the cache with the whole prompt, then a
``jax.lax.while_loop`` feeds one token per step until every row has emitted an EOS / stop token or the
``max_new_tokens`` budget is spent. Prefill and loop are one jitted pure function of ``(graphdef, state)``; it is
compiled once per (model structure, batch size, bucketed prompt length, max_new_tokens, sampling mode, stop ids,
pad id, stop-string table shape) — temperature, top-p, top-k values, the seed and the stop-string table's
entries are traced, so changing them does not recompile.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from selfaug_jax.models.decoder import DecoderLM, default_positions

PromptIds = Sequence[Sequence[int]] | np.ndarray


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings.

    Attributes:
        max_new_tokens: token budget per row (the output width; also a static shape of the compiled loop).
        temperature: 0 = greedy (argmax); > 0 divides the logits before sampling.
        top_p: nucleus sampling: keep the smallest set of most likely tokens whose probability reaches ``top_p``
            (1.0 = off). Applied after ``top_k``, as in transformers.
        top_k: keep only the ``top_k`` most likely tokens (None or 0 = off).
        eos_token_ids: ids that end a row (EOS and any extra stop ids). None = ``model.config.eos_token_ids``
            (plus the tokenizer's EOS in :func:`generate_text`); ``()`` = never stop early.
        pad_token_id: written after a row's EOS and used for left padding. None = ``model.config.pad_token_id``,
            else the first EOS id, else 0.
        seed: PRNG seed for sampling (same seed -> same tokens).
        prompt_bucket: the padded prompt length is rounded up to a multiple of this (bounds recompiles).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    eos_token_ids: tuple[int, ...] | None = None
    pad_token_id: int | None = None
    seed: int = 0
    prompt_bucket: int = 64

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.prompt_bucket < 1:
            raise ValueError(f"prompt_bucket must be >= 1, got {self.prompt_bucket}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclasses.dataclass
class GenerationResult:
    """Output of :func:`generate` (host numpy arrays).

    Attributes:
        tokens: ``[b, max_new_tokens]`` int32 generated ids; ``pad_token_id`` after a row's first EOS.
        lengths: ``[b]`` generated tokens per row, the EOS included (``max_new_tokens`` if it never stopped).
        stopped_on_eos: ``[b]`` bool, whether the row ended with an EOS / stop token.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    stopped_on_eos: np.ndarray

    def sequences(self) -> list[list[int]]:
        """Generated ids per row, up to and including the EOS, without padding."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


# --------------------------------------------------------------------------------------------- prompt handling
def left_pad(
    prompt_ids: PromptIds, pad_token_id: int, *, attention_mask: np.ndarray | None = None, bucket: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad prompts to a common length rounded up to a multiple of ``bucket``.

    Args:
        prompt_ids: a list of id lists, or an ``[b, t]`` array (with ``attention_mask`` marking real tokens, left
            or right padded; without it every entry is a real token).
        pad_token_id: filler id for the padding.
        attention_mask: optional ``[b, t]`` mask for an array input.
        bucket: round the padded length up to a multiple of this.

    Returns:
        ``(ids_bt int32, mask_bt int32)``, real tokens right-aligned.
    """
    if attention_mask is not None:
        ids = np.asarray(prompt_ids)
        mask = np.asarray(attention_mask).astype(bool)
        rows = [ids[i][mask[i]].tolist() for i in range(ids.shape[0])]
    else:
        rows = [list(map(int, r)) for r in np.asarray(prompt_ids).tolist()] if isinstance(
            prompt_ids, np.ndarray) else [list(map(int, r)) for r in prompt_ids]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    t = int(math.ceil(max(len(r) for r in rows) / bucket) * bucket)
    ids_bt = np.full((len(rows), t), pad_token_id, np.int32)
    mask_bt = np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
        ids_bt[i, t - len(r):] = r
        mask_bt[i, t - len(r):] = 1
    return ids_bt, mask_bt


def _resolve_ids(model: DecoderLM, config: GenerationConfig) -> tuple[tuple[int, ...], int]:
    eos = tuple(model.config.eos_token_ids) if config.eos_token_ids is None else tuple(config.eos_token_ids)
    pad = config.pad_token_id
    if pad is None:
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else (eos[0] if eos else 0)
    return tuple(int(e) for e in eos), int(pad)


# --------------------------------------------------------------------------------------------- sampling
def sample_logits(
    logits_bv: jnp.ndarray,
    key: jax.Array,
    temperature: jnp.ndarray,
    top_p: jnp.ndarray,
    top_k: jnp.ndarray,
    *,
    use_top_k: bool,
    use_top_p: bool,
) -> jnp.ndarray:
    """Sample ids ``[b]`` from float32 logits: temperature, then top-k, then top-p (transformers' order).

    ``temperature`` / ``top_p`` / ``top_k`` are traced scalars; ``use_top_k`` / ``use_top_p`` are static switches
    (off = skip the vocabulary sort). Top-p always keeps the most likely token.
    """
    logits_bv = logits_bv.astype(jnp.float32) / temperature
    if use_top_k or use_top_p:
        sorted_bv = -jnp.sort(-logits_bv, axis=-1)  # descending
        rank_v = jnp.arange(logits_bv.shape[-1])
        keep_sorted_bv = jnp.ones(sorted_bv.shape, bool)
        if use_top_k:
            keep_sorted_bv &= rank_v < top_k
        if use_top_p:
            probs_bv = jax.nn.softmax(jnp.where(keep_sorted_bv, sorted_bv, -jnp.inf), axis=-1)
            mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv  # exclusive cumulative probability
            keep_sorted_bv &= (mass_before_bv < top_p) | (rank_v == 0)
        # Smallest kept logit per row: everything at least that large stays (ties kept together).
        threshold_b1 = jnp.min(jnp.where(keep_sorted_bv, sorted_bv, jnp.inf), axis=-1, keepdims=True)
        logits_bv = jnp.where(logits_bv >= threshold_b1, logits_bv, -jnp.inf)
    return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)


def _next_token(logits_bv, key, temperature, top_p, top_k, mode: tuple[bool, bool, bool]) -> jnp.ndarray:
    greedy, use_top_k, use_top_p = mode
    if greedy:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    return sample_logits(logits_bv, key, temperature, top_p, top_k, use_top_k=use_top_k, use_top_p=use_top_p)


# --------------------------------------------------------------------------------------------- the jitted loop
def _generate_impl(
    graphdef: Any,
    state: Any,
    ids_bt: jnp.ndarray,
    mask_bt: jnp.ndarray,
    key: jax.Array,
    temperature: jnp.ndarray,
    top_p: jnp.ndarray,
    top_k: jnp.ndarray,
    stop_table_sv: jnp.ndarray | None = None,
    *,
    max_new_tokens: int,
    mode: tuple[bool, bool, bool],
    eos_ids: tuple[int, ...],
    pad_id: int,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Prefill + ``while_loop`` decode. Returns ``(tokens_bn, lengths_b, stopped_b)``.

    ``stop_table_sv``: optional stop-string automaton (:mod:`selfaug_jax.models.stop_strings`); a row whose state
    reaches ``accept`` (= the table's row count) ends as on an EOS."""
    model = nnx.merge(graphdef, state)
    b, t = ids_bt.shape
    n = max_new_tokens
    eos_e = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def is_eos(tok_b):
        return (tok_b[:, None] == eos_e[None, :]).any(-1) if eos_ids else jnp.zeros(tok_b.shape, bool)

    def stop_step(sstate_b, tok_b):  # (next automaton state, whether a stop string ended)
        if stop_table_sv is None:
            return sstate_b, jnp.zeros(tok_b.shape, bool)
        nxt_b = stop_table_sv[sstate_b, tok_b]
        hit_b = nxt_b == stop_table_sv.shape[0]
        return jnp.where(hit_b, 0, nxt_b), hit_b

    # Generated slots are marked valid up front: causality hides the ones not yet written.
    kv_valid_bs = jnp.concatenate([mask_bt, jnp.ones((b, n), jnp.int32)], axis=1)
    cache = model.init_cache(b, t + n)
    logits_btv, cache = model.decode(
        ids_bt, default_positions(mask_bt), kv_valid_bs, cache, jnp.int32(0), last_only=True
    )
    first_b = _next_token(logits_btv[:, -1], jax.random.fold_in(key, 0), temperature, top_p, top_k, mode)
    tokens_bn = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(first_b)
    sstate_b, hit_b = stop_step(jnp.zeros((b,), jnp.int32), first_b)
    done_b = is_eos(first_b) | hit_b
    lengths_b = jnp.ones((b,), jnp.int32)
    pos_b = jnp.sum(mask_bt, axis=1).astype(jnp.int32)  # RoPE position of the first generated token

    def cond(carry):
        i, _, done_b, _, _, _ = carry
        return (i < n) & ~jnp.all(done_b)

    def body(carry):
        i, tokens_bn, done_b, lengths_b, cache, sstate_b = carry
        prev_b1 = jax.lax.dynamic_slice_in_dim(tokens_bn, i - 1, 1, axis=1)
        pos_b1 = (pos_b + i - 1)[:, None]
        logits_b1v, cache = model.decode(prev_b1, pos_b1, kv_valid_bs, cache, t + i - 1)
        tok_b = _next_token(logits_b1v[:, 0], jax.random.fold_in(key, i), temperature, top_p, top_k, mode)
        tok_b = jnp.where(done_b, pad_id, tok_b)
        tokens_bn = jax.lax.dynamic_update_slice_in_dim(tokens_bn, tok_b[:, None], i, axis=1)
        lengths_b = jnp.where(done_b, lengths_b, i + 1)
        sstate_b, hit_b = stop_step(sstate_b, tok_b)
        done_b = done_b | is_eos(tok_b) | hit_b
        return i + 1, tokens_bn, done_b, lengths_b, cache, sstate_b

    carry = (jnp.int32(1), tokens_bn, done_b, lengths_b, cache, sstate_b)
    _, tokens_bn, done_b, lengths_b, _, _ = jax.lax.while_loop(cond, body, carry)
    return tokens_bn, lengths_b, done_b


_STATIC = ("max_new_tokens", "mode", "eos_ids", "pad_id")
_JITTED: list[tuple[Any, Callable[..., Any]]] = []  # (graphdef, jitted fn), most recent last
_MAX_JITTED = 8


def _jitted_for(graphdef: Any) -> Callable[..., Any]:
    """One ``jax.jit`` per model structure (graphdefs compare by value; ModelConfig is unhashable, so the graphdef
    is closed over instead of being a static argument). jax.jit then caches one executable per input shape and
    static-argument combination."""
    for i, (g, fn) in enumerate(_JITTED):
        if g == graphdef:
            _JITTED.append(_JITTED.pop(i))
            return fn

    def fn(state, *args, **static):
        return _generate_impl(graphdef, state, *args, **static)

    jitted = jax.jit(fn, static_argnames=_STATIC)
    _JITTED.append((graphdef, jitted))
    del _JITTED[:-_MAX_JITTED]
    return jitted


def compiled_count(model: DecoderLM) -> int:
    """How many executables :func:`generate` has compiled for this model's structure (for tests / diagnostics)."""
    graphdef, _ = nnx.split(model)
    return next((fn._cache_size() for g, fn in _JITTED if g == graphdef), 0)


# --------------------------------------------------------------------------------------------- public API
def generate(
    model: DecoderLM,
    prompt_ids: PromptIds,
    config: GenerationConfig = GenerationConfig(),
    *,
    attention_mask: np.ndarray | None = None,
    stop_table: np.ndarray | None = None,
) -> GenerationResult:
    """Generate up to ``config.max_new_tokens`` tokens for a batch of prompts (of any lengths).

    Args:
        model: the decoder (its current parameters are used; LoRA adapters included).
        prompt_ids: list of id lists, or an ``[b, t]`` array (see :func:`left_pad` for ``attention_mask``).
        config: decoding settings.
        attention_mask: ``[b, t]`` real-token mask for an array ``prompt_ids``.
        stop_table: ``[states, vocab]`` stop-string automaton
            (:func:`selfaug_jax.models.stop_strings.stop_string_table`): rows also end, as on an EOS, where a stop
            string ends, even one split over several tokens.
    """
    eos_ids, pad_id = _resolve_ids(model, config)
    ids_bt, mask_bt = left_pad(prompt_ids, pad_id, attention_mask=attention_mask, bucket=config.prompt_bucket)
    use_top_k = bool(config.top_k) and config.top_k < model.config.vocab_size
    mode = (config.greedy, (not config.greedy) and use_top_k, (not config.greedy) and config.top_p < 1.0)
    graphdef, state = nnx.split(model)
    tokens_bn, lengths_b, stopped_b = _jitted_for(graphdef)(
        state,
        jnp.asarray(ids_bt),
        jnp.asarray(mask_bt),
        jax.random.key(config.seed),
        jnp.float32(config.temperature if config.temperature > 0 else 1.0),
        jnp.float32(config.top_p),
        jnp.int32(config.top_k or 0),
        None if stop_table is None else jnp.asarray(stop_table, jnp.int32),
        max_new_tokens=config.max_new_tokens,
        mode=mode,
        eos_ids=eos_ids,
        pad_id=pad_id,
    )
    tokens, lengths, stopped = jax.device_get((tokens_bn, lengths_b, stopped_b))
    return GenerationResult(np.asarray(tokens), np.asarray(lengths), np.asarray(stopped))


def generate_text(
    model: DecoderLM,
    tokenizer: Any,
    prompts: Sequence[str] | Sequence[Sequence[dict[str, str]]],
    config: GenerationConfig = GenerationConfig(),
    *,
    chat: bool = True,
    batch_size: int = 8,
) -> list[str]:
    """Generate a completion string per prompt.

    Args:
        model: the decoder.
        tokenizer: its Hugging Face tokenizer.
        prompts: strings (a single user turn when ``chat``) or chat message lists (``[{"role", "content"}]``).
        config: decoding settings; stop ids default to the model's EOS ids plus ``tokenizer.eos_token_id``.
        chat: render with ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``; else tokenize raw.
        batch_size: prompts per :func:`generate` call; the last batch is padded with copies to keep one shape.

    Returns:
        The decoded completions (``skip_special_tokens=True``), in prompt order.
    """
    config = _with_tokenizer_ids(model, tokenizer, config)
    encoded = [_encode(tokenizer, p, chat) for p in prompts]
    texts: list[str] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        real = len(chunk)
        if len(encoded) > batch_size:
            chunk = chunk + [chunk[0]] * (batch_size - real)
        result = generate(model, chunk, config)
        for row in result.sequences()[:real]:
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def _with_tokenizer_ids(model: DecoderLM, tokenizer: Any, config: GenerationConfig) -> GenerationConfig:
    """Stop ids default to the model's EOS ids plus the tokenizer's EOS; pad falls back to the tokenizer's."""
    if config.eos_token_ids is None:
        eos = list(model.config.eos_token_ids)
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(int(tokenizer.eos_token_id))
        config = dataclasses.replace(config, eos_token_ids=tuple(eos))
    tokenizer_pad = getattr(tokenizer, "pad_token_id", None)
    if config.pad_token_id is None and model.config.pad_token_id is None and tokenizer_pad is not None:
        config = dataclasses.replace(config, pad_token_id=int(tokenizer_pad))
    return config


# --------------------------------------------------------------------------------------------- stop strings
def special_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """Every special token id of ``tokenizer``: ``all_special_ids`` plus added tokens marked special (chat
    markers such as ``<|im_start|>``), sorted."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", ())}
    for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(i))
    return tuple(sorted(ids))


def stop_string_token_ids(tokenizer: Any, stop_strings: Sequence[str]) -> tuple[int, ...]:
    """Ids of the vocabulary tokens whose decoded text contains one of ``stop_strings`` (e.g. ``"\\n"``).

    Stopping on these ids ends a row as soon as a stop string is *inside one token*; a stop string split over
    several tokens is caught afterwards by :func:`truncate_at_stop` (the text is the same, a few tokens were
    wasted). Together they give the text vLLM's ``stop=[...]`` gives. One pass over the vocabulary
    (~0.5 s for 49k tokens).
    """
    if not stop_strings:
        return ()
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return tuple(i for i, t in enumerate(texts) if any(s in t for s in stop_strings))


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """``text`` cut before the first occurrence of any stop string, and whether a stop string was found."""
    cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@dataclasses.dataclass(frozen=True)
class Completion:
    """One decoded completion of :func:`generate_completions`.

    Attributes:
        text: decoded (``skip_special_tokens=True``) and cut at the first stop string.
        finished: the row ended on a stop id / EOS or a stop string, not on the token budget.
        num_tokens: generated tokens (the stop token included).
    """

    text: str
    finished: bool
    num_tokens: int


def generate_completions(
    model: DecoderLM,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    config: GenerationConfig = GenerationConfig(),
    *,
    stop_strings: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    batch_size: int = 8,
) -> list[Completion]:
    """Generate from already-tokenized prompts with extra stop tokens and stop strings, in fixed-shape batches.

    Unlike :func:`generate_text`, every batch is padded to ``batch_size`` rows (one compiled shape for any
    number of prompts) and batch ``k`` samples with its own seed (derived from ``(config.seed, k)``), so
    identical prompts in different batches get different samples (MAGPIE samples many completions of one
    prompt).

    Args:
        model: the decoder.
        tokenizer: its Hugging Face tokenizer (decoding, default EOS / pad).
        prompt_ids: token id lists (the caller renders and tokenizes, e.g. a chat template's pre-query prefix).
        config: decoding settings; its stop ids (default: model + tokenizer EOS) are extended by
            ``stop_token_ids`` and by :func:`stop_string_token_ids` of ``stop_strings``.
        stop_strings: the decoded text is cut before the first of these, and a row stops inside the loop as soon
            as one is generated, also when it is split over several tokens
            (:mod:`selfaug_jax.models.stop_strings`).
        stop_token_ids: extra ids that end a row (e.g. :func:`special_token_ids`).
        batch_size: rows per :func:`generate` call.

    Returns:
        One :class:`Completion` per prompt, in order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    config = _with_tokenizer_ids(model, tokenizer, config)
    stops = tuple(dict.fromkeys([*config.eos_token_ids, *map(int, stop_token_ids),
                                 *stop_string_token_ids(tokenizer, stop_strings)]))
    config = dataclasses.replace(config, eos_token_ids=stops)
    from selfaug_jax.models.stop_strings import tokenizer_stop_table

    table = tokenizer_stop_table(tokenizer, stop_strings, model.config.vocab_size) if stop_strings else None
    rows = [list(map(int, p)) for p in prompt_ids]
    out: list[Completion] = []
    for k, start in enumerate(range(0, len(rows), batch_size)):
        chunk = rows[start:start + batch_size]
        real = len(chunk)
        chunk = chunk + [chunk[0]] * (batch_size - real)
        seed = int(np.random.SeedSequence([config.seed, k]).generate_state(1)[0] & 0x7FFFFFFF)
        result = generate(model, chunk, dataclasses.replace(config, seed=seed), stop_table=table)
        for row, n, stopped in zip(result.tokens[:real], result.lengths[:real], result.stopped_on_eos[:real]):
            text, hit = truncate_at_stop(tokenizer.decode(row[:n].tolist(), skip_special_tokens=True), stop_strings)
            out.append(Completion(text=text, finished=bool(stopped) or hit, num_tokens=int(n)))
    return out


def _encode(tokenizer: Any, prompt: str | Sequence[dict[str, str]], chat: bool) -> list[int]:
    if chat:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer.encode(text, add_special_tokens=False))
    if not isinstance(prompt, str):
        raise TypeError("chat=False needs string prompts")
    return list(tokenizer.encode(prompt))


def greedy_generate_no_cache(
    model: DecoderLM,
    prompt_ids: PromptIds,
    max_new_tokens: int,
    *,
    eos_token_ids: tuple[int, ...] = (),
    pad_token_id: int = 0,
) -> np.ndarray:
    """Reference greedy decoding that recomputes the full forward pass every step (slow; for tests).

    Prompts are left-padded and the buffer is right-padded to ``prompt + max_new_tokens`` so one compiled
    forward serves every step. Rows stop at ``eos_token_ids`` and are then filled with ``pad_token_id``.

    Returns:
        ``[b, max_new_tokens]`` int32 generated ids.
    """
    ids_bt, mask_bt = left_pad(prompt_ids, pad_token_id)
    b, t = ids_bt.shape
    buf_ids = np.concatenate([ids_bt, np.full((b, max_new_tokens), pad_token_id, np.int32)], axis=1)
    buf_mask = np.concatenate([mask_bt, np.zeros((b, max_new_tokens), np.int32)], axis=1)
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, ids, mask, col):
        logits_btv = nnx.merge(graphdef, state)(ids, attention_mask=mask)
        return jnp.argmax(jax.lax.dynamic_index_in_dim(logits_btv, col, axis=1, keepdims=False), -1)

    out = np.full((b, max_new_tokens), pad_token_id, np.int32)
    done = np.zeros(b, bool)
    for i in range(max_new_tokens):
        tok = np.asarray(step(state, jnp.asarray(buf_ids), jnp.asarray(buf_mask), jnp.int32(t + i - 1)))
        tok = np.where(done, pad_token_id, tok)
        out[:, i] = tok
        buf_ids[:, t + i] = tok
        buf_mask[:, t + i] = 1
        done |= np.isin(tok, eos_token_ids)
        if done.all():
            break
    return out
