"""Genome: an ordered, weighted stack of LoRA layers on one base model."""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from genome_service.domain.common import (
    Decider,
    DomainError,
    require,
    require_exists,
    require_new,
    require_not_archived,
    require_text,
    require_weight,
)

STREAM_TYPE = "genome"


class LayerRef(msgspec.Struct, frozen=True, gc=False):
    """One layer in a stack; the tuple order is the stack order, index 0 at the bottom."""

    layer_id: str
    weight: float


# Events
class GenomeCreated(msgspec.Struct, frozen=True, gc=False, tag=True):
    genome_id: str
    owner: str
    persona_id: str
    base_model: str
    name: str
    description: str = ""


class GenomeForked(msgspec.Struct, frozen=True, gc=False, tag=True):
    genome_id: str
    owner: str
    persona_id: str
    base_model: str
    name: str
    description: str
    parent_ids: tuple[str, ...]
    layers: tuple[LayerRef, ...]
    generation: int


class GenomeDetailsChanged(msgspec.Struct, frozen=True, gc=False, tag=True, omit_defaults=True):
    name: str | None = None
    description: str | None = None


class LayerAttached(msgspec.Struct, frozen=True, gc=False, tag=True):
    layer_id: str
    weight: float
    position: int


class LayerDetached(msgspec.Struct, frozen=True, gc=False, tag=True):
    layer_id: str


class LayerReweighted(msgspec.Struct, frozen=True, gc=False, tag=True):
    layer_id: str
    weight: float


class LayersReordered(msgspec.Struct, frozen=True, gc=False, tag=True):
    layer_ids: tuple[str, ...]


class LayerStackReplaced(msgspec.Struct, frozen=True, gc=False, tag=True):
    layers: tuple[LayerRef, ...]


class GenomeArchived(msgspec.Struct, frozen=True, gc=False, tag=True):
    pass


GenomeEvent = (
    GenomeCreated
    | GenomeForked
    | GenomeDetailsChanged
    | LayerAttached
    | LayerDetached
    | LayerReweighted
    | LayersReordered
    | LayerStackReplaced
    | GenomeArchived
)


# State
class Genome(msgspec.Struct, frozen=True, gc=False):
    genome_id: str
    owner: str
    persona_id: str
    base_model: str
    name: str
    description: str
    layers: tuple[LayerRef, ...] = ()
    parent_ids: tuple[str, ...] = ()
    generation: int = 0
    archived: bool = False


# Commands
class LayerFacts(msgspec.Struct, frozen=True, gc=False):
    """What the genome needs to know of a layer to stack it."""

    layer_id: str
    base_model: str
    deprecated: bool


class CreateGenome(msgspec.Struct, frozen=True, gc=False):
    genome_id: str
    owner: str
    persona_id: str
    base_model: str
    name: str
    description: str = ""


class ForkGenome(msgspec.Struct, frozen=True, gc=False):
    genome_id: str
    owner: str
    persona_id: str
    name: str
    parents: tuple[Genome, ...]
    description: str = ""


class ChangeGenomeDetails(msgspec.Struct, frozen=True, gc=False):
    name: str | None = None
    description: str | None = None


class AttachLayer(msgspec.Struct, frozen=True, gc=False):
    layer: LayerFacts
    weight: float = 1.0
    position: int | None = None  # None puts the layer on top


class DetachLayer(msgspec.Struct, frozen=True, gc=False):
    layer_id: str


class ReweightLayer(msgspec.Struct, frozen=True, gc=False):
    layer_id: str
    weight: float


class ReorderLayers(msgspec.Struct, frozen=True, gc=False):
    layer_ids: tuple[str, ...]


class ReplaceLayerStack(msgspec.Struct, frozen=True, gc=False):
    layers: tuple[tuple[LayerFacts, float], ...]


class ArchiveGenome(msgspec.Struct, frozen=True, gc=False):
    pass


GenomeCommand = (
    CreateGenome
    | ForkGenome
    | ChangeGenomeDetails
    | AttachLayer
    | DetachLayer
    | ReweightLayer
    | ReorderLayers
    | ReplaceLayerStack
    | ArchiveGenome
)


def decide(command: GenomeCommand, state: Genome | None) -> list[GenomeEvent]:
    if isinstance(command, CreateGenome):
        require_new(state, "genome")
        require_text(command.name, "name", max_length=200)
        require_text(command.base_model, "base_model", max_length=200)
        return [GenomeCreated(**msgspec.structs.asdict(command))]
    if isinstance(command, ForkGenome):
        require_new(state, "genome")
        return [_fork(command)]
    require_exists(state, "genome")
    assert state is not None
    require_not_archived(state.archived, "genome")
    match command:
        case ChangeGenomeDetails(name=name, description=description):
            if name is not None:
                require_text(name, "name", max_length=200)
            changed = {
                key: value
                for key, value in (("name", name), ("description", description))
                if value is not None and value != getattr(state, key)
            }
            return [GenomeDetailsChanged(**changed)] if changed else []
        case AttachLayer(layer=layer, weight=weight, position=position):
            require_weight(weight)
            require(
                layer.layer_id not in _ids(state.layers),
                "layer_already_attached",
                f"layer {layer.layer_id} is already attached to genome {state.genome_id}",
            )
            _require_stackable(layer, state)
            position = len(state.layers) if position is None else position
            require(
                0 <= position <= len(state.layers),
                "position_out_of_range",
                f"position must be in 0..{len(state.layers)} (got {position})",
            )
            return [LayerAttached(layer.layer_id, weight, position)]
        case DetachLayer(layer_id=layer_id):
            _require_attached(layer_id, state)
            return [LayerDetached(layer_id)]
        case ReweightLayer(layer_id=layer_id, weight=weight):
            require_weight(weight)
            _require_attached(layer_id, state)
            unchanged = any(ref.layer_id == layer_id and ref.weight == weight for ref in state.layers)
            return [] if unchanged else [LayerReweighted(layer_id, weight)]
        case ReorderLayers(layer_ids=layer_ids):
            _require_unique(layer_ids)
            require(
                set(layer_ids) == set(_ids(state.layers)),
                "reorder_not_permutation",
                f"the new order {list(layer_ids)} must name exactly the attached layers {_ids(state.layers)}",
            )
            return [] if tuple(layer_ids) == tuple(_ids(state.layers)) else [LayersReordered(tuple(layer_ids))]
        case ReplaceLayerStack(layers=stack):
            _require_unique(layer.layer_id for layer, _ in stack)
            for layer, weight in stack:
                require_weight(weight)
                _require_stackable(layer, state)
            layers = tuple(LayerRef(layer.layer_id, weight) for layer, weight in stack)
            return [] if layers == state.layers else [LayerStackReplaced(layers)]
        case ArchiveGenome():
            return [GenomeArchived()]
    raise DomainError("unknown_command", f"genome cannot handle {type(command).__name__}")


