import math

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from genome_service.domain.common import DomainError
from genome_service.domain.genome import (
    GENOME,
    ArchiveGenome,
    AttachLayer,
    ChangeGenomeDetails,
    CreateGenome,
    DetachLayer,
    ForkGenome,
    GenomeArchived,
    GenomeCreated,
    GenomeDetailsChanged,
    GenomeEvent,
    GenomeForked,
    LayerAttached,
    LayerDetached,
    LayerFacts,
    LayerRef,
    LayerReweighted,
    LayersReordered,
    LayerStackReplaced,
    ReorderLayers,
    ReplaceLayerStack,
    ReweightLayer,
)

BASE = "qwen2.5-7b"


def layer(layer_id, base_model=BASE, deprecated=False):
    return LayerFacts(layer_id, base_model, deprecated)


def run(state, *commands):
    for command in commands:
        state = GENOME.fold(state, GENOME.decide(command, state))
    return state


def refused(command, state):
    with pytest.raises(DomainError) as caught:
        GENOME.decide(command, state)
    return caught.value.rule


@pytest.fixture
def genome():
    return run(None, CreateGenome("g1", "alice", "p1", BASE, "Ada's genome", "first try"))


@pytest.fixture
def stacked(genome):
    return run(genome, AttachLayer(layer("a"), 0.5), AttachLayer(layer("b"), 1.0), AttachLayer(layer("c"), 0.25))


def stack(state):
    return [(ref.layer_id, ref.weight) for ref in state.layers]


# Creation
def test_creating_a_genome_folds_into_an_empty_first_generation(genome):
    assert genome.genome_id == "g1"
    assert genome.owner == "alice"
    assert genome.persona_id == "p1"
    assert genome.base_model == BASE
    assert genome.name == "Ada's genome"
    assert genome.description == "first try"
    assert genome.layers == ()
    assert genome.parent_ids == ()
    assert genome.generation == 0
    assert not genome.archived


def test_creating_a_genome_twice_is_refused(genome):
    assert refused(CreateGenome("g1", "alice", "p1", BASE, "again"), genome) == "genome_exists"


def test_a_genome_needs_a_name():
    assert refused(CreateGenome("g1", "alice", "p1", BASE, " "), None) == "name_required"


def test_a_genome_name_longer_than_200_characters_is_refused():
    assert refused(CreateGenome("g1", "alice", "p1", BASE, "x" * 201), None) == "name_too_long"


def test_a_genome_needs_a_base_model():
    assert refused(CreateGenome("g1", "alice", "p1", "", "name"), None) == "base_model_required"


def test_commands_on_a_missing_genome_are_refused():
    assert refused(AttachLayer(layer("a")), None) == "genome_not_found"


# Details
def test_changing_details_records_only_what_changed(genome):
    events = GENOME.decide(ChangeGenomeDetails(name="Renamed", description="first try"), genome)
    assert events == [GenomeDetailsChanged(name="Renamed")]
    assert GENOME.fold(genome, events).name == "Renamed"


def test_changing_details_to_the_same_values_is_a_no_op(genome):
    assert GENOME.decide(ChangeGenomeDetails(name="Ada's genome"), genome) == []
    assert GENOME.decide(ChangeGenomeDetails(), genome) == []


def test_changing_the_name_to_blank_is_refused(genome):
    assert refused(ChangeGenomeDetails(name=""), genome) == "name_required"


# Attaching
def test_attaching_without_a_position_puts_the_layer_on_top(stacked):
    assert stack(stacked) == [("a", 0.5), ("b", 1.0), ("c", 0.25)]


def test_attaching_at_a_position_inserts_the_layer_there(stacked):
    assert stack(run(stacked, AttachLayer(layer("d"), 0.1, position=0))) == [
        ("d", 0.1),
        ("a", 0.5),
        ("b", 1.0),
        ("c", 0.25),
    ]
    assert stack(run(stacked, AttachLayer(layer("d"), 0.1, position=3)))[-1] == ("d", 0.1)


def test_attaching_records_the_resolved_position(stacked):
    assert GENOME.decide(AttachLayer(layer("d"), 0.75), stacked) == [LayerAttached("d", 0.75, 3)]


def test_attaching_a_layer_twice_is_refused(stacked):
    assert refused(AttachLayer(layer("a"), 0.2), stacked) == "layer_already_attached"


@pytest.mark.parametrize("weight", [-0.01, 1.01, math.nan, math.inf])
def test_attaching_with_a_weight_outside_zero_to_one_is_refused(genome, weight):
    assert refused(AttachLayer(layer("a"), weight), genome) == "weight_out_of_range"


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_the_weight_bounds_are_inclusive(genome, weight):
    assert stack(run(genome, AttachLayer(layer("a"), weight))) == [("a", weight)]


