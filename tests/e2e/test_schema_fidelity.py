"""What the OpenAPI document calls valid, the service accepts; what it refuses, the document names.

The real server, with a real API key, seeded as for the contract test (`openapi_fuzzing.py`), is sent
only schema-valid requests (schemathesis' positive mode), aimed at the seeded resources part of the
time, an upload given a real adapter or a real text file part of the time. For every operation:
- at least one generated request is accepted (2xx): the schema does not promise what the service refuses;
- every refusal is problem details whose `rule` is among the rules the operation documents for that
  status (`x-rules` on each error response): a client reading the document knows every way it can fail.

Generation is derandomized with a fixed seed and a few examples per operation, so a run replays exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_fuzzing import (
    BASE,
    PROBLEM,
    TRAINING_FILE,
    Seeded,
    aim_at_seeded_resources,
    fuzzable_server,
    load_schema,
    seed,
)
from schemathesis import GenerationMode
from servers import Server

from fixtures.make_adapter import make_adapter_files
from inference.models import ModelCatalog

MAX_EXAMPLES = int(os.environ.get("FIDELITY_MAX_EXAMPLES", "20"))
# The real PEFT adapter's files (for the seeded base model, made with the server), by their bytes: a
# generated upload that carries them sends them under their own file names (the parser tells the
# layout by name).
ADAPTER_NAMES: dict[bytes, str] = {}
TEXT = b"Ada Lovelace wrote the first published program."
# A recipe's steps whose params fit their commands and refer to what exists: a generated definition
# (random commands, params and expressions) almost never does.
STEPS = [{"id": "stack", "command": "genome.stack", "params": {"persona_id": "{{ inputs.persona_id }}"}}]
INPUTS = {"persona_id": {"type": "string"}}


@dataclass
class Refusal:
    status: int
    rule: str | None
    request: str

    def __str__(self) -> str:
        return f"{self.status} {self.rule}: {self.request[:500]}"


@dataclass
class Probe:
    """What one operation answered to the schema-valid requests it was sent."""

    accepted: int = 0
    refusals: list[Refusal] = field(default_factory=list)


def documented_rules(seeded: Seeded, operation: schemathesis.APIOperation, status: int) -> set[str]:
    definition = seeded.schema.raw_schema["paths"][operation.path][operation.method.lower()]
    return set(definition.get("responses", {}).get(str(status), {}).get("x-rules", []))


def supply_real_files(seeded: Seeded) -> None:
    """Half the time an adapter upload carries the real adapter and its metadata names the seeded base
    model; half the time a knowledge upload's files are UTF-8 text, as its schema says they must be;
    half the time a recipe's definition is one that runs, and a run's inputs are the seeded recipe's."""
    adapter = make_adapter_files("peft", seed=7, spec=ModelCatalog(Path(seeded.server.env["GENOME_MODELS_DIR"])).get(BASE))
    ADAPTER_NAMES.update({data: name for name, data in adapter.items()})

    @seeded.schema.hook
    def flatmap_body(ctx: schemathesis.HookContext, body: Any) -> st.SearchStrategy[Any]:
        label = ctx.operation.label if ctx.operation is not None else None
        if label in ("POST /recipes", "PUT /recipes/{recipe_id}") and isinstance(body, dict):
            return st.sampled_from([body, {**body, "steps": STEPS, "inputs": INPUTS, "output": None}])
        if label == "POST /recipes/{recipe_id}/runs" and isinstance(body, dict):
            return st.sampled_from([body, {"inputs": {"persona_id": seeded.ids["persona_id"][0]}}])
        if label == "POST /personas/{persona_id}/knowledge/documents" and isinstance(body, dict):
            return st.sampled_from([body, {**body, "files": [TEXT]}])
        if label == "POST /v1/files" and isinstance(body, dict):
            return st.sampled_from([body, {**body, "file": TRAINING_FILE}])
        if label != "POST /layers" or not isinstance(body, dict):
            return st.just(body)
        metadata = body.get("metadata")
        real = {**body, "files": list(adapter.values())}
        if isinstance(metadata, dict):
            real["metadata"] = {**metadata, "base_model": BASE, "parent_layer_id": None, "embedding": None}
        return st.sampled_from([body, real])


