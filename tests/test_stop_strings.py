"""The stop-string automaton over tokens (selfaug_jax/models/stop_strings.py) against a brute-force search."""

import numpy as np

from selfaug_jax.models.stop_strings import stop_string_table


def _first_stop(texts, ids, stops):
    """Index of the token in which the first stop string ends (brute force over the growing text), else None."""
    text = ""
    for k, t in enumerate(ids):
        before = len(text)
        text += texts[t]
        for s in stops:
            i = text.find(s, max(0, before - len(s) + 1))
            if i >= 0 and text.find(s) == i:
                return k
    return None


def _run(table, ids):
    accept, state = table.shape[0], 0
    for k, t in enumerate(ids):
        state = table[state, t]
        if state == accept:
            return k
    return None


def test_table_matches_brute_force_on_random_token_streams():
    texts = ["\n", "#", "##", "###", "a", "\n#", "b\n", "#a", "", "x##", "\n\n", "ss", "assi", "stant", "\ufffd"]
    stops = ("\n###", "assistant", "a#")
    table = stop_string_table(texts, stops)
    assert table.shape == (len({p for s in stops for p in (s[:k] for k in range(len(s)))}), len(texts))
    rng = np.random.default_rng(0)
    found = 0
    for _ in range(3000):
        ids = rng.integers(0, len(texts), size=int(rng.integers(1, 12))).tolist()
        ref = _first_stop(texts, ids, stops)
        assert _run(table, ids) == ref, ([texts[i] for i in ids], ref)
        found += ref is not None
    assert 300 < found < 2900  # both outcomes exercised


def test_sdft_stop_split_over_tokens_and_none():
    texts = ["\n", "###", " Instruction", "Paris", "\n\n", "#"]
    table = stop_string_table(texts, ["\n###"])
    assert _run(table, [3, 0, 1]) == 2          # "Paris" "\n" "###"
    assert _run(table, [3, 4, 5, 5, 5]) == 4    # "\n\n" then "#" "#" "#"
    assert _run(table, [3, 1, 0, 3, 5]) is None  # "###" not after a newline
    assert stop_string_table(texts, []) is None and stop_string_table(texts, [""]) is None
