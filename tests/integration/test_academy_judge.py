"""The judge: schema-checked model verdicts, corrective retries, the heuristic fallback, scores in 0..100."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from genome_service.academy.judge import MalformedVerdict, Verdict, heuristic_score, judge, parse_verdict, rubric_score
from genome_service.academy.runner import judge_of
from genome_service.settings import Settings
from rag.embedder import SentenceTransformerEmbedder
from inference.backends.base import ChatMessage, Finish, Sampling, Token
from inference.backends.torch import TorchBackend


class Recorded:
    """The real tiny-model backend, keeping each conversation it was asked to continue."""

    name = "recorded"

    def __init__(self, backend: TorchBackend) -> None:
        self.backend = backend
        self.calls: list[list[ChatMessage]] = []

    def generate(self, messages: Sequence[ChatMessage], stack, sampling: Sampling, cancelled=None) -> Iterator[Token | Finish]:  # type: ignore[no-untyped-def]
        self.calls.append(list(messages))
        return self.backend.generate(messages, stack, sampling)

    @property
    def loads(self) -> int:
        return self.backend.loads


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('{"score": 72, "rationale": "clear and calm"}', Verdict(72.0, "clear and calm")),
        ('Sure! {"score": 88.5, "rationale": " good "} hope that helps', Verdict(88.5, "good")),
        ('{"score": 250, "rationale": "superb"}', Verdict(100.0, "superb")),
        ('{"score": -3, "rationale": "off topic"}', Verdict(0.0, "off topic")),
    ],
)
def test_a_verdict_is_read_from_the_reply_and_clamped_into_range(reply: str, expected: Verdict) -> None:
    assert parse_verdict(reply) == expected


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        ("I would give it a seven.", "no JSON object"),
        ('{"score": "high", "rationale": "ok"}', "did not match the schema"),
        ('{"score": 50}', "did not match the schema"),
        ('{"score": 50, "rationale": "ok", "extra": 1}', "did not match the schema"),
        ('{"score": 50, "rationale": "   "}', "rationale must not be empty"),
        ('{"score": NaN, "rationale": "x"}', "did not match the schema"),
    ],
)
def test_a_malformed_reply_is_refused_with_the_reason_the_retry_will_name(reply: str, problem: str) -> None:
    with pytest.raises(MalformedVerdict, match=problem):
        parse_verdict(reply)


def test_malformed_model_output_is_retried_with_a_correction_then_scored_by_the_heuristic(tiny_model: Path) -> None:
    backend = Recorded(TorchBackend(tiny_model, device="cpu"))

    result = judge(backend, "Explain tides in one sentence.", ("mentions the moon",), "The moon pulls the sea.",
                   retries=2, max_tokens=24)

    # The random tiny model never writes the schema: three asks, then the fallback.
    assert (result.judge, result.attempts, len(backend.calls)) == ("heuristic", 3, 3)
    assert [len(call) for call in backend.calls] == [2, 4, 6]
    assert backend.calls[1][-1].content.startswith("That reply was not valid: ")
    assert 0.0 <= result.score <= 100.0 and result.rationale.startswith("heuristic:")


@pytest.mark.parametrize(
    "response",
    ["", "   ", "tides " * 500, "The moon pulls the sea, making tides twice a day.", "x" * 10_000, "🌊" * 50],
)
def test_every_heuristic_score_is_within_0_and_100(response: str) -> None:
    result = heuristic_score("Explain tides.", ("mentions the moon",), response)
    assert 0.0 <= result.score <= 100.0 and math.isfinite(result.score)


def test_the_heuristic_prefers_an_on_topic_varied_answer_to_a_loop() -> None:
    good = heuristic_score("Explain tides.", ("moon",), "Tides come from the moon's pull on the oceans of the earth.")
    loop = heuristic_score("Explain tides.", ("moon",), "ok " * 60)
    assert good.score > loop.score


def test_the_rubric_ranks_an_answer_above_an_echo_of_the_question_and_is_deterministic(
    embedder: SentenceTransformerEmbedder
) -> None:
    challenge = "Describe how a pirate greets the crew at dawn."
    criteria = ("Speak like a pirate in every answer.",)
    echo = rubric_score(challenge, criteria, "Describe how a pirate greets the crew at dawn.", embedder.embed)
    answer = rubric_score(challenge, criteria, "Ahoy, me hearties! Rise and shine, ye scurvy dogs, the sun be up "
                                               "and the sea be calling. Arr!", embedder.embed)
    off_topic = rubric_score(challenge, criteria, "Quarterly revenue grew by four percent in the retail segment.",
                             embedder.embed)
    assert (echo.judge, answer.judge) == ("rubric", "rubric")
    assert echo.score < 10 < off_topic.score < answer.score and answer.score > 60
    assert rubric_score(challenge, criteria, "", embedder.embed).score == 0.0
    again = rubric_score(challenge, criteria, "Ahoy, me hearties! Rise and shine, ye scurvy dogs, the sun be up "
                                              "and the sea be calling. Arr!", embedder.embed)
    assert again == answer and answer.rationale.startswith("rubric: expected concepts")


def test_the_judge_setting_picks_the_rubric_for_the_bundled_small_model_only(tmp_path: Path) -> None:
    assert judge_of(Settings(data_dir=tmp_path)) == "rubric"
    assert judge_of(Settings(data_dir=tmp_path, inference_model="tiny-llama")) == "model"
    assert judge_of(Settings(data_dir=tmp_path, inference_model="tiny-llama", academy_judge="rubric")) == "rubric"
