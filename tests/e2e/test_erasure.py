"""Erasure over HTTP on the real server (tiny model), on SQLite and PostgreSQL: no plaintext before or after.

Knowledge and messages are stored sealed, so their text is in no byte of the
SQLite file (nor its -wal and -shm) and in no PostgreSQL row even before the
erasure; after it the persona's key is gone, and the persona, its knowledge and
its conversations answer 404 or 410 while another persona's stay readable.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from servers import Server
from test_personas_and_genomes_api import PROBLEM

from inference.models import ModelCatalog

KNOWN = "The vault under Zephyrine opens with the word KNOWMARK-5521-AMBERGRIS."
UPLOADED = "Diary: on Tuesday I buried the key near DOCMARK-8830-LIMEWOOD."
ASKED = "Remember that my locker is ASKMARK-1902-TAMARIND, and tell me about the vault."
KEPT = "Sourdough rises overnight because wild yeast ferments the dough."


def tiny(start_server: Callable[..., Server], tiny_model: Path, tmp_path: Path, database_url: str | None) -> Server:
    ModelCatalog(tmp_path / "models").register_local("tiny", tiny_model)
    return start_server(database_url, models_dir=str(tmp_path / "models"), inference_model="tiny",
                        inference_device="cpu", inference_backend="torch")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str | None:
    """None: the server's embedded SQLite file; else the PostgreSQL URL of a fresh schema."""
    return None if request.param == "sqlite" else request.getfixturevalue("postgres_url")


def stored_text(tmp_path: Path, database_url: str | None) -> bytes:
    """Everything the database holds: the SQLite files' raw bytes, or every PostgreSQL row as text."""
    if database_url is None:
        data = tmp_path / "data"
        return b"".join(path.read_bytes() for path in sorted(data.glob("genome.db*")))
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as connection:
            tables = sa.inspect(connection).get_table_names()
            rows = [str(tuple(row)) for table in tables for row in connection.exec_driver_sql(f"SELECT * FROM {table}")]
    finally:
        engine.dispose()
    return "\n".join(rows).encode()


def person(client: httpx.Client, name: str, text: str) -> str:
    persona = client.post("/personas/", json={"name": name, "system_prompt": f"You are {name}."})
    assert persona.status_code == 201, persona.text
    persona_id = persona.json()["id"]
    added = client.post(f"/personas/{persona_id}/knowledge", json={"title": f"{name}'s notes", "text": text})
    assert added.status_code == 201, added.text
    return persona_id


def chat(client: httpx.Client, persona_id: str, text: str) -> dict[str, object]:
    answer = client.post(f"/personas/{persona_id}/chat", json={
        "messages": [{"role": "user", "content": text}], "max_tokens": 12, "context_k": 1})
    assert answer.status_code == 200, answer.text
    return answer.json()


def gone(response: httpx.Response, *statuses: int) -> None:
    assert response.status_code in statuses, response.text
    assert response.headers["content-type"] == PROBLEM


def test_an_erased_persona_leaves_no_plaintext_and_answers_gone(
    start_server: Callable[..., Server], tiny_model: Path, tmp_path: Path, backend: str | None,
) -> None:
    server = tiny(start_server, tiny_model, tmp_path, backend)
    with server.client() as client:
        client.timeout = httpx.Timeout(120)
        persona_id = person(client, "Vera", KNOWN)
        uploaded = client.post(f"/personas/{persona_id}/knowledge/documents",
                               files={"diary.md": ("diary.md", UPLOADED.encode(), "text/markdown")})
        assert uploaded.status_code == 201, uploaded.text
        answer = chat(client, persona_id, ASKED)
        conversation_id, reply = answer["conversation_id"], answer["message"]["content"]  # type: ignore[index]
        assert answer["generation"]["citations"]  # type: ignore[index]
        kept_id = person(client, "Kit", KEPT)
        kept = chat(client, kept_id, "Why does sourdough rise?")

        secrets = [s.encode() for s in ("KNOWMARK-5521", "DOCMARK-8830", "ASKMARK-1902")]
        if len(reply.strip()) >= 8:  # type: ignore[union-attr]
            secrets.append(reply.encode())  # type: ignore[union-attr]
        assert client.get(f"/conversations/{conversation_id}").json()["messages"][0]["content"] == ASKED
        before = stored_text(tmp_path, backend)
        assert [s for s in secrets if s in before] == []  # sealed from the start

        refused = client.delete(f"/personas/{persona_id}", params={"erase": "maybe"})
        assert refused.status_code == 400 and "erase" in refused.text, refused.text
        assert client.get(f"/personas/{persona_id}").status_code == 200
        gone(client.delete("/personas/0000nobody", params={"erase": "true"}), 404)

        assert client.delete(f"/personas/{persona_id}", params={"erase": "true"}).status_code == 204
        again = client.delete(f"/personas/{persona_id}", params={"erase": "true"})
        gone(again, 410)
        assert again.json()["rule"] == "persona_erased"

        after = stored_text(tmp_path, backend)
        assert [s for s in secrets if s in after] == []
        gone(client.get(f"/personas/{persona_id}"), 410)
        gone(client.get(f"/personas/{persona_id}/knowledge"), 410)
        gone(client.get(f"/personas/{persona_id}/knowledge/search", params={"q": "vault"}), 410)
        gone(client.get(f"/personas/{persona_id}/conversations"), 410)
        gone(client.get(f"/conversations/{conversation_id}"), 404, 410)
        gone(client.post(f"/personas/{persona_id}/chat", json={"messages": [{"role": "user", "content": "hi"}]}), 410)

        for command in (("projections", "rebuild"), ("index", "rebuild")):
            done = server.cli("--quiet", *command)
            assert done.returncode == 0, done.stderr
        assert [s for s in secrets if s in stored_text(tmp_path, backend)] == []
        gone(client.get(f"/conversations/{conversation_id}"), 404, 410)
        # The other persona is untouched.
        detail = client.get(f"/conversations/{kept['conversation_id']}").json()
        assert [m["content"] for m in detail["messages"]] == ["Why does sourdough rise?", kept["message"]["content"]]  # type: ignore[index]
        found = client.get(f"/personas/{kept_id}/knowledge/search", params={"q": "why does sourdough rise", "k": 1}).json()
        assert [p["text"] for p in found] == [KEPT]
        assert [d["title"] for d in client.get(f"/personas/{kept_id}/knowledge").json()["items"]] == ["Kit's notes"]
