import math

import msgspec
import pytest

from genome_service.domain.common import DomainError
from genome_service.domain.layer import (
    LAYER,
    ChangeLayerDetails,
    DeprecateLayer,
    LayerDeprecated,
    LayerDetailsChanged,
    LayerEvent,
    LayerRegistered,
    RecordTrainingMetrics,
    RegisterLayer,
    TrainingMetrics,
    TrainingMetricsRecorded,
    TraitType,
)

SHA = "ab" * 32


def register(**overrides):
    fields = dict(
        layer_id="l1",
        owner="alice",
        name="Stoic tone",
        base_model="qwen2.5-7b",
        adapter_sha256=SHA,
        adapter_format="peft",
        rank=16,
        target_modules=("q_proj", "v_proj"),
        trait_type=TraitType.TONE_AND_VOICE,
        description="calm and terse",
        tags=("Tone",),
        creator="alice",
        license="apache-2.0",
    )
    return RegisterLayer(**{**fields, **overrides})


def run(state, *commands):
    for command in commands:
        state = LAYER.fold(state, LAYER.decide(command, state))
    return state


def refused(command, state):
    with pytest.raises(DomainError) as caught:
        LAYER.decide(command, state)
    return caught.value.rule


@pytest.fixture
def layer():
    return run(None, register())


def test_registering_a_layer_folds_into_its_state(layer):
    assert layer.layer_id == "l1"
    assert layer.owner == "alice"
    assert layer.name == "Stoic tone"
    assert layer.base_model == "qwen2.5-7b"
    assert layer.adapter_sha256 == SHA
    assert layer.adapter_format == "peft"
    assert layer.rank == 16
    assert layer.target_modules == ("q_proj", "v_proj")
    assert layer.trait_type is TraitType.TONE_AND_VOICE
    assert layer.tags == ("tone",)
    assert layer.license == "apache-2.0"
    assert not layer.public
    assert layer.parent_layer_id is None
    assert layer.training_metrics is None
    assert not layer.deprecated


def test_registering_with_metrics_and_a_parent_keeps_them():
    metrics = TrainingMetrics(loss=0.4, epochs=3, steps=900, performance=0.8)
    state = run(None, register(parent_layer_id="l0", training_metrics=metrics, adapter_format="mlx"))
    assert state.parent_layer_id == "l0"
    assert state.training_metrics == metrics
    assert state.adapter_format == "mlx"


def test_registering_a_layer_twice_is_refused(layer):
    assert refused(register(), layer) == "layer_exists"


def test_commands_on_a_missing_layer_are_refused():
    assert refused(DeprecateLayer(), None) == "layer_not_found"


@pytest.mark.parametrize(
    ("overrides", "rule"),
    [
        ({"name": ""}, "name_required"),
        ({"name": "x" * 201}, "name_too_long"),
        ({"base_model": " "}, "base_model_required"),
        ({"adapter_sha256": "AB" * 32}, "adapter_sha256_invalid"),
        ({"adapter_sha256": "ab" * 31}, "adapter_sha256_invalid"),
        ({"adapter_sha256": "zz" * 32}, "adapter_sha256_invalid"),
        ({"adapter_format": "gguf"}, "adapter_format_unknown"),
        ({"rank": 0}, "rank_out_of_range"),
        ({"target_modules": ()}, "target_modules_required"),
        ({"tags": ("ok", "  ")}, "tag_empty"),
        ({"tags": ("x" * 65,)}, "tag_too_long"),
        ({"tags": tuple(f"t{i}" for i in range(33))}, "too_many_tags"),
        ({"training_metrics": TrainingMetrics(loss=math.nan)}, "metric_not_finite"),
        ({"training_metrics": TrainingMetrics(loss=-0.1)}, "metric_negative"),
    ],
)
def test_registering_an_invalid_layer_is_refused(overrides, rule):
    assert refused(register(**overrides), None) == rule


