"""The commands a recipe step can run: one input and one output schema each, over the feature services.

Every command acts as the run's caller through ``StepContext.command``, whose idempotency key
is the run's and the step's: a step run again after a crash replays the appends its first
try made (one persona, one genome, one session), and a command that makes several appends
derives one key for each. Commands never touch the event store directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Protocol

import msgspec

from genome_service.academy.analysis import Analysis
from genome_service.chat.service import AskedMessage, ChatAnswer, ChatAsk
from genome_service.domain.academy import ACADEMY_SESSION, MAX_BUDGET_SECONDS, MAX_BUDGET_STEPS, TERMINAL, SessionStatus
from genome_service.domain.layer import TraitType
from genome_service.domain.recipe_run import Awaited
from genome_service.services.academy_sessions import AcademySessions
from genome_service.services.bootstrap import Services
from genome_service.services.context import Caller, Command, EventMetadata
from genome_service.services.conversations import Conversations
from genome_service.services.genomes import Genome, Genomes
from genome_service.services.knowledge import KnowledgeBase
from genome_service.services.personas import Personas
from genome_service.services.search import LayerDiscovery, LayerQuery

Weight = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]


class ChatTurn(Protocol):
    """One chat turn from a worker thread, given up when `cancelled` raises."""

    def __call__(self, caller: Caller, persona_id: str, ask: ChatAsk, metadata: EventMetadata,
                 cancelled: Callable[[], bool]) -> ChatAnswer: ...


class StepContext(msgspec.Struct, frozen=True):
    services: Services
    command: Command  # the run's caller; the idempotency key of (run, step)
    chat: ChatTurn
    cancelled: Callable[[], bool]  # raises when the run is cancelled or its worker stops


class StepFailure(RuntimeError):
    """The work a step started ended badly (an academy session that failed)."""


class Spec(msgspec.Struct, frozen=True):
    name: str
    summary: str
    input_type: type
    output_type: type
    run: Callable[[StepContext, Any], Any]
    # Asynchronous commands: what their output waits on, and the output once that has ended (None before).
    awaits: Callable[[Any], Awaited] | None = None
    wait: Callable[[StepContext, Awaited], Any] | None = None


# --- inputs and outputs --------------------------------------------------------------------

class StrictInput(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class GenomeTarget(StrictInput):
    """A genome by id, or the one a persona speaks with."""

    persona_id: str | None = None
    genome_id: str | None = None


class PersonaCreateInput(StrictInput):
    name: str
    description: str = ""
    system_prompt: str = ""
    base_model: str | None = None  # None: the service's inference model


class PersonaOutput(msgspec.Struct, frozen=True):
    persona_id: str
    genome_id: str | None
    name: str


class GenomeCreateInput(StrictInput):
    persona_id: str
    name: str
    base_model: str | None = None
    description: str = ""


class GenomeForkInput(StrictInput):
    genome_id: str
    name: str
    persona_id: str | None = None
    description: str = ""


class StackLayer(msgspec.Struct, frozen=True):
    layer_id: str
    weight: float


class GenomeOutput(msgspec.Struct, frozen=True):
    genome_id: str
    persona_id: str
    base_model: str
    layers: list[StackLayer]  # bottom of the stack first


class LayerSearchInput(StrictInput):
    text: str
    k: Annotated[int, msgspec.Meta(ge=1)] = 5
    trait_type: TraitType | None = None
    base_model: str | None = None


class LayerHit(msgspec.Struct, frozen=True):
    layer_id: str
    name: str
    score: float


class LayerSearchOutput(msgspec.Struct, frozen=True):
    matches: list[LayerHit]


class GoalAnalyseInput(StrictInput):
    goal: str
    target_similarity: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.95
    k: Annotated[int, msgspec.Meta(ge=1, le=20)] = 3
    persona_id: str | None = None  # layers on the base model of its genome
    base_model: str | None = None  # otherwise on this one (None: the service's inference model)


class NearLayerOutput(msgspec.Struct, frozen=True):
    layer_id: str
    similarity: float


class NeedOutput(msgspec.Struct, frozen=True):
    need: str
    trait_type: TraitType
    layers: list[NearLayerOutput]  # nearest first
    close_layer_id: str | None  # the nearest, if at or above target_similarity


class GoalAnalysis(msgspec.Struct, frozen=True):
    needs: list[NeedOutput]
    close_layer_ids: list[str]  # one per need met by a layer, no repeats
    open_needs: list[str]  # the needs no layer meets: what is left to train


class LayerAttachInput(GenomeTarget, kw_only=True):
    layer_ids: list[str]
    weight: Weight = 1.0


class AttachOutput(msgspec.Struct, frozen=True):
    genome_id: str
    attached: list[str]  # in order; layers already in the stack are left as they are
    layers: list[StackLayer]


class LayerReweightInput(GenomeTarget, kw_only=True):
    layer_id: str
    weight: Weight


class LayerDetachInput(GenomeTarget, kw_only=True):
    layer_id: str


class KnowledgeAddInput(StrictInput):
    persona_id: str
    text: str
    title: str = "note"


class KnowledgeOutput(msgspec.Struct, frozen=True):
    knowledge_id: str
    chunk_count: int


class AcademyTrainInput(StrictInput):
    persona_id: str
    goal: str
    needs: list[str] = []  # planned as given; empty: the goal's sentences
    target_similarity: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.95
    budget_steps: Annotated[int, msgspec.Meta(ge=1, le=MAX_BUDGET_STEPS)] = 100
    budget_seconds: Annotated[float, msgspec.Meta(gt=0, le=MAX_BUDGET_SECONDS)] = 3600.0


class AcademyOutput(msgspec.Struct, frozen=True):
    session_id: str
    status: str  # pending when not awaited; completed once an awaited session succeeded
    layer_ids: list[str]


class PersonaChatInput(StrictInput):
    persona_id: str
    message: str
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    seed: int | None = None


class ChatOutput(msgspec.Struct, frozen=True):
    conversation_id: str
    content: str
    completion_tokens: int


# --- the commands --------------------------------------------------------------------------

def _genome(genome: Genome) -> GenomeOutput:
    return GenomeOutput(genome.id, genome.persona_id, genome.base_model,
                        [StackLayer(ref.layer_id, ref.weight) for ref in genome.layers])


def _genome_id(ctx: StepContext, target: GenomeTarget) -> str:
    if (target.persona_id is None) == (target.genome_id is None):
        raise ValueError("give exactly one of persona_id or genome_id")
    if target.genome_id is not None:
        return target.genome_id
    assert target.persona_id is not None
    return Personas(ctx.services).genome_id(ctx.command.caller, target.persona_id)


def _base_model(ctx: StepContext, given: str | None) -> str:
    return given or ctx.services.settings.inference_model


def create_persona(ctx: StepContext, given: PersonaCreateInput) -> PersonaOutput:
    persona = Personas(ctx.services).create(ctx.command, given.name, description=given.description,
                                            system_prompt=given.system_prompt, base_model=_base_model(ctx, given.base_model))
    return PersonaOutput(persona.id, persona.genome_id, persona.name)


def create_genome(ctx: StepContext, given: GenomeCreateInput) -> GenomeOutput:
    genome = Genomes(ctx.services).create(ctx.command, given.persona_id, _base_model(ctx, given.base_model), given.name,
                                          given.description)
    return _genome(genome)


def fork_genome(ctx: StepContext, given: GenomeForkInput) -> GenomeOutput:
    genome = Genomes(ctx.services).fork(ctx.command, given.genome_id, given.name, persona_id=given.persona_id,
                                        description=given.description)
    return _genome(genome)


def genome_stack(ctx: StepContext, given: GenomeTarget) -> GenomeOutput:
    return _genome(Genomes(ctx.services).get(ctx.command.caller, _genome_id(ctx, given)))


def search_layers(ctx: StepContext, given: LayerSearchInput) -> LayerSearchOutput:
    query = LayerQuery(text=given.text, k=given.k, trait_type=given.trait_type, base_model=given.base_model)
    found = LayerDiscovery(ctx.services).find(ctx.command.caller, query)
    return LayerSearchOutput([LayerHit(m.layer.id, m.layer.name, m.score) for m in found.items])


def analyse_goal(ctx: StepContext, given: GoalAnalyseInput) -> GoalAnalysis:
    base_model = _base_model(ctx, given.base_model)
    if given.persona_id is not None:
        genome_id = Personas(ctx.services).genome_id(ctx.command.caller, given.persona_id)
        base_model = Genomes(ctx.services).get(ctx.command.caller, genome_id).base_model
    analysis = Analysis(ctx.services, ctx.command.owner, base_model)
    needs = []
    for need in analysis.goal(given.goal, k=given.k):
        best = need.layers[0] if need.layers else None
        close = best.layer_id if best is not None and best.similarity >= given.target_similarity else None
        needs.append(NeedOutput(need.need, need.trait_type, [NearLayerOutput(n.layer_id, n.similarity) for n in need.layers],
                                close))
    close_ids = list(dict.fromkeys(n.close_layer_id for n in needs if n.close_layer_id is not None))
    return GoalAnalysis(needs, close_ids, [n.need for n in needs if n.close_layer_id is None])


def attach_layers(ctx: StepContext, given: LayerAttachInput) -> AttachOutput:
    genomes = Genomes(ctx.services)
    genome_id = _genome_id(ctx, given)
    genome = genomes.get(ctx.command.caller, genome_id)
    attached = []
    for layer_id in dict.fromkeys(given.layer_ids):
        if any(ref.layer_id == layer_id for ref in genome.layers):
            continue  # there already (attached by this step's first try, or before the run)
        genome = genomes.attach_layer(ctx.command.derived(f"attach:{layer_id}"), genome_id, layer_id, given.weight)
        attached.append(layer_id)
    return AttachOutput(genome_id, attached, _genome(genome).layers)


def reweight_layer(ctx: StepContext, given: LayerReweightInput) -> GenomeOutput:
    genomes = Genomes(ctx.services)
    genome_id = _genome_id(ctx, given)
    stack = genomes.get(ctx.command.caller, genome_id).layers
    if given.layer_id not in {ref.layer_id for ref in stack}:
        raise ValueError(f"layer {given.layer_id} is not in genome {genome_id}'s stack")
    weights = [(ref.layer_id, given.weight if ref.layer_id == given.layer_id else ref.weight) for ref in stack]
    return _genome(genomes.replace_layers(ctx.command, genome_id, weights))


def detach_layer(ctx: StepContext, given: LayerDetachInput) -> GenomeOutput:
    return _genome(Genomes(ctx.services).detach_layer(ctx.command, _genome_id(ctx, given), given.layer_id))


def add_knowledge(ctx: StepContext, given: KnowledgeAddInput) -> KnowledgeOutput:
    document = KnowledgeBase(ctx.services).add(ctx.command, given.persona_id, given.text, title=given.title)
    return KnowledgeOutput(document.id, document.chunk_count)


def start_training(ctx: StepContext, given: AcademyTrainInput) -> AcademyOutput:
    session = AcademySessions(ctx.services).start(
        ctx.command, given.persona_id, given.goal, target_similarity=given.target_similarity,
        budget_steps=given.budget_steps, budget_seconds=given.budget_seconds, needs=tuple(given.needs),
    )
    return AcademyOutput(session.id, session.status, session.layer_ids)


def training_ended(ctx: StepContext, awaited: Awaited) -> AcademyOutput | None:
    """The session's outcome once it has ended; a session that failed or was cancelled fails the step."""
    state = ctx.services.repository.load(ACADEMY_SESSION, awaited.stream_id).state
    assert state is not None, "an awaited session exists"
    if state.status not in TERMINAL:
        return None
    if state.status is not SessionStatus.COMPLETED:
        raise StepFailure(f"academy session {state.session_id} {state.status.value}: {state.reason}")
    return AcademyOutput(state.session_id, state.status.value, [layer_id for _, layer_id in state.finished_tasks])