def test_attaching_a_layer_of_another_base_model_is_refused(genome):
    with pytest.raises(DomainError) as caught:
        GENOME.decide(AttachLayer(layer("a", base_model="llama-3-8b")), genome)
    assert caught.value.rule == "base_model_mismatch"
    assert "llama-3-8b" in caught.value.message and BASE in caught.value.message


def test_attaching_a_deprecated_layer_is_refused(genome):
    assert refused(AttachLayer(layer("a", deprecated=True)), genome) == "layer_deprecated"


@pytest.mark.parametrize("position", [-1, 4])
def test_attaching_outside_the_stack_is_refused(stacked, position):
    assert refused(AttachLayer(layer("d"), position=position), stacked) == "position_out_of_range"


# Detaching and reweighting
def test_detaching_a_layer_removes_it_and_keeps_the_order(stacked):
    assert stack(run(stacked, DetachLayer("b"))) == [("a", 0.5), ("c", 0.25)]


def test_detaching_a_layer_not_attached_is_refused(stacked):
    assert refused(DetachLayer("zz"), stacked) == "layer_not_attached"


def test_reweighting_a_layer_changes_only_its_weight(stacked):
    assert stack(run(stacked, ReweightLayer("b", 0.3))) == [("a", 0.5), ("b", 0.3), ("c", 0.25)]


def test_reweighting_to_the_same_weight_is_a_no_op(stacked):
    assert GENOME.decide(ReweightLayer("b", 1.0), stacked) == []


def test_reweighting_a_layer_not_attached_is_refused(stacked):
    assert refused(ReweightLayer("zz", 0.5), stacked) == "layer_not_attached"


def test_reweighting_outside_zero_to_one_is_refused(stacked):
    assert refused(ReweightLayer("a", 2.0), stacked) == "weight_out_of_range"


# Reordering
def test_reordering_changes_the_stack_order_and_keeps_the_weights(stacked):
    assert stack(run(stacked, ReorderLayers(("c", "a", "b")))) == [("c", 0.25), ("a", 0.5), ("b", 1.0)]


def test_reordering_to_the_current_order_is_a_no_op(stacked):
    assert GENOME.decide(ReorderLayers(("a", "b", "c")), stacked) == []


@pytest.mark.parametrize("order", [("a", "b"), ("a", "b", "c", "d"), ("a", "b", "zz")])
def test_reordering_to_something_other_than_a_permutation_is_refused(stacked, order):
    assert refused(ReorderLayers(order), stacked) == "reorder_not_permutation"


def test_reordering_with_a_layer_named_twice_is_refused(stacked):
    assert refused(ReorderLayers(("a", "a", "b", "c")), stacked) == "layer_already_attached"


# Replacing the stack
def test_replacing_the_stack_sets_the_whole_ordered_weighted_stack(stacked):
    state = run(stacked, ReplaceLayerStack(((layer("d"), 0.9), (layer("a"), 0.1))))
    assert stack(state) == [("d", 0.9), ("a", 0.1)]


def test_replacing_the_stack_with_an_empty_one_clears_it(stacked):
    assert run(stacked, ReplaceLayerStack(())).layers == ()


def test_replacing_the_stack_with_the_same_stack_is_a_no_op(stacked):
    same = ((layer("a"), 0.5), (layer("b"), 1.0), (layer("c"), 0.25))
    assert GENOME.decide(ReplaceLayerStack(same), stacked) == []


def test_replacing_the_stack_with_a_layer_twice_is_refused(genome):
    assert refused(ReplaceLayerStack(((layer("a"), 0.5), (layer("a"), 0.4))), genome) == "layer_already_attached"


def test_replacing_the_stack_with_a_bad_weight_is_refused(genome):
    assert refused(ReplaceLayerStack(((layer("a"), 1.5),)), genome) == "weight_out_of_range"


def test_replacing_the_stack_with_a_layer_of_another_base_model_is_refused(genome):
    assert refused(ReplaceLayerStack(((layer("a", "llama"), 0.5),)), genome) == "base_model_mismatch"


def test_replacing_the_stack_with_a_new_deprecated_layer_is_refused(genome):
    assert refused(ReplaceLayerStack(((layer("a", deprecated=True), 0.5),)), genome) == "layer_deprecated"


def test_a_layer_deprecated_after_stacking_may_stay_in_a_replaced_stack(stacked):
    state = run(stacked, ReplaceLayerStack(((layer("a", deprecated=True), 0.7),)))
    assert stack(state) == [("a", 0.7)]


# Forking
def parent(genome_id, layers, generation=0, base_model=BASE):
    refs = tuple(LayerRef(layer_id, weight) for layer_id, weight in layers)
    event = GenomeForked(genome_id, "bob", "p9", base_model, genome_id, "", (), refs, generation)
    return GENOME.fold(None, [event])


