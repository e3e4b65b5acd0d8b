"""Stop strings that end a row *inside* the generation loop, however the tokenizer splits them.

:func:`selfaug_jax.models.generation.stop_string_token_ids` stops a row on a token whose text contains a stop
string; a stop string spread over several tokens -- SDFT's ``"\\n###"`` is always ``"\\n"`` + ``"###"`` in
SmolLM2's vocabulary, no single token contains it -- is only found after generation by
:func:`~selfaug_jax.models.generation.truncate_at_stop`, and the row runs its whole token budget.

:func:`stop_string_table` compiles the stop strings into a string-matching automaton over *tokens*: states are the
prefixes of the stop strings (Aho-Corasick: state = the longest suffix of the generated text that is a prefix of
some stop string), and ``table[state, token]`` is the state after appending the token's text, or ``accept`` (=
``table.shape[0]``) when a stop string ends inside that token. The generation loop carries one state per row
(``int32``) and does one gather per step: ``state_b = table[state_b, tok_b]``; a row whose state reaches
``accept`` is finished, exactly as if the token were an EOS. The state starts at 0 with the first generated token
(the generated text alone, as :func:`~selfaug_jax.models.generation.truncate_at_stop` cuts it).

Token texts are each token decoded alone (``skip_special_tokens=True``), so the match is on the concatenation of
the tokens' texts; for byte-level BPE vocabularies this is the decoded text wherever the stop string is ASCII
(a token that is only part of a multi-byte character decodes alone to U+FFFD, which matches nothing).
The decoded text is still cut by ``truncate_at_stop`` afterwards, so the output text is unchanged; the loop only
stops earlier.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _prefix_states(stop_strings: Sequence[str]) -> list[str]:
    """Every proper prefix of every stop string (the empty prefix first): the automaton's states."""
    prefixes = {""}
    for s in stop_strings:
        prefixes.update(s[:k] for k in range(1, len(s)))
    return sorted(prefixes, key=lambda p: (len(p), p))


def stop_string_table(token_texts: Sequence[str], stop_strings: Sequence[str]) -> np.ndarray | None:
    """``[n_states, vocab]`` int32 transition table of the stop-string automaton (module docstring), or None when
    there are no (non-empty) stop strings.

    Args:
        token_texts: each vocabulary id's text, decoded alone (index = token id).
        stop_strings: the strings that end a row.
    """
    stops = tuple(dict.fromkeys(s for s in stop_strings if s))
    if not stops:
        return None
    states = _prefix_states(stops)
    index = {p: i for i, p in enumerate(states)}
    accept = len(states)
    alphabet = set("".join(stops))
    step_cache: dict[tuple[int, str], int] = {}

    def step(state: int, ch: str) -> int:
        """State after appending ``ch`` (``accept`` if a stop string ends here)."""
        if ch not in alphabet:
            return 0
        key = (state, ch)
        if key not in step_cache:
            text = states[state] + ch
            nxt = accept if any(text.endswith(s) for s in stops) else None
            while nxt is None:
                if text in index:
                    nxt = index[text]
                else:
                    text = text[1:]
            step_cache[key] = nxt
        return step_cache[key]

    table = np.zeros((accept, len(token_texts)), np.int32)
    for tok, text in enumerate(token_texts):
        if not text:  # decodes to nothing (a special token): the state is unchanged
            table[:, tok] = np.arange(accept)
            continue
        if not alphabet.intersection(text):
            continue  # a character of no stop string: every state goes back to 0
        for state in range(accept):
            s = state
            for ch in text:
                s = step(s, ch)
                if s == accept:
                    break
            table[state, tok] = s
    return table


def tokenizer_stop_table(tokenizer: Any, stop_strings: Sequence[str], vocab_size: int | None = None
                         ) -> np.ndarray | None:
    """:func:`stop_string_table` for a Hugging Face tokenizer (one pass over its vocabulary, ~0.5 s for 49k
    tokens). ``vocab_size``: the model's output width when it differs from ``len(tokenizer)`` (extra rows never
    sampled in practice match nothing)."""
    if not any(stop_strings):
        return None
    n = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=True)
    if vocab_size is not None and vocab_size > n:
        texts = list(texts) + [""] * (vocab_size - n)
    return stop_string_table(texts[:vocab_size] if vocab_size else texts, stop_strings)
