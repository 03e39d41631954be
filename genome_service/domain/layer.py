"""Layer: one trained LoRA adapter, described well enough to be found and stacked."""

from __future__ import annotations

import enum
import math
import re

import msgspec

from genome_service.domain.common import (
    Decider,
    DomainError,
    require,
    require_exists,
    require_new,
    require_text,
)

STREAM_TYPE = "layer"
ADAPTER_FORMATS = ("mlx", "peft")
MAX_TAGS = 32
MAX_TAG_LENGTH = 64
_SHA256 = re.compile(r"[0-9a-f]{64}")


class TraitType(enum.StrEnum):
    GENERAL_REASONING = "general_reasoning"
    TONE_AND_VOICE = "tone_and_voice"
    ETHICAL_REASONING = "ethical_reasoning"
    DOMAIN_EXPERTISE = "domain_expertise"
    CULTURAL_KNOWLEDGE = "cultural_knowledge"
    MEMORY_INTEGRATION = "memory_integration"


class TrainingMetrics(msgspec.Struct, frozen=True, gc=False, omit_defaults=True):
    loss: float | None = None
    epochs: int | None = None
    steps: int | None = None
    performance: float | None = None
    tokens: int | None = None  # answer (target) tokens trained on, summed over every step


# Events
class LayerRegistered(msgspec.Struct, frozen=True, gc=False, tag=True):
    layer_id: str
    owner: str
    name: str
    base_model: str
    adapter_sha256: str
    adapter_format: str
    rank: int
    target_modules: tuple[str, ...]
    trait_type: TraitType
    description: str = ""
    tags: tuple[str, ...] = ()
    creator: str = ""
    license: str = ""
    public: bool = False
    parent_layer_id: str | None = None
    training_metrics: TrainingMetrics | None = None
    # Only ever the owner's own vector; a computed one is derived, never stored here.
    embedding: tuple[float, ...] | None = None
    # The persona whose personal data (knowledge) the adapter was trained on: never public,
    # and erased with that persona.
    personal_of: str | None = None


class LayerDetailsChanged(msgspec.Struct, frozen=True, gc=False, tag=True, omit_defaults=True):
    description: str | None = None
    tags: tuple[str, ...] | None = None
    public: bool | None = None
    license: str | None = None


class TrainingMetricsRecorded(msgspec.Struct, frozen=True, gc=False, tag=True):
    metrics: TrainingMetrics


class LayerDeprecated(msgspec.Struct, frozen=True, gc=False, tag=True):
    reason: str = ""


class LayerErased(msgspec.Struct, frozen=True, gc=False, tag=True):
    """The adapter's bytes were deleted with the persona whose data they carried."""

    persona_id: str


LayerEvent = LayerRegistered | LayerDetailsChanged | TrainingMetricsRecorded | LayerDeprecated | LayerErased


# State
class Layer(msgspec.Struct, frozen=True, gc=False):
    layer_id: str
    owner: str
    name: str
    description: str
    base_model: str
    adapter_sha256: str
    adapter_format: str
    rank: int
    target_modules: tuple[str, ...]
    trait_type: TraitType
    tags: tuple[str, ...]
    creator: str
    license: str
    public: bool
    parent_layer_id: str | None = None
    training_metrics: TrainingMetrics | None = None
    deprecated: bool = False
    deprecation_reason: str = ""
    embedding: tuple[float, ...] | None = None
    personal_of: str | None = None
    erased: bool = False


# Commands
class RegisterLayer(msgspec.Struct, frozen=True, gc=False):
    layer_id: str
    owner: str
    name: str
    base_model: str
    adapter_sha256: str
    adapter_format: str
    rank: int
    target_modules: tuple[str, ...]
    trait_type: TraitType
    description: str = ""
    tags: tuple[str, ...] = ()
    creator: str = ""
    license: str = ""
    public: bool = False
    parent_layer_id: str | None = None
    training_metrics: TrainingMetrics | None = None
    embedding: tuple[float, ...] | None = None
    personal_of: str | None = None


class ChangeLayerDetails(msgspec.Struct, frozen=True, gc=False):
    description: str | None = None
    tags: tuple[str, ...] | None = None
    public: bool | None = None
    license: str | None = None


class RecordTrainingMetrics(msgspec.Struct, frozen=True, gc=False):
    metrics: TrainingMetrics


class DeprecateLayer(msgspec.Struct, frozen=True, gc=False):
    reason: str = ""


class EraseLayer(msgspec.Struct, frozen=True, gc=False):
    persona_id: str


LayerCommand = RegisterLayer | ChangeLayerDetails | RecordTrainingMetrics | DeprecateLayer | EraseLayer


