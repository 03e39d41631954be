"""Recipes and their runs as pure deciders: the definition's rules, references, and the run's order of steps."""

import msgspec
import pytest

from genome_service.domain.common import DomainError
from genome_service.domain.recipe import RECIPE, DefineRecipe, Definition, RetireRecipe, ReviseRecipe, run_inputs
from genome_service.domain.recipe_run import (
    RECIPE_RUN,
    CancelRun,
    CompleteRun,
    CompleteStep,
    FailStep,
    PickUpRun,
    RunStatus,
    SkipStep,
    StartRun,
    StartStep,
)
from genome_service.recipes.builtin import GENOME_ASSEMBLY
from genome_service.recipes.references import resolve, truth


def definition(steps, inputs=None, output=None) -> Definition:
    return msgspec.convert({"steps": steps, "inputs": inputs or {}, "output": output}, Definition)


def refused(definition_: Definition) -> tuple[str, str]:
    with pytest.raises(DomainError) as caught:
        RECIPE.decide(DefineRecipe("r1", "alice", "mine", definition_), None)
    return caught.value.rule, caught.value.message


STEP = {"id": "a", "command": "genome.stack", "params": {"persona_id": "{{ inputs.p }}"}}
INPUTS = {"p": {"type": "string"}}


@pytest.mark.parametrize(("steps", "rule", "named"), [
    ([STEP, {**STEP}], "step_id_repeated", "step 'a'"),
    ([{**STEP, "id": "bad-id"}], "step_id_invalid", "step 'bad-id'"),
    ([{**STEP, "params": {"x": "{{ inputs.q }}"}}], "reference_unknown_input", "step 'a'"),
    ([{**STEP, "params": {"x": "{{ steps.a.output }}"}}], "reference_to_itself", "step 'a'"),
    ([{**STEP, "params": {"x": "{{ steps.b.output.id }}"}}, {**STEP, "id": "b"}], "reference_to_later_step", "step 'a'"),
    ([STEP, {**STEP, "id": "b", "params": {"x": "{{ steps.zz.output }}"}}], "reference_to_missing_step", "step 'b'"),
    ([{**STEP, "params": {"x": "{{ foo.bar }}"}}], "reference_unknown_root", "step 'a'"),
    ([{**STEP, "params": {"x": "id: {{ inputs.p[ }}"}}], "expression_invalid", "step 'a'"),
    ([{**STEP, "when": "length(steps.a.output) > `0`"}], "reference_to_itself", "step 'a'"),
    ([{**STEP, "retry": {"attempts": 0}}], "retry_attempts_out_of_range", "step 'a'"),
    ([], "steps_out_of_range", "1..50"),
])
def test_a_definition_breaking_a_rule_is_refused_naming_the_rule_and_the_step(steps, rule, named) -> None:
    found, message = refused(definition(steps, INPUTS))
    assert found == rule and named in message


def test_a_reference_reads_only_the_root_not_the_elements_a_filter_or_function_walks() -> None:
    steps = [{**STEP, "id": "first"}, {**STEP, "id": "then", "when": "length(steps.first.output.layers[?weight > `0.5`]) > `0`",
                                        "params": {"persona_id": "{{ inputs.p }}"}}]
    state = RECIPE.fold(None, RECIPE.decide(DefineRecipe("r1", "alice", "mine", definition(steps, INPUTS)), None))
    assert state is not None and state.revision == 1


def test_inputs_defaults_must_fit_their_types_and_a_runs_inputs_are_checked() -> None:
    assert refused(definition([STEP], {"p": {"type": "integer", "default": "x"}}))[0] == "input_default_invalid"
    spec = definition([STEP], {"p": {"type": "string"}, "n": {"type": "number", "default": 0.5}})
    assert run_inputs(spec, {"p": "x"}) == {"p": "x", "n": 0.5}
    assert run_inputs(spec, {"p": "x", "n": 2}) == {"p": "x", "n": 2}
    for given, rule in (({}, "input_missing"), ({"p": 1}, "input_type_mismatch"), ({"p": "x", "z": 1}, "input_unknown"),
                        ({"p": "x", "n": True}, "input_type_mismatch")):
        with pytest.raises(DomainError) as caught:
            run_inputs(spec, given)
        assert caught.value.rule == rule


def test_revisions_count_up_and_a_retired_recipe_refuses_change() -> None:
    state = RECIPE.fold(None, RECIPE.decide(DefineRecipe("r1", "alice", "mine", GENOME_ASSEMBLY), None))
    state = RECIPE.fold(state, RECIPE.decide(ReviseRecipe(definition([STEP], INPUTS), public=True), state))
    assert (state.revision, state.public, len(state.definition.steps)) == (2, True, 1)
    state = RECIPE.fold(state, RECIPE.decide(RetireRecipe(), state))
    with pytest.raises(DomainError) as caught:
        RECIPE.decide(ReviseRecipe(GENOME_ASSEMBLY), state)
    assert caught.value.rule == "recipe_archived"


def test_a_whole_reference_keeps_its_type_and_one_inside_text_is_interpolated() -> None:
    data = {"inputs": {"n": 3, "tags": ["a", "b"]}, "steps": {"s": {"output": {"ok": True, "name": "Ada"}}}}
    params = {"list": "{{ inputs.tags }}", "n": " {{ inputs.n }} ", "text": "{{ steps.s.output.name }} has {{ inputs.n }} {{ inputs.tags }}",
              "nested": [{"flag": "{{ steps.s.output.ok }}"}], "plain": 7}
    assert resolve(params, data, "here") == {"list": ["a", "b"], "n": 3, "text": 'Ada has 3 ["a","b"]',
                                             "nested": [{"flag": True}], "plain": 7}
    assert [truth(v) for v in (0, 1, "", "x", [], [0], {}, None, False, True)] == [
        True, True, False, True, False, True, False, False, False, True]


def test_a_run_goes_step_by_step_in_order_and_a_completed_step_cannot_start_again() -> None:
    spec = definition([STEP, {**STEP, "id": "b"}], INPUTS)
    run = RECIPE_RUN.fold(None, RECIPE_RUN.decide(StartRun("x1", "alice", "r1", "mine", 1, spec, {"p": "p1"}), None))

    def step(state, command):
        return RECIPE_RUN.fold(state, RECIPE_RUN.decide(command, state))

    def rule(state, command) -> str:
        with pytest.raises(DomainError) as caught:
            RECIPE_RUN.decide(command, state)
        return caught.value.rule

    run = step(run, PickUpRun())
    assert rule(run, StartStep("b")) == "step_out_of_order"
    assert rule(run, CompleteStep("a", 1)) == "step_not_started"
    run = step(step(run, StartStep("a")), FailStep("a", "boom", retry_in=0.5))
    run = step(step(run, StartStep("a")), CompleteStep("a", {"v": 1}))
    assert run.attempts == {"a": 2} and rule(run, StartStep("a")) == "step_out_of_order"
    assert rule(run, CompleteRun(None)) == "run_has_open_steps"
    run = step(run, SkipStep("b", "when false"))
    run = step(run, CompleteRun({"v": 1}))
    assert run.status is RunStatus.COMPLETED and rule(run, CancelRun("late")) == "run_finished"
    assert run.data() == {"inputs": {"p": "p1"}, "steps": {"a": {"output": {"v": 1}}}}
