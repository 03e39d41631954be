"""On-demand challenges and judging generate with the server's one chat engine: the base model
loads once per process, whichever of chat and academy asks first."""

from __future__ import annotations

from pathlib import Path

from litestar.testing import TestClient

from genome_service.api.app import create_app
from genome_service.services.bootstrap import build
from genome_service.settings import Settings
from rag.embedder import SentenceTransformerEmbedder

MODEL = "tiny-llama"


def test_challenges_answers_and_chat_share_one_engine_and_one_model_load(
    sqlite_url: str, tmp_path: Path, tiny_model: Path, embedder: SentenceTransformerEmbedder
) -> None:
    settings = Settings(data_dir=tmp_path, database_url=sqlite_url, inference_model=MODEL, inference_backend="torch",
                        inference_device="cpu", academy_worker="off", rate_limit_per_minute=0)
    services = build(settings, embedder=embedder)
    services.models.register_local(MODEL, tiny_model)
    app = create_app(services)
    # The engine the academy controller was bound to, and the chat runtime under it.
    challenges = app.route_handler_method_map["/academy/sessions/{session_id:str}/challenges"]["POST"]
    runtime = challenges.fn.__self__.engine.runtime

    with TestClient(app) as client:
        persona = client.post("/personas/", json={"name": "Ada", "system_prompt": "You are calm.", "base_model": MODEL}).json()["id"]
        session = client.post("/academy/sessions/", json={"persona_id": persona, "goal": "Sound calm."}).json()["id"]
        assert runtime.engine is None  # nothing has generated yet

        made = client.post(f"/academy/sessions/{session}/challenges", json={"trait_type": "tone_and_voice"})
        assert made.status_code == 201, made.text
        # The academy's request loaded the chat engine's model and ran on its queue.
        engine = runtime.engine
        assert engine is not None and engine.backend.loads == 1
        assert engine.metrics.registry.get_sample_value("genome_inference_completion_tokens_total") > 0
        scored = client.post(f"/academy/sessions/{session}/challenges/{made.json()['id']}/responses",
                             json={"response": "Breathe. All is well."})
        assert scored.status_code == 201, scored.text
        chat = client.post(f"/personas/{persona}/chat", json={"messages": [{"role": "user", "content": "Hi"}],
                                                              "max_tokens": 4})
        assert chat.status_code == 200, chat.text

        assert runtime.engine is engine and engine.backend.loads == 1
    services.close()
