"""KV-cache generation: token equality with a no-cache reference and transformers' generate, EOS handling,
sampling (top-k / top-p / seeds), compile caching, and the default model answering a real question."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from selfaug_jax.models import load_pretrained, load_tokenizer
from selfaug_jax.models.generation import (
    GenerationConfig,
    compiled_count,
    generate,
    generate_completions,
    generate_text,
    greedy_generate_no_cache,
    left_pad,
    sample_logits,
    stop_string_token_ids,
    truncate_at_stop,
)
from torch_reference import TINY, make_tiny_hf_model

N = 16  # new tokens
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 40, 50, 60], [20, 21, 22], [30, 31, 32, 33, 34]]  # different lengths


def _make_qwen2_untied(out_dir, seed=0):
    """Like ``make_tiny_hf_model`` but an untied qwen2 (tied tiny random models just repeat the last token)."""
    config = transformers.Qwen2Config(**TINY, rope_theta=1000000.0, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in pname else 0.0))
    model.eval().save_pretrained(out_dir, safe_serialization=True)
    return model


@pytest.fixture(scope="module", params=["llama3-untied", "qwen2-untied", "mistral"])
def tiny(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf = _make_qwen2_untied(d) if request.param == "qwen2-untied" else make_tiny_hf_model(request.param, d)
    return hf, load_pretrained(d)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """One tiny model for the tests that do not depend on the architecture."""
    d = tmp_path_factory.mktemp("llama")
    make_tiny_hf_model("llama3-untied", d)
    return load_pretrained(d)


def _hf_greedy(hf, prompts, max_new, eos=None, pad=0):
    ids, mask = left_pad(prompts, pad)
    with torch.no_grad():
        out = hf.generate(
            torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),  # HF derives position ids from the mask
            max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=pad,
        )
    return out[:, ids.shape[1]:].numpy()


def test_greedy_cache_equals_no_cache_equals_transformers(tiny):
    hf, model = tiny
    res = generate(model, PROMPTS, GenerationConfig(max_new_tokens=N, eos_token_ids=()))
    assert res.tokens.shape == (3, N) and res.tokens.dtype == np.int32
    np.testing.assert_array_equal(res.lengths, [N, N, N])
    assert not res.stopped_on_eos.any()
    assert len(set(res.tokens[0].tolist())) > 3  # not a degenerate repeat
    np.testing.assert_array_equal(res.tokens, greedy_generate_no_cache(model, PROMPTS, N))
    np.testing.assert_array_equal(res.tokens, _hf_greedy(hf, PROMPTS, N))


def test_eos_stopping_pads_and_matches_transformers(tiny):
    hf, model = tiny
    free = generate(model, PROMPTS, GenerationConfig(max_new_tokens=N, eos_token_ids=())).tokens
    eos = int(free[0, 4])  # row 0 stops at its first occurrence of this token (position <= 4)
    pad = next(p for p in range(128) if p != eos)
    res = generate(model, PROMPTS, GenerationConfig(max_new_tokens=N, eos_token_ids=(eos,), pad_token_id=pad))
    for row in range(3):
        hits = np.flatnonzero(free[row] == eos)
        n = int(hits[0]) + 1 if hits.size else N
        assert res.lengths[row] == n and res.stopped_on_eos[row] == bool(hits.size)
        np.testing.assert_array_equal(res.tokens[row, :n], free[row, :n])
        assert (res.tokens[row, n:] == pad).all()
    assert res.lengths[0] <= 5 and res.stopped_on_eos[0]
    assert res.sequences()[0][-1] == eos
    # transformers stops at the same place and pads the same way (its output is as wide as the longest row)
    ref = _hf_greedy(hf, PROMPTS, N, eos=eos, pad=pad)
    np.testing.assert_array_equal(res.tokens[:, : ref.shape[1]], ref)
    ref_nc = greedy_generate_no_cache(model, PROMPTS, N, eos_token_ids=(eos,), pad_token_id=pad)
    np.testing.assert_array_equal(res.tokens, ref_nc)


def test_sampling_seeds_and_greedy_limits(llama):
    model = llama
    base = dict(max_new_tokens=N, eos_token_ids=())
    greedy = generate(model, PROMPTS, GenerationConfig(**base)).tokens
    a = generate(model, PROMPTS, GenerationConfig(**base, temperature=1.0, seed=3)).tokens
    b = generate(model, PROMPTS, GenerationConfig(**base, temperature=1.0, seed=3)).tokens
    c = generate(model, PROMPTS, GenerationConfig(**base, temperature=1.0, seed=4)).tokens
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != greedy).any()
    tiny_p = generate(model, PROMPTS, GenerationConfig(**base, temperature=0.8, top_p=1e-6, seed=5)).tokens
    np.testing.assert_array_equal(tiny_p, greedy)
    k1 = generate(model, PROMPTS, GenerationConfig(**base, temperature=1.5, top_k=1, seed=6)).tokens
    np.testing.assert_array_equal(k1, greedy)


def test_sample_logits_filters_distribution():
    probs = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
    logits_bv = jnp.log(jnp.asarray(probs))[None, :]
    keys = jax.random.split(jax.random.key(0), 4000)

    def draw(top_p, top_k, use_top_k, use_top_p):
        f = lambda k: sample_logits(logits_bv, k, jnp.float32(1.0), jnp.float32(top_p), jnp.int32(top_k),
                                    use_top_k=use_top_k, use_top_p=use_top_p)[0]
        return np.bincount(np.asarray(jax.vmap(f)(keys)), minlength=4) / len(keys)

    np.testing.assert_allclose(draw(1.0, 0, False, False), probs, atol=0.03)
    # top_p=0.5: mass before token 1 is 0.4 < 0.5 -> keep {0, 1}; renormalised 4/7, 3/7
    np.testing.assert_allclose(draw(0.5, 0, False, True), [4 / 7, 3 / 7, 0, 0], atol=0.03)
    # top_k=3 -> {0, 1, 2}: 4/9, 3/9, 2/9
    np.testing.assert_allclose(draw(1.0, 3, True, False), [4 / 9, 3 / 9, 2 / 9, 0], atol=0.03)
    # top_k then top_p (transformers' order): {0,1,2} renormalised, mass before token 2 is 7/9 >= 0.7 -> {0, 1}
    np.testing.assert_allclose(draw(0.7, 3, True, True), [4 / 7, 3 / 7, 0, 0], atol=0.03)


def _reference_probs(logits, temperature, top_k, top_p):
    """float64 NumPy: softmax(logits / T), then keep the top_k, then the smallest top-p set (transformers' order)."""
    z = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-z)
    keep = np.zeros(z.shape, bool)
    keep[order[:top_k]] = True
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    mass_before = np.cumsum(p[order]) - p[order]
    nucleus = np.zeros(z.shape, bool)
    nucleus[order[(mass_before < top_p) & keep[order]]] = True
    q = np.where(nucleus, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 5, 1.0), (1.0, 5, 1.0), (0.95, 3, 0.7)])
