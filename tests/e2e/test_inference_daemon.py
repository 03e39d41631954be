"""The inference daemon on real servers: models in worker processes, shared, supervised and budgeted."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import test_chat_api as chat_tests  # its tests run again below, against a remote daemon
from servers import CLI, Server, clean_env, free_port, launch, stop
from test_chat_api import refused, sse

from fixtures.make_adapter import make_adapter_files
from fixtures.make_model import make_tiny_llama, tiny_spec
from fixtures.processes import children, command_line, maps_libtorch, pss_bytes, tree
from inference.models import DEFAULT_MODEL, ModelCatalog, declared_weight_bytes

QUESTION = [{"role": "user", "content": "Tell me a long story about the sea."}]


def models_dir(root: Path, default_model: Path | None, **tiny: Path) -> Path:
    """A models folder holding the default model (linked) and tiny models registered by name."""
    folder = root / "models"
    folder.mkdir(parents=True, exist_ok=True)
    if default_model is not None:
        (folder / DEFAULT_MODEL).symlink_to(default_model, target_is_directory=True)
    for name, path in tiny.items():
        ModelCatalog(folder).register_local(name.replace("_", "-"), path)
    return folder


def persona_on(client: httpx.Client, base_model: str, name: str = "P") -> str:
    persona = client.post("/personas", json={"name": name, "system_prompt": "You are brief.", "base_model": base_model})
    assert persona.status_code == 201, persona.text
    return persona.json()["id"]


def chat(server: Server, persona_id: str, max_tokens: int = 4) -> httpx.Response:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        return client.post(f"/personas/{persona_id}/chat", json={"messages": QUESTION, "max_tokens": max_tokens, "context_k": 0})


def models(server: Server) -> dict[str, dict[str, object]]:
    with server.client() as client:
        stats = client.get("/inference/stats").json()
    return {entry["model"]: entry for entry in stats["models"]}


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory, default_model: Path, tiny_model: Path) -> Iterator[Server]:
    """One API (its embedded daemon) serving the default model and a registered tiny one."""
    root = tmp_path_factory.mktemp("two-models")
    processes: list[subprocess.Popen[str]] = []
    server = launch(root, processes, models_dir=str(models_dir(root, default_model, tiny=tiny_model)), inference_daemon="embedded",
                    inference_device="cpu", inference_backend="torch", chat_timeout="4",
                    inference_stuck_grace_seconds="1", inference_restart_backoff_seconds="0.2")
    yield server
    stop(processes)


def test_personas_on_two_base_models_answer_from_two_worker_processes(two_models: Server) -> None:
    with two_models.client() as client:
        assert client.get("/inference/stats").json()["models"] == []  # nothing loads before a chat
        on_default, on_tiny = persona_on(client, DEFAULT_MODEL, "D"), persona_on(client, "tiny", "T")
    answers = {persona: chat(two_models, persona) for persona in (on_default, on_tiny, on_default, on_tiny)}
    for answer in answers.values():
        assert answer.status_code == 200, answer.text
    workers = models(two_models)
    assert set(workers) == {DEFAULT_MODEL, "tiny"} and all(w["state"] == "ready" and w["restarts"] == 0 for w in workers.values())
    # Each model loaded once, in its own process, and that process is the one that answered.
    assert workers[DEFAULT_MODEL]["pid"] != workers["tiny"]["pid"]
    assert int(answers[on_default].headers["x-genome-worker-pid"]) == workers[DEFAULT_MODEL]["pid"]
    assert int(answers[on_tiny].headers["x-genome-worker-pid"]) == workers["tiny"]["pid"]
    assert answers[on_tiny].json()["generation"]["model"] == "tiny"
    with two_models.client() as client:
        exposition = client.get("/metrics").text
    assert 'genome_daemon_model_up{model="tiny"} 1' in exposition
    assert f'genome_inference_requests_total{{model="{DEFAULT_MODEL}",reason="length"}}' in exposition


def test_a_killed_worker_fails_its_stream_at_once_and_the_next_chat_is_answered(two_models: Server) -> None:
    with two_models.client() as client:
        persona = persona_on(client, DEFAULT_MODEL, "K")
        client.timeout = httpx.Timeout(120)
        ask = {"messages": QUESTION, "max_tokens": 400, "temperature": 0.8, "seed": 3, "stream": True, "context_k": 0}
        with client.stream("POST", f"/personas/{persona}/chat", json=ask) as response:
            assert response.status_code == 200
            api_process = response.headers["x-genome-process"]
            events = sse(response.iter_lines())
            assert next(events)[0] == "token"
            worker = models(two_models)[DEFAULT_MODEL]["pid"]
            os.kill(int(worker), signal.SIGKILL)  # type: ignore[arg-type]
            rest = list(events)
        kind, data = rest[-1]
        assert kind == "error" and data["rule"] == "model_crashed", rest[-1]
        assert {kind for kind, _ in rest[:-1]} <= {"token"}
        assert client.get(f"/personas/{persona}/conversations").json()["items"] == []  # nothing half recorded
    again = chat(two_models, persona)
    assert again.status_code == 200, again.text
    assert int(again.headers["x-genome-worker-pid"]) != worker
    assert again.headers["x-genome-process"] == api_process and two_models.process is not None and two_models.process.poll() is None
    assert models(two_models)[DEFAULT_MODEL]["restarts"] == 1


def test_a_stuck_worker_is_killed_past_the_timeout_while_the_other_model_answers(two_models: Server) -> None:
    with two_models.client() as client:
        on_default, on_tiny = persona_on(client, DEFAULT_MODEL, "D2"), persona_on(client, "tiny", "T2")
    assert chat(two_models, on_tiny).status_code == 200
    stuck = int(models(two_models)["tiny"]["pid"])  # type: ignore[arg-type]
    os.kill(stuck, signal.SIGSTOP)
    with ThreadPoolExecutor(1) as pool:
        waiting: Future[httpx.Response] = pool.submit(chat, two_models, on_tiny)
        meanwhile = chat(two_models, on_default)
        assert meanwhile.status_code == 200, meanwhile.text
        assert not waiting.done()
        refused(waiting.result(timeout=60), 503, "generation_timed_out")
    with pytest.raises(ProcessLookupError):
        os.kill(stuck, 0)  # killed, not merely resumed
    again = chat(two_models, on_tiny)
    assert again.status_code == 200, again.text
    assert int(again.headers["x-genome-worker-pid"]) != stuck


def test_the_memory_budget_stops_an_idle_model_and_refuses_when_the_room_is_busy(tmp_path: Path, tiny_model: Path) -> None:
    big = make_tiny_llama(tmp_path / "big", hidden_size=128, intermediate_size=256)
    one = declared_weight_bytes(tiny_model, 4)
    processes: list[subprocess.Popen[str]] = []
    server = launch(tmp_path, processes, models_dir=str(models_dir(tmp_path, None, tiny_a=tiny_model, tiny_b=tiny_model, big=big)),
                    inference_model="tiny-a", inference_device="cpu", inference_backend="torch", inference_daemon="embedded",
                    inference_memory_bytes=str(one * 3 // 2), chat_timeout="60")
    try:
        with server.client() as client:
            a, b, on_big = persona_on(client, "tiny-a", "A"), persona_on(client, "tiny-b", "B"), persona_on(client, "big", "G")
        assert chat(server, a).status_code == 200
        assert chat(server, b).status_code == 200
        states = {name: entry["state"] for name, entry in models(server).items()}
        assert states == {"tiny-a": "stopped", "tiny-b": "ready"}  # the idle one made room

        refused(chat(server, on_big), 503, "model_capacity")  # bigger than the whole budget
        busy = int(models(server)["tiny-b"]["pid"])  # type: ignore[arg-type]
        os.kill(busy, signal.SIGSTOP)
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(chat, server, b)
            while models(server)["tiny-b"]["in_flight"] != 1:  # the request reached the stopped worker
                assert not held.done(), held.result().text
            refused(chat(server, a), 503, "model_capacity")
            os.kill(busy, signal.SIGCONT)
            assert held.result(timeout=60).status_code == 200
    finally:
        stop(processes)


def test_serve_with_three_workers_shares_one_copy_of_the_model(tmp_path: Path, default_model: Path) -> None:
    processes: list[subprocess.Popen[str]] = []
    server = launch(tmp_path, processes, models_dir=str(models_dir(tmp_path, default_model)), workers="3",
                    inference_device="cpu", inference_backend="torch", inference_daemon="embedded")
    try:
        with server.client() as client:
            persona = persona_on(client, DEFAULT_MODEL)
        answered: dict[str, str] = {}
        for _ in range(60):  # each request on a new connection: the kernel spreads them over the workers
            response = chat(server, persona, max_tokens=1)
            assert response.status_code == 200, response.text
            answered[response.headers["x-genome-process"]] = response.headers["x-genome-worker-pid"]
            if len(answered) == 3:
                break
        assert len(answered) == 3, f"only {sorted(answered)} answered"
        assert len(set(answered.values())) == 1  # all through the one model worker
        assert server.process is not None
        processes_now = tree(server.process.pid)
        # libtorch is in the model worker and in the daemon's forkserver it was forked from.
        worker = int(next(iter(answered.values())))
        [forkserver] = [pid for pid in processes_now if worker in children(pid)]
        assert "multiprocessing.forkserver" in command_line(forkserver)
        assert {pid for pid in processes_now if maps_libtorch(pid)} == {worker, forkserver}
        api = [int(pid) for pid in answered]
        weights = declared_weight_bytes(default_model, 4)
        # Each API process holds its code and caches, far less than a copy of the weights; the
        # forkserver holds torch's and transformers' modules (~270 MiB here), no model.
        assert all(pss_bytes(pid) < weights // 2 for pid in api), {pid: pss_bytes(pid) for pid in api}
        assert pss_bytes(forkserver) < weights
    finally:
        stop(processes)


def start_daemon(tmp_path: Path, token: str, models_folder: Path, **settings: str) -> tuple[str, subprocess.Popen[str]]:
    """`inference serve` on a free port with GENOME_* `settings` (which say where adapters come from)."""
    port = free_port()
    # Its own data folder: adapters come from where `settings` say, as on another machine.
    env = clean_env(tmp_path / "daemon", GENOME_INFERENCE_TOKEN=token, GENOME_MODELS_DIR=str(models_folder),
                    GENOME_INFERENCE_DEVICE="cpu", GENOME_INFERENCE_BACKEND="torch",
                    **{f"GENOME_{name.upper()}": value for name, value in settings.items()})
    process = subprocess.Popen([*CLI, "inference", "serve", "--port", str(port)], env=env, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    for line in process.stderr:
        if f"Uvicorn running on http://127.0.0.1:{port}" in line:
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return f"http://127.0.0.1:{port}", process
    pytest.fail(f"the daemon exited with {process.wait()}")


def test_an_api_uses_a_daemon_started_apart_with_a_token(tmp_path: Path, tiny_model: Path) -> None:
    token = "a-shared-secret"
    folder = models_dir(tmp_path, None, tiny=tiny_model)
    api_port = free_port()
    url, daemon = start_daemon(tmp_path, token, folder, inference_blobs_url=f"http://127.0.0.1:{api_port}")
    processes: list[subprocess.Popen[str]] = [daemon]
    try:
        ask = {"model": "tiny", "messages": QUESTION, "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            refused(httpx.post(f"{url}/v1/chat/completions", json=ask, headers=headers), 401, "invalid_token")
            refused(httpx.get(f"{url}/health", headers=headers), 401, "invalid_token")
        server = launch(tmp_path, processes, models_dir=str(folder), inference_model="tiny", inference_url=url,
                        inference_token=token, port=api_port)
        refused(httpx.get(f"{server.url}/inference/blobs/{'0' * 64}"), 401, "unauthorized")
        chat_tests.test_bad_chat_requests_get_precise_problems_and_record_nothing(server)
        chat_tests.test_the_official_openai_client_chats_with_a_persona_as_a_model(server)

        # A persona's layer reaches the daemon as its adapter's hash; the daemon reads the blob itself.
        key = server.cli("keys", "create", "--owner", "bob").stdout.strip()  # the OpenAI test made the API keyed
        with server.client(key) as client:
            persona_id = persona_on(client, "tiny", "L")
            genome_id = client.get(f"/personas/{persona_id}").json()["genome_id"]
            files = make_adapter_files("peft", rank=4, spec=tiny_spec(tiny_model, "tiny"))
            metadata = {"name": "layer", "base_model": "tiny", "trait_type": "domain_expertise"}
            layer = client.post("/layers", files=[("files", (n, d)) for n, d in files.items()], data={"metadata": json.dumps(metadata)})
            assert layer.status_code == 201, layer.text
            attached = client.post(f"/genomes/{genome_id}/layers", json={"layer_id": layer.json()["id"], "weight": 1.0})
            assert attached.status_code == 200, attached.text
            answer = client.post(f"/personas/{persona_id}/chat", json={"messages": QUESTION, "max_tokens": 3})
            assert answer.status_code == 200, answer.text
            assert answer.json()["generation"]["stack_hash"] is not None
        health = httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {token}"}).json()
        assert [(m["model"], m["state"]) for m in health["models"]] == [("tiny", "ready")]

        wrong = launch(tmp_path, processes, models_dir=str(folder), inference_model="tiny", inference_url=url,
                       inference_token="not-the-token")
        with wrong.client(key) as client:
            refused(client.post(f"/personas/{persona_id}/chat", json={"messages": QUESTION}), 503, "inference_unavailable")
    finally:
        stop(processes)


def test_the_daemon_refuses_to_listen_off_loopback_without_a_token(tmp_path: Path) -> None:
    done = subprocess.run([*CLI, "inference", "serve", "--host", "0.0.0.0"], env=clean_env(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "GENOME_INFERENCE_TOKEN" in done.stderr



def put_blob(folder: Path, data: bytes, name: str | None = None) -> str:
    """Store `data` as the API's blob store does (`<folder>/<2 hex>/<sha256>`); `name` stores it under another hash."""
    sha256 = name or hashlib.sha256(data).hexdigest()
    (folder / sha256[:2]).mkdir(parents=True, exist_ok=True)
    (folder / sha256[:2] / sha256).write_bytes(data)
    return sha256