def multipart(case: schemathesis.Case) -> dict[str, Any]:
    """The parts of a multipart case, each file under a distinct name (its real one for the real adapter)."""
    if case.media_type != "multipart/form-data" or not isinstance(case.body, dict):
        return {}
    parts: list[tuple[str, Any]] = []
    for name, value in case.body.items():
        if name in ("files", "file"):  # the layer and knowledge uploads' files, a training file
            for i, data in enumerate(value if isinstance(value, list) else [value]):
                data = getattr(data, "data", data)  # schemathesis wraps generated bytes
                data = data.encode() if isinstance(data, str) else bytes(data)
                parts.append((name, (ADAPTER_NAMES.get(data, f"file-{i}.txt"), data)))
        else:
            parts.append((name, (None, value if isinstance(value, str) else json.dumps(value))))
    return {"files": parts}


def _destructive_last(operation: schemathesis.APIOperation) -> tuple[bool, int, str]:
    # Archiving, deprecating and cancelling the seeded resources early would leave the rest only
    # 409s and 410s; a sub-resource (a genome's layer, a document) goes before its parent.
    destructive = operation.method.upper() == "DELETE" or operation.path.endswith("/cancel")
    return (destructive, -operation.path.count("/") if destructive else 0, operation.label)


@pytest.fixture
def seeded(start_server: Callable[..., Server], tiny_model: Path, tmp_path: Path) -> Seeded:
    server = fuzzable_server(start_server, tiny_model, tmp_path / "models")
    created = server.cli("keys", "create", "--owner", "alice")
    assert created.returncode == 0, created.stderr
    result = Seeded(server, load_schema(server), key=created.stdout.strip())
    seed(result)
    aim_at_seeded_resources(result)
    supply_real_files(result)
    return result


def probe(seeded: Seeded, operation: schemathesis.APIOperation) -> Probe:
    found = Probe()
    headers = {"Authorization": f"Bearer {seeded.key}"}

    @settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(GenerationMode.POSITIVE))
    def send(case: schemathesis.Case) -> None:
        response = case.call(timeout=60, headers=headers, **multipart(case))
        if response.status_code < 400:
            found.accepted += 1
            return
        is_problem = response.headers.get("content-type", [""])[0] == PROBLEM
        rule = response.json().get("rule") if is_problem else None
        found.refusals.append(Refusal(response.status_code, rule, case.as_curl_command({"Authorization": "Bearer KEY"})))

    send()
    return found


def test_every_operation_accepts_what_its_schema_calls_valid_and_refuses_only_by_documented_rules(
    seeded: Seeded, subtests: pytest.Subtests,
) -> None:
    operations = sorted((result.ok() for result in seeded.schema.get_all_operations()), key=_destructive_last)
    probes = {operation.label: probe(seeded, operation) for operation in operations}

    print(f"\n{'operation':58} accepted  refused by rule")  # shown with -s
    for operation in operations:
        found = probes[operation.label]
        rules = sorted({f"{r.status} {r.rule}" for r in found.refusals})
        print(f"{operation.label:58} {found.accepted:8}  {rules}")

    for operation in operations:
        found = probes[operation.label]
        with subtests.test(msg=f"{operation.label} accepts a schema-valid request"):
            assert found.accepted, "\n".join(map(str, found.refusals[:3]))
        with subtests.test(msg=f"{operation.label} refuses only by documented rules"):
            undocumented = [r for r in found.refusals if r.rule not in documented_rules(seeded, operation, r.status)]
            assert not undocumented, "\n".join(map(str, undocumented[:3]))
