"""The OpenAPI contract, fuzzed: schemathesis drives every documented operation of the real server.

The schema is the server's own (`/schema/openapi.json`), loaded over HTTP from a server process on a
fresh SQLite database, like every e2e test. Personas, genomes
and layers are seeded first, and schema hooks aim path parameters and bodies at them part of the time,
so requests reach real resources and not only 404s (seeding and hooks live in `openapi_fuzzing.py`,
shared with the schema-fidelity test).

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

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_fuzzing import (
    BASE,
    ERROR_CHECKS,
    KINDS,
    Seeded,
    adapter_upload,
    aim_at_seeded_resources,
    contract_checks,
    declared_body_fields,
    fuzzable_server,
    load_schema,
    seed,
)
from schemathesis import GenerationMode
from schemathesis.core import NOT_SET
from servers import Server, launch, stop

# Per operation, from schema-valid and schema-invalid requests alike; raise it for a deeper local run.
MAX_EXAMPLES = int(os.environ.get("CONTRACT_MAX_EXAMPLES", "25"))

# Checks excused on one operation (none today; a new gap goes here with a regression case below).
EXCUSED: set[tuple[str, Any]] = set()


def checks_for(case: schemathesis.Case, response: Any, *, excuse_known: bool = True) -> list[Any]:
    return [check for check in contract_checks(response) if not (excuse_known and (case.operation.label, check) in EXCUSED)]


def seeded_server(start_server: Callable[..., Server], tiny_model: Path, models_dir: Path) -> Seeded:
    server = fuzzable_server(start_server, tiny_model, models_dir)
    result = Seeded(server, load_schema(server))
    seed(result)
    return result


@pytest.fixture
def seeded(start_server: Callable[..., Server], tiny_model: Path, tmp_path: Path) -> Seeded:
    return seeded_server(start_server, tiny_model, tmp_path / "models")


@pytest.fixture(scope="module")
def seeded_once(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Seeded]:
    """One seeded server for the regression cases below: each sends one request, none needs a fresh database."""
    root = tmp_path_factory.mktemp("contract-regressions")
    processes: list[subprocess.Popen[str]] = []
    yield seeded_server(lambda **settings: launch(root, processes, **settings), tiny_model, root / "models")
    stop(processes)


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
                "trait_type": "tone_and_voice", "response": "x", "steps": []}
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
    upload = adapter_upload(2, Path(seeded.server.env["GENOME_MODELS_DIR"]))
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
def test_a_request_that_once_broke_the_contract_now_keeps_it(bug: str, seeded_once: Seeded) -> None:
    case = FIXED_BUGS[bug][0](seeded_once)
    response = case.call(timeout=30)
    case.validate_response(response, checks=checks_for(case, response, excuse_known=False))


@pytest.mark.postgres
def test_nul_characters_are_refused_not_crashed_on_postgres(start_server: Callable[..., Server], postgres_url: str) -> None:
    server = start_server(postgres_url)
    case = load_schema(server)["/personas"]["POST"].Case(body={"name": "a\x00b"}, media_type="application/json")
    response = case.call(timeout=30)
    case.validate_response(response, checks=checks_for(case, response, excuse_known=False))