def test_sample_logits_matches_numpy_reference(temperature, top_k, top_p):
    """Temperature with top-p 1 (MAGPIE's instruction sampling) and SDFT's temperature + top-k + top-p, against a
    float64 NumPy reference of the sampling distribution on fixed logits."""
    logits = np.array([2.0, 1.2, 0.9, -0.3, -1.0], np.float32)
    keys = jax.random.split(jax.random.key(1), 6000)
    f = lambda k: sample_logits(jnp.asarray(logits)[None], k, jnp.float32(temperature), jnp.float32(top_p),
                                jnp.int32(top_k), use_top_k=top_k < 5, use_top_p=top_p < 1.0)[0]
    freq = np.bincount(np.asarray(jax.vmap(f)(keys)), minlength=5) / len(keys)
    ref = _reference_probs(logits, temperature, top_k, top_p)
    np.testing.assert_allclose(freq, ref, atol=0.02)
    if temperature == 0.7:  # the temperature sharpens: not the T=1 distribution
        assert abs(ref[0] - _reference_probs(logits, 1.0, 5, 1.0)[0]) > 0.05


class _OneCharTokenizer:
    """Token i decodes to its own character (10 is a newline, 0 is EOS); enough for generate_completions."""

    eos_token_id, pad_token_id = 0, 0

    def __len__(self):
        return 128

    def decode(self, ids, skip_special_tokens=False):
        return "".join("" if (i == 0 and skip_special_tokens) else ("\n" if i == 10 else chr(0x4E00 + i))
                       for i in ids)

    def batch_decode(self, rows, skip_special_tokens=False):
        return [self.decode(r, skip_special_tokens) for r in rows]


