"""Read-model tables. Each row is a stream's folded state plus its version and times."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from genome_service.eventstore.tables import Position


def _json() -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(sa.JSON(), nullable=False)


def _time() -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(sa.DateTime(timezone=True), nullable=False)


class GenomeRow(SQLModel, table=True):
    __tablename__ = "genomes"

    genome_id: str = Field(primary_key=True, max_length=64)
    owner: str = Field(index=True, max_length=200)
    persona_id: str = Field(index=True, max_length=64)
    base_model: str = Field(index=True, max_length=200)
    name: str = Field(max_length=200)
    description: str
    parent_ids: list[str] = Field(sa_column=_json())
    generation: int
    archived: bool
    version: int
    created_at: datetime = Field(sa_column=_time())
    updated_at: datetime = Field(sa_column=_time())


class GenomeLayerRefRow(SQLModel, table=True):
    """One layer in a genome's stack; ``position`` 0 is the bottom of the stack."""

    __tablename__ = "genome_layer_refs"

    genome_id: str = Field(primary_key=True, max_length=64)
    position: int = Field(primary_key=True)
    layer_id: str = Field(index=True, max_length=64)
    weight: float


class LayerRow(SQLModel, table=True):
    __tablename__ = "layers"

    layer_id: str = Field(primary_key=True, max_length=64)
    owner: str = Field(index=True, max_length=200)
    name: str = Field(max_length=200)
    description: str
    base_model: str = Field(index=True, max_length=200)
    adapter_sha256: str = Field(max_length=64)
    adapter_format: str = Field(max_length=16)
    rank: int
    target_modules: list[str] = Field(sa_column=_json())
    trait_type: str = Field(index=True, max_length=64)
    tags: list[str] = Field(sa_column=_json())
    creator: str = Field(index=True, max_length=200)
    license: str = Field(max_length=200)
    public: bool = Field(index=True)
    parent_layer_id: str | None = Field(default=None, max_length=64)
    training_metrics: dict | None = Field(default=None, sa_column=sa.Column(sa.JSON(), nullable=True))  # type: ignore[type-arg]
    deprecated: bool
    deprecation_reason: str
    # The persona whose knowledge the adapter carries (never public, erased with it).
    personal_of: str | None = Field(default=None, index=True, max_length=64)
    erased: bool = False
    version: int
    created_at: datetime = Field(sa_column=_time())
    updated_at: datetime = Field(sa_column=_time())


class PersonaRow(SQLModel, table=True):
    __tablename__ = "personas"

    persona_id: str = Field(primary_key=True, max_length=64)
    owner: str = Field(index=True, max_length=200)
    name: str = Field(max_length=200)
    description: str
    system_prompt: str
    genome_id: str | None = Field(default=None, max_length=64)
    archived: bool
    # Its knowledge and conversations were crypto-shredded (it is archived too).
    erased: bool = Field(default=False, sa_column=sa.Column(sa.Boolean(), nullable=False, server_default=sa.false()))
    version: int
    created_at: datetime = Field(sa_column=_time())
    updated_at: datetime = Field(sa_column=_time())


class AcademySessionRow(SQLModel, table=True):
    __tablename__ = "academy_sessions"

    session_id: str = Field(primary_key=True, max_length=64)
    owner: str = Field(index=True, max_length=200)
    persona_id: str = Field(index=True, max_length=64)
    goal: str
    target_similarity: float
    budget_steps: int
    budget_seconds: float
    status: str = Field(index=True, max_length=16)
    reason: str
    planned: bool
    challenge_count: int
    example_count: int
    step: int  # training steps recorded (checkpointed), over all tasks
    loss: float | None = None  # the latest recorded training loss
    layer_ids: list[str] = Field(sa_column=_json())  # produced or reused, in order
    version: int
    created_at: datetime = Field(sa_column=_time())
    updated_at: datetime = Field(sa_column=_time())


class TrainingFileRow(SQLModel, table=True):
    """An uploaded training file; its content is only in the log, sealed with the file's own key."""

    __tablename__ = "training_files"

    file_id: str = Field(primary_key=True, max_length=64)
    owner: str = Field(index=True, max_length=200)
    filename: str = Field(max_length=255)
    purpose: str = Field(max_length=32)
    bytes: int
    sha256: str = Field(max_length=64)
    examples: int
    deleted: bool = Field(index=True)
    version: int
    created_at: datetime = Field(sa_column=_time())
    updated_at: datetime = Field(sa_column=_time())


