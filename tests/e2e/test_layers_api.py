"""Layers over HTTP: adapter upload in both layouts, validation, visibility, stacking into genomes."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families
from servers import Server
from test_personas_and_genomes_api import PROBLEM, create_genome, create_persona

from fixtures.make_adapter import make_adapter_files
from inference.models import SMOLLM2_135M_INSTRUCT

BASE = "smollm2-135m-instruct"


def metadata(**overrides: object) -> str:
    return json.dumps({"name": "math tutor", "base_model": BASE, "trait_type": "domain_expertise", "tags": ["Math"]} | overrides)


def upload(client: httpx.Client, files: dict[str, bytes], **overrides: object) -> httpx.Response:
    return client.post("/layers", files=[("files", (name, data)) for name, data in files.items()], data={"metadata": metadata(**overrides)})


def stored_blobs(server: Server) -> list[Path]:
    root = Path(server.env["GENOME_DATA_DIR"]) / "blobs"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


@pytest.mark.parametrize(("layout", "weights"), [("peft", "adapter_model.safetensors"), ("mlx", "adapters.safetensors")])
def test_adapter_upload_round_trips_byte_for_byte(server: Server, layout: str, weights: str) -> None:
    files = make_adapter_files(layout, rank=8, modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    with server.client() as client:
        created = upload(client, files)
        assert created.status_code == 201, created.text
        layer = created.json()
        assert (layer["adapter_format"], layer["rank"], layer["tags"]) == (layout, 8, ["math"])
        assert layer["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
        downloaded = client.get(f"/layers/{layer['id']}/adapter")
        assert downloaded.content == files[weights]
        assert weights in downloaded.headers["content-disposition"]
        assert client.get(f"/layers/{layer['id']}/adapter", params={"file": "config"}).content == files["adapter_config.json"]


def _truncated(files: dict[str, bytes]) -> dict[str, bytes]:
    weights = "adapter_model.safetensors"
    return {**files, weights: files[weights][: len(files[weights]) // 2]}


def _huge_header(files: dict[str, bytes]) -> dict[str, bytes]:
    return {**files, "adapter_model.safetensors": (10**9).to_bytes(8, "little") + b"{}"}


# The default model's name with a smaller hidden size: every projection has the wrong shape.
_NARROWER = msgspec.structs.replace(SMOLLM2_135M_INSTRUCT, hidden_size=64)

BAD_ADAPTERS = {
    "pickle": (lambda f: {"adapter_model.bin": b"\x80\x04\x95junk", "adapter_config.json": f["adapter_config.json"]}, {}, "pickle_not_allowed"),
    "wrong shapes": (lambda f: make_adapter_files("peft", spec=_NARROWER), {}, "shape_mismatch"),
    "nan": (lambda f: make_adapter_files("peft", nan=True), {}, "not_finite"),
    "unknown base model": (lambda f: f, {"base_model": "gpt-7-ultra"}, "unknown_base_model"),
    "rank over limit": (lambda f: make_adapter_files("peft", rank=128), {}, "rank_over_limit"),
    "truncated": (_truncated, {}, "bad_safetensors"),
    "header past the end": (_huge_header, {}, "bad_safetensors"),
}


@pytest.mark.parametrize("case", list(BAD_ADAPTERS), ids=list(BAD_ADAPTERS))
def test_each_kind_of_bad_adapter_is_refused_precisely_and_nothing_is_stored(server: Server, case: str) -> None:
    make_files, overrides, rule = BAD_ADAPTERS[case]
    with server.client() as client:
        refused = upload(client, make_files(make_adapter_files("peft")), **overrides)
        assert refused.status_code == 422, refused.text
        assert refused.headers["content-type"] == PROBLEM
        assert refused.json()["rule"] == rule
        assert client.get("/layers").json()["items"] == []
    assert stored_blobs(server) == []


def test_upload_needs_multipart_and_a_metadata_part(server: Server) -> None:
    with server.client() as client:
        as_json = client.post("/layers", json={"name": "x"})
        assert as_json.status_code == 415 and as_json.json()["rule"] == "unsupported_media_type"
        files = make_adapter_files("peft")
        no_metadata = client.post("/layers", files=[("files", (n, d)) for n, d in files.items()])
        assert no_metadata.status_code == 400 and "metadata" in no_metadata.json()["detail"]
        bad_trait = upload(client, files, trait_type="charisma")
        assert bad_trait.status_code == 400 and "trait_type" in bad_trait.json()["detail"]


def test_public_layers_are_readable_by_all_and_writable_only_by_their_owner(start_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = start_server()
    alice, bob = (server.cli("keys", "create", "--owner", who).stdout.strip() for who in ("alice", "bob"))
    with server.client(alice) as a, server.client(bob) as b:
        private = upload(a, make_adapter_files("peft", seed=1), name="private").json()
        public = upload(a, make_adapter_files("mlx", seed=2), name="shared", public=True).json()
        assert b.get(f"/layers/{private['id']}").status_code == 404
        assert b.get(f"/layers/{private['id']}/adapter").status_code == 404
        assert b.get(f"/layers/{public['id']}").json()["name"] == "shared"
        assert [layer["id"] for layer in b.get("/layers").json()["items"]] == [public["id"]]
        assert b.patch(f"/layers/{public['id']}", json={"description": "mine"}).status_code == 403
        assert b.delete(f"/layers/{public['id']}").status_code == 403
        assert a.patch(f"/layers/{public['id']}", json={"description": "still alice's"}).status_code == 200
        # A public layer can go into another owner's genome; a private one cannot.
        genome = create_genome(b, create_persona(b, "Bo")["id"])
        assert b.post(f"/genomes/{genome['id']}/layers", json={"layer_id": public["id"]}).status_code == 200
        assert b.post(f"/genomes/{genome['id']}/layers", json={"layer_id": private["id"]}).status_code == 404


def test_layers_stack_into_genomes_with_weights_order_and_rules(server: Server) -> None:
    with server.client() as client:
        ids = [upload(client, make_adapter_files("peft", seed=n), name=f"layer {n}", tags=[f"t{n}"]).json()["id"] for n in range(3)]
        genome = create_genome(client, create_persona(client)["id"])
        path = f"/genomes/{genome['id']}/layers"
        client.post(path, json={"layer_id": ids[0], "weight": 0.5})
        top = client.post(path, json={"layer_id": ids[1], "weight": 0.25, "position": 0}).json()
        assert [(s["layer_id"], s["weight"], s["position"]) for s in top["layers"]] == [(ids[1], 0.25, 0), (ids[0], 0.5, 1)]
        twice = client.post(path, json={"layer_id": ids[0]})
        assert twice.status_code == 409 and twice.json()["rule"] == "layer_already_attached"
        heavy = client.post(path, json={"layer_id": ids[2], "weight": 1.5})
        assert heavy.status_code == 422 and heavy.json()["rule"] == "weight_out_of_range"
        stack = client.put(path, json={"layers": [{"layer_id": ids[2], "weight": 1.0}, {"layer_id": ids[0], "weight": 0.1}]}).json()
        assert [s["layer_id"] for s in stack["layers"]] == [ids[2], ids[0]]
        detached = client.delete(f"{path}/{ids[2]}").json()
        assert [s["layer_id"] for s in detached["layers"]] == [ids[0]]
        assert [g["id"] for g in client.get("/genomes", params={"layer_id": ids[0]}).json()["items"]] == [genome["id"]]
        assert client.get("/genomes", params={"layer_id": ids[2]}).json()["items"] == []
        assert [layer["id"] for layer in client.get("/layers", params={"tag": "T1"}).json()["items"]] == [ids[1]]
        assert client.delete(f"/layers/{ids[1]}").status_code == 204
        deprecated = client.post(path, json={"layer_id": ids[1]})
        assert deprecated.status_code == 409 and deprecated.json()["rule"] == "layer_deprecated"


def test_metrics_report_requests_latencies_appends_and_projection_lag(server: Server) -> None:
    with server.client() as client:
        create_persona(client)
        client.get("/personas")
        text = client.get("/metrics").text
    assert "genome_events_appended_total 1.0" in text
    assert "genome_projection_lag_events 0.0" in text
    assert 'genome_requests_total{method="POST",path="/personas",status_code="201"} 1.0' in text
    assert 'genome_requests_total{method="GET",path="/personas",status_code="200"} 1.0' in text
    latency = {
        (sample.name, sample.labels.get("le"), sample.labels["method"]): sample.value
        for family in text_string_to_metric_families(text) if family.name == "genome_request_duration_seconds"
        for sample in family.samples if sample.labels["path"] == "/personas"
    }
    assert latency[("genome_request_duration_seconds_count", None, "GET")] == 1
    assert latency[("genome_request_duration_seconds_bucket", "+Inf", "POST")] == 1
    assert 0 < latency[("genome_request_duration_seconds_sum", None, "POST")] < 60


def test_too_many_requests_get_429_with_retry_after(start_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = start_server(rate_limit_per_minute="5")
    with server.client() as client:
        statuses = [client.get("/personas").status_code for _ in range(6)]
        limited = client.get("/personas")
    assert statuses[:5] == [200] * 5 and statuses[5] == 429
    assert limited.status_code == 429 and limited.headers["content-type"] == PROBLEM
    assert int(limited.headers["retry-after"]) > 0


def test_an_idempotent_attach_retry_answers_as_the_first_time_and_appends_nothing(server: Server) -> None:
    with server.client() as client:
        layers = [upload(client, make_adapter_files("peft", seed=n), name=f"l{n}").json()["id"] for n in range(2)]
        genome = create_genome(client, create_persona(client)["id"])
        path = f"/genomes/{genome['id']}/layers"
        first = client.post(path, json={"layer_id": layers[0], "weight": 0.4}, headers={"Idempotency-Key": "attach-1"})
        client.post(path, json={"layer_id": layers[1]})
        retry = client.post(path, json={"layer_id": layers[0], "weight": 0.4}, headers={"Idempotency-Key": "attach-1"})
        assert retry.status_code == 200 and retry.json() == first.json()
        assert retry.headers["etag"] == first.headers["etag"] == '"2"'
        assert [e["type"] for e in client.get(f"/genomes/{genome['id']}/events").json()] == [
            "GenomeCreated", "LayerAttached", "LayerAttached",
        ]


def test_an_attach_retry_with_another_body_or_path_gets_422_and_appends_nothing(server: Server) -> None:
    with server.client() as client:
        layer = upload(client, make_adapter_files("peft", seed=0)).json()["id"]
        persona_id = create_persona(client)["id"]
        genomes = [create_genome(client, persona_id, name=f"g{n}")["id"] for n in range(2)]
        first = client.post(f"/genomes/{genomes[0]}/layers", json={"layer_id": layer, "weight": 0.4}, headers={"Idempotency-Key": "a"})
        assert first.status_code == 200
        heavier = client.post(f"/genomes/{genomes[0]}/layers", json={"layer_id": layer, "weight": 0.9}, headers={"Idempotency-Key": "a"})
        assert heavier.status_code == 422 and heavier.json()["rule"] == "idempotency_key_mismatch"
        elsewhere = client.post(f"/genomes/{genomes[1]}/layers", json={"layer_id": layer, "weight": 0.4}, headers={"Idempotency-Key": "a"})
        assert elsewhere.status_code == 422
        assert [len(client.get(f"/genomes/{g}/events").json()) for g in genomes] == [2, 1]
        assert client.get(f"/genomes/{genomes[0]}").json()["layers"][0]["weight"] == 0.4


def test_an_upload_retry_must_send_the_same_files(server: Server) -> None:
    with server.client() as client:
        files = make_adapter_files("peft", seed=1)
        key = {"Idempotency-Key": "upload-1"}
        first = client.post("/layers", files=[("files", (n, d)) for n, d in files.items()], data={"metadata": metadata()}, headers=key)
        assert first.status_code == 201, first.text
        retry = client.post("/layers", files=[("files", (n, d)) for n, d in files.items()], data={"metadata": metadata()}, headers=key)
        assert retry.status_code == 201 and retry.json() == first.json()
        other = make_adapter_files("peft", seed=2)
        changed = client.post("/layers", files=[("files", (n, d)) for n, d in other.items()], data={"metadata": metadata()}, headers=key)
        assert changed.status_code == 422 and changed.json()["rule"] == "idempotency_key_mismatch"
        assert [layer["id"] for layer in client.get("/layers").json()["items"]] == [first.json()["id"]]


def test_concurrent_writers_each_land_once_and_stale_if_match_writers_get_412(server: Server) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with server.client() as client:
        layers = [upload(client, make_adapter_files("peft", seed=n), name=f"l{n}").json()["id"] for n in range(8)]
        genome = create_genome(client, create_persona(client)["id"])
    path = f"{server.url}/genomes/{genome['id']}/layers"

    def attach(layer_id: str, if_match: str | None) -> int:
        headers = {"If-Match": if_match} if if_match else {}
        return httpx.post(path, json={"layer_id": layer_id, "weight": 0.5}, headers=headers, timeout=30).status_code

    with ThreadPoolExecutor(8) as pool:
        free = list(pool.map(lambda layer: attach(layer, None), layers[:4]))
        pinned = list(pool.map(lambda layer: attach(layer, '"5"'), layers[4:]))
    assert free == [200] * 4
    assert sorted(pinned) == [200, 412, 412, 412]
    with server.client() as client:
        stack = client.get(f"/genomes/{genome['id']}").json()["layers"]
    assert len(stack) == 5 and len({s["layer_id"] for s in stack}) == 5


@pytest.mark.postgres
def test_the_whole_api_runs_on_postgresql(start_server, postgres_url: str) -> None:  # type: ignore[no-untyped-def]
    server: Server = start_server(database_url=postgres_url)
    with server.client() as client:
        persona = create_persona(client)
        genome = create_genome(client, persona["id"])
        layer = upload(client, make_adapter_files("mlx"), public=True, tags=["Tone"]).json()
        attached = client.post(f"/genomes/{genome['id']}/layers", json={"layer_id": layer["id"], "weight": 0.7}).json()
        fetched = client.get(f"/genomes/{genome['id']}")
        assert fetched.json() == attached and fetched.headers["etag"] == '"2"'
        assert client.get(f"/layers/{layer['id']}").json() == layer
        assert client.get(f"/personas/{persona['id']}").json()["created_at"] == persona["created_at"]
        assert [g["id"] for g in client.get("/genomes", params={"layer_id": layer["id"]}).json()["items"]] == [genome["id"]]
        assert [x["id"] for x in client.get("/layers", params={"tag": "tone"}).json()["items"]] == [layer["id"]]
        assert client.get(f"/genomes/{genome['id']}", params={"version": 1}).json()["layers"] == []
        assert client.delete(f"/genomes/{genome['id']}").status_code == 204
        assert client.get(f"/genomes/{genome['id']}").status_code == 410


def test_references_to_missing_resources_name_the_missing_one(server: Server) -> None:
    with server.client() as client:
        orphan = upload(client, make_adapter_files("peft"), parent_layer_id="no-such-layer")
        assert orphan.status_code == 404 and orphan.json()["rule"] == "parent_layer_not_found"
        assert client.get("/layers").json()["items"] == []
        unknown_both = client.post("/genomes/no-such-genome/layers", json={"layer_id": "no-such-layer"})
        assert unknown_both.status_code == 404 and unknown_both.json()["rule"] == "genome_not_found"
        genome = create_genome(client, create_persona(client)["id"])
        twice = client.post(f"/genomes/{genome['id']}/fork", json={"name": "twin", "other_parent_ids": [genome["id"]]})
        assert twice.status_code == 422 and twice.json()["rule"] == "parent_repeated"
