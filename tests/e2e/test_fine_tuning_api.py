"""The Academy over OpenAI's fine-tuning API and its knowledge distillation, against the real server
on the tiny model: the official `openai` client uploads a file, runs a job to `succeeded`, reads its
events and checkpoints, chats with its fine-tuned model and cancels a second job; bad files are
refused with the line and the rule; a persona's knowledge becomes a layer that is attached only if
it improved the persona, is never public, and is erased with the persona."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from servers import Server, launch, stop
from test_academy_api import WORKER, persona_on_tiny_model, sse_events

MODEL = "tiny-llama"
MAX_FILE_BYTES = 20_000
FACTS = ("The capital of Zorbania is Quillfort. The Mirelan river flows 412 kilometres. "
         "The painter Ilva Done was born in Tesk.")


def chat_line(number: int) -> dict:
    return {"messages": [{"role": "system", "content": "You answer in one word."},
                         {"role": "user", "content": f"Say the word number {number}."},
                         {"role": "assistant", "content": f"Word{number}."}]}


def jsonl(lines: list) -> bytes:
    return "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Server]:
    processes: list[subprocess.Popen[str]] = []
    started = launch(tmp_path_factory.mktemp("fine-tuning"), processes, None, **WORKER,
                     files_max_bytes=str(MAX_FILE_BYTES))
    assert started.cli("model", "register", MODEL, str(tiny_model)).returncode == 0
    yield started
    stop(processes)


@pytest.fixture(scope="module")
def key(server: Server) -> str:
    return server.cli("keys", "create", "--owner", "alice").stdout.strip()


@pytest.fixture(scope="module")
def ai(server: Server, key: str):  # type: ignore[no-untyped-def]
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def test_bad_files_are_refused_with_the_line_and_the_rule_and_nothing_is_stored(server: Server, key: str, ai) -> None:  # type: ignore[no-untyped-def]
    import openai

    good = chat_line(1)
    long = {"messages": [{"role": "user", "content": "word " * 2500}, {"role": "assistant", "content": "ok"}]}
    cases = [
        (jsonl([good, "{not json"]), 422, "line_not_json", 2),
        (jsonl([good, good, {"messages": [{"content": "Hi"}, {"role": "assistant", "content": "Yo"}]}]), 422, "role_missing", 3),
        (jsonl([{"messages": [{"role": "wizard", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}]), 422,
         "role_unknown", 1),
        (jsonl([good, {"messages": [{"role": "user", "content": "Hi"}]}]), 422, "no_assistant_turn", 2),
        (b"", 422, "file_empty", 0),
        (jsonl([good] * 200), 413, "file_too_large", 0),
        (jsonl([good, long]), 422, "line_too_long", 2),
    ]
    for data, status, rule, line in cases:
        with pytest.raises(openai.APIStatusError) as refused:
            ai.files.create(file=("data.jsonl", data), purpose="fine-tune")
        problem = refused.value.response.json()
        assert (refused.value.status_code, problem["rule"], problem["line"]) == (status, rule, line), problem
        assert refused.value.response.headers["content-type"].startswith("application/problem+json")
    unknown = server.client(key).post("/v1/files", files={"file": ("d.jsonl", jsonl([good]))}, data={"purpose": "batch"})
    # The schema names the one purpose: anything else fails validation before the file is read.
    assert unknown.status_code == 400 and "purpose" in unknown.text
    assert ai.files.list().data == []


def test_the_openai_client_runs_a_job_reads_its_events_and_checkpoints_and_chats_with_its_model(
    server: Server, key: str, ai  # type: ignore[no-untyped-def]
) -> None:
    uploaded = ai.files.create(file=("chats.jsonl", jsonl([chat_line(n) for n in range(8)])), purpose="fine-tune")
    assert (uploaded.object, uploaded.purpose, uploaded.filename) == ("file", "fine-tune", "chats.jsonl")
    assert ai.files.retrieve(uploaded.id).bytes == uploaded.bytes

    job = ai.fine_tuning.jobs.create(model=MODEL, training_file=uploaded.id, suffix="words", seed=3,
                                     hyperparameters={"n_epochs": 5, "batch_size": 4})
    assert job.status == "queued" and job.fine_tuned_model is None and job.trained_tokens is None
    # The job is an academy session: its live event stream ends when the job does.
    sse_events(server.client(key), f"/academy/sessions/{job.id}/events")
    done = ai.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:{MODEL}:words:{done.layer_id}"  # type: ignore[attr-defined]
    assert done.hyperparameters.n_epochs == 5 and done.seed == 3 and done.finished_at is not None
    # The answer tokens trained on, as the layer's metrics record them: 9 steps of 4 rows (see
    # below), each answer ("WordN." and the end of its turn) 7 tokens on SmolLM2's tokenizer;
    # prompts (~30 tokens a row) do not count.
    with server.client(key) as client:
        layer = client.get(f"/layers/{done.layer_id}").json()  # type: ignore[attr-defined]
    assert done.trained_tokens == layer["training_metrics"]["tokens"]
    assert 9 * 4 * 3 <= done.trained_tokens <= 9 * 4 * 10
    assert [j.id for j in ai.fine_tuning.jobs.list().data] == [job.id]

    events = ai.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert (events[0].message, events[-1].message) == ("Job succeeded", "Job running")
    metrics = [e.data for e in events if e.type == "metrics" and "valid_loss" in e.data]
    assert {m["phase"] for m in metrics} == {"before", "checkpoint", "after"}
    before = next(m for m in metrics if m["phase"] == "before")
    after = next(m for m in metrics if m["phase"] == "after")
    # One example in five is held out (no validation file): 7 trained, 5 epochs of batches of 4 = 9 steps.
    assert after["step"] == 9 and after["valid_loss"] < before["valid_loss"]
    checkpoints = ai.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [9, 5]
    assert {"train_loss", "valid_loss", "valid_mean_token_accuracy"} <= set(checkpoints[0].metrics.model_dump(exclude_none=True))

    assert done.fine_tuned_model in [m.id for m in ai.models.list().data]
    reply = ai.chat.completions.create(model=done.fine_tuned_model, max_tokens=4,
                                       messages=[{"role": "system", "content": "You answer in one word."},
                                                 {"role": "user", "content": "Say the word number 2."}])
    assert reply.model == done.fine_tuned_model and reply.choices[0].message.content is not None
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 4
    with pytest.raises(Exception) as unknown:
        ai.chat.completions.create(model=f"ft:{MODEL}:words:nope", messages=[{"role": "user", "content": "Hi"}])
    assert getattr(unknown.value, "status_code", None) == 404

    ai.files.delete(uploaded.id)
    assert ai.files.list().data == [] and ai.fine_tuning.jobs.retrieve(job.id).status == "succeeded"


def test_a_running_job_is_cancelled(server: Server, key: str, ai) -> None:  # type: ignore[no-untyped-def]
    uploaded = ai.files.create(file=("more.jsonl", jsonl([chat_line(n) for n in range(8)])), purpose="fine-tune")
    job = ai.fine_tuning.jobs.create(model=MODEL, training_file=uploaded.id, hyperparameters={"n_epochs": 100})
    client = server.client(key)
    with client.stream("GET", f"/academy/sessions/{job.id}/events", headers={"Accept": "text/event-stream"},
                       timeout=300) as stream:
        for line in stream.iter_lines():  # live: wait for the first checkpointed training step
            if line == "event: TrainingProgressed":
                break
        assert ai.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    assert ai.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    refused = client.post(f"/v1/fine_tuning/jobs/{job.id}/cancel")
    assert refused.status_code == 409 and refused.json()["rule"] == "session_finished"


def test_knowledge_becomes_a_layer_attached_if_improved_never_public_and_erased_with_its_persona(
    server: Server, key: str
) -> None:
    client = server.client(key)
    persona = persona_on_tiny_model(client)
    assert client.post(f"/personas/{persona}/knowledge/", json={"text": FACTS, "title": "facts"}).status_code == 201

    def session(**extra: object) -> tuple[list[tuple[str, dict]], dict]:
        body = {"persona_id": persona, "goal": "Know the facts.", "sources": ["knowledge"], "seed": 1, **extra}
        created = client.post("/academy/sessions/", json=body)
        assert created.status_code == 201, created.text
        streamed = sse_events(client, f"/academy/sessions/{created.json()['id']}/events")
        return streamed, client.get(f"/academy/sessions/{created.json()['id']}").json()

    # A budget of one step with a tiny learning rate teaches nothing: the layer stays unattached.
    streamed, final = session(budget_steps=1, hyperparameters={"learning_rate_multiplier": 0.0001})
    assert final["status"] == "completed", final["reason"]
    [decided] = [data["data"] for name, data in streamed if name == "AttachDecided"]
    assert not decided["attached"] and decided["reason"].startswith("not attached: the task score went from 0.000 to 0.000")
    genome_id = client.get(f"/personas/{persona}").json()["genome_id"]
    assert client.get(f"/genomes/{genome_id}").json()["layers"] == []

    streamed, final = session(budget_steps=60, hyperparameters={"learning_rate_multiplier": 2.0})
    assert final["status"] == "completed", final["reason"]
    evaluations = [data["data"] for name, data in streamed if name == "Evaluated"]
    before, after = evaluations[0], evaluations[-1]
    assert (before["phase"], before["step"], after["phase"], after["step"]) == ("before", 0, "after", 60)
    assert after["valid_loss"] < before["valid_loss"]
    assert before["task_score"] == 0.0 and after["task_score"] > before["task_score"]
    [decided] = [data["data"] for name, data in streamed if name == "AttachDecided"]
    assert decided["attached"], decided["reason"]
    layer_id = decided["layer_id"]
    assert [ref["layer_id"] for ref in client.get(f"/genomes/{genome_id}").json()["layers"]] == [layer_id]

    layer = client.get(f"/layers/{layer_id}").json()
    assert layer["personal_of"] == persona and not layer["public"]
    refused = client.patch(f"/layers/{layer_id}", json={"public": True})
    assert refused.status_code == 409 and refused.json()["rule"] == "public_not_allowed"
    weights = client.get(f"/layers/{layer_id}/adapter", params={"file": "weights"}).content
    assert len(weights) > 1000

    assert client.delete(f"/personas/{persona}", params={"erase": "true"}).status_code == 204
    erased = client.get(f"/layers/{layer_id}")
    assert erased.status_code == 200 and erased.json()["erased"] and erased.json()["deprecated"]
    assert client.get(f"/layers/{layer_id}/adapter", params={"file": "weights"}).status_code == 404
    # No byte of the weights is left anywhere under the data folder (blobs, database, WAL).
    window = weights[len(weights) // 2: len(weights) // 2 + 64]
    data_dir = Path(server.env["GENOME_DATA_DIR"])
    assert not [p for p in data_dir.rglob("*") if p.is_file() and window in p.read_bytes()]
    assert httpx.get(f"{server.url}/health").status_code == 200
