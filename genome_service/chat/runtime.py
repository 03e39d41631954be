"""The process's one inference engine for chat, opened on the first turn and closed with the app.

Loading a model takes seconds and memory that most processes (CLI commands, a server
that only serves CRUD) never need, so nothing loads until someone chats. The engine
then owns the model for the life of the process; the app's shutdown closes it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec

from genome_service.services.bootstrap import Services
from genome_service.services.stacks import StackResolver
from inference.backends.base import ChatMessage
from inference.engine import Engine, EngineStats
from inference.models import ModelCatalog, ModelNotPulled, UnknownModel

# Without a local tokenizer (the openai backend) tokens are estimated; three characters a
# token over-counts English for Llama-family vocabularies, so the budget errs on the safe side.
CHARS_PER_TOKEN = 3
# The context assumed for a remote model whose config is not on this machine.
REMOTE_CONTEXT = 4096


class ChatUnavailable(RuntimeError):
    """No model can be loaded (not pulled, unknown, or the backend failed to start)."""

    status = 503
    rule = "model_unavailable"


class PersonaFigures(msgspec.Struct, frozen=True):
    persona_id: str
    requests: int
    completion_tokens: int
    errors: int
    mean_queue_wait_ms: float


class InferenceStats(msgspec.Struct, frozen=True, kw_only=True):
    loaded: bool  # the model loads on the first chat
    engine: EngineStats | None
    personas: list[PersonaFigures]


class Loaded(msgspec.Struct, frozen=True):
    engine: Engine
    resolver: StackResolver
    model: str
    context: int  # tokens: prompt + completion
    count_prompt: Callable[[Sequence[ChatMessage]], int]
    count_text: Callable[[str], int]


def persona_label(owner: str, persona_id: str) -> str:
    """How a persona's requests are labelled in the engine's figures (its owner first)."""
    return f"{owner}/{persona_id}"


class ChatRuntime:
    def __init__(self, services: Services) -> None:
        self.services = services
        self._loaded: Loaded | None = None
        self._lock = asyncio.Lock()

    @property
    def engine(self) -> Engine | None:
        return self._loaded.engine if self._loaded is not None else None

    async def ready(self) -> Loaded:
        if self._loaded is None:
            async with self._lock:
                if self._loaded is None:
                    loaded = await asyncio.to_thread(self._load)
                    loaded.engine.start()
                    self._loaded = loaded
        return self._loaded

    def stats(self, owner: str) -> InferenceStats:
        """The engine's figures (none before the first chat loads it), per persona only for `owner`'s."""
        engine = self.engine
        if engine is None:
            return InferenceStats(loaded=False, engine=None, personas=[])
        mine = f"{owner}/"
        personas = [
            PersonaFigures(entry.label[len(mine):], entry.requests, entry.completion_tokens, entry.errors, entry.mean_queue_wait_ms)
            for entry in engine.label_stats() if entry.label.startswith(mine)
        ]  # fmt: skip
        return InferenceStats(loaded=True, engine=engine.stats(), personas=personas)

    async def close(self) -> None:
        loaded, self._loaded = self._loaded, None
        if loaded is not None:
            await loaded.engine.close()

    def _load(self) -> Loaded:
        from genome_service.services.backend import open_configured_backend

        settings = self.services.settings
        catalog = ModelCatalog(settings.resolved_models_dir)
        try:
            spec = catalog.get(settings.inference_model)
            backend, folder = open_configured_backend(settings, catalog)
        except (UnknownModel, ModelNotPulled) as error:
            raise ChatUnavailable(str(error)) from None
        engine = Engine(
            backend, max_queue=settings.inference_queue_size, timeout=settings.chat_timeout,
            max_batch=settings.inference_max_batch, max_batch_tokens=settings.inference_max_batch_tokens,
            prefill_chunk=settings.inference_prefill_chunk,
            # torch and mlx batch here; a remote server batches concurrent requests itself.
            concurrency=settings.openai_concurrency,
        )  # fmt: skip
        count_prompt, count_text, context = _counters(folder)
        return Loaded(engine, StackResolver(self.services, spec), settings.inference_model,
                      settings.chat_context_tokens or context, count_prompt, count_text)


def _counters(folder: Path | None) -> tuple[Callable[[Sequence[ChatMessage]], int], Callable[[str], int], int]:
    """Exact counts with the model's own tokenizer and chat template where the model is local."""
    if folder is None:
        def estimate(messages: Sequence[ChatMessage]) -> int:
            return sum(len(m.content) // CHARS_PER_TOKEN + 8 for m in messages) + 8

        return estimate, lambda text: len(text) // CHARS_PER_TOKEN + 1, REMOTE_CONTEXT
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))

    def count_prompt(messages: Sequence[ChatMessage]) -> int:
        chat = [{"role": m.role, "content": m.content} for m in messages]
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        return len(tokenizer.encode(text, add_special_tokens=False))

    def count_text(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    return count_prompt, count_text, int(config.get("max_position_embeddings") or REMOTE_CONTEXT)
