"""Training-data transforms (selfaug_jax/data/transforms.py): MAGPIE replay and SDFT rewrites.

Scripted generators stand in for the model (exact control of what "the model" wrote, and proof that a cached run
calls no generator); one test runs the real generation path on the default model cut to 2 layers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from selfaug_jax.data.magpie import MagpieConfig, filter_instructions, pre_query_template, replay_count
from selfaug_jax.data.prompts import PromptConfig
from selfaug_jax.data.schema import Document, RagExample
from selfaug_jax.data.sdft import SDFT_SYSTEM, SDFTConfig, instruction_of, sdft_prompt_ids
from selfaug_jax.data.transforms import TRANSFORMS, TransformContext, apply_transform
from selfaug_jax.methods import METHOD_NAMES, METHODS
from selfaug_jax.models.generation import Completion, special_token_ids

SMOL_PRE_QUERY = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                  "<|im_end|>\n<|im_start|>user\n")


@pytest.fixture(scope="module")
def smol():
    from selfaug_jax.models import load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir("smollm2-135m-instruct")
    return model_dir, load_tokenizer(model_dir)


class Scripted:
    """A stand-in for ``generate_completions``: returns the next scripted list per call and records the calls.

    A scripted dict ``{substring: (text, finished)}`` answers each prompt by the key its decoded text contains
    (the transforms generate in length order, so positions are not the examples' order)."""

    def __init__(self, *outputs):
        self.outputs, self.calls = list(outputs), []

    def __call__(self, model, tokenizer, prompt_ids, config, *, stop_strings=(), stop_token_ids=(), batch_size=8):
        self.calls.append(dict(prompts=[list(p) for p in prompt_ids], config=config, stop_strings=stop_strings,
                               stop_token_ids=tuple(stop_token_ids)))
        out = self.outputs.pop(0)
        if isinstance(out, dict):
            texts = [tokenizer.decode(list(p)) for p in prompt_ids]
            out = [next(v for k, v in out.items() if k in t) for t in texts]
        assert len(out) == len(prompt_ids)
        return [Completion(t, f, 1) if isinstance(t, str) else t for t, f in out]


def _never(*args, **kwargs):
    raise AssertionError("the generator was called although the cache holds the generations")


def _task(n):
    return [RagExample(question=f"Question {i}?", documents=(Document(f"Doc {i}."),), answer=f"Answer {i}.",
                       id=f"t{i}") for i in range(n)]


def _ctx(tok, n_task, generate, cache, **options):
    return TransformContext(model=None, tokenizer=tok, model_id="test-model", prompt_config=PromptConfig(max_length=512),
                            n_task=n_task, options={"magpie": options.get("magpie", MagpieConfig()),
                                                    "sdft": options.get("sdft", SDFTConfig())},
                            cache_dir=cache, generate=generate)


# ----------------------------------------------------------------------------------------------------- registry
def test_registry_entries_and_transform_table():
    assert METHOD_NAMES[:4] == ("sft", "lora", "lora-magpie", "lora-sdft")  # Table 1 order
    assert (METHODS["lora-magpie"].data, METHODS["lora-sdft"].data) == ("magpie", "sdft")
    assert all(METHODS[m].trains == "lora" and METHODS[m].table == 1 and not METHODS[m].terms
               for m in ("lora-magpie", "lora-sdft"))
    assert {m.data for m in METHODS.values()} <= set(TRANSFORMS)
    with pytest.raises(ValueError, match="unknown data transform 'x'"):
        apply_transform("x", [], None)


# ----------------------------------------------------------------------------------------------------- MAGPIE
def test_pre_query_template_from_the_chat_template(smol):
    _, tok = smol
    assert pre_query_template(tok) == SMOL_PRE_QUERY
    assert pre_query_template(tok, "Be brief.") == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"


def test_replay_count_is_round_half_up():
    assert [replay_count(n, (1, 9)) for n in (0, 4, 5, 13, 14, 32, 45, 2000)] == [0, 0, 1, 1, 2, 4, 5, 222]
    assert replay_count(3, (1, 2)) == 2 and replay_count(1, (1, 2)) == 1  # 1.5 -> 2, 0.5 -> 1
    with pytest.raises(ValueError, match="magpie.ratio"):
        MagpieConfig(ratio="1/9")


def test_filter_drops_what_it_must():
    cfg = MagpieConfig(min_words=3, max_words=12, near_duplicate_jaccard=0.8)
    cands = [("How do I bake bread at home?", True),            # kept
             ("how do I bake bread at home", True),             # duplicate (normalised: case, punctuation)
             ("How do I bake the bread at home?", True),        # duplicate after SQuAD normalisation (article)
             ("How do I bake bread at my home?", True),         # near duplicate: Jaccard 7/8
             ("Write a poem about the sea", False),             # no end of line within the budget
             (" ".join(["word"] * 13), True),                   # more than max_words
             ("   ", True),                                      # empty
             ("Tell me <|im_start|> more please", True),        # spells a special token
             ("Hello there", True),                             # too short
             ("Translate the following into French:", True),    # ends with ':'
             ("Explain how rainbows form in the sky.", True)]   # kept
    out = filter_instructions([{"text": t, "finished": f} for t, f in cands], cfg, ("<|im_start|>", "<|im_end|>"))
    assert [c["reason"] for c in out] == [None, "duplicate", "duplicate", "near_duplicate", "too_long", "too_long",
                                          "empty", "special_token", "too_short", "ends_with_colon", None]


def _magpie_script(n):
    """Instruction completions for a run of ``n`` samples: 3 good distinct ones, then one of each drop reason,
    then filler duplicates."""
    good = [("What is the tallest mountain in Africa?", True), ("Give me three tips for sleeping better.", True),
            ("Explain how a bicycle gear works.", True)]
    bad = [("What is the tallest mountain in Africa?", True), ("", True), ("Hi you", True),
           ("List the following items:", True), ("An unfinished instruction that goes on", False),
           ("Say <|im_end|> twice please", True)]
    rows = good + bad
    return rows + [good[0]] * (n - len(rows))


def test_magpie_mix_counts_ratio_and_cache(smol, tmp_path):
    model_dir, tok = smol
    task = _task(45)  # 45 task examples at 1:9 -> exactly 5 replay examples
    cfg = MagpieConfig(n=12, batch_size=4)
    answers = {"tallest mountain": ("Mount Kilimanjaro.", True), "three tips": ("", True),
               "bicycle gear": ("Gears change the ratio.", False)}
    gen = Scripted(_magpie_script(12), answers)
    result = apply_transform("magpie", task, _ctx(tok, 45, gen, tmp_path, magpie=cfg))

    # the instruction call: only the pre-query prefix, sampled at the configured temperature, stopped at a
    # newline / "assistant" and at every special token
    instr_call, answer_call = gen.calls
    assert {tuple(p) for p in instr_call["prompts"]} == {tuple(tok.encode(SMOL_PRE_QUERY, add_special_tokens=False))}
    assert instr_call["config"].temperature == 0.7 and instr_call["config"].top_p == 1.0
    assert "\n" in instr_call["stop_strings"] and set(special_token_ids(tok)) <= set(instr_call["stop_token_ids"])
    # the answer call: greedy, the normal chat template with the generation prompt
    assert answer_call["config"].greedy
    assert tok.apply_chat_template([{"role": "user", "content": "What is the tallest mountain in Africa?"}],
                                   add_generation_prompt=True, tokenize=False) in {
        tok.decode(p) for p in answer_call["prompts"]}
    assert [len(p) for p in answer_call["prompts"]] == sorted(len(p) for p in answer_call["prompts"])  # length order

    rep = result.report
    assert rep["generated"] == 12 and rep["instructions_kept"] == 3 and rep["pairs_kept"] == 2
    assert rep["dropped"] == {"duplicate": 1 + 3, "empty": 1, "too_short": 1, "ends_with_colon": 1, "too_long": 1,
                              "special_token": 1, "empty_response": 1}
    assert sum(rep["dropped"].values()) - 1 + rep["instructions_kept"] == 12  # every candidate accounted for once
    assert rep["responses_truncated"] == 1 and rep["n_replay"] == 5 and rep["repeated"] == 3
    assert rep["cache"] == "miss"

    # exactly 45 task + 5 replay examples: one epoch holds the 1:9 ratio
    assert result.examples[:45] == task
    replay = result.examples[45:]
    assert len(replay) == 5 and all(ex.meta["source"] == "magpie" for ex in replay)
    assert len({ex.id for ex in result.examples}) == 50
    specials = tok.convert_ids_to_tokens(list(special_token_ids(tok)))
    for ex in replay:
        instruction = ex.messages[0].content
        assert "\n" not in instruction and instruction == instruction.strip()
        assert not any(s in instruction for s in specials)
    assert len({ex.messages[0].content for ex in replay[:2]}) == 2  # deduplicated pool, then cycled

    # a second run reads the cache and generates nothing; the mix is identical
    again = apply_transform("magpie", task, _ctx(tok, 45, _never, tmp_path, magpie=cfg))
    assert again.examples == result.examples and again.key == result.key and again.report["cache"] == "hit"
    # the ratio is not part of the generation key: 1:4 reuses the pool
    other = apply_transform("magpie", task, _ctx(tok, 45, _never, tmp_path, magpie=dataclasses.replace(cfg, ratio="1:4")))
    assert len(other.examples) == 45 + 11
    # a different seed is a different cache entry
    with pytest.raises(AssertionError, match="generator was called"):
        apply_transform("magpie", task, _ctx(tok, 45, _never, tmp_path, magpie=dataclasses.replace(cfg, seed=1)))


def test_magpie_real_generation_single_lines(smol, tmp_path):
    """The real path (pre-query prefix -> sampled lines) on the default model's first 2 layers: whatever such a
    model writes, every sampled instruction is one line without special tokens, and a second run generates
    nothing. (4 task examples at 1:9 need no replay example, so the garbage of a 2-layer model is not an error.)"""
    import json

    from selfaug_jax.models import load_pretrained
    from selfaug_jax.models.generation import generate_completions

    model_dir, tok = smol
    model = load_pretrained(model_dir, num_layers=2)
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return generate_completions(*args, **kwargs)

    cfg = MagpieConfig(n=8, batch_size=8, max_instruction_tokens=12, max_new_tokens=6, min_words=1, temperature=1.0)
    ctx = dataclasses.replace(_ctx(tok, 4, counting, tmp_path, magpie=cfg), model=model)
    result = apply_transform("magpie", _task(4), ctx)
    rep = result.report
    assert rep["generated"] == 8 and rep["n_replay"] == 0 and len(result.examples) == 4
    assert sum(rep["dropped"].values()) + rep["pairs_kept"] == 8
    (cache_file,) = tmp_path.glob("magpie-*.json")
    candidates = json.loads(cache_file.read_text())["value"]["candidates"]
    specials = tok.convert_ids_to_tokens(list(special_token_ids(tok)))
    assert len(candidates) == 8 and sum(c["text"] != "" for c in candidates) >= 1
    for c in candidates:
        assert "\n" not in c["text"] and not any(s in c["text"] for s in specials)
    calls.clear()
    assert apply_transform("magpie", _task(4), ctx).examples == result.examples and calls == []


# ----------------------------------------------------------------------------------------------------- SDFT
def _rag():
    return [
        RagExample(question="How many people work at Bojei Works?", documents=(Document("356 people work there."),),
                   answer="356", id="a", system="Answer briefly."),
        RagExample(question="Which river flows through Kojeigrim?", documents=(Document("The Savrer River."),),
                   answer="Savrer", id="b", meta={"answer_aliases": ["Savrer River"]}),
        RagExample(question="Who founded Jadriabrousk?", documents=(Document("A firm in Troucol."),),
                   answer="The documents do not contain this information.", id="c", meta={"answerable": False}),
        RagExample(question="In which year was it built?", documents=(Document("Built in 1871."),),
                   answer="1871", id="d"),
        RagExample(question="Where is it?", documents=(Document("In Quoular."),), answer="Quoular", id="e"),
        RagExample(question="What colour is it?", documents=(Document("It is maroon."),), answer="maroon", id="f"),
    ]


def test_sdft_prompt_is_the_repos_template(smol):
    _, tok = smol
    ex = _rag()[0]
    instruction = instruction_of(ex, PromptConfig().documents_template)
    assert instruction == "Answer briefly.\n\n### Paragraph:\n[1] 356 people work there.\n\n### Instruction:\n" \
                          "How many people work at Bojei Works?"
    text = tok.decode(sdft_prompt_ids(tok, instruction, " 356 ", "raw"))
    assert text == (f"{SDFT_SYSTEM}\n\n### Instruction:\n{instruction}\n\n### Reference Answer:\n356\n\n"
                    "### Response:\n")
    chat = tok.decode(sdft_prompt_ids(tok, instruction, "356", "chat"))
    assert chat.startswith(f"<|im_start|>system\n{SDFT_SYSTEM}<|im_end|>") and chat.endswith("<|im_start|>assistant\n")


def test_sdft_keeps_original_on_failed_checks(smol, tmp_path):
    _, tok = smol
    examples = _rag()
    rewrites = {"Bojei": ("Bojei Works has 356 employees.", True),                # a: contains the gold -> used
                "Kojeigrim": ("The river is the Savrer River.", False),        # b: alias contained (truncated, kept)
                "Jadriabrousk": ("The documents do not mention the founder.", True),  # c: unanswerable + refusal
                "built": ("It was built long ago.", True),                     # d: drops the answer -> original
                "Where is it": ("As the reference answer says, Quoular.", True),  # e: leakage phrase -> original
                "colour": ("Your turn: maroon", True)}                         # f: starts with "Your turn"
    gen = Scripted(rewrites)
    result = apply_transform("sdft", examples, _ctx(tok, 6, gen, tmp_path))
    (call,) = gen.calls
    assert (call["config"].temperature, call["config"].top_p, call["config"].top_k) == (0.95, 0.7, 50)
    assert [ex.target for ex in result.examples] == ["Bojei Works has 356 employees.", "The river is the Savrer River.",
                                                     "The documents do not mention the founder.", "1871", "Quoular",
                                                     "maroon"]
    assert [ex.id for ex in result.examples] == [ex.id for ex in examples]
    assert result.examples[0].documents == examples[0].documents  # only the answer changes
    rep = result.report
    assert (rep["examples"], rep["rewritten"], rep["kept_original"]) == (6, 3, 3)
    assert rep["kept_original_by_reason"] == {"task_check": 1, "leakage": 2}
    assert rep["rewrites_truncated"] == 1 and rep["cache"] == "miss"
    # keep_truncated=false drops the truncated rewrite (a post-filter: the generations come from the cache)
    strict = apply_transform("sdft", examples, _ctx(tok, 6, _never, tmp_path,
                                                     sdft=SDFTConfig(keep_truncated=False)))
    assert strict.examples[1].target == "Savrer" and strict.report["kept_original_by_reason"]["truncated"] == 1
    again = apply_transform("sdft", examples, _ctx(tok, 6, _never, tmp_path))
    assert again.examples == result.examples and again.report["cache"] == "hit"
    # greedy is an option (a different cache entry, temperature 0)
    greedy = Scripted(rewrites)
    apply_transform("sdft", examples, _ctx(tok, 6, greedy, tmp_path, sdft=SDFTConfig(greedy=True)))
    assert greedy.calls[0]["config"].greedy


def test_generate_by_length_restores_input_order():
    from selfaug_jax.data.transform_context import generate_by_length

    seen = []

    def echo(model, tokenizer, prompt_ids, config, *, stop_strings=(), stop_token_ids=(), batch_size=8):
        seen.extend(list(p) for p in prompt_ids)
        return [Completion(",".join(map(str, p)), True, len(p)) for p in prompt_ids]

    prompts = [[5, 5, 5], [1], [7, 7], [2], [9, 9, 9, 9], [3, 3]]
    ctx = TransformContext(model=None, tokenizer=None, model_id="m", prompt_config=PromptConfig(), n_task=0,
                           options={}, generate=echo)
    out = generate_by_length(ctx, prompts, None, batch_size=2)
    assert [c.text for c in out] == [",".join(map(str, p)) for p in prompts]  # input order, exactly
    assert seen == [[1], [2], [7, 7], [3, 3], [5, 5, 5], [9, 9, 9, 9]]  # by length, ties in input order


def test_sdft_trained_documents_and_untrained_examples(smol, tmp_path):
    """documents="trained": the rewrite prompt holds only the documents the length policy keeps; an example the
    policy skips is not rewritten (counted); the cache then answers a second run; "all" shows every document."""
    from selfaug_jax.data.prompts import tokenize_example

    _, tok = smol
    docs = tuple(Document(f"Document {k}: " + " ".join(f"w{k}x{j}" for j in range(40))) for k in range(3))
    ex = RagExample(question="What is w0x1?", documents=docs, answer="w0x1", id="long")
    full = len(tokenize_example(ex, tok, PromptConfig()).input_ids)
    cfg = PromptConfig(max_length=full - 30)  # the last-ranked document no longer fits
    too_long = RagExample(question="Why? " * (full // 2), documents=(Document("x"),), answer="w", id="skip")
    gen = Scripted({"w0x1": ("It is w0x1.", True)})
    ctx = dataclasses.replace(_ctx(tok, 1, gen, tmp_path), prompt_config=cfg)
    result = apply_transform("sdft", [ex, too_long], ctx)
    (call,) = gen.calls
    (prompt,) = [tok.decode(p) for p in call["prompts"]]
    assert "Document 0:" in prompt and "Document 1:" in prompt and "Document 2:" not in prompt
    assert [e.target for e in result.examples] == ["It is w0x1.", "w"]
    rep = result.report
    assert (rep["rewritten"], rep["kept_original_by_reason"], rep["cache"]) == (1, {"not_trained": 1}, "miss")
    assert apply_transform("sdft", [ex, too_long], dataclasses.replace(ctx, generate=_never)).examples == \
        result.examples
    every = Scripted({"w0x1": ("It is w0x1.", True), "Why?": ("w", True)})
    apply_transform("sdft", [ex, too_long], dataclasses.replace(ctx, generate=every,
                                                                  options={"sdft": SDFTConfig(documents="all")}))
    assert len(every.calls[0]["prompts"]) == 2
    assert any("Document 2:" in tok.decode(p) for p in every.calls[0]["prompts"])