def test_tags_are_stored_stripped_lowercased_and_deduplicated_in_order():
    events = LAYER.decide(register(tags=(" Stoic ", "tone", "STOIC", "Calm")), None)
    assert events[0].tags == ("stoic", "tone", "calm")


def test_thirty_two_distinct_tags_are_allowed_even_with_duplicates_beyond():
    tags = tuple(f"t{i}" for i in range(32)) + ("T0", "t1 ")
    assert len(run(None, register(tags=tags)).tags) == 32


def test_a_tag_of_exactly_64_characters_is_allowed():
    assert run(None, register(tags=("x" * 64,))).tags == ("x" * 64,)


def test_changing_details_records_only_what_changed(layer):
    events = LAYER.decide(ChangeLayerDetails(description="calm and terse", tags=(" NEW ",), public=True), layer)
    assert events == [LayerDetailsChanged(tags=("new",), public=True)]
    state = LAYER.fold(layer, events)
    assert state.tags == ("new",)
    assert state.public


def test_changing_details_to_the_same_values_is_a_no_op(layer):
    assert LAYER.decide(ChangeLayerDetails(tags=("TONE",), public=False, license="apache-2.0"), layer) == []


def test_changing_details_with_a_bad_tag_is_refused(layer):
    assert refused(ChangeLayerDetails(tags=("",)), layer) == "tag_empty"


def test_recording_training_metrics_replaces_them(layer):
    metrics = TrainingMetrics(loss=0.2, steps=100)
    assert run(layer, RecordTrainingMetrics(metrics)).training_metrics == metrics


def test_recording_the_same_metrics_again_is_a_no_op(layer):
    state = run(layer, RecordTrainingMetrics(TrainingMetrics(loss=0.2)))
    assert LAYER.decide(RecordTrainingMetrics(TrainingMetrics(loss=0.2)), state) == []


@pytest.mark.parametrize(
    ("metrics", "rule"),
    [
        (TrainingMetrics(loss=math.inf), "metric_not_finite"),
        (TrainingMetrics(performance=math.nan), "metric_not_finite"),
        (TrainingMetrics(loss=-1.0), "metric_negative"),
        (TrainingMetrics(epochs=-1), "metric_negative"),
        (TrainingMetrics(steps=-5), "metric_negative"),
    ],
)
def test_recording_invalid_metrics_is_refused(layer, metrics, rule):
    assert refused(RecordTrainingMetrics(metrics), layer) == rule


def test_deprecating_a_layer_records_the_reason(layer):
    state = run(layer, DeprecateLayer("superseded by l2"))
    assert state.deprecated
    assert state.deprecation_reason == "superseded by l2"


def test_a_deprecated_layer_refuses_every_command(layer):
    state = run(layer, DeprecateLayer())
    commands = (ChangeLayerDetails(public=True), RecordTrainingMetrics(TrainingMetrics(loss=0.1)), DeprecateLayer())
    for command in commands:
        assert refused(command, state) == "layer_deprecated"


def test_an_unknown_command_is_refused(layer):
    assert refused(object(), layer) == "unknown_command"


@pytest.mark.parametrize(
    "event",
    [
        LAYER.decide(register(training_metrics=TrainingMetrics(loss=0.5), parent_layer_id="l0"), None)[0],
        LayerDetailsChanged(tags=("a", "b"), public=True),
        TrainingMetricsRecorded(TrainingMetrics(loss=0.1, epochs=2, steps=10, performance=0.9)),
        LayerDeprecated("old"),
    ],
)
def test_every_layer_event_survives_a_json_round_trip(event):
    assert msgspec.json.decode(msgspec.json.encode(event), type=LayerEvent) == event


def test_the_trait_type_travels_as_its_plain_value():
    event = LAYER.decide(register(), None)[0]
    assert isinstance(event, LayerRegistered)
    assert b'"trait_type":"tone_and_voice"' in msgspec.json.encode(event)
