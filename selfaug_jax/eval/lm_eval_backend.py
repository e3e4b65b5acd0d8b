"""An lm-evaluation-harness model that runs this project's JAX decoder: ``lm_eval --model selfaug-jax``.

```
selfaug-lm-eval --model selfaug-jax --model_args pretrained=smollm2-135m-instruct,dtype=bfloat16 --tasks arc_easy
selfaug-lm-eval --model selfaug-jax --model_args pretrained=runs/smoke,method=selfaug --tasks hellaswag
```

lm-eval 0.4.13 finds models only in its registry; importing this module registers ``selfaug-jax`` there
(``@register_model``). ``selfaug-lm-eval`` / ``python -m selfaug_jax.eval.lm_eval_cli`` is lm-eval's own CLI with
this module imported first; from Python, ``import selfaug_jax.eval.lm_eval_backend`` before
``lm_eval.simple_evaluate(model="selfaug-jax", ...)``, or pass a :class:`SelfAugJaxLM` instance as ``model``.

Requests are served as lm-eval's HF backend (``lm_eval.models.huggingface.HFLM``) serves them, so scores agree with
it on the same weights (tests/test_lm_eval_backend.py): the same tokenization (``tok_encode``, BOS handling, the
trailing-space move of ``_encode_pair``), left truncation to ``max_length``, rolling windows, stop sequences (plus the
EOS string) cut from the decoded text, ``max_gen_toks`` (default 256).

How it runs: requests are sorted by length and cut into batches of exactly ``batch_size`` rows (a short last batch
is filled with dummy rows), each right-padded to a length bucket (powers of two from ``min_bucket`` up to
``max_length``), so a whole task compiles a handful of shapes. Log-likelihoods come from one jitted function of the
model state: hidden states, then the vocabulary projection a ``logits_chunk`` of positions at a time (``lax.map``),
so no float32 ``[batch, length, vocab]`` tensor is ever held. Generation is
:func:`selfaug_jax.models.generation.generate` (KV cache, left padding to a multiple of ``prompt_bucket``);
single-token stop sequences also stop decoding early when that cannot change the cut text.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from selfaug_jax.chunking import from_chunks, to_chunks
from selfaug_jax.eval.eval_model_source import EvalModelSpec, load_eval_model
from selfaug_jax.eval.multiple_choice import bucket_lengths
from selfaug_jax.models import DEFAULT_MODEL, DecoderLM
from selfaug_jax.models.generation import GenerationConfig, generate

__all__ = ["BackendConfig", "BackendError", "SelfAugJaxLM", "REGISTERED_NAME"]

logger = logging.getLogger(__name__)

REGISTERED_NAME = "selfaug-jax"
# Keys lm-eval itself adds to model_args (simple_evaluate's additional_config); accepted, device is informational.
_LM_EVAL_KEYS = ("device", "max_batch_size")
_GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "seed")


class BackendError(ValueError):
    """Bad ``model_args``, model path or request; the message is one line starting with ``selfaug-jax:``."""


@dataclasses.dataclass(frozen=True)
class BackendConfig:
    """``--model_args`` of ``selfaug-jax`` (``key=value,...``).

    Attributes:
        pretrained: default-model alias, HF directory, ``.gguf`` file, or a run output / method directory
            (:mod:`selfaug_jax.eval.eval_model_source`).
        adapter: PEFT adapter directory to attach (a run's own adapter is used without it).
        merge: fold the adapter into the base weights (default) or keep it as LoRA matmuls.
        method: which method of a run directory (default: its last).
        dtype: ``float32`` or ``bfloat16`` (compute and parameters; log-probabilities are float32).
        batch_size: rows per compiled batch (lm-eval's ``--batch_size``; ``auto`` is not supported).
        max_length: longest input in tokens (default: the model's ``max_position_embeddings``, as HFLM).
        max_gen_toks: default generation budget when a task gives none (HFLM: 256).
        add_bos_token: force the tokenizer's special tokens on (True) or off (False); None = tokenizer default.
        min_bucket: shortest padded length of a scoring batch.
        prompt_bucket: generation prompts are left-padded to a multiple of this.
        logits_chunk: positions projected onto the vocabulary at once when scoring.
    """

    pretrained: str = DEFAULT_MODEL
    adapter: str | None = None
    merge: bool = True
    method: str | None = None
    dtype: str = "float32"
    batch_size: int = 8
    max_length: int | None = None
    max_gen_toks: int = 256
    add_bos_token: bool | None = None
    min_bucket: int = 32
    prompt_bucket: int = 64
    logits_chunk: int = 128

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> "BackendConfig":
        """Check and convert lm-eval's parsed ``model_args`` (one-line ``ValueError`` for a bad or unknown key)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - set(fields) - set(_LM_EVAL_KEYS))
        if unknown:
            raise BackendError(f"{REGISTERED_NAME}: unknown model_args key(s) {', '.join(unknown)}; "
                             f"valid keys: {', '.join(fields)}")
        out: dict[str, Any] = {}
        for key, value in kwargs.items():
            if key in _LM_EVAL_KEYS or value is None:
                continue
            default = fields[key].default
            if key == "batch_size" and isinstance(value, str) and value.startswith("auto"):
                raise BackendError(f"{REGISTERED_NAME}: batch_size={value} is not supported; give an integer")
            if isinstance(default, bool) or key in ("merge", "add_bos_token"):
                if isinstance(value, str) and value.lower() in ("true", "false"):
                    value = value.lower() == "true"
                if not isinstance(value, bool):
                    raise BackendError(f"{REGISTERED_NAME}: {key}={value!r} is not true/false")
            elif isinstance(default, int) or key == "max_length":
                try:
                    value = int(value)
                except (TypeError, ValueError):
                    raise BackendError(f"{REGISTERED_NAME}: {key}={value!r} is not an integer") from None
                if value < 1:
                    raise BackendError(f"{REGISTERED_NAME}: {key}={value} must be >= 1")
            else:
                value = str(value)
            out[key] = value
        return cls(**out)


def _make_scorer(graphdef: Any, logits_chunk: int):
    """Jitted ``(state, ids_bt, mask_bt, targets_bt, scored_bt) -> (loglik_b, all_greedy_b)``.

    ``targets_bt[:, t]`` is the token after position ``t``; only positions with ``scored_bt`` count.
    """

    def score(state, ids_bt, mask_bt, targets_bt, scored_bt):
        model = nnx.merge(graphdef, state)
        hidden_btd = model.hidden_states(ids_bt, attention_mask=mask_bt)
        w_dv = model.lm_head_weight()
        t = ids_bt.shape[1]

        def one_chunk(args):
            h_bcd, tgt_bc = args
            logits_bcv = jnp.dot(h_bcd, w_dv.astype(h_bcd.dtype), preferred_element_type=jnp.float32)
            lse_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
            tgt_logit_bc = jnp.take_along_axis(logits_bcv, tgt_bc[..., None], axis=-1)[..., 0]
            return tgt_logit_bc - lse_bc, jnp.argmax(logits_bcv, axis=-1) == tgt_bc

        chunk = min(logits_chunk, t)
        logp_cbc, greedy_cbc = jax.lax.map(one_chunk, (to_chunks(hidden_btd, chunk), to_chunks(targets_bt, chunk)))
        logp_bt, greedy_bt = from_chunks(logp_cbc, t), from_chunks(greedy_cbc, t)
        loglik_b = jnp.sum(jnp.where(scored_bt, logp_bt, 0.0), axis=-1)
        greedy_b = jnp.all(jnp.where(scored_bt, greedy_bt, True), axis=-1)
        return loglik_b, greedy_b

    return jax.jit(score)


@register_model(REGISTERED_NAME)
class SelfAugJaxLM(TemplateLM):
    """lm-eval ``LM`` over a :class:`~selfaug_jax.models.DecoderLM` (see the module docstring).

    Construct from ``model_args`` (``SelfAugJaxLM(pretrained=..., dtype=...)``) or around a loaded model with
    :meth:`from_model`.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        model = kwargs.pop("_model", None)
        tokenizer = kwargs.pop("_tokenizer", None)
        self.config = BackendConfig.from_kwargs(kwargs)
        if model is None:
            try:
                spec = EvalModelSpec(pretrained=self.config.pretrained, adapter=self.config.adapter,
                                     merge=self.config.merge, method=self.config.method, dtype=self.config.dtype)
                model, tokenizer, resolved = load_eval_model(spec)
            except (ValueError, FileNotFoundError) as e:  # bad path / method / adapter: one line, not a traceback
                message = " ".join(line.strip() for line in str(e).splitlines()) or type(e).__name__
                raise BackendError(f"{REGISTERED_NAME}: {message}") from None
            logger.info("%s: %s", REGISTERED_NAME, resolved.description)
        if kwargs.get("device"):
            logger.info("%s: device=%s ignored; JAX runs on %s", REGISTERED_NAME, kwargs["device"],
                        jax.devices()[0].platform)
        self.model: DecoderLM = model
        self.tokenizer = tokenizer
        self._graphdef, self._state = nnx.split(model)
        self._scorer = _make_scorer(self._graphdef, self.config.logits_chunk)
        self._pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)

    @classmethod
    def from_model(cls, model: DecoderLM, tokenizer: Any, **kwargs: Any) -> "SelfAugJaxLM":
        """Wrap an already loaded model and its HF tokenizer (``pretrained`` is then only a label)."""
        return cls(_model=model, _tokenizer=tokenizer, **kwargs)

    # ------------------------------------------------------------------ properties lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self.config.max_length or int(self.model.config.max_position_embeddings)

    @property
    def max_gen_toks(self) -> int:
        return self.config.max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    # ------------------------------------------------------------------ tokenization (as HFLM)
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = self.config.add_bos_token
            bos_text = self.tokenizer.decode(self.prefix_token_id)
            if bos_text and string.startswith(bos_text):
                add_special_tokens = False
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = list(self.tokenizer.encode(string, **special))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The tokenizer's chat template, as HFLM renders it (``continue_final_message`` when not adding a
        generation prompt)."""
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # ------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests: Sequence[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """``(loglik, is_greedy)`` per ``(key, context_ids, continuation_ids)``, in request order."""
        rows: list[tuple[list[int], int]] = []  # (input ids incl. the final target, n continuation tokens)
        for key, ctx, cont in requests:
            if not cont or not ctx:
                raise BackendError(f"{REGISTERED_NAME}: empty context or continuation in request {key!r}")
            if len(cont) > self.max_length:
                raise BackendError(f"{REGISTERED_NAME}: continuation of {len(cont)} tokens exceeds "
                                 f"max_length={self.max_length} in request {key!r}")
            rows.append(((ctx + cont)[-(self.max_length + 1):], len(cont)))
        n_truncated = sum(len(c) + len(k) > self.max_length + 1 for _, c, k in requests)
        if n_truncated:
            logger.warning("%s: %d of %d requests left-truncated to max_length=%d", REGISTERED_NAME, n_truncated,
                           len(requests), self.max_length)
        buckets = bucket_lengths(self.max_length, self.config.min_bucket)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        bs = self.batch_size
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            length = next(b for b in buckets if b >= max(len(rows[i][0]) - 1 for i in idx))
            ids_bt = np.full((bs, length), self._pad_id, np.int32)
            mask_bt = np.zeros((bs, length), np.int32)
            tgt_bt = np.zeros((bs, length), np.int32)
            scored_bt = np.zeros((bs, length), bool)
            mask_bt[len(idx):, 0] = 1  # dummy rows: one real token, never scored
            for r, i in enumerate(idx):
                full, k = rows[i]
                n = len(full) - 1
                ids_bt[r, :n] = full[:-1]
                mask_bt[r, :n] = 1
                tgt_bt[r, :n] = full[1:]
                scored_bt[r, n - k:n] = True
            loglik_b, greedy_b = jax.device_get(self._scorer(self._state, ids_bt, mask_bt, tgt_bt, scored_bt))
            for r, i in enumerate(idx):
                out[i] = (float(loglik_b[r]), bool(greedy_b[r]))
                key = requests[i][0]
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, out[i])
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each string over disjoint ``max_length`` windows (HFLM's windows)."""
        windows: list[tuple[None, list[int], list[int]]] = []
        owner: list[int] = []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, scores):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def _generation_config(self, gen_kwargs: dict[str, Any]) -> tuple[GenerationConfig, list[str]]:
        """Decoding settings and stop strings of one request's ``gen_kwargs`` (unsupported keys rejected)."""
        if not isinstance(gen_kwargs, dict):
            raise BackendError(f"{REGISTERED_NAME}: gen_kwargs must be a dict, got {type(gen_kwargs).__name__}")
        kw = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        unknown = sorted(set(kw) - set(_GEN_KWARGS))
        if unknown:
            raise BackendError(f"{REGISTERED_NAME}: unsupported generation kwargs {', '.join(unknown)}; "
                             f"supported: {', '.join(_GEN_KWARGS)}")
        eos_text = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        until = handle_stop_sequences(kw.get("until"), eos=eos_text)
        greedy = not kw.get("do_sample") or float(kw.get("temperature", 0.0)) == 0.0
        eos_ids = list(self.model.config.eos_token_ids)
        if self.eot_token_id is not None and self.eot_token_id not in eos_ids:
            eos_ids.append(int(self.eot_token_id))
        for stop in until:  # a single-token stop string ends decoding early unless a longer stop string contains it
            ids = self.tokenizer.encode(stop, add_special_tokens=False) if stop else []
            if len(ids) == 1 and not any(stop in other and stop != other for other in until):
                if ids[0] not in eos_ids:
                    eos_ids.append(int(ids[0]))
        config = GenerationConfig(
            max_new_tokens=int(kw["max_gen_toks"]),
            temperature=0.0 if greedy else float(kw["temperature"]),
            top_p=float(kw.get("top_p") or 1.0) if not greedy else 1.0,
            top_k=int(kw["top_k"]) if (not greedy and kw.get("top_k")) else None,
            eos_token_ids=tuple(eos_ids),
            pad_token_id=self._pad_id,
            seed=int(kw.get("seed", 0)),
            prompt_bucket=self.config.prompt_bucket,
        )
        return config, until

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when a task asks) continuations cut at the first stop string."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):  # one decoding configuration per group
            groups.setdefault(repr(sorted(req.args[1].items(), key=lambda kv: kv[0])), []).append(i)
        for idx_all in groups.values():
            config, until = self._generation_config(requests[idx_all[0]].args[1])
            max_ctx = self.max_length - config.max_new_tokens
            if max_ctx < 1:
                raise BackendError(f"{REGISTERED_NAME}: max_gen_toks={config.max_new_tokens} leaves no room for a "
                                 f"prompt in max_length={self.max_length}")
            encoded = {i: self.tok_encode(requests[i].args[0]) for i in idx_all}
            n_cut = sum(len(e) > max_ctx for e in encoded.values())
            if n_cut:
                logger.warning("%s: %d prompts left-truncated to %d tokens", REGISTERED_NAME, n_cut, max_ctx)
            order = sorted(idx_all, key=lambda i: -len(encoded[i]))
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                prompts = [encoded[i][-max_ctx:] for i in idx]
                prompts += [prompts[0]] * (self.batch_size - len(prompts))
                result = generate(self.model, prompts, config)
                for i, row in zip(idx, result.sequences()):
                    text = postprocess_generated_text(self.tokenizer.decode(row, skip_special_tokens=True),
                                                      stop=until, think_end_token=None)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out  # type: ignore[return-value]
