"""The rules each operation can answer with, by HTTP status: what the OpenAPI document lists as
`x-rules` on every error response, so a client knows each way a request can fail.

Every protected operation shares the conventions' rules (`SHARED`, `SHARED_WRITES`) and the rules of
the resources its path names (`<kind>_not_found`, `<kind>_archived`); `OPERATIONS` adds what only
that operation checks: the domain's `require_*` rules, the adapter's refusals, search and chat limits.
"""

from __future__ import annotations

# A path parameter -> the kind of resource it names (the `<kind>_not_found` and `<kind>_archived` rules).
KINDS = {"genome_id": "genome", "persona_id": "persona", "layer_id": "layer", "knowledge_id": "knowledge",
         "conversation_id": "conversation", "session_id": "academy_session", "challenge_id": "challenge",
         "recipe_id": "recipe", "run_id": "recipe_run", "file_id": "file", "job_id": "fine_tuning_job"}

SHARED: dict[int, tuple[str, ...]] = {
    400: ("bad_request",), 401: ("unauthorized",), 404: ("not_found",), 429: ("rate_limited",),
    503: ("unavailable", "database_unavailable"),
}
SHARED_WRITES: dict[int, tuple[str, ...]] = {
    400: ("invalid_text",), 403: ("forbidden",), 409: ("concurrent_change",), 412: ("stale_version",),
    413: ("payload_too_large",), 415: ("unsupported_media_type",),
    422: ("idempotency_key_reused", "idempotency_key_mismatch"),
}


def _text(field: str) -> tuple[str, ...]:
    """The rules of `require_text`: not blank, not too long."""
    return (f"{field}_required", f"{field}_too_long")


# The adapter parser's refusals: `AdapterRejected.reason` in inference/lora/adapter.py.
ADAPTER = ("missing_file", "pickle_not_allowed", "bad_config", "bad_safetensors", "bad_dtype", "unknown_tensor",
           "unpaired_tensor", "shape_mismatch", "not_finite", "rank_over_limit")
TAGS = ("tag_empty", "tag_too_long", "too_many_tags")
VECTOR = ("vector_dimension_mismatch", "vector_not_finite", "vector_zero")
STACK = ("weight_out_of_range", "base_model_mismatch", "layer_already_attached")
KNOWLEDGE = (*_text("title"), "media_type_unsupported", "text_required", "text_too_long", *_text("chunk"))
SEARCH = ("k_out_of_range", "query_text_required")
CHAT = {
    404: ("conversation_not_found",),
    409: ("conversation_archived",),
    422: ("max_tokens_out_of_range", "context_k_out_of_range", "sampling_out_of_range", "prompt_too_long",
          "system_message_refused", "messages_required", *_text("message")),
    429: ("inference_busy",),
    503: ("model_unavailable", "generation_failed", "generation_timed_out"),
}
# Writing a challenge or judging an answer runs the model as chat does.
GENERATION = {429: ("inference_busy",), 503: ("model_unavailable", "generation_failed", "generation_timed_out")}

# A recipe's definition: its shape (domain/recipe.py) and its steps' commands (recipes/catalogue.py).
DEFINITION = ("steps_out_of_range", "inputs_out_of_range", "description_too_long", "input_name_invalid",
              "input_default_invalid", "step_id_invalid", "step_id_repeated", "retry_attempts_out_of_range",
              "expression_invalid", "reference_unknown_root", "reference_unknown_input", "reference_to_itself",
              "reference_to_later_step", "reference_to_missing_step", "command_unknown", "step_not_async",
              "param_unknown", "param_missing", "param_invalid")

# A session's training data (domain/academy.py `_require_data`) and its files.
TRAINING_DATA = ("sources_invalid", "training_file_mismatch", "validation_file_without_training_file", "persona_required",
                 "n_epochs_out_of_range", "batch_size_out_of_range", "learning_rate_multiplier_out_of_range",
                 "seed_out_of_range", "suffix_invalid")
# A training file's line-by-line check (academy/datasets.py) and its record (domain/training_file.py).
DATASET = ("line_not_json", "line_not_object", "messages_missing", "role_missing", "role_unknown", "content_missing",
           "no_assistant_turn", "last_turn_not_assistant", "no_prompt_turn", "line_malformed", "line_too_long",
           "line_not_utf8", "file_empty", "too_many_lines", "purpose_unsupported", *_text("filename"), "sha256_invalid")

