"""The shared guards: incremental decoding, stop strings, repetition loops, how requests end."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from inference.backends.base import Finish, Sampling, Token
from inference.guards import Detokenizer, Guard, RepetitionDetector, RepetitionRule, StopMatcher

# A byte-level vocabulary: each id is one UTF-8 byte, as byte-level BPE falls back to.
EOS = 1000


def decode(ids: Sequence[int]) -> str:
    return bytes(i for i in ids if i != EOS).decode("utf-8", errors="replace")


def ids(text: str) -> list[int]:
    return list(text.encode())


def run(guard: Guard, token_ids: list[int]) -> tuple[str, Finish | None]:
    text = ""
    for token_id in token_ids:
        tokens, finish = guard.push(token_id)
        text += "".join(t.text for t in tokens)
        if finish is not None:
            return text, finish
    return text, None


def test_a_character_split_over_tokens_is_emitted_whole_once_complete() -> None:
    detokenizer = Detokenizer(decode)
    pieces = [detokenizer.push(i) for i in ids("é!")]  # é is two bytes
    assert pieces == ["", "é", "!"]


@pytest.mark.parametrize(
    ("chunks", "emitted", "stopped"),
    [
        (["Hello E", "N", "D more"], ["Hello ", "", ""], [False, False, True]),
        (["abc", "d"], ["abc", "d"], [False, False]),
        (["ab\n", "\nlater"], ["ab", ""], [False, True]),
        (["xEN", "Y"], ["x", "ENY"], [False, False]),  # a false start is released
    ],
)
def test_stop_strings_are_cut_even_across_chunks_and_never_emitted(chunks, emitted, stopped) -> None:  # type: ignore[no-untyped-def]
    matcher = StopMatcher(["END", "\n\n"])
    results = [matcher.feed(chunk) for chunk in chunks]
    assert [r[0] for r in results] == emitted and [r[1] for r in results] == stopped


def test_a_cycle_is_a_loop_only_once_it_repeats_enough() -> None:
    detector = RepetitionDetector(RepetitionRule(max_period=8, min_repeats=3, min_span=12))
    cycle = [5, 6, 7, 8]
    flags = [detector.push(t) for t in [1, 2, 3] + cycle * 3]
    assert flags.index(True) == 3 + 12 - 1  # the twelfth token of the cycle completes three repeats
    fresh = RepetitionDetector(RepetitionRule(max_period=8, min_repeats=3, min_span=12))
    assert not any(fresh.push(t) for t in range(100))


def test_one_token_repeated_needs_the_minimum_span() -> None:
    detector = RepetitionDetector(RepetitionRule(max_period=4, min_repeats=2, min_span=10))
    assert [detector.push(7) for _ in range(10)] == [False] * 9 + [True]


def test_guard_ends_on_eos_with_held_back_text_released() -> None:
    guard = Guard(Sampling(stop=("STOP",)), decode, {EOS}, prompt_tokens=3)
    text, finish = run(guard, ids("go ST") + [EOS])
    assert text == "go ST" and finish == Finish("stop", 3, 6)


def test_guard_ends_at_a_stop_string_without_emitting_it() -> None:
    guard = Guard(Sampling(stop=("STOP",)), decode, {EOS}, prompt_tokens=0)
    text, finish = run(guard, ids("one STOP two"))
    assert text == "one " and finish is not None and finish.reason == "stop" and finish.completion_tokens == 8


def test_guard_ends_at_max_tokens_with_length() -> None:
    guard = Guard(Sampling(max_tokens=4, stop=("zz",)), decode, {EOS}, prompt_tokens=1)
    text, finish = run(guard, ids("abcz" + "ef"))
    assert text == "abcz" and finish == Finish("length", 1, 4)


def test_guard_ends_a_loop_with_repetition() -> None:
    rule = RepetitionRule(max_period=4, min_repeats=3, min_span=6)
    guard = Guard(Sampling(max_tokens=100), decode, {EOS}, prompt_tokens=0, repetition=rule)
    text, finish = run(guard, ids("hi" + "ab" * 10))
    assert finish is not None and finish.reason == "repetition" and text == "hiababab"


def test_guard_reports_non_finite_logits_and_cancellation() -> None:
    guard = Guard(Sampling(), decode, {EOS}, prompt_tokens=2)
    guard.push(ids("a")[0])
    assert guard.nonfinite() == Finish("error", 2, 1, "non-finite logits (NaN or Inf) at generated token 2")
    assert guard.cancel() == Finish("cancelled", 2, 1)


def test_token_ids_travel_with_the_text() -> None:
    guard = Guard(Sampling(), decode, {EOS}, prompt_tokens=0)
    tokens, _ = guard.push(ord("x"))
    assert tokens == [Token("x", ord("x"))]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": -1.0}, "temperature: expected a number in"),
        ({"top_p": 0.0}, r"top_p: expected a number in \(0, 1\]"),
        ({"max_tokens": 0}, "max_tokens: expected at least 1"),
        ({"stop": ("",)}, "stop: expected non-empty strings"),
    ],
)
def test_bad_sampling_parameters_are_refused(options, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        Sampling(**options)
