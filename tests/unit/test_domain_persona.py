import msgspec
import pytest

from genome_service.domain.common import DomainError
from genome_service.domain.persona import (
    PERSONA,
    ArchivePersona,
    AssignGenome,
    ChangePersonaProfile,
    CreatePersona,
    GenomeAssigned,
    GenomeFacts,
    PersonaArchived,
    PersonaCreated,
    PersonaEvent,
    PersonaProfileChanged,
)


def run(state, *commands):
    for command in commands:
        state = PERSONA.fold(state, PERSONA.decide(command, state))
    return state


def refused(command, state):
    with pytest.raises(DomainError) as caught:
        PERSONA.decide(command, state)
    return caught.value.rule


@pytest.fixture
def persona():
    return run(None, CreatePersona("p1", "alice", "Ada", "a mathematician", "You are Ada."))


def test_creating_a_persona_folds_into_its_state(persona):
    assert persona.persona_id == "p1"
    assert persona.owner == "alice"
    assert persona.name == "Ada"
    assert persona.system_prompt == "You are Ada."
    assert persona.genome_id is None
    assert not persona.archived


def test_creating_a_persona_twice_is_refused(persona):
    assert refused(CreatePersona("p1", "alice", "Ada"), persona) == "persona_exists"


def test_a_persona_needs_a_name():
    assert refused(CreatePersona("p1", "alice", "  "), None) == "name_required"


def test_a_persona_name_longer_than_200_characters_is_refused():
    assert refused(CreatePersona("p1", "alice", "x" * 201), None) == "name_too_long"


def test_a_system_prompt_over_the_limit_is_refused():
    assert refused(CreatePersona("p1", "alice", "Ada", system_prompt="x" * 20_001), None) == "system_prompt_too_long"


def test_commands_on_a_missing_persona_are_refused():
    assert refused(ChangePersonaProfile(name="Ada"), None) == "persona_not_found"


def test_changing_the_profile_records_only_what_changed(persona):
    events = PERSONA.decide(ChangePersonaProfile(name="Ada L.", description="a mathematician"), persona)
    assert events == [PersonaProfileChanged(name="Ada L.")]
    assert PERSONA.fold(persona, events).name == "Ada L."


def test_changing_the_profile_to_the_same_values_is_a_no_op(persona):
    assert PERSONA.decide(ChangePersonaProfile(name="Ada", system_prompt="You are Ada."), persona) == []


def test_changing_the_profile_to_an_empty_name_is_refused(persona):
    assert refused(ChangePersonaProfile(name=""), persona) == "name_required"


def test_changing_the_profile_to_a_too_long_prompt_is_refused(persona):
    assert refused(ChangePersonaProfile(system_prompt="x" * 20_001), persona) == "system_prompt_too_long"


def test_assigning_a_genome_of_the_persona_sets_it(persona):
    state = run(persona, AssignGenome(GenomeFacts("g1", "p1", archived=False)))
    assert state.genome_id == "g1"


def test_assigning_the_same_genome_again_is_a_no_op(persona):
    state = run(persona, AssignGenome(GenomeFacts("g1", "p1", archived=False)))
    assert PERSONA.decide(AssignGenome(GenomeFacts("g1", "p1", archived=False)), state) == []


def test_assigning_a_genome_of_another_persona_is_refused(persona):
    assert refused(AssignGenome(GenomeFacts("g1", "p2", archived=False)), persona) == "genome_of_other_persona"


def test_assigning_an_archived_genome_is_refused(persona):
    assert refused(AssignGenome(GenomeFacts("g1", "p1", archived=True)), persona) == "genome_archived"


def test_an_archived_persona_refuses_every_change(persona):
    state = run(persona, ArchivePersona())
    assert state.archived
    assert refused(ChangePersonaProfile(name="Bob"), state) == "persona_archived"
    assert refused(ArchivePersona(), state) == "persona_archived"


def test_an_unknown_command_is_refused(persona):
    assert refused(object(), persona) == "unknown_command"


@pytest.mark.parametrize(
    "event",
    [
        PersonaCreated("p1", "alice", "Ada", "d", "prompt"),
        PersonaProfileChanged(description="new"),
        GenomeAssigned("g1"),
        PersonaArchived(),
    ],
)
def test_every_persona_event_survives_a_json_round_trip(event):
    assert msgspec.json.decode(msgspec.json.encode(event), type=PersonaEvent) == event