def put_adapter(folder: Path, files: dict[str, bytes]) -> str:
    manifest = {"format": "peft", "files": {name: put_blob(folder, data) for name, data in sorted(files.items())}}
    return put_blob(folder, json.dumps(manifest).encode())


def test_the_daemons_own_api_refuses_bad_requests_precisely_applies_scales_and_keeps_its_worker(tmp_path: Path, tiny_model: Path) -> None:
    blobs = tmp_path / "blobs"
    adapter = put_adapter(blobs, make_adapter_files("peft", rank=4, spec=tiny_spec(tiny_model, "tiny")))  # its scale is 2.0
    not_a_manifest = put_blob(blobs, b"\x00\x01 weights, not a manifest")
    rotten = put_adapter(blobs, {"adapter_config.json": b"{}"})
    manifest = json.loads((blobs / rotten[:2] / rotten).read_bytes())
    put_blob(blobs, b"other bytes", name=manifest["files"]["adapter_config.json"])  # a blob whose bytes lost their hash
    url, daemon = start_daemon(tmp_path, "t", models_dir(tmp_path, None, tiny=tiny_model), blob_dir=str(blobs),
                               inference_max_crashes="1")
    try:
        with httpx.Client(base_url=url, headers={"Authorization": "Bearer t"}, timeout=60) as client:
            def ask(stack: list[dict[str, object]] | None = None, **body: object) -> httpx.Response:
                return client.post("/v1/chat/completions", json={"model": "tiny", "messages": QUESTION, "max_tokens": 6,
                                                                 "temperature": 0, "genome_ignore_eos": True,
                                                                 "genome_stack": stack or [], **body})

            def text(stack: list[dict[str, object]] | None = None) -> str:
                answer = ask(stack)
                assert answer.status_code == 200, answer.text
                return answer.json()["choices"][0]["message"]["content"]

            # The fixture's factors are small (std 0.02): a gain w x s of 2000 moves the greedy answer.
            base, strong = text(), text([{"adapter_sha256": adapter, "scale": 2000.0}])
            assert strong != base
            assert text([{"adapter_sha256": adapter, "weight": 0.5, "scale": 4000.0}]) == strong  # the gain is w x s
            assert text([{"adapter_sha256": adapter, "weight": 1000.0}]) == strong  # no scale: the adapter's own, 2.0
            assert text([{"adapter_sha256": adapter, "scale": 1e-7}]) == base  # scaled to nothing

            bad = {
                (400, "malformed_json"): client.post("/v1/chat/completions", content=b'{"model": "tiny", "messages": [',
                                                      headers={"Content-Type": "application/json"}),
                (422, "invalid_request"): ask(messages="hello"),
                (422, "invalid_request", "empty"): ask(messages=[]),
                (422, "invalid_request", "scale"): ask([{"adapter_sha256": adapter, "scale": 0}]),
                (422, "invalid_request", "field"): ask([{"adapter_sha256": adapter, "gain": 2}]),
                (413, "payload_too_large"): ask(messages=[{"role": "user", "content": "x" * (5 * 1024 * 1024)}]),
                (404, "model_not_found"): ask(model="no-such-model"),
                (422, "invalid_adapter_hash"): ask([{"adapter_sha256": "../../etc/passwd"}]),
                (404, "adapter_not_found"): ask([{"adapter_sha256": "0" * 64}]),
                (404, "adapter_not_found", "rotten"): ask([{"adapter_sha256": rotten}]),
                (422, "invalid_adapter"): ask([{"adapter_sha256": not_a_manifest}]),
                (422, "invalid_stack"): ask([{"adapter_sha256": adapter}, {"adapter_sha256": adapter, "weight": 0.5}]),
                (422, "sampling_out_of_range"): ask(temperature=-1),
            }
            for (status, rule, *_), response in bad.items():
                refused(response, status, rule)
            [tiny] = client.get("/health").json()["models"]
            assert (tiny["state"], tiny["restarts"], tiny["crashes_in_a_row"]) == ("ready", 0, 0)  # bad input crashed nothing

            os.kill(tiny["pid"], signal.SIGKILL)  # one crash in a row is all this daemon allows
            while (health := client.get("/health").json())["status"] != "degraded":
                assert health["models"][0]["state"] in ("ready", "stopped"), health  # no restart: it is unhealthy
            assert health["models"][0]["state"] == "unhealthy"
            refused(ask(), 503, "model_unhealthy")
            assert 'genome_daemon_model_unhealthy{model="tiny"} 1' in client.get("/metrics").text
    finally:
        stop([daemon])
