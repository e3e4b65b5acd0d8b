"""The tokenizer, tokenizer config and generation config of a GGUF file, as Hugging Face files.

Part of the GGUF -> HF conversion (:mod:`selfaug_jax.checkpoints.gguf`): a byte-level BPE ``tokenizers.Tokenizer``
is rebuilt from the ``tokenizer.ggml.*`` metadata (vocabulary, merges, token types, and the pre-tokenizer that
llama.cpp selects by ``tokenizer.ggml.pre``), so the converted directory tokenizes as llama.cpp does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from selfaug_jax.checkpoints.gguf import GGUFConversionError, _require

logger = logging.getLogger(__name__)

# GGUF token types (llama.cpp ``llama_token_type``; gguf.constants.TokenType).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# Pre-tokenizer regexes, as llama.cpp's llama-vocab.cpp (``llm_tokenizer_bpe`` constructor) lists them per
# ``tokenizer.ggml.pre``. GPT-2's own regex is what ``pre_tokenizers.ByteLevel(use_regex=True)`` applies.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# "\p{N}" isolated first, then the GPT-2 regex (llama.cpp: STARCODER, REFACT, COMMAND_R, SMOLLM, CODESHELL,
# EXAONE, MINERVA). ``Digits(individual_digits=True)`` is the same split (Rust ``char::is_numeric`` == \p{N}),
# and is what SmolLM2's own tokenizer.json uses.
_DIGITS_THEN_GPT2 = ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva")
_PLAIN_GPT2 = ("gpt2", "default", "mpt", "olmo", "jais")
_SPLIT_THEN_BYTELEVEL = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}  # fmt: skip
SUPPORTED_PRE_TOKENIZERS = tuple(sorted((*_DIGITS_THEN_GPT2, *_PLAIN_GPT2, *_SPLIT_THEN_BYTELEVEL)))


def _pre_tokenizer(pre: str | None, path: str) -> Any:
    """The ``tokenizers`` pre-tokenizer matching llama.cpp's ``tokenizer.ggml.pre``."""
    from tokenizers import Regex, pre_tokenizers

    pre = pre or "default"
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])  # fmt: skip
    if pre in _PLAIN_GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _SPLIT_THEN_BYTELEVEL:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_THEN_BYTELEVEL[pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ])  # fmt: skip
    raise GGUFConversionError(
        f"{path}: tokenizer.ggml.pre={pre!r} is not supported; supported: {', '.join(SUPPORTED_PRE_TOKENIZERS)}"
    )


def build_bpe_tokenizer(meta: dict[str, Any], path: str = "<gguf>") -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` from ``tokenizer.ggml.*`` metadata (``model == "gpt2"``).

    Control tokens (type 3) become special added tokens and user-defined ones (type 4) plain added tokens, so
    both are matched whole in text, as llama.cpp does. A bos/eos is added by the post-processor only when the
    GGUF's ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` ask for it.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFConversionError(f"{path}: tokenizer.ggml.model={model!r}; only byte-level BPE 'gpt2' is built")
    tokens: list[str] = list(_require(meta, "tokenizer.ggml.tokens", path))
    merges_raw: list[str] = list(_require(meta, "tokenizer.ggml.merges", path))
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if len(types) != len(tokens):
        raise GGUFConversionError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries, tokens {len(tokens)}")

    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if tok in vocab:
            raise GGUFConversionError(f"{path}: duplicate token {tok!r} (ids {vocab[tok]} and {i})")
        vocab[tok] = i
    merges: list[tuple[str, str]] = []
    for i, merge in enumerate(merges_raw):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise GGUFConversionError(f"{path}: tokenizer.ggml.merges[{i}]={merge!r} is not 'left right'")
        merges.append((parts[0], parts[1]))

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"), path)
    tokenizer.decoder = decoders.ByteLevel()

    special_ids = {i for i, t in enumerate(types) if t == _TOKEN_TYPE_CONTROL}
    for key in ("bos", "eos", "unknown", "padding", "eot", "eom"):
        tid = meta.get(f"tokenizer.ggml.{key}_token_id")
        if tid is not None and 0 <= int(tid) < len(tokens):
            special_ids.add(int(tid))
    tokenizer.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special_ids)]
    )
    user = [i for i, t in enumerate(types) if t == _TOKEN_TYPE_USER_DEFINED and i not in special_ids]
    tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if add_bos or add_eos:
        bos = tokens[int(_require(meta, "tokenizer.ggml.bos_token_id", path))] if add_bos else None
        eos = tokens[int(_require(meta, "tokenizer.ggml.eos_token_id", path))] if add_eos else None
        single = " ".join([*([bos] if bos else []), "$A", *([eos] if eos else [])])
        pair = " ".join([single, *([bos] if bos else []), "$B:1", *([eos] if eos else [])])
        tokenizer.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in {bos, eos} if t]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def tokenizer_config_from_gguf(meta: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """``tokenizer_config.json`` contents: special tokens, chat template, bos/eos flags, max length."""
    tokens = meta.get("tokenizer.ggml.tokens") or []

    def tok(key: str) -> str | None:
        tid = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(tid)] if tid is not None and 0 <= int(tid) < len(tokens) else None

    out: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok("bos"),
        "eos_token": tok("eos"),
        "pad_token": tok("padding"),
        "unk_token": tok("unknown"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if "tokenizer.chat_template" in meta:
        out["chat_template"] = meta["tokenizer.chat_template"]
    return out


def generation_config_from_gguf(meta: dict[str, Any]) -> dict[str, Any]:
    """``generation_config.json``: bos, pad, and every end-of-generation id (eos, eot, eom) the GGUF names."""
    eos = []
    for key in ("eos", "eot", "eom"):
        tid = meta.get(f"tokenizer.ggml.{key}_token_id")
        if tid is not None and int(tid) not in eos:
            eos.append(int(tid))
    out: dict[str, Any] = {"_from_model_config": False}
    if meta.get("tokenizer.ggml.bos_token_id") is not None:
        out["bos_token_id"] = int(meta["tokenizer.ggml.bos_token_id"])
    if eos:
        out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if meta.get("tokenizer.ggml.padding_token_id") is not None:
        out["pad_token_id"] = int(meta["tokenizer.ggml.padding_token_id"])
    return out


def write_tokenizer(meta: dict[str, Any], config: dict[str, Any], gguf_path: Path, out_dir: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json (native BPE; transformers' GGUF converter otherwise)."""
    tok_config = tokenizer_config_from_gguf(meta, config)
    hf_json = meta.get("tokenizer.huggingface.json")
    if hf_json:  # the GGUF carries the original tokenizer.json verbatim: nothing to rebuild
        (out_dir / "tokenizer.json").write_text(hf_json, encoding="utf-8")
    elif meta.get("tokenizer.ggml.model") == "gpt2":
        build_bpe_tokenizer(meta, str(gguf_path)).save(str(out_dir / "tokenizer.json"))
    else:  # sentencepiece-style vocabularies: let transformers' own GGUF tokenizer conversion do it
        logger.warning("tokenizer.ggml.model=%r: using transformers' GGUF tokenizer conversion",
                       meta.get("tokenizer.ggml.model"))  # fmt: skip
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        hf_tok.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