def decide(command: LayerCommand, state: Layer | None) -> list[LayerEvent]:
    if isinstance(command, RegisterLayer):
        require_new(state, "layer")
        _require_registration(command)
        if command.training_metrics is not None:
            _require_metrics(command.training_metrics)
        tags = normalise_tags(command.tags)
        _require_private(command.personal_of, command.public)
        return [LayerRegistered(**{**msgspec.structs.asdict(command), "tags": tags})]
    require_exists(state, "layer")
    assert state is not None
    if isinstance(command, EraseLayer):
        require(state.personal_of == command.persona_id, "layer_not_personal",
                f"layer {state.layer_id} carries no data of persona {command.persona_id}")
        return [] if state.erased else [LayerErased(command.persona_id)]
    require(not state.deprecated, "layer_deprecated", f"layer {state.layer_id} is deprecated and can no longer change")
    match command:
        case ChangeLayerDetails(description=description, tags=tags, public=public, license=license):
            tags = None if tags is None else normalise_tags(tags)
            _require_private(state.personal_of, bool(public))
            proposed = {"description": description, "tags": tags, "public": public, "license": license}
            changed = {
                key: value for key, value in proposed.items() if value is not None and value != getattr(state, key)
            }
            return [LayerDetailsChanged(**changed)] if changed else []
        case RecordTrainingMetrics(metrics=metrics):
            _require_metrics(metrics)
            return [] if metrics == state.training_metrics else [TrainingMetricsRecorded(metrics)]
        case DeprecateLayer(reason=reason):
            return [LayerDeprecated(reason)]
    raise DomainError("unknown_command", f"layer cannot handle {type(command).__name__}")


def _require_registration(command: RegisterLayer) -> None:
    require_text(command.name, "name", max_length=200)
    require_text(command.base_model, "base_model", max_length=200)
    require(
        _SHA256.fullmatch(command.adapter_sha256) is not None,
        "adapter_sha256_invalid",
        f"adapter_sha256 must be 64 lowercase hex characters (got {command.adapter_sha256!r})",
    )
    require(
        command.adapter_format in ADAPTER_FORMATS,
        "adapter_format_unknown",
        f"adapter_format must be one of {', '.join(ADAPTER_FORMATS)} (got {command.adapter_format!r})",
    )
    require(command.rank >= 1, "rank_out_of_range", f"rank must be at least 1 (got {command.rank})")
    require(len(command.target_modules) > 0, "target_modules_required", "target_modules must not be empty")
    if command.embedding is not None:
        require(all(math.isfinite(x) for x in command.embedding), "vector_not_finite",
                "every number of the embedding must be finite (no NaN or infinity)")
        require(any(command.embedding), "vector_zero", "the embedding must not be all zeros")


def normalise_tags(tags: tuple[str, ...]) -> tuple[str, ...]:
    """Strip, lowercase and deduplicate tags, keeping their first order; refuse bad ones."""
    normalised: dict[str, None] = {}
    for tag in tags:
        clean = tag.strip().lower()
        require(bool(clean), "tag_empty", "a tag must not be empty")
        require(
            len(clean) <= MAX_TAG_LENGTH,
            "tag_too_long",
            f"tag {clean[:20]!r}... must be at most {MAX_TAG_LENGTH} characters (got {len(clean)})",
        )
        normalised[clean] = None
    require(len(normalised) <= MAX_TAGS, "too_many_tags", f"at most {MAX_TAGS} tags (got {len(normalised)})")
    return tuple(normalised)


def _require_private(personal_of: str | None, public: bool) -> None:
    require(
        personal_of is None or not public,
        "public_not_allowed",
        f"this layer was trained on persona {personal_of}'s knowledge (personal data): it cannot be made public",
    )


def _require_metrics(metrics: TrainingMetrics) -> None:
    for field, value in msgspec.structs.asdict(metrics).items():
        if value is None:
            continue
        require(math.isfinite(value), "metric_not_finite", f"{field} must be a finite number (got {value})")
        if field != "performance":
            require(value >= 0, "metric_negative", f"{field} must not be negative (got {value})")


def evolve(state: Layer | None, event: LayerEvent) -> Layer:
    match event:
        case LayerRegistered():
            return Layer(**msgspec.structs.asdict(event))
    assert state is not None, f"{type(event).__name__} before LayerRegistered"
    match event:
        case LayerDetailsChanged():
            changes = {k: v for k, v in msgspec.structs.asdict(event).items() if v is not None}
            return msgspec.structs.replace(state, **changes)
        case TrainingMetricsRecorded(metrics=metrics):
            return msgspec.structs.replace(state, training_metrics=metrics)
        case LayerDeprecated(reason=reason):
            return msgspec.structs.replace(state, deprecated=True, deprecation_reason=reason)
        case LayerErased(persona_id=persona_id):
            return msgspec.structs.replace(state, erased=True, deprecated=True,
                                           deprecation_reason=f"erased with persona {persona_id}")
    raise TypeError(f"unknown layer event {type(event).__name__}")


LAYER = Decider(
    stream_type=STREAM_TYPE,
    event_type=LayerEvent,
    state_type=Layer,
    decide=decide,
    evolve=evolve,
)