def _fork(command: ForkGenome) -> GenomeForked:
    require_text(command.name, "name", max_length=200)
    parents = command.parents
    require(len(parents) >= 1, "fork_without_parent", "a fork needs at least one parent genome")
    parent_ids = [parent.genome_id for parent in parents]
    require(
        len(set(parent_ids)) == len(parent_ids),
        "parent_repeated",
        f"each parent genome may be named once (got {parent_ids})",
    )
    base_models = sorted({parent.base_model for parent in parents})
    require(
        len(base_models) == 1,
        "parent_base_model_mismatch",
        f"the parents must share one base model (got {', '.join(base_models)})",
    )
    layers: dict[str, LayerRef] = {}
    for parent in parents:
        for ref in parent.layers:
            layers.setdefault(ref.layer_id, ref)  # the first parent to carry a layer wins
    return GenomeForked(
        genome_id=command.genome_id,
        owner=command.owner,
        persona_id=command.persona_id,
        base_model=base_models[0],
        name=command.name,
        description=command.description,
        parent_ids=tuple(parent.genome_id for parent in parents),
        layers=tuple(layers.values()),
        generation=max(parent.generation for parent in parents) + 1,
    )


def _ids(layers: tuple[LayerRef, ...]) -> list[str]:
    return [ref.layer_id for ref in layers]


def _require_attached(layer_id: str, state: Genome) -> None:
    require(
        layer_id in _ids(state.layers),
        "layer_not_attached",
        f"layer {layer_id} is not attached to genome {state.genome_id}",
    )


def _require_unique(layer_ids: Iterable[str]) -> None:
    seen: set[str] = set()
    for layer_id in layer_ids:
        require(layer_id not in seen, "layer_already_attached", f"layer {layer_id} appears more than once")
        seen.add(layer_id)


def _require_stackable(layer: LayerFacts, state: Genome) -> None:
    require(
        layer.base_model == state.base_model,
        "base_model_mismatch",
        f"layer {layer.layer_id} is for base model {layer.base_model}, "
        f"genome {state.genome_id} is for {state.base_model}",
    )
    # A layer deprecated after it was stacked may stay; only new attachments are refused.
    require(
        not layer.deprecated or layer.layer_id in _ids(state.layers),
        "layer_deprecated",
        f"layer {layer.layer_id} is deprecated and cannot be attached",
    )


def evolve(state: Genome | None, event: GenomeEvent) -> Genome:
    match event:
        case GenomeCreated():
            return Genome(**msgspec.structs.asdict(event))
        case GenomeForked():
            return Genome(**msgspec.structs.asdict(event))
    assert state is not None, f"{type(event).__name__} before the genome was created"
    match event:
        case GenomeDetailsChanged():
            changes = {k: v for k, v in msgspec.structs.asdict(event).items() if v is not None}
            return msgspec.structs.replace(state, **changes)
        case LayerAttached(layer_id=layer_id, weight=weight, position=position):
            layers = list(state.layers)
            layers.insert(position, LayerRef(layer_id, weight))
            return msgspec.structs.replace(state, layers=tuple(layers))
        case LayerDetached(layer_id=layer_id):
            layers = tuple(ref for ref in state.layers if ref.layer_id != layer_id)
            return msgspec.structs.replace(state, layers=layers)
        case LayerReweighted(layer_id=layer_id, weight=weight):
            layers = tuple(LayerRef(layer_id, weight) if ref.layer_id == layer_id else ref for ref in state.layers)
            return msgspec.structs.replace(state, layers=layers)
        case LayersReordered(layer_ids=layer_ids):
            by_id = {ref.layer_id: ref for ref in state.layers}
            return msgspec.structs.replace(state, layers=tuple(by_id[layer_id] for layer_id in layer_ids))
        case LayerStackReplaced(layers=layers):
            return msgspec.structs.replace(state, layers=layers)
        case GenomeArchived():
            return msgspec.structs.replace(state, archived=True)
    raise TypeError(f"unknown genome event {type(event).__name__}")


GENOME = Decider(
    stream_type=STREAM_TYPE,
    event_type=GenomeEvent,
    state_type=Genome,
    decide=decide,
    evolve=evolve,
)
