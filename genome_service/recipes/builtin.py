"""Recipes every owner can run, defined here rather than in the log (revision 1 until this file changes)."""

from __future__ import annotations

from genome_service.domain.recipe import Definition, RecipeInput, RecipeStep

BUILTIN_OWNER = "builtin"

GENOME_ASSEMBLY = Definition(
    description=("Assemble a persona's genome for a goal: analyse the goal into needs, attach the layers that "
                 "already meet a need at target_similarity, train layers for the other needs only in one "
                 "Academy session, and end with the genome's stack."),
    inputs={
        "persona_id": RecipeInput("string", description="The persona (with a genome) to assemble for."),
        "goal": RecipeInput("string", description="What the persona should be good at; each sentence is a need."),
        "target_similarity": RecipeInput("number", 0.9, "A layer at least this similar to a need is attached as is."),
        "budget_steps": RecipeInput("integer", 100, "Training steps for the Academy session."),
    },
    steps=[
        RecipeStep("analyse", "goal.analyse", {
            "goal": "{{ inputs.goal }}", "persona_id": "{{ inputs.persona_id }}",
            "target_similarity": "{{ inputs.target_similarity }}",
        }),
        RecipeStep("attach", "layers.attach", {
            "persona_id": "{{ inputs.persona_id }}", "layer_ids": "{{ steps.analyse.output.close_layer_ids }}",
        }, when="length(steps.analyse.output.close_layer_ids) > `0`"),
        RecipeStep("train", "academy.train", {
            "persona_id": "{{ inputs.persona_id }}", "goal": "{{ inputs.goal }}",
            "needs": "{{ steps.analyse.output.open_needs }}", "target_similarity": "{{ inputs.target_similarity }}",
            "budget_steps": "{{ inputs.budget_steps }}",
        }, asynchronous=True, when="length(steps.analyse.output.open_needs) > `0`"),
        RecipeStep("stack", "genome.stack", {"persona_id": "{{ inputs.persona_id }}"}),
    ],
    output="steps.stack.output",
)

BUILTIN: dict[str, Definition] = {"genome-assembly": GENOME_ASSEMBLY}
