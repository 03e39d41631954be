"""What the OpenAPI fuzzing tests share: a server to fuzz, the resources seeded in it, and the
schemathesis hooks that aim generated requests at those resources.

Used by `test_openapi_contract.py` (every response keeps the documented contract) and
`test_schema_fidelity.py` (what the schema calls valid, the service accepts).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from servers import Server

from fixtures.make_adapter import make_adapter_files
from inference.models import ModelCatalog

BASE = "tiny"  # the fuzzable server's model: its personas chat on the tiny random Llama
SEED = 20260101
PROBLEM = "application/problem+json"
# Path parameter -> the kind of resource it names (404 rules are `<kind>_not_found`).
KINDS = {"genome_id": "genome", "persona_id": "persona", "layer_id": "layer", "knowledge_id": "knowledge",
         "conversation_id": "conversation", "session_id": "academy_session",
         "challenge_id": "challenge", "recipe_id": "recipe", "run_id": "recipe_run", "file_id": "file",
         "job_id": "fine_tuning_job"}


@schemathesis.check
def problem_details(ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """Every error is problem details naming the rule that failed (README, REST API conventions)."""
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type == PROBLEM, f"a {response.status_code} answered as {content_type!r}, not {PROBLEM}"
    body = response.json()
    assert isinstance(body, dict) and body.get("status") == response.status_code, f"status is not {response.status_code}: {body}"
    missing = [key for key in ("type", "title", "detail", "rule") if not (isinstance(body.get(key), str) and body[key])]
    assert not missing, f"problem details without {missing}: {body}"


SUCCESS_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
ERROR_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, problem_details]


def contract_checks(response: Any) -> list[Any]:
    return SUCCESS_CHECKS if response.status_code < 400 else ERROR_CHECKS


@dataclass
class Seeded:
    """The server, its schema, real resources to aim at (path parameter -> ids), and what the fuzzer got.

    With a `key`, every request (seeding and fuzzing) carries it; without, the server is open on loopback."""

    server: Server
    schema: schemathesis.BaseSchema
    key: str | None = None
    ids: dict[str, list[str]] = field(default_factory=dict)
    answers: Counter[tuple[str, int]] = field(default_factory=Counter)

    def operation(self, method: str, path: str) -> schemathesis.APIOperation:
        return self.schema[path][method]

    def calls(self, label: str) -> int:
        return sum(n for (op, _), n in self.answers.items() if op == label)


def fuzzable_server(start_server: Callable[..., Server], tiny_model: Path, models_dir: Path) -> Server:
    # No rate limit: the fuzzer sends far more than 1200 requests a minute. Chat runs on the tiny
    # random model and a few tokens at most, so a fuzzed chat is quick and finds a model to load.
    ModelCatalog(models_dir).register_local("tiny", tiny_model)
    return start_server(
        rate_limit_per_minute="0", models_dir=str(models_dir), inference_model="tiny", inference_backend="torch",
        inference_device="cpu", chat_max_tokens_limit="8", chat_default_max_tokens="8",
    )


def load_schema(server: Server) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_url(
        f"{server.url}/schema/openapi.json", config=schemathesis.Config.from_dict({"seed": SEED}),
    )
    schema.config.update(base_url=server.url)
    return schema


# Chat JSONL as the fine-tuning API takes it: two chats.
TRAINING_FILE = b"\n".join(json.dumps({"messages": [{"role": "user", "content": f"Say {n}."},
                                                     {"role": "assistant", "content": f"{n}."}]}).encode() for n in (1, 2))


def adapter_upload(seed: int, models_dir: Path) -> dict[str, Any]:
    files = make_adapter_files("peft", seed=seed, spec=ModelCatalog(models_dir).get(BASE))
    metadata = {"name": f"layer {seed}", "base_model": BASE, "trait_type": "domain_expertise", "tags": ["math"]}
    return {"files": [("files", (name, data)) for name, data in files.items()], "data": {"metadata": json.dumps(metadata)}}


def seed(seeded: Seeded) -> None:
    """Two of each kind, every creating response checked against the schema too (the fuzzer cannot
    build a valid adapter upload, so this is where `uploadLayer`'s 201 is checked)."""

    def created(method: str, route: str, path_parameters: dict[str, str] | None = None, **request: Any) -> str:
        response = client.request(method, route.format(**(path_parameters or {})), **request)
        response.request.read()  # a multipart body is streamed; schemathesis reads the request back
        case = seeded.operation(method, route).Case()
        case.validate_response(response, checks=contract_checks(response))
        assert response.is_success, response.text
        return response.json()["id"]

    with seeded.server.client(seeded.key) as client:
        # Each with the genome it speaks with: an academy session needs one.
        personas = [created("POST", "/personas", json={"name": name, "base_model": BASE}) for name in ("Ada", "Grace")]
        genomes = [
            created("POST", "/genomes", json={"persona_id": personas[0], "base_model": BASE, "name": name})
            for name in ("main", "spare")
        ]
        models_dir = Path(seeded.server.env["GENOME_MODELS_DIR"])
        layers = [created("POST", "/layers", **adapter_upload(seed, models_dir)) for seed in (0, 1)]
        created("POST", "/genomes/{genome_id}/layers", {"genome_id": genomes[0]}, json={"layer_id": layers[0]})
        # No academy worker runs in this server: sessions stay pending and nothing trains.
        sessions = [created("POST", "/academy/sessions", json={"persona_id": personas[0], "goal": goal})
                    for goal in ("Sound calm.", "Explain maths patiently.")]
        # Challenges of the first session only: a request that names it and one of them can be answered.
        challenges = [created("POST", "/academy/sessions/{session_id}/challenges", {"session_id": sessions[0]},
                              json={"trait_type": "tone_and_voice"}) for _ in range(2)]
        knowledge = [created("POST", "/personas/{persona_id}/knowledge", {"persona_id": personas[0]},
                             json={"text": text}) for text in ("Ada wrote the first program.", "Grace found a moth.")]
        chat = client.post(f"/personas/{personas[0]}/chat", json={"messages": [{"role": "user", "content": "Hello"}]})
        assert chat.status_code == 200, chat.text
        conversations = [chat.json()["conversation_id"]]
        # Runs stay pending too; the built-in recipe is one to aim at as well.
        stack = {"id": "stack", "command": "genome.stack", "params": {"persona_id": "{{ inputs.persona_id }}"}}
        recipe = created("POST", "/recipes", json={"name": "stack", "inputs": {"persona_id": {"type": "string"}},
                                                   "steps": [stack]})
        runs = [created("POST", "/recipes/{recipe_id}/runs", {"recipe_id": recipe}, json={"inputs": {"persona_id": p}})
                for p in personas]
        # A training file, and a fine-tuning job on it for each persona (queued: nothing trains here).
        files = [created("POST", "/v1/files", files={"file": ("chats.jsonl", TRAINING_FILE)}, data={"purpose": "fine-tune"})]
        jobs = [created("POST", "/v1/fine_tuning/jobs", json={"model": p, "training_file": files[0]}) for p in personas]
    seeded.ids = {"persona_id": personas, "genome_id": genomes, "layer_id": layers, "session_id": sessions,
                  "challenge_id": challenges, "knowledge_id": knowledge, "conversation_id": conversations,
                  "recipe_id": [recipe], "run_id": runs, "file_id": files, "job_id": jobs, "training_file": files,
                  "validation_file": files}


def declared_body_fields(schema: schemathesis.BaseSchema, operation: schemathesis.APIOperation) -> set[str] | None:
    """The JSON body's declared properties, or None where the body is not a JSON object schema."""
    body = schema.raw_schema["paths"][operation.path][operation.method.lower()].get("requestBody", {})
    definition = body.get("content", {}).get("application/json", {}).get("schema")
    if definition and "$ref" in definition:
        definition = schema.raw_schema["components"]["schemas"][definition["$ref"].rsplit("/", 1)[-1]]
    return set(definition.get("properties", {})) if definition else None


def aim_at_seeded_resources(seeded: Seeded) -> None:
    """Half the time, the ids a request names (path or body) are real, and its base model is known;
    without a key, two times in three, independently, the request carries no (made-up) API key (with
    one, it always carries the real key); half the time, independently, only its required query
    parameters are sent.

    Such a body also drops the undeclared fields positive generation adds (the schema allows them,
    the service refuses them), so that these requests can succeed and their responses be checked.
    """
    ids = seeded.ids
    stacked = st.fixed_dictionaries({"layer_id": st.sampled_from(ids["layer_id"])}, optional={"weight": st.floats(0, 1)})

    def realistic(values: dict[str, Any], keep: set[str] | None = None) -> st.SearchStrategy[Any]:
        parts: dict[str, st.SearchStrategy[Any]] = {}
        for name, value in values.items():
            if keep is not None and name not in keep:
                continue
            if name in ids:
                parts[name] = st.sampled_from(ids[name])
            elif name == "base_model":
                parts[name] = st.just(BASE)
            elif name == "model":  # an OpenAI-compatible request names a persona as its model
                parts[name] = st.sampled_from(ids["persona_id"])
            elif name == "other_parent_ids":
                parts[name] = st.lists(st.sampled_from(ids["genome_id"]), max_size=2)
            elif name == "layers":
                parts[name] = st.lists(stacked, max_size=2, unique_by=lambda item: item["layer_id"])
            else:
                parts[name] = st.just(value)
        return st.one_of(st.just(values), st.fixed_dictionaries(parts))

    @seeded.schema.hook
    def flatmap_path_parameters(ctx: schemathesis.HookContext, parameters: dict[str, Any] | None) -> st.SearchStrategy[Any]:
        return realistic(parameters) if parameters else st.just(parameters)

    @seeded.schema.hook
    def flatmap_headers(ctx: schemathesis.HookContext, headers: dict[str, Any] | None) -> st.SearchStrategy[Any]:
        if seeded.key is not None:
            others = {name: value for name, value in (headers or {}).items() if name.lower() != "authorization"}
            return st.just({**others, "Authorization": f"Bearer {seeded.key}"})
        # The generated bearer key is never a real one: with it every request is a 401, so two
        # times in three the request goes keyless, as this open-mode server's own clients do.
        if not headers or not any(name.lower() == "authorization" for name in headers):
            return st.just(headers)
        keyless = {name: value for name, value in headers.items() if name.lower() != "authorization"}
        return st.sampled_from([headers, keyless, keyless])

    @seeded.schema.hook
    def flatmap_query(ctx: schemathesis.HookContext, query: dict[str, Any] | None) -> st.SearchStrategy[Any]:
        # A request that sets every optional knob at random (k, max_tokens, mmr...) almost never
        # passes them all: half the time only the required ones and the ids are sent.
        if not query or ctx.operation is None:
            return st.just(query)
        required = {parameter.name for parameter in ctx.operation.query if parameter.is_required}
        return st.sampled_from([query, {name: value for name, value in query.items() if name in required or name in ids}])

    @seeded.schema.hook
    def flatmap_body(ctx: schemathesis.HookContext, body: Any) -> st.SearchStrategy[Any]:
        fields = declared_body_fields(seeded.schema, ctx.operation) if ctx.operation is not None else None
        return realistic(body, fields) if isinstance(body, dict) and fields is not None else st.just(body)