def test_forking_merges_the_parents_layers_in_parent_order_first_occurrence_winning():
    mother = parent("m", [("a", 0.5), ("b", 0.6)], generation=2)
    father = parent("f", [("b", 0.9), ("c", 0.1)], generation=4)
    child = run(None, ForkGenome("g2", "alice", "p1", "child", (mother, father), "a mix"))
    assert stack(child) == [("a", 0.5), ("b", 0.6), ("c", 0.1)]
    assert child.parent_ids == ("m", "f")
    assert child.generation == 5
    assert child.base_model == BASE
    assert (child.genome_id, child.owner, child.persona_id, child.name, child.description) == (
        "g2",
        "alice",
        "p1",
        "child",
        "a mix",
    )


def test_forking_a_single_parent_copies_its_stack(stacked):
    child = run(None, ForkGenome("g2", "alice", "p1", "copy", (stacked,)))
    assert child.layers == stacked.layers
    assert child.generation == 1
    assert child.parent_ids == ("g1",)


def test_forking_without_a_parent_is_refused():
    assert refused(ForkGenome("g2", "alice", "p1", "orphan", ()), None) == "fork_without_parent"


def test_forking_parents_of_different_base_models_is_refused():
    parents = (parent("m", [], base_model=BASE), parent("f", [], base_model="llama"))
    with pytest.raises(DomainError) as caught:
        GENOME.decide(ForkGenome("g2", "alice", "p1", "child", parents), None)
    assert caught.value.rule == "parent_base_model_mismatch"
    assert "llama" in caught.value.message and BASE in caught.value.message


def test_forking_needs_a_name(stacked):
    assert refused(ForkGenome("g2", "alice", "p1", "", (stacked,)), None) == "name_required"


def test_forking_onto_an_existing_genome_is_refused(stacked):
    assert refused(ForkGenome("g1", "alice", "p1", "child", (stacked,)), stacked) == "genome_exists"


# Archiving
def test_an_archived_genome_refuses_every_change(stacked):
    state = run(stacked, ArchiveGenome())
    assert state.archived
    for command in (
        ChangeGenomeDetails(name="x"),
        AttachLayer(layer("d")),
        DetachLayer("a"),
        ReweightLayer("a", 0.1),
        ReorderLayers(("c", "b", "a")),
        ReplaceLayerStack(()),
        ArchiveGenome(),
    ):
        assert refused(command, state) == "genome_archived"


def test_an_unknown_command_is_refused(genome):
    assert refused(object(), genome) == "unknown_command"


@pytest.mark.parametrize(
    "event",
    [
        GenomeCreated("g1", "alice", "p1", BASE, "name", "desc"),
        GenomeForked("g2", "alice", "p1", BASE, "child", "", ("g1", "g0"), (LayerRef("a", 0.5),), 3),
        GenomeDetailsChanged(description="new"),
        LayerAttached("a", 0.5, 0),
        LayerDetached("a"),
        LayerReweighted("a", 0.25),
        LayersReordered(("b", "a")),
        LayerStackReplaced((LayerRef("a", 1.0), LayerRef("b", 0.0))),
        GenomeArchived(),
    ],
)
def test_every_genome_event_survives_a_json_round_trip(event):
    assert msgspec.json.decode(msgspec.json.encode(event), type=GenomeEvent) == event


# Property
layer_ids = st.sampled_from(["a", "b", "c", "d", "e"])
weights = st.floats(min_value=0.0, max_value=1.0)
commands = st.one_of(
    st.builds(AttachLayer, st.builds(layer, layer_ids), weights, st.none() | st.integers(0, 5)),
    st.builds(DetachLayer, layer_ids),
    st.builds(ReweightLayer, layer_ids, weights),
    st.builds(ReorderLayers, st.permutations(["a", "b", "c", "d", "e"]).map(tuple)),
    st.builds(ReorderLayers, st.lists(layer_ids, unique=True).map(tuple)),
)


@given(st.lists(commands, max_size=40))
def test_no_sequence_of_stack_changes_holds_a_layer_twice_or_a_weight_outside_zero_to_one(sequence):
    state = run(None, CreateGenome("g1", "alice", "p1", BASE, "name"))
    for command in sequence:
        try:
            state = run(state, command)
        except DomainError:
            continue  # a refused command leaves the genome as it was
        ids = [ref.layer_id for ref in state.layers]
        assert len(ids) == len(set(ids))
        assert all(0.0 <= ref.weight <= 1.0 for ref in state.layers)


def test_a_fork_that_names_a_parent_twice_is_refused() -> None:
    from genome_service.domain.common import DomainError
    from genome_service.domain.genome import GENOME, CreateGenome, ForkGenome

    parent = GENOME.fold(None, GENOME.decide(CreateGenome("g1", "alice", "p1", "base", "parent"), None))
    with pytest.raises(DomainError) as refused:
        GENOME.decide(ForkGenome("g2", "alice", "p1", "child", (parent, parent)), None)
    assert refused.value.rule == "parent_repeated"
