"""The embedder, the chunker and the retriever, with the real model."""

from __future__ import annotations

import numpy as np
import pytest

from rag.chunker import chunk
from rag.embedder import SentenceTransformerEmbedder
from rag.retriever import Candidate, select

TEXTS = ["a patient algebra tutor", "sonnets in a warm voice " * 12, "x", "the ethics of triage in an emergency ward " * 40]


def test_a_text_embeds_to_the_same_vector_alone_or_in_any_batch(embedder: SentenceTransformerEmbedder) -> None:
    fresh = SentenceTransformerEmbedder(cache_size=0)
    fresh._model = embedder.model  # the loaded weights; no cache
    together = fresh.embed(TEXTS)
    alone = np.stack([fresh.embed([text])[0] for text in TEXTS])
    shuffled = fresh.embed(TEXTS[::-1])[::-1]
    # Computed floats (BLAS may sum in another order for another batch shape): within 1e-6,
    # where a text pooled with another's padding or tokens would move by far more.
    np.testing.assert_allclose(together, alone, atol=1e-6, rtol=0)
    np.testing.assert_allclose(together, shuffled, atol=1e-6, rtol=0)
    assert together.shape == (len(TEXTS), embedder.dimension) and embedder.dimension == 384
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


def test_repeated_texts_come_from_the_cache(embedder: SentenceTransformerEmbedder) -> None:
    before = embedder.misses
    first = embedder.embed(["cached once", "cached once", "and another"])
    again = embedder.embed(["and another"])
    # A cache hit hands back the stored vector: that is exact.
    assert embedder.misses - before == 2 and np.array_equal(first[2], again[0])


def test_chunks_overlap_keep_the_text_exactly_and_cover_every_word() -> None:
    words = [f"w{i}" for i in range(25)]
    text = "# Title\n\n" + " ".join(words[:10]) + "\n\n" + "  ".join(words[10:])
    chunks = chunk(text, size=10, overlap=3)
    assert [len(c.text.split()) for c in chunks] == [10, 10, 10, 6]  # 27 words, windows start 7 apart
    assert all(text[c.start : c.end] == c.text for c in chunks)
    assert chunks[0].text.split()[-3:] == chunks[1].text.split()[:3]
    assert chunks[-1].text.split()[-1] == "w24" and chunk("   ", size=5, overlap=1) == []
    with pytest.raises(ValueError):
        chunk(text, size=5, overlap=5)


def _candidates() -> list[Candidate]:
    basis = np.eye(4, dtype=np.float32)
    near_copy = (basis[0] + 0.01 * basis[1]) / np.linalg.norm(basis[0] + 0.01 * basis[1])
    return [
        Candidate("a", "d1", "one two three", 0.9, basis[0]),
        Candidate("a2", "d1", "one two three again", 0.89, near_copy),
        Candidate("b", "d2", "four five", 0.7, basis[1]),
        Candidate("c", "d3", "six " * 50, 0.6, basis[2]),
    ]


def test_retrieval_respects_the_budget_and_mmr_prefers_something_new() -> None:
    words = lambda text: len(text.split())  # noqa: E731 - a token counter for the test
    plain = select(_candidates(), k=2, token_budget=None, count_tokens=words)
    assert [p.id for p in plain] == ["a", "a2"]
    diverse = select(_candidates(), k=2, token_budget=None, count_tokens=words, mmr_lambda=0.5)
    assert [p.id for p in diverse] == ["a", "b"]
    budget = select(_candidates(), k=4, token_budget=6, count_tokens=words)  # a2 (4 tokens) no longer fits
    assert [p.id for p in budget] == ["a", "b"] and sum(p.tokens for p in budget) <= 6
