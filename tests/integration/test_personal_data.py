"""Knowledge and messages sealed with per-persona keys; erasure by shredding the key (SQLite and PostgreSQL)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from genome_service.domain.common import DomainError
from genome_service.domain.conversation import CONVERSATION, Generation, Message, RecordTurn, SamplingUsed, Usage
from genome_service.domain.knowledge import KNOWLEDGE, AddKnowledge, PersonaFacts
from genome_service.domain.persona import PERSONA, CreatePersona
from genome_service.eventstore.cipher import DataKey, MasterKey, SealBroken, associated
from genome_service.eventstore.data_keys import SubjectErased
from genome_service.eventstore.database import Database
from genome_service.eventstore.records import EventMetadata, Expect
from genome_service.eventstore.store import EventStore
from genome_service.projections.read_models import READ_MODELS
from genome_service.services.bootstrap import Services, build, domain_codec
from genome_service.services.erasure import erase_persona
from genome_service.services.knowledge import add_knowledge
from genome_service.settings import Settings
from rag.embedder import SentenceTransformerEmbedder

KNOWN = "Quillon's moon Vesperine was charted by Ilsa Marrow"
ASKED = "my passport number is XK-4471-LUMEN"
REPLIED = "noted, the number ends in LUMEN"
OTHER = "Bread rises slowly when wild yeast ferments overnight"
META = EventMetadata(actor="alice")
GENERATION = Generation("tiny", None, SamplingUsed(0.0, 1.0, 8), Usage(3, 2), "stop")


@pytest.fixture
def sealed(database: Database, tmp_path: Path, embedder: SentenceTransformerEmbedder) -> Iterator[Services]:
    yield build(Settings(data_dir=tmp_path, database_url=database.url, snapshot_every=2), database=database, embedder=embedder)


def every_row_as_text(database: Database) -> str:
    """Every row of every table, as text: where a plaintext would show if it were stored."""
    with database.read() as connection:
        tables = sa.inspect(connection).get_table_names()
        return "\n".join(str(tuple(row)) for table in tables for row in connection.exec_driver_sql(f"SELECT * FROM {table}"))


def read_model_rows(services: Services) -> dict[str, list[tuple[object, ...]]]:
    with services.database.read() as connection:
        return {table.name: sorted(tuple(r) for r in connection.execute(sa.select(table)))
                for model in READ_MODELS for table in model.tables}


def persona_with_data(services: Services, persona_id: str, text: str) -> tuple[str, str]:
    services.commands.execute(PERSONA, persona_id, CreatePersona(persona_id, "alice", persona_id))
    knowledge = add_knowledge(services, "alice", persona_id, f"{persona_id} notes", "text/plain", text, META)
    conversation_id = f"c-{persona_id}"
    for turn in range(2):
        asked = (Message("user", f"{ASKED} ({persona_id}, turn {turn})"),)
        services.commands.execute(CONVERSATION, conversation_id, RecordTurn(
            conversation_id, persona_id, "alice", asked, Message("assistant", REPLIED, GENERATION)), metadata=META)
    return knowledge.aggregate.stream_id, conversation_id


def test_knowledge_and_messages_are_stored_sealed_and_read_back_in_clear(sealed: Services) -> None:
    knowledge_id, conversation_id = persona_with_data(sealed, "p1", KNOWN)

    stored = every_row_as_text(sealed.database)
    for plain in (KNOWN, ASKED, REPLIED, "p1 notes"):
        assert plain not in stored
    events = sealed.store.read_stream(conversation_id)
    assert [e.event.content for e in events[1:]] == [f"{ASKED} (p1, turn 0)", REPLIED, f"{ASKED} (p1, turn 1)", REPLIED]
    assert sealed.repository.load(KNOWLEDGE, knowledge_id).state.chunks == (KNOWN,)  # type: ignore[union-attr]
    # Five events, a snapshot every two versions: none is written for a stream of personal data.
    with sealed.database.read() as connection:
        snapshotted = {row[0] for row in connection.exec_driver_sql("SELECT stream_type FROM snapshots")}
    assert snapshotted == set()
    candidates = sealed.search.knowledge_candidates(sealed.search.query_vector("who charted Vesperine"), 1, "p1")
    assert [c.text for c in candidates] == [KNOWN]


def test_erasure_empties_the_events_drops_the_rows_and_a_rebuild_gives_the_same_rows(sealed: Services) -> None:
    knowledge_id, conversation_id = persona_with_data(sealed, "p1", KNOWN)
    kept_knowledge, kept_conversation = persona_with_data(sealed, "p2", OTHER)

    erase_persona(sealed, "p1", META)

    knowledge = sealed.repository.load(KNOWLEDGE, knowledge_id).state
    assert knowledge is not None and knowledge.erased and knowledge.chunks == ("",) and knowledge.title == ""
    conversation = sealed.repository.load(CONVERSATION, conversation_id).state
    assert conversation is not None and conversation.erased and {m.content for m in conversation.messages} == {""}
    persona = sealed.repository.load(PERSONA, "p1").state
    assert persona is not None and persona.erased and persona.archived
    rows = read_model_rows(sealed)
    assert {r[0] for r in rows["knowledge"]} == {kept_knowledge}
    assert {r[0] for r in rows["conversations"]} == {kept_conversation}
    assert {r[0] for r in rows["conversation_messages"]} == {kept_conversation}
    assert sealed.repository.load(CONVERSATION, kept_conversation).state.messages[1].content == REPLIED  # type: ignore[union-attr]

    sealed.projector.rebuild()
    assert read_model_rows(sealed) == rows
    sealed.search.rebuild()
    search = sealed.search
    assert search.search_knowledge(search.query_vector(KNOWN), 10, "p1") == []
    assert [c.text for c in search.knowledge_candidates(search.query_vector("yeast"), 1, "p2")] == [OTHER]


def test_nothing_more_is_recorded_for_an_erased_persona_and_erasing_twice_is_refused(sealed: Services) -> None:
    _, conversation_id = persona_with_data(sealed, "p1", KNOWN)
    erase_persona(sealed, "p1", META)
    with pytest.raises(DomainError) as refused:
        erase_persona(sealed, "p1", META)
    assert refused.value.rule == "persona_erased"
    # A turn that raced the erasure cannot mint a new key for the persona.
    before = sealed.store.last_position()
    with pytest.raises(SubjectErased):
        sealed.commands.execute(CONVERSATION, conversation_id, RecordTurn(
            conversation_id, "p1", "alice", (Message("user", ASKED),), Message("assistant", REPLIED, GENERATION)))
    assert sealed.store.last_position() == before


def test_events_written_before_sealing_still_read_and_an_erasure_drops_their_rows(sealed: Services) -> None:
    sealed.commands.execute(PERSONA, "p1", CreatePersona("p1", "alice", "p1"))
    legacy = EventStore(sealed.database, domain_codec())  # as the store wrote before sealing existed
    facts = PersonaFacts("p1", "alice", archived=False)
    events = KNOWLEDGE.decide(AddKnowledge("k-old", facts, "alice", "old notes", "text/plain", (KNOWN,)), None)
    legacy.append("k-old", KNOWLEDGE.stream_type, events, Expect.NO_STREAM)

    assert sealed.repository.load(KNOWLEDGE, "k-old").state.chunks == (KNOWN,)  # type: ignore[union-attr]
    sealed.projector.catch_up()
    sealed.projector.rebuild()  # the read model rows get sealed, though the old event stays in clear
    with sealed.database.read() as connection:
        chunk_texts = [row[0] for row in connection.exec_driver_sql("SELECT text FROM knowledge_chunks")]
    assert len(chunk_texts) == 1 and KNOWN not in chunk_texts[0]
    assert [c.text for c in sealed.search.knowledge_candidates(sealed.search.query_vector(KNOWN), 1, "p1")] == [KNOWN]

    erase_persona(sealed, "p1", META)
    assert read_model_rows(sealed)["knowledge"] == []
    sealed.projector.rebuild()
    assert read_model_rows(sealed)["knowledge_chunks"] == []
    sealed.search.rebuild()
    assert sealed.search.search_knowledge(sealed.search.query_vector(KNOWN), 10, "p1") == []


def test_a_sealed_value_opens_only_in_its_own_place() -> None:
    key = DataKey(DataKey.generate())
    here, there = associated("p1", "c1", "2", "content"), associated("p1", "c1", "4", "content")
    sealed = key.seal(ASKED, here)
    assert key.open(sealed, here) == ASKED and key.seal(ASKED, here) != sealed  # a fresh nonce each time
    with pytest.raises(SealBroken):
        key.open(sealed, there)
    with pytest.raises(SealBroken):
        DataKey(DataKey.generate()).open(sealed, here)
    fixed = key.seal_fixed(ASKED, here)
    assert key.seal_fixed(ASKED, here) == fixed and key.open_fixed(fixed, here) == ASKED
    with pytest.raises(SealBroken):
        key.open_fixed(fixed, there)


def test_request_fingerprints_are_keyed_by_the_master_key(tmp_path: Path) -> None:
    """A fingerprint outlives the shredded body in the log's metadata: without the master key
    nobody can confirm a guessed body against it."""
    def fingerprint(master: MasterKey, body: bytes) -> str:
        digest = master.fingerprint()
        digest.update(body)
        return digest.hexdigest()

    body = f'{{"text": "{ASKED}"}}'.encode()
    ours = MasterKey.from_file(tmp_path / "a.key")
    assert fingerprint(ours, body) == fingerprint(MasterKey.from_file(tmp_path / "a.key"), body)
    assert fingerprint(ours, body) != fingerprint(MasterKey.from_file(tmp_path / "b.key"), body)
    assert fingerprint(ours, body) != hashlib.sha256(body).hexdigest()