def test_stop_strings_and_per_batch_seeds(llama):
    tok = _OneCharTokenizer()
    assert stop_string_token_ids(tok, ["\n"]) == (10,) and stop_string_token_ids(tok, []) == ()
    assert truncate_at_stop("ab\ncd", ["\n", "c"]) == ("ab", True) and truncate_at_stop("ab", ["x"]) == ("ab", False)
    cfg = GenerationConfig(max_new_tokens=N, eos_token_ids=(), temperature=1.0, seed=2)
    free = generate(llama, PROMPTS, cfg).tokens  # one batch of 3: the seed of batch 0 below differs, so compare
    done = generate_completions(llama, tok, PROMPTS, cfg, stop_token_ids=(10,), batch_size=3)
    again = generate_completions(llama, tok, PROMPTS, cfg, stop_token_ids=(10,), batch_size=3)
    assert done == again  # seeded
    # greedy: a stop id ends the row at its first occurrence, the text is cut before it
    g = GenerationConfig(max_new_tokens=N, eos_token_ids=())
    ref = generate(llama, PROMPTS, g).tokens
    stop = int(ref[0, 3])
    out = generate_completions(llama, tok, PROMPTS, g, stop_strings=[tok.decode([stop])], batch_size=2)
    for row, c in zip(ref, out):
        hits = np.flatnonzero(row == stop)
        n = int(hits[0]) if hits.size else N
        assert c.text == tok.decode(row[:n].tolist()) and c.finished == bool(hits.size)
        assert c.num_tokens == (n + 1 if hits.size else N)
    # a stop string of two tokens ends the row inside the loop (num_tokens), not only in the decoded text
    pair = tok.decode([int(ref[0, 3]), int(ref[0, 4])])
    split = generate_completions(llama, tok, PROMPTS, g, stop_strings=[pair], batch_size=3)
    for row, c in zip(ref, split):
        text = tok.decode(row.tolist())
        n = text.find(pair)
        assert c.text == (text[:n] if n >= 0 else text) and c.finished == (n >= 0)
        assert c.num_tokens == (n + 2 if n >= 0 else N)
    # identical prompts in different batches get different samples; in one batch the rows differ too
    same = generate_completions(llama, tok, [PROMPTS[0]] * 4, cfg, batch_size=2)
    assert same[0].text != same[2].text and same[0].text != same[1].text
    assert len(free) == 3


def test_bucketing_reuses_compilation_and_array_input(llama):
    model = llama
    cfg = GenerationConfig(max_new_tokens=5, eos_token_ids=())
    ids, mask = left_pad(PROMPTS, 0, bucket=64)
    assert ids.shape == (3, 64) and mask.sum(1).tolist() == [10, 3, 5]
    first = generate(model, PROMPTS, cfg).tokens
    before = compiled_count(model)
    longer = [p + [1, 2, 3] for p in PROMPTS]  # still within one 64-token bucket
    generate(model, longer, cfg)
    generate(model, PROMPTS, GenerationConfig(max_new_tokens=5, eos_token_ids=(), temperature=0.0, seed=9))
    assert compiled_count(model) == before
    # right-padded array + mask gives the same tokens as the ragged list
    arr = np.zeros((3, 12), np.int64)
    arr_mask = np.zeros((3, 12), np.int64)
    for i, p in enumerate(PROMPTS):
        arr[i, : len(p)], arr_mask[i, : len(p)] = p, 1
    np.testing.assert_array_equal(generate(model, arr, cfg, attention_mask=arr_mask).tokens, first)


class _CharTokenizer:
    """Minimal tokenizer stand-in for a 128-token tiny model: ids are character codes."""

    eos_token_id = 127

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def encode(self, text, add_special_tokens=True):
        return [ord(c) % 127 for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == self.eos_token_id))


def test_generate_text_batches_in_order(llama):
    model = llama
    tok = _CharTokenizer()
    prompts = ["ab", "hello", [{"role": "user", "content": "xyz"}]]
    cfg = GenerationConfig(max_new_tokens=6)
    texts = generate_text(model, tok, prompts, cfg, batch_size=2)  # last batch padded with a copy
    eos = tuple(dict.fromkeys(model.config.eos_token_ids + (127,)))
    encoded = [tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": p}] if isinstance(p, str) else p, True, False)) for p in prompts]
    cfg_ids = GenerationConfig(max_new_tokens=6, eos_token_ids=eos)
    rows = [generate(model, batch, cfg_ids).sequences() for batch in (encoded[:2], encoded[2:] * 2)]
    expected = [tok.decode(s, skip_special_tokens=True) for s in rows[0] + rows[1][:1]]
    assert texts == expected and len(texts) == 3


# ------------------------------------------------------------------------------------------- the default model
@pytest.fixture(scope="module")
def smollm():
    return load_pretrained("smollm2-135m-instruct"), load_tokenizer("smollm2-135m-instruct")


def test_default_model_answers_paris(smollm):
    model, tokenizer = smollm
    cfg = GenerationConfig(max_new_tokens=20)
    (answer,) = generate_text(model, tokenizer, ["What is the capital of France?"], cfg)  # compiles
    t0 = time.perf_counter()
    (again,) = generate_text(model, tokenizer, ["What is the capital of France?"], cfg)
    seconds = time.perf_counter() - t0
    assert "Paris" in answer and again == answer
    print(f"\nsmollm2-135m greedy: {answer!r} in {seconds:.2f}s after compilation")
