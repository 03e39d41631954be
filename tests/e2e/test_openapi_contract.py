"""The OpenAPI contract, fuzzed: schemathesis drives every documented operation of the real server.

The schema is the server's own (`/schema/openapi.json`), loaded over HTTP from a server process on a
fresh SQLite database, like every e2e test. Personas, genomes
and layers are seeded first, and schema hooks aim path parameters and bodies at them part of the time,
so requests reach real resources and not only 404s.

What is checked, for every response:
- never a 5xx;
- a success has a documented status code and content type, and its body conforms to the schema;
- an error has a documented status and content type and is RFC 9457 problem details
  (`application/problem+json`) naming the `rule` that failed, as the README promises.

Generation is derandomized (fixed seed, bounded examples per operation), so a failure replays exactly,
and schemathesis prints a `curl` line that reproduces it. Service bugs found this way are kept at the
bottom as regression cases, each with the request that once triggered it.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from conftest import Server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core import NOT_SET
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from fixtures.make_adapter import make_adapter_files
from inference.models import ModelCatalog

BASE = "smollm2-135m-instruct"
SEED = 20260101
# Per operation, from schema-valid and schema-invalid requests alike; raise it for a deeper local run.
MAX_EXAMPLES = int(os.environ.get("CONTRACT_MAX_EXAMPLES", "25"))
PROBLEM = "application/problem+json"
# Path parameter -> the kind of resource it names (404 rules are `<kind>_not_found`).
KINDS = {"genome_id": "genome", "persona_id": "persona", "layer_id": "layer", "knowledge_id": "knowledge",
         "conversation_id": "conversation", "session_id": "academy_session",
         "challenge_id": "challenge"}


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

# Checks excused on one operation (none today; a new gap goes here with a regression case below).
EXCUSED: set[tuple[str, Any]] = set()


def checks_for(case: schemathesis.Case, response: Any, *, excuse_known: bool = True) -> list[Any]:
    checks = SUCCESS_CHECKS if response.status_code < 400 else ERROR_CHECKS
    return [check for check in checks if not (excuse_known and (case.operation.label, check) in EXCUSED)]


@dataclass
class Seeded:
    """The server, its schema, real resources to aim at (path parameter -> ids), and what the fuzzer got."""

    server: Server
    schema: schemathesis.BaseSchema
    ids: dict[str, list[str]] = field(default_factory=dict)
    answers: Counter[tuple[str, int]] = field(default_factory=Counter)

    def operation(self, method: str, path: str) -> schemathesis.APIOperation:
        return self.schema[path][method]

    def calls(self, label: str) -> int:
        return sum(n for (op, _), n in self.answers.items() if op == label)


def load_schema(server: Server) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_url(
        f"{server.url}/schema/openapi.json", config=schemathesis.Config.from_dict({"seed": SEED}),
    )
    schema.config.update(base_url=server.url)
    return schema


def adapter_upload(seed: int) -> dict[str, Any]:
    files = make_adapter_files("peft", seed=seed)
    metadata = {"name": f"layer {seed}", "base_model": BASE, "trait_type": "domain_expertise", "tags": ["math"]}
    return {"files": [("files", (name, data)) for name, data in files.items()], "data": {"metadata": json.dumps(metadata)}}


def seed(seeded: Seeded) -> None:
    """Two of each kind, every creating response checked against the schema too (the fuzzer cannot
    build a valid adapter upload, so this is where `uploadLayer`'s 201 is checked)."""

    def created(method: str, route: str, path_parameters: dict[str, str] | None = None, **request: Any) -> str:
        response = client.request(method, route.format(**(path_parameters or {})), **request)
        response.request.read()  # a multipart body is streamed; schemathesis reads the request back
        case = seeded.operation(method, route).Case()
        case.validate_response(response, checks=checks_for(case, response, excuse_known=False))
        assert response.is_success, response.text
        return response.json()["id"]

    with seeded.server.client() as client:
        personas = [created("POST", "/personas", json={"name": name}) for name in ("Ada", "Grace")]
        genomes = [
            created("POST", "/genomes", json={"persona_id": personas[0], "base_model": BASE, "name": name})
            for name in ("main", "spare")
        ]
        layers = [created("POST", "/layers", **adapter_upload(seed)) for seed in (0, 1)]
        created("POST", "/genomes/{genome_id}/layers", {"genome_id": genomes[0]}, json={"layer_id": layers[0]})
        # No academy worker runs in this server: sessions stay pending and nothing trains.
        sessions = [created("POST", "/academy/sessions", json={"persona_id": personas[0], "goal": goal})
                    for goal in ("Sound calm.", "Explain maths patiently.")]
        chat = client.post(f"/personas/{personas[0]}/chat", json={"messages": [{"role": "user", "content": "Hello"}]})
        assert chat.status_code == 200, chat.text
        conversations = [chat.json()["conversation_id"]]
    seeded.ids = {"persona_id": personas, "genome_id": genomes, "layer_id": layers, "session_id": sessions,
                  "conversation_id": conversations}


@pytest.fixture
def seeded(start_server: Callable[..., Server], tiny_model: Path, tmp_path: Path) -> Seeded:
    # No rate limit: the fuzzer sends far more than 1200 requests a minute. Chat runs on the tiny
    # random model and a few tokens at most, so a fuzzed chat is quick and finds a model to load.
    ModelCatalog(tmp_path / "models").register_local("tiny", tiny_model)
    server = start_server(
        rate_limit_per_minute="0", models_dir=str(tmp_path / "models"), inference_model="tiny", inference_backend="torch",
        inference_device="cpu", chat_max_tokens_limit="8", chat_default_max_tokens="8",
    )
    result = Seeded(server, load_schema(server))
    seed(result)
    return result


def declared_body_fields(schema: schemathesis.BaseSchema, operation: schemathesis.APIOperation) -> set[str] | None:
    """The JSON body's declared properties, or None where the body is not a JSON object schema."""
    body = schema.raw_schema["paths"][operation.path][operation.method.lower()].get("requestBody", {})
    definition = body.get("content", {}).get("application/json", {}).get("schema")
    if definition and "$ref" in definition:
        definition = schema.raw_schema["components"]["schemas"][definition["$ref"].rsplit("/", 1)[-1]]
    return set(definition.get("properties", {})) if definition else None


def aim_at_seeded_resources(seeded: Seeded) -> None:
    """Half the time, the ids a request names (path or body) are real, and its base model is known;
    two times in three, independently, the request carries no (made-up) API key; half the time,
    independently, only its required query parameters are sent.

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


def _destructive_last(operation: schemathesis.APIOperation) -> tuple[bool, str]:
    # Archiving and deprecating the seeded resources early would leave the rest only 409s and 410s.
    return (operation.method.upper() == "DELETE", operation.label)


def test_every_operation_honours_its_contract(seeded: Seeded, subtests: pytest.Subtests) -> None:
    aim_at_seeded_resources(seeded)
    operations = sorted((result.ok() for result in seeded.schema.get_all_operations()), key=_destructive_last)
    assert len(operations) >= 27, [op.label for op in operations]

    for operation in operations:
        strategy = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

        # Reads of one resource get twice the examples: they are cheap, and the check below
        # needs some of them to reach a seeded resource.
        reaches = bool(operation.path_parameters) and operation.method.upper() == "GET"

        @settings(max_examples=MAX_EXAMPLES * (2 if reaches else 1), derandomize=True, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def fuzz(case: schemathesis.Case) -> None:
            response = case.call(timeout=30)
            seeded.answers[(case.operation.label, response.status_code)] += 1
            case.validate_response(response, checks=checks_for(case, response))

        with subtests.test(msg=operation.label):
            fuzz()

    print(f"\n{'operation':46} examples  answers by status")  # shown with -s
    for operation in operations:
        answers = {status: n for (label, status), n in sorted(seeded.answers.items()) if label == operation.label}
        print(f"{operation.label:46} {seeded.calls(operation.label):8}  {answers}")

    # The hooks did their job: every read of one resource reached a real one at least once.
    for operation in operations:
        if operation.path_parameters and operation.method.upper() == "GET":
            statuses = {status for label, status in seeded.answers if label == operation.label}
            with subtests.test(msg=f"{operation.label} reached a seeded resource"):
                assert any(200 <= status < 300 for status in statuses), statuses


def test_unknown_ids_are_404_problem_details_everywhere(server: Server, subtests: pytest.Subtests) -> None:
    schema = load_schema(server)
    for operation in (result.ok() for result in schema.get_all_operations()):
        names = [parameter.name for parameter in operation.path_parameters]
        if not names:
            continue
        body = {"name": "x", "text": "x", "layer_id": "no-such-layer", "genome_id": "no-such-genome", "layers": [],
                "trait_type": "tone_and_voice", "response": "x"}
        fields = declared_body_fields(schema, operation)
        case = operation.Case(
            path_parameters={name: f"no-such-{KINDS[name]}" for name in names},
            query={parameter.name: "x" for parameter in operation.query if parameter.is_required} or None,
            body={k: v for k, v in body.items() if k in fields} if fields is not None else NOT_SET,
        )
        with subtests.test(msg=operation.label):
            response = case.call(timeout=30)
            case.validate_response(response, checks=ERROR_CHECKS)
            assert response.status_code == 404, response.text
            # Where the body names resources too, whichever is looked up first may be the one reported.
            assert response.json()["rule"] in {f"{kind}_not_found" for kind in KINDS.values()}, response.text


# -----------------------------------------------------------------------------------------------------
# Requests the first contract run found breaking the service or its schema, kept as regression cases.
# -----------------------------------------------------------------------------------------------------


def _download(file: str) -> Callable[[Seeded], schemathesis.Case]:
    return lambda seeded: seeded.operation("GET", "/layers/{layer_id}/adapter").Case(
        path_parameters={"layer_id": seeded.ids["layer_id"][0]}, query={"file": file},
    )


def _replay(**query: Any) -> Callable[[Seeded], schemathesis.Case]:
    return lambda seeded: seeded.operation("GET", "/genomes/{genome_id}").Case(
        path_parameters={"genome_id": seeded.ids["genome_id"][0]}, query=query,
    )


def _idempotency_key_reused_across_kinds(seeded: Seeded) -> schemathesis.Case:
    with seeded.server.client() as client:
        first = client.post("/personas", json={"name": "Ada"}, headers={"Idempotency-Key": "shared-key"})
        assert first.status_code == 201, first.text
    return seeded.operation("POST", "/genomes").Case(
        body={"persona_id": seeded.ids["persona_id"][0], "base_model": BASE, "name": "g"},
        headers={"Idempotency-Key": "shared-key"}, media_type="application/json",
    )


def _adapter_parts_without_filenames(seeded: Seeded) -> schemathesis.Case:
    # The adapter files as plain form fields (no filename): the weights are not UTF-8.
    upload = adapter_upload(seed=2)
    body = {"metadata": upload["data"]["metadata"]} | {name: data for _, (name, data) in upload["files"]}
    return seeded.operation("POST", "/layers").Case(body=body, media_type="multipart/form-data")


FIXED_BUGS: dict[str, tuple[Callable[[Seeded], schemathesis.Case], str]] = {
    "downloadAdapter weights": (
        _download("weights"),
        "GET /layers/{id}/adapter answers 200 application/octet-stream; the schema documents only application/json",
    ),
    "downloadAdapter config": (
        _download("config"),
        "GET /layers/{id}/adapter?file=config answers a JSON object; the schema says {type: string}",
    ),
    "metrics": (
        lambda seeded: seeded.operation("GET", "/metrics").Case(),
        "GET /metrics answers 200 text/plain (Prometheus); the schema documents application/json",
    ),
    "getGenome version past int64": (
        _replay(version=2**63),
        "GET /genomes/{id}?version=9223372036854775808 -> 500: OverflowError, int too large for SQLite",
    ),
    "getGenome as_of past datetime.max in UTC": (
        _replay(as_of="9999-12-31T23:59:59-14:00"),
        "GET /genomes/{id}?as_of=9999-12-31T23:59:59-14:00 -> 500: OverflowError in Database.to_db_time",
    ),
    "Idempotency-Key reused across kinds": (
        _idempotency_key_reused_across_kinds,
        "POST /personas then POST /genomes with one Idempotency-Key -> 500: AssertionError in create_stream",
    ),
    "uploadLayer part without filename": (
        _adapter_parts_without_filenames,
        "POST /layers with a non-UTF-8 multipart field (no filename) -> 500: UnicodeDecodeError in Litestar's parser",
    ),
}


@pytest.mark.parametrize("bug", list(FIXED_BUGS))
def test_a_request_that_once_broke_the_contract_now_keeps_it(bug: str, seeded: Seeded) -> None:
    case = FIXED_BUGS[bug][0](seeded)
    response = case.call(timeout=30)
    case.validate_response(response, checks=checks_for(case, response, excuse_known=False))


@pytest.mark.postgres
def test_nul_characters_are_refused_not_crashed_on_postgres(start_server: Callable[..., Server], postgres_url: str) -> None:
    server = start_server(postgres_url)
    case = load_schema(server)["/personas"]["POST"].Case(body={"name": "a\x00b"}, media_type="application/json")
    response = case.call(timeout=30)
    case.validate_response(response, checks=checks_for(case, response, excuse_known=False))
