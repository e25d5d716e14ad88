"""Stop sequences and streaming text across tokens that split a UTF-8 character, and nucleus sampling."""

from __future__ import annotations

import pytest
import torch

from worker.inference.sampling import TextState, sample

# Byte-level tokens as a BPE tokenizer has them: token 2 and 3 each hold half of "é" (0xC3 0xA9).
TOKENS = {1: b"ab", 2: b"\xc3", 3: b"\xa9x", 4: b"yz", 5: b"END", 6: b"!"}


def decode(ids: list[int]) -> str:
    return b"".join(TOKENS[i] for i in ids).decode("utf-8", errors="replace")


def generate(stops: tuple[str, ...]) -> tuple[str, str, bool]:
    """Feed tokens 1..6 one at a time: (final text, streamed text, stopped)."""
    state, ids, streamed = TextState(decode, stops), [], ""
    for token in TOKENS:
        ids.append(token)
        stopped = state.add(ids)
        streamed += state.release(final=stopped)
        if stopped:
            return state.text, streamed, True
    return state.text, streamed + state.release(final=True), False


@pytest.mark.parametrize(("stops", "text"), [
    (("éx",), "ab"),  # the stop starts in a character two tokens complete
    (("bé",), "a"),  # the stop spans text already seen and a completed character
    (("yzE",), "abéx"),  # the stop spans two tokens
    (("!", "z"), "abéxy"),  # the earliest of several stops wins
])
def test_stop_sequences_cut_text_and_nothing_past_them_is_streamed(stops, text):
    assert generate(stops) == (text, text, True)


def test_without_a_stop_everything_streams_and_no_half_character_is_sent():
    state = TextState(decode, ())
    state.add([1, 2])
    assert state.release(final=False) == "ab"  # "\xc3" alone decodes to U+FFFD: held back
    state.add([1, 2, 3])
    assert state.release(final=False) == "éx"
    assert generate(()) == ("abéxyzEND!", "abéxyzEND!", False)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    generator = torch.Generator().manual_seed(0)
    assert {sample(logits, 1.0, 0.01, generator) for _ in range(50)} == {0}
    assert {sample(logits, 1.0, 0.75, generator) for _ in range(300)} == {0, 1}