def chat(ctx: StepContext, given: PersonaChatInput) -> ChatOutput:
    recorded = Conversations(ctx.services).recorded_reply(ctx.command.metadata)
    if recorded is not None:  # the first try recorded its turn and died before the step completed
        conversation_id, reply = recorded
        return ChatOutput(conversation_id, reply.content, reply.generation.usage.completion_tokens if reply.generation else 0)
    ask = ChatAsk(messages=[AskedMessage("user", given.message)], max_tokens=given.max_tokens,
                  temperature=given.temperature, seed=given.seed)
    answer = ctx.chat(ctx.command.caller, given.persona_id, ask, ctx.command.metadata, ctx.cancelled)
    return ChatOutput(answer.conversation_id, answer.message.content, answer.generation.usage.completion_tokens)


COMMANDS: dict[str, Spec] = {spec.name: spec for spec in (
    Spec("persona.create", "Create a persona with an empty genome on a base model.", PersonaCreateInput, PersonaOutput,
         create_persona),
    Spec("genome.create", "Create an empty genome for a persona.", GenomeCreateInput, GenomeOutput, create_genome),
    Spec("genome.fork", "Fork a genome: a new genome starting from its stack.", GenomeForkInput, GenomeOutput, fork_genome),
    Spec("genome.stack", "A genome's stack as it is now.", GenomeTarget, GenomeOutput, genome_stack),
    Spec("layers.search", "The layers most similar to a text.", LayerSearchInput, LayerSearchOutput, search_layers),
    Spec("goal.analyse", "The Academy planner's analysis of a goal: its needs, each with its nearest layers; "
         "which needs a layer meets at target_similarity, and which are left to train.",
         GoalAnalyseInput, GoalAnalysis, analyse_goal),
    Spec("layers.attach", "Attach layers to a genome (those already attached are left as they are).",
         LayerAttachInput, AttachOutput, attach_layers),
    Spec("layers.reweight", "Change the weight of a layer in a genome's stack.", LayerReweightInput, GenomeOutput,
         reweight_layer),
    Spec("layers.detach", "Detach a layer from a genome.", LayerDetachInput, GenomeOutput, detach_layer),
    Spec("knowledge.add", "Add a text to a persona's knowledge.", KnowledgeAddInput, KnowledgeOutput, add_knowledge),
    Spec("academy.train", "Start an Academy session that trains layers for a goal (or for the needs given); "
         "asynchronous: with async the step ends when the session does.", AcademyTrainInput, AcademyOutput,
         start_training, awaits=lambda output: Awaited("academy_session", output.session_id), wait=training_ended),
    Spec("persona.chat", "Ask a persona one message; its reply is recorded in a new conversation.",
         PersonaChatInput, ChatOutput, chat),
)}
