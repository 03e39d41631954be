"""A teacher model for knowledge distillation: question/answer pairs and paraphrases written from a chunk.

Configured by ``GENOME_ACADEMY_TEACHER_*`` (a backend and a model, e.g. a bigger model behind
the `openai` backend); without one, knowledge is learnt from cloze items alone. The teacher is
asked for lines of the form ``Q: <question> | P: <the question asked another way> | A: <answer>``.
A pair is kept only when its answer appears in the chunk: a teacher's invention is not the
persona's knowledge. The questions are trained on; the paraphrases are the held-out form.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import msgspec

from genome_service.academy.judge import complete
from genome_service.settings import Settings
from inference.backends.base import Backend, ChatMessage, Sampling, never_cancelled
from inference.models import ModelCatalog
from inference.training import Example

TEACHER_SYSTEM = (
    "You write study questions about a text. For each fact in it write one line, exactly:\n"
    "Q: <a question about the fact> | P: <the same question asked another way> | A: <the short answer, "
    "copied from the text>\nWrite nothing else."
)
_LINE = re.compile(r"Q:\s*(?P<question>.+?)\s*\|\s*P:\s*(?P<paraphrase>.+?)\s*\|\s*A:\s*(?P<answer>.+)")
MAX_PAIRS_PER_CHUNK = 32


class TaughtPair(msgspec.Struct, frozen=True):
    question: str
    paraphrase: str
    answer: str


def open_teacher(settings: Settings, catalog: ModelCatalog) -> tuple[Backend, str] | None:
    """The configured teacher backend and its name (`backend:model`), or None when there is none."""
    from inference.backends import open_backend

    name = settings.academy_teacher_backend
    if not name:
        return None
    model = settings.academy_teacher_model
    folder = None if name == "openai" else catalog.folder(model)
    backend = open_backend(name, folder=folder, model=model, device=settings.inference_device,
                           base_url=settings.academy_teacher_base_url, api_key=settings.academy_teacher_api_key)
    return backend, f"{name}:{model}"


def parse_pairs(reply: str, chunk: str) -> list[TaughtPair]:
    """The well-formed lines of a teacher's reply whose answer the chunk holds, each once."""
    text = " ".join(chunk.lower().split())
    found: dict[str, TaughtPair] = {}
    for line in reply.splitlines():
        match = _LINE.search(line)
        if match is None:
            continue
        pair = TaughtPair(*(" ".join(match[k].split()).strip() for k in ("question", "paraphrase", "answer")))
        answer = pair.answer.rstrip(".").lower()
        if answer and answer in text and pair.question.lower() != pair.paraphrase.lower():
            found.setdefault(pair.question.lower(), pair)
    return list(found.values())[:MAX_PAIRS_PER_CHUNK]


def teach(backend: Backend, chunks: Iterable[str], *, max_tokens: int = 512,
          cancelled: Callable[[], bool] = never_cancelled) -> list[TaughtPair]:
    """The teacher's grounded pairs for every chunk, greedy (the same chunks give the same pairs)."""
    pairs: list[TaughtPair] = []
    sampling = Sampling(temperature=0.0, max_tokens=max_tokens)
    for chunk in chunks:
        messages = [ChatMessage("system", TEACHER_SYSTEM), ChatMessage("user", chunk)]
        pairs += parse_pairs(complete(backend, messages, sampling, cancelled=cancelled), chunk)
    return pairs


def pair_examples(pairs: Iterable[TaughtPair], system: str) -> tuple[list[Example], list[Example]]:
    """(trained: each question with its answer, held out: each paraphrase with the same answer)."""
    trained, held = [], []
    for pair in pairs:
        trained.append(Example((ChatMessage("system", system), ChatMessage("user", pair.question),
                                ChatMessage("assistant", pair.answer))))
        held.append(Example((ChatMessage("system", system), ChatMessage("user", pair.paraphrase),
                             ChatMessage("assistant", pair.answer))))
    return trained, held