OPERATIONS: dict[str, dict[int, tuple[str, ...]]] = {
    "createPersona": {422: (*_text("name"), "system_prompt_too_long", "unknown_base_model")},
    "updatePersona": {422: (*_text("name"), "system_prompt_too_long")},
    "assignGenome": {404: ("genome_not_found",), 409: ("genome_archived",), 422: ("genome_of_other_persona",)},
    "createGenome": {404: ("persona_not_found",), 410: ("persona_archived",),
                     422: (*_text("name"), *_text("base_model"), "unknown_base_model")},
    "updateGenome": {422: _text("name")},
    "replaceLayerStack": {404: ("layer_not_found",), 409: ("layer_deprecated", "layer_already_attached"), 422: STACK},
    "attachLayer": {404: ("layer_not_found",), 409: ("layer_deprecated", "layer_already_attached"),
                    422: (*STACK, "position_out_of_range")},
    "detachLayer": {422: ("layer_not_attached",)},
    "forkGenome": {404: ("persona_not_found",), 410: ("persona_archived",),
                   422: (*_text("name"), "fork_without_parent", "parent_repeated", "parent_base_model_mismatch")},
    "uploadLayer": {404: ("parent_layer_not_found",),
                    422: (*_text("name"), *_text("base_model"), "unknown_base_model", *TAGS, *VECTOR, *ADAPTER,
                          "rank_out_of_range", "target_modules_required")},
    "updateLayer": {409: ("layer_deprecated", "public_not_allowed"), 422: TAGS},
    "deprecateLayer": {409: ("layer_deprecated",)},
    "searchLayersByText": {422: SEARCH},
    "searchLayers": {404: ("layer_not_found",), 410: ("layer_archived",), 422: (*SEARCH, "one_query_required", *VECTOR)},
    "addKnowledge": {422: KNOWLEDGE},
    "uploadKnowledge": {422: (*KNOWLEDGE, "text_not_utf8")},
    "searchKnowledge": {422: (*SEARCH, "max_tokens_out_of_range", "mmr_out_of_range")},
    "chat": CHAT,
    # A fine-tuned model (`ft:...`) names a layer: the base model plus it, the client's own messages.
    "createChatCompletion": {**CHAT, 404: ("model_not_found", "layer_not_found", *CHAT[404]),
                             422: (*CHAT[422], "model_ambiguous", "n_unsupported", "last_message_not_user", "layer_erased",
                                   "base_model_mismatch")},
    "startAcademySession": {404: ("persona_not_found", "file_not_found"), 410: ("persona_archived",),
                            422: (*_text("goal"), "target_similarity_out_of_range", "budget_steps_out_of_range",
                                  "budget_seconds_out_of_range", "persona_has_no_genome", *TRAINING_DATA)},
    "uploadFile": {413: ("file_too_large",), 422: DATASET},
    "createFineTuningJob": {404: ("model_not_found", "file_not_found", "persona_not_found"), 410: ("persona_archived",),
                            422: ("model_ambiguous", "persona_has_no_genome", *_text("goal"), *TRAINING_DATA)},
    "cancelFineTuningJob": {409: ("session_finished",)},
    "cancelAcademySession": {409: ("session_finished",)},
    "createAcademyChallenge": {**GENERATION, 409: ("session_finished",), 422: (*_text("prompt"),)},
    "createRecipe": {409: ("recipe_name_exists",), 422: (*_text("name"), "name_invalid", *DEFINITION)},
    "reviseRecipe": {422: DEFINITION},
    "startRecipeRun": {422: ("input_unknown", "input_missing", "input_type_mismatch")},
    "cancelRecipeRun": {409: ("run_finished",)},
    "scoreAcademyResponse": {**GENERATION, 409: ("response_exists",),
                             422: (*_text("response"), *_text("rationale"), "score_out_of_range")},
}


def rules_of(operation_id: str, path_parameters: list[str], write: bool) -> dict[int, list[str]]:
    """Every rule the operation can answer with, by status, sorted."""
    kinds = [KINDS[name] for name in path_parameters if name in KINDS]
    found: dict[int, set[str]] = {}
    for table in (SHARED, SHARED_WRITES if write else {}, OPERATIONS.get(operation_id, {})):
        for status, rules in table.items():
            found.setdefault(status, set()).update(rules)
    found[404] |= {f"{kind}_not_found" for kind in kinds}
    found.setdefault(410, set()).update(f"{kind}_archived" for kind in kinds)
    if "persona" in kinds:
        found[410].add("persona_erased")
    if write:  # a change to an archived resource is a conflict with its state
        found[409] |= {f"{kind}_archived" for kind in kinds}
    return {status: sorted(rules) for status, rules in found.items()}
