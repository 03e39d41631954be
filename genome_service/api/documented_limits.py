"""The limits the service enforces, stated in the OpenAPI document: lengths, ranges, patterns, enums,
and which fields go together.

Most are enforced by domain rules (`require_text`, `require_weight`...) and by handlers (search and
chat limits from the settings), which answer 422 naming their rule. Declaring them as msgspec
constraints would move that refusal to decoding (a generic 400), so they are written into the
document here instead, from the same constants and settings the service checks against.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from litestar.openapi.spec import (
    Components,
    Encoding,
    OpenAPI,
    OpenAPIMediaType,
    OpenAPIType,
    RequestBody,
    Schema,
)

from genome_service.domain.academy import MAX_BUDGET_SECONDS
from genome_service.domain.conversation import MAX_MESSAGE_LENGTH
from genome_service.domain.layer import MAX_TAG_LENGTH, MAX_TAGS
from genome_service.domain.persona import MAX_SYSTEM_PROMPT
from genome_service.domain.recipe import IDENTIFIER, MAX_ATTEMPTS, MAX_INPUTS, MAX_STEPS, RECIPE_NAME
from genome_service.recipes.commands import COMMANDS
from genome_service.services.layers import LayerDetails
from genome_service.settings import Settings

# `require_text`: not blank (a character other than white space), at most so many characters.
NOT_BLANK = {"minLength": 1, "pattern": r"\S"}


def text(max_length: int) -> dict[str, Any]:
    return {**NOT_BLANK, "maxLength": max_length}


NAME = text(200)  # names and base models: `require_text(..., max_length=200)` in the domain
TAGS = {"maxItems": MAX_TAGS, "items": text(MAX_TAG_LENGTH)}
WEIGHT = {"minimum": 0, "maximum": 1}
TEMPERATURE = {"minimum": 0, "maximum": 100}  # inference.backends.base.Sampling
TOP_P = {"exclusiveMinimum": 0, "maximum": 1}
VECTOR = {"minItems": 1, "description": "As many numbers as the embedder's dimension; finite, not all zeros."}

STATIC: dict[str, dict[str, dict[str, Any]]] = {
    "PersonaCreate": {"name": NAME, "system_prompt": {"maxLength": MAX_SYSTEM_PROMPT}, "base_model": NAME},
    "PersonaUpdate": {"name": NAME, "system_prompt": {"maxLength": MAX_SYSTEM_PROMPT}},
    "GenomeCreate": {"name": NAME, "base_model": NAME},
    "GenomeUpdate": {"name": NAME},
    "GenomeFork": {"name": NAME},
    "LayerWeight": {"weight": WEIGHT},
    "LayerAttachment": {"weight": WEIGHT, "position": {"minimum": 0}},
    "LayerUpdate": {"tags": TAGS},
    "LayerSearch": {"text": NOT_BLANK, "vector": VECTOR},
    "KnowledgeCreate": {"text": NOT_BLANK, "title": NAME},
    "ChatMessageIn": {"content": text(MAX_MESSAGE_LENGTH)},
    "ChatCreate": {"temperature": TEMPERATURE, "top_p": TOP_P},
    "CompletionCreate": {"temperature": TEMPERATURE, "top_p": TOP_P, "n": {"enum": [1]}, "messages": {"minItems": 1}},
    "SessionCreate": {"goal": text(2000), "target_similarity": {"exclusiveMinimum": 0, "maximum": 1},
                      "budget_seconds": {"maximum": MAX_BUDGET_SECONDS}},
    "ResponseCreate": {"response": text(20_000)},
    "RecipeCreate": {"name": {**NAME, "pattern": RECIPE_NAME.pattern}, "steps": {"minItems": 1, "maxItems": MAX_STEPS},
                     "inputs": {"maxProperties": MAX_INPUTS}, "description": {"maxLength": 2000}},
    "RecipeRevision": {"steps": {"minItems": 1, "maxItems": MAX_STEPS}, "inputs": {"maxProperties": MAX_INPUTS},
                       "description": {"maxLength": 2000}},
    "RecipeStep": {"id": {"pattern": IDENTIFIER.pattern}, "command": {"enum": sorted(COMMANDS)}},
    "Retry": {"attempts": {"minimum": 1, "maximum": MAX_ATTEMPTS}},
}
LAYER_DETAILS = {"name": NAME, "base_model": NAME, "tags": TAGS, "embedding": VECTOR}
# Exactly one of the three, the other two absent or null.
_QUERIES = ("text", "vector", "like_layer_id")
ONE_QUERY = [
    Schema(required=[given], properties={other: Schema(type=OpenAPIType.NULL) for other in _QUERIES if other != given})
    for given in _QUERIES
]


def document_limits(schema: OpenAPI, settings: Settings) -> None:
    components = schema.components if isinstance(schema.components, Components) else Components()
    schemas = components.schemas or {}
    limits = {name: dict(properties) for name, properties in STATIC.items()}
    k = {"minimum": 1, "maximum": settings.search_max_k}
    tokens = {"minimum": 1, "maximum": settings.chat_max_tokens_limit}
    limits["LayerSearch"]["k"] = k
    limits["ChatCreate"] |= {"max_tokens": tokens, "context_k": {"minimum": 0, "maximum": settings.search_max_k},
                             "messages": {"minItems": 1, "description": "The last message is the user's."}}
    limits["CompletionCreate"] |= {"max_tokens": tokens, "max_completion_tokens": tokens}
    if settings.chat_system_messages == "refuse":
        limits["ChatMessageIn"]["role"] = {"enum": ["user", "assistant"]}
    for name, properties in limits.items():
        component = schemas[name]
        assert isinstance(component, Schema) and component.properties is not None, name
        for field, constraints in properties.items():
            constrain(component.properties[field], constraints)
    chat = schemas["ChatCreate"]
    assert isinstance(chat, Schema)
    chat.required = sorted({*(chat.required or []), "messages"})  # without one, every turn is refused
    search = schemas["LayerSearch"]
    assert isinstance(search, Schema)
    search.one_of = list(ONE_QUERY)
    query_limits = {"q": NOT_BLANK, "k": k, "max_tokens": {"minimum": 1}, "mmr": {"minimum": 0, "maximum": 1}}
    for path in ("/layers/search", "/personas/{persona_id}/knowledge/search"):
        operation = (schema.paths or {})[path].get
        assert operation is not None
        for parameter in operation.parameters or []:
            if parameter.param_in == "query" and parameter.name in query_limits:
                constrain(parameter.schema, query_limits[parameter.name])  # type: ignore[arg-type]
    _document_uploads(schema)


def _document_uploads(schema: OpenAPI) -> None:
    """The multipart bodies a handler reads as a plain dict, so that Litestar has no type to document."""
    paths = schema.paths or {}
    layer_details = msgspec.json.schema_components([LayerDetails], ref_template="#/components/schemas/{name}")[1]["LayerDetails"]
    for field, constraints in LAYER_DETAILS.items():
        constrain(layer_details["properties"][field], constraints)
    adapter_files = Schema(
        type=OpenAPIType.ARRAY, min_items=1, items=Schema(type=OpenAPIType.STRING, format="binary"),  # type: ignore[arg-type]
        description="The adapter's files, each under its own file name: adapter_config.json with "
        "adapter_model.safetensors (PEFT), or with adapters.safetensors (mlx-lm).",
    )
    upload_layer = paths["/layers"].post
    assert upload_layer is not None
    upload_layer.request_body = RequestBody(required=True, content={"multipart/form-data": OpenAPIMediaType(
        schema=Schema(type=OpenAPIType.OBJECT, required=["metadata", "files"],
                      properties={"metadata": layer_details, "files": adapter_files}, additional_properties=False),  # type: ignore[dict-item]
        encoding={"metadata": Encoding(content_type="application/json")},
    )})
    documents = Schema(
        type=OpenAPIType.ARRAY, min_items=1, items=Schema(type=OpenAPIType.STRING, format="binary"),  # type: ignore[arg-type]
        description="UTF-8 text or markdown files, each under its own file name (.md or .markdown: markdown).",
    )
    upload_knowledge = paths["/personas/{persona_id}/knowledge/documents"].post
    assert upload_knowledge is not None
    upload_knowledge.request_body = RequestBody(required=True, content={"multipart/form-data": OpenAPIMediaType(
        schema=Schema(type=OpenAPIType.OBJECT, required=["files"], properties={"files": documents}, additional_properties=False),
    )})


def constrain(target: Schema | dict[str, Any], constraints: dict[str, Any]) -> None:
    """Add JSON Schema keywords to a property's schema (its non-null arm where it may be null)."""
    if isinstance(target, dict):
        arms = [arm for arm in target.get("anyOf", target.get("oneOf", [target])) if arm.get("type") != "null"]
        for key, value in constraints.items():
            if key == "items":
                constrain(arms[0]["items"], value)
            else:
                arms[0][key] = value
        return
    arms = [arm for arm in (target.one_of or [target]) if isinstance(arm, Schema) and arm.type != OpenAPIType.NULL]
    for key, value in constraints.items():
        if key == "items":
            assert isinstance(arms[0].items, Schema | dict)
            constrain(arms[0].items, value)
        else:
            setattr(arms[0], re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower(), value)