class KnowledgeRow(SQLModel, table=True):
    """A document of a persona's knowledge; its text is in ``knowledge_chunks``."""

    __tablename__ = "knowledge"

    knowledge_id: str = Field(primary_key=True, max_length=64)
    persona_id: str = Field(index=True, max_length=64)
    owner: str = Field(index=True, max_length=200)
    title: str  # sealed: longer than the 200 characters a title may have
    media_type: str = Field(max_length=32)
    chunk_count: int
    removed: bool
    version: int
    created_at: datetime = Field(sa_column=_time())
    updated_at: datetime = Field(sa_column=_time())


class KnowledgeChunkRow(SQLModel, table=True):
    """One searchable chunk of a document (its text sealed); a removed document keeps none."""

    __tablename__ = "knowledge_chunks"

    knowledge_id: str = Field(primary_key=True, max_length=64)
    ordinal: int = Field(primary_key=True)
    persona_id: str = Field(index=True, max_length=64)
    text: str


class ConversationRow(SQLModel, table=True):
    """A persona's chat with one owner; its messages are in ``conversation_messages``."""

    __tablename__ = "conversations"

    conversation_id: str = Field(primary_key=True, max_length=64)
    persona_id: str = Field(index=True, max_length=64)
    owner: str = Field(index=True, max_length=200)
    message_count: int
    version: int
    created_at: datetime = Field(sa_column=_time())
    updated_at: datetime = Field(sa_column=_time())


class ConversationMessageRow(SQLModel, table=True):
    """One message of a conversation (its content sealed); a reply also holds how it was generated (JSON)."""

    __tablename__ = "conversation_messages"

    conversation_id: str = Field(primary_key=True, max_length=64)
    ordinal: int = Field(primary_key=True)
    role: str = Field(max_length=16)
    content: str
    generation: dict | None = Field(default=None, sa_column=sa.Column(sa.JSON(), nullable=True))  # type: ignore[type-arg]


class RecipeRow(SQLModel, table=True):
    """A recipe's current revision; its definition is in its events."""

    __tablename__ = "recipes"

    recipe_id: str = Field(primary_key=True, max_length=64)
    owner: str = Field(index=True, max_length=200)
    name: str = Field(index=True, max_length=200)
    description: str
    public: bool = Field(index=True)
    revision: int
    retired: bool
    step_count: int
    version: int
    created_at: datetime = Field(sa_column=_time())
    updated_at: datetime = Field(sa_column=_time())


class RecipeRunRow(SQLModel, table=True):
    """A run of a recipe: where it stands; its steps and outputs are in its events."""

    __tablename__ = "recipe_runs"

    run_id: str = Field(primary_key=True, max_length=64)
    owner: str = Field(index=True, max_length=200)
    recipe_id: str = Field(index=True, max_length=64)
    recipe_name: str = Field(max_length=200)
    recipe_revision: int
    status: str = Field(index=True, max_length=16)
    reason: str
    current_step: str | None = Field(default=None, max_length=64)
    # The stream an asynchronous step waits on (an academy session): no worker holds the run meanwhile.
    waiting_on: str | None = Field(default=None, max_length=64)
    steps_done: int  # completed or skipped
    step_count: int
    version: int
    created_at: datetime = Field(sa_column=_time())
    updated_at: datetime = Field(sa_column=_time())


class ProjectionCheckpointRow(SQLModel, table=True):
    """The last event position a projection has applied."""

    __tablename__ = "projection_checkpoints"

    name: str = Field(primary_key=True, max_length=64)
    position: int = Field(sa_column=sa.Column(Position, nullable=False))


# The tables as SQLAlchemy Core handles, for queries and the projector: the models above
# declare them, and the metadata hands them back typed, by name.
GENOMES = SQLModel.metadata.tables["genomes"]
GENOME_LAYER_REFS = SQLModel.metadata.tables["genome_layer_refs"]
LAYERS = SQLModel.metadata.tables["layers"]
PERSONAS = SQLModel.metadata.tables["personas"]
ACADEMY_SESSIONS = SQLModel.metadata.tables["academy_sessions"]
TRAINING_FILES = SQLModel.metadata.tables["training_files"]
KNOWLEDGE_DOCUMENTS = SQLModel.metadata.tables["knowledge"]
KNOWLEDGE_CHUNKS = SQLModel.metadata.tables["knowledge_chunks"]
CONVERSATIONS = SQLModel.metadata.tables["conversations"]
CONVERSATION_MESSAGES = SQLModel.metadata.tables["conversation_messages"]
RECIPES = SQLModel.metadata.tables["recipes"]
RECIPE_RUNS = SQLModel.metadata.tables["recipe_runs"]
