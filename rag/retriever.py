"""Pick the passages for a prompt: the best-scoring chunks that fit a token budget, optionally diverse.

Max-marginal relevance (Carbonell & Goldstein, 1998) picks, one at a time, the
candidate d maximising

    lambda * cos(q, d) - (1 - lambda) * max_{s in picked} cos(d, s)

so that a near-copy of a passage already picked loses to a slightly less similar
one that says something new. lambda = 1 is plain relevance order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import msgspec
import numpy as np


class Candidate(msgspec.Struct, frozen=True):
    id: str
    source_id: str
    text: str
    score: float  # cos(query, vector)
    vector: np.ndarray  # unit row; used by MMR


class Passage(msgspec.Struct, frozen=True):
    id: str
    source_id: str
    text: str
    score: float
    tokens: int


def select(
    candidates: Sequence[Candidate], *, k: int, token_budget: int | None, count_tokens: Callable[[str], int],
    mmr_lambda: float | None = None,
) -> list[Passage]:
    """Up to ``k`` passages whose tokens sum to at most ``token_budget``, in the order picked.

    A candidate too long for what is left of the budget is passed over for a shorter one.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1 (got {k})")
    if mmr_lambda is not None and not 0.0 <= mmr_lambda <= 1.0:
        raise ValueError(f"mmr_lambda must be within [0, 1] (got {mmr_lambda})")
    remaining = list(range(len(candidates)))
    relevance = np.array([c.score for c in candidates], dtype=np.float64)
    # redundancy[i] = max cos(candidate i, any picked passage); nothing picked yet.
    redundancy = np.full(len(candidates), -np.inf)
    budget = token_budget
    picked: list[Passage] = []
    while remaining and len(picked) < k:
        if mmr_lambda is None:
            best = remaining[0]  # candidates come best first
        else:
            penalty = np.where(np.isinf(redundancy[remaining]), 0.0, redundancy[remaining])
            gains = mmr_lambda * relevance[remaining] - (1.0 - mmr_lambda) * penalty
            best = remaining[int(np.argmax(gains))]
        remaining.remove(best)
        candidate = candidates[best]
        tokens = count_tokens(candidate.text)
        if budget is not None and tokens > budget:
            continue
        if budget is not None:
            budget -= tokens
        picked.append(Passage(candidate.id, candidate.source_id, candidate.text, candidate.score, tokens))
        if mmr_lambda is not None and remaining:
            others = np.stack([candidates[i].vector for i in remaining])
            redundancy[remaining] = np.maximum(redundancy[remaining], others @ candidate.vector)
    return picked
