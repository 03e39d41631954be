"""The Academy planner's analysis of a goal: its needs, each with the trait it calls for and the
caller's layers nearest to it (cosine similarity on the search index).

The runner plans a session's tasks from it, and the recipes' `goal.analyse` command shows it
to a recipe, whose later steps may attach what is close enough and train only the rest.
"""

from __future__ import annotations

import msgspec
import numpy as np

from genome_service.domain.academy import MAX_NEEDS, goal_needs
from genome_service.domain.layer import TraitType
from genome_service.services.bootstrap import Services

# What each trait is about, embedded to pick the trait a goal needs most.
TRAITS = {
    TraitType.GENERAL_REASONING: "reasoning, logic, problem solving, thinking step by step",
    TraitType.TONE_AND_VOICE: "tone, voice, style, manner of speaking, personality, sounding like someone",
    TraitType.ETHICAL_REASONING: "ethics, morality, fairness, right and wrong, values",
    TraitType.DOMAIN_EXPERTISE: "expert knowledge of a field: science, law, medicine, mathematics, programming",
    TraitType.CULTURAL_KNOWLEDGE: "culture, history, traditions, languages, customs of peoples",
    TraitType.MEMORY_INTEGRATION: "remembering facts about the user and earlier conversations",
}


class NearLayer(msgspec.Struct, frozen=True):
    layer_id: str
    similarity: float  # cosine, rounded to 6 places


class NeedAnalysis(msgspec.Struct, frozen=True):
    need: str
    trait_type: TraitType
    layers: list[NearLayer]  # nearest first


class Analysis:
    """Needs, traits and near layers of one owner's goal, on one base model."""

    def __init__(self, services: Services, owner: str, base_model: str) -> None:
        self.services = services
        self.owner = owner
        self.base_model = base_model

    def goal(self, goal: str, *, k: int = 1, limit: int = MAX_NEEDS) -> list[NeedAnalysis]:
        return [self.need(need, k=k) for need in goal_needs(goal, limit)]

    def need(self, need: str, *, k: int = 1) -> NeedAnalysis:
        search = self.services.search
        vector = search.query_vector(need)
        hits = search.current().search_layers(vector, k, owner=self.owner, base_model=self.base_model)
        return NeedAnalysis(need, self.trait(vector), [NearLayer(hit.key, round(float(hit.score), 6)) for hit in hits])

    def trait(self, vector: np.ndarray) -> TraitType:
        vectors = self.services.search.embedder.embed(list(TRAITS.values()))
        return list(TRAITS)[int(np.argmax(vectors @ vector))]
