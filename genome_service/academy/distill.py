"""Knowledge distilled into a layer: each sentence of a persona's documents becomes cloze items.

A fact is a sentence cut before its final key phrase: the words before it are the prompt,
the phrase is the answer ("The capital of Zorbania is" / "Quillfort"). The key phrase is
the sentence's last run of content words (at most three), narrowed to its names and
numbers when it has some ("flows 412 kilometres" -> "412 kilometres"). Everything here is
deterministic: the same documents give the same items, in the same order.

The layer is trained on two forms of every fact (`TRAINED_FORMS`) and judged on a third it
never saw (`HELDOUT_FORM`): the held-out form's loss and recall say whether the persona
learnt the fact or only the wording.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import msgspec

from inference.backends.base import ChatMessage
from inference.training import Example

MAX_FACTS = 2_000
MAX_PHRASE_WORDS = 3
MIN_PROMPT_WORDS = 3
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_EDGE_PUNCTUATION = ".,;:!?\"'()[]"
STOPWORDS = frozenset(
    "a an the of in on at to for from by with is are was were be been being and or but as its their his her our "
    "your my that which who whom whose than into about called named has have had this these those it only also just "
    "very".split()
)


class Fact(msgspec.Struct, frozen=True):
    sentence: str
    prompt: str  # the sentence up to its key phrase
    answer: str  # the key phrase (what recall looks for)


class ClozeForm(msgspec.Struct, frozen=True):
    """How a fact is asked (`ask`, with {prompt}) and answered (`reply`, with {prompt} and {answer})."""

    ask: str
    reply: str


TRAINED_FORMS = (
    ClozeForm("Complete this sentence from what you know: {prompt} ...", "{answer}"),
    ClozeForm("{prompt}", "{prompt} {answer}."),
)
HELDOUT_FORM = ClozeForm("Fill in the blank from memory: {prompt} ____.", "{answer}")


def facts(texts: Iterable[str], limit: int = MAX_FACTS) -> list[Fact]:
    """The cloze facts of `texts` (chunks may overlap: a sentence seen twice is one fact)."""
    found: dict[str, Fact] = {}
    for text in texts:
        for sentence in _SENTENCE.split(text):
            fact = cloze(sentence)
            if fact is not None and fact.sentence.lower() not in found:
                found[fact.sentence.lower()] = fact
                if len(found) >= limit:
                    return list(found.values())
    return list(found.values())


def cloze(sentence: str) -> Fact | None:
    """The sentence cut before its final key phrase; None when too short to leave a prompt."""
    sentence = " ".join(sentence.split()).strip()
    words = sentence.rstrip(".!?").split()
    phrase: list[str] = []
    for word in reversed(words):
        if _bare(word).lower() in STOPWORDS or len(phrase) == MAX_PHRASE_WORDS:
            break
        phrase.insert(0, word)
    # Narrowed to the part that starts at a name or a number, when it holds one.
    while len(phrase) > 1 and not _names(phrase[0]) and any(_names(word) for word in phrase[1:]):
        phrase.pop(0)
    prompt_words = words[: len(words) - len(phrase)]
    answer = _bare(" ".join(phrase))
    if not answer or len(prompt_words) < MIN_PROMPT_WORDS:
        return None
    return Fact(sentence, " ".join(prompt_words), answer)


def _bare(word: str) -> str:
    return word.strip(_EDGE_PUNCTUATION)


def _names(word: str) -> bool:
    """A name or a number: what a question about the sentence would most likely ask for."""
    word = _bare(word)
    return bool(word) and (word[0].isupper() or any(c.isdigit() for c in word))


def example(fact: Fact, form: ClozeForm, system: str) -> Example:
    fields = {"prompt": fact.prompt, "answer": fact.answer}
    return Example((ChatMessage("system", system), ChatMessage("user", form.ask.format(**fields)),
                    ChatMessage("assistant", form.reply.format(**fields))))


def training_examples(found: Iterable[Fact], system: str) -> list[Example]:
    return [example(fact, form, system) for fact in found for form in TRAINED_FORMS]


def heldout_examples(found: Iterable[Fact], system: str) -> list[Example]:
    return [example(fact, HELDOUT_FORM, system) for fact in found]


def recalled(answer: str, fact: Fact) -> bool:
    """Whether a generated answer names the fact's key phrase (case and spacing aside)."""
    return " ".join(fact.answer.lower().split()) in " ".join(answer.lower().split())
