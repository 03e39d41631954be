"""Scoring an answer to a challenge: a model judge held to a JSON schema, with a heuristic fallback,
or a deterministic rubric (what a small model's own verdicts are not worth more than).

The model is asked for `{"score": 0-100, "rationale": "..."}`. A reply that is not that
object (no JSON, wrong fields, a non-number score) gets a corrective follow-up naming the
problem, up to `retries` times; after that the heuristic scores it. Every score is clamped
into 0..100 whoever gave it, so a judge can never push one out of range.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import msgspec
import numpy as np

from inference.backends.base import Backend, ChatMessage, Finish, Sampling, never_cancelled

SCHEMA = '{"score": <number from 0 to 100>, "rationale": "<one sentence>"}'
JUDGE_SYSTEM = (
    "You are a strict examiner. You grade an answer to a challenge against its criteria. "
    f"Reply with only a JSON object of this form and nothing else: {SCHEMA}"
)
_WORD = re.compile(r"[a-z0-9']+")


class Verdict(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The one shape a model judge's reply may take."""

    score: float
    rationale: str


class Judgement(msgspec.Struct, frozen=True):
    score: float  # always within 0..100
    rationale: str
    judge: str  # "model", "heuristic" or "rubric"
    attempts: int  # model replies asked for


class MalformedVerdict(ValueError):
    """The judge's reply is not a Verdict; the message is what the corrective prompt tells it."""


def complete(
    backend: Backend, messages: Sequence[ChatMessage], sampling: Sampling, stack: object = None,
    cancelled: Callable[[], bool] = never_cancelled,
) -> str:
    """The whole text of one generation (a failed generation raises, it is never an empty answer).

    `cancelled` is asked between tokens; to stop, it raises (a stopped text is no answer).
    """
    parts = []
    for event in backend.generate(messages, stack, sampling, cancelled):  # type: ignore[arg-type]
        if isinstance(event, Finish):
            if event.reason == "error":
                raise RuntimeError(f"generation failed: {event.error}")
            break
        parts.append(event.text)
    return "".join(parts)


def parse_verdict(text: str) -> Verdict:
    """The first JSON object in `text` as a Verdict, its score clamped; MalformedVerdict otherwise."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        raise MalformedVerdict("the reply held no JSON object")
    try:
        verdict = msgspec.json.decode(text[start : end + 1], type=Verdict)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise MalformedVerdict(f"the JSON did not match the schema: {exc}") from None
    if not math.isfinite(verdict.score):
        raise MalformedVerdict(f"score must be a finite number, got {verdict.score}")
    if not verdict.rationale.strip():
        raise MalformedVerdict("rationale must not be empty")
    return Verdict(clamp(verdict.score), verdict.rationale.strip()[:4000])


def clamp(score: float) -> float:
    return min(100.0, max(0.0, float(score)))


def heuristic_score(challenge: str, criteria: Sequence[str], response: str) -> Judgement:
    """A model-free score: on-topic words, a reasonable length, no looping repetition."""
    words = _WORD.findall(response.lower())
    if not words:
        return Judgement(0.0, "heuristic: the answer is empty", "heuristic", 0)
    topic = set(_WORD.findall(" ".join([challenge, *criteria]).lower()))
    overlap = len(topic & set(words)) / max(1, min(len(topic), 12))
    variety = len(set(words)) / len(words)  # near 0 for a loop of one phrase
    length = min(1.0, len(words) / 20) if len(words) <= 200 else max(0.3, 200 / len(words))
    score = clamp(100.0 * (0.45 * min(1.0, overlap) + 0.3 * variety + 0.25 * length))
    rationale = f"heuristic: topic overlap {overlap:.2f}, word variety {variety:.2f}, {len(words)} words"
    return Judgement(round(score, 2), rationale, "heuristic", 0)


def rubric_score(challenge: str, criteria: Sequence[str], response: str,
                 embed: Callable[[Sequence[str]], np.ndarray]) -> Judgement:
    """The rubric: the expected concepts met (embedding similarity), new words, variety, length.

    concept = clamp((max_i cos(answer, criterion_i) - 0.15) / 0.5, 0, 1) over the normalised
    embeddings; novelty is the share of the answer's words the challenge does not hold. An
    answer that only echoes the question (novelty under 0.3) has its score scaled down by
    novelty / 0.3, whatever its similarity: repeating a question is not answering it.
    """
    words = _WORD.findall(response.lower())
    if not words:
        return Judgement(0.0, "rubric: the answer is empty", "rubric", 0)
    asked = set(_WORD.findall(challenge.lower()))
    novelty = sum(word not in asked for word in words) / len(words)
    vectors = embed([response, *(criteria or [challenge])])
    concept = min(1.0, max(0.0, (float(np.max(vectors[1:] @ vectors[0])) - 0.15) / 0.5))
    variety = len(set(words)) / len(words)
    length = min(1.0, len(words) / 20) if len(words) <= 200 else max(0.3, 200 / len(words))
    score = 100.0 * (0.45 * concept + 0.2 * novelty + 0.15 * variety + 0.2 * length)
    if novelty < 0.3:
        score *= novelty / 0.3
    rationale = (f"rubric: expected concepts {concept:.2f}, new words {novelty:.2f}, variety {variety:.2f}, "
                 f"{len(words)} words")
    return Judgement(round(clamp(score), 2), rationale, "rubric", 0)


def judge(
    backend: Backend,
    challenge: str,
    criteria: Sequence[str],
    response: str,
    *,
    retries: int = 2,
    max_tokens: int = 96,
    cancelled: Callable[[], bool] = never_cancelled,
) -> Judgement:
    """Score `response`; the model first, the heuristic once `retries` corrections are spent."""
    wanted = "\n".join(f"- {c}" for c in criteria) or "- answers the challenge well"
    messages = [
        ChatMessage("system", JUDGE_SYSTEM),
        ChatMessage("user", f"Challenge:\n{challenge}\n\nCriteria:\n{wanted}\n\nAnswer:\n{response}"),
    ]
    sampling = Sampling(temperature=0.0, max_tokens=max_tokens)
    for attempt in range(1, retries + 2):
        reply = complete(backend, messages, sampling, cancelled=cancelled)
        try:
            verdict = parse_verdict(reply)
        except MalformedVerdict as problem:
            # Show the judge its own reply and what was wrong with it: small models often
            # fix the format when told exactly what the schema wants.
            messages += [
                ChatMessage("assistant", reply),
                ChatMessage("user", f"That reply was not valid: {problem}. Reply with only {SCHEMA}"),
            ]
            continue
        return Judgement(verdict.score, verdict.rationale, "model", attempt)
    fallback = heuristic_score(challenge, criteria, response)
    return msgspec.structs.replace(fallback, attempts=retries + 1)

