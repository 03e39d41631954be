"""The process's inference for chat: an engine per base model, opened on first use, closed with the app.

Two ways to reach a model, one interface (`Loaded`):

- **through the inference daemon** (`GENOME_INFERENCE_URL`, set by `serve` for its embedded
  daemon): every base model, each in the daemon's worker process for it; this process loads
  no model and sends stacks as adapter references;
- **in process** (no daemon): the one model `GENOME_INFERENCE_MODEL`, loaded on the first chat
  into this process's own engine (the CLI, tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec

from genome_service.services.bootstrap import Services
from genome_service.services.genomes import Genomes
from genome_service.services.stacks import StackResolver
from inference.backends.base import ChatMessage
from inference.daemon.client import DaemonClient, DaemonEngine, DaemonRefused
from inference.engine import Engine, EngineStats, LabelStats
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


class ModelFigures(msgspec.Struct, frozen=True, kw_only=True):
    """One base model in the inference daemon: its worker and its engine's figures."""

    model: str
    state: str  # stopped, starting, ready, backoff (restarting after a crash), unhealthy
    pid: int | None
    declared_bytes: int
    in_flight: int
    restarts: int
    engine: EngineStats | None


class InferenceStats(msgspec.Struct, frozen=True, kw_only=True):
    loaded: bool  # the model loads on the first chat
    engine: EngineStats | None  # the default model's
    personas: list[PersonaFigures]
    daemon: str | None = None  # the inference daemon's URL, when chat goes through one
    models: list[ModelFigures] = []  # with a daemon: every model it knows of


class Loaded(msgspec.Struct, frozen=True):
    engine: Engine | DaemonEngine
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
        settings = services.settings
        self.daemon = DaemonClient(settings.inference_url, settings.inference_token) if settings.inference_url else None
        self._loaded: dict[str, Loaded] = {}
        self._lock = asyncio.Lock()

    @property
    def engine(self) -> Engine | None:
        """This process's own engine, once loaded (None through a daemon)."""
        loaded = self._loaded.get(self.services.settings.inference_model)
        return loaded.engine if loaded is not None and isinstance(loaded.engine, Engine) else None

    def model_of(self, persona_id: str) -> str:
        """The base model a persona's genome runs on (the default model for a persona without one)."""
        genome = Genomes(self.services).of_persona(persona_id)
        return genome.base_model if genome is not None else self.services.settings.inference_model

    async def ready(self, model: str | None = None) -> Loaded:
        model = model or self.services.settings.inference_model
        if model not in self._loaded:
            async with self._lock:
                if model not in self._loaded:
                    loaded = await asyncio.to_thread(self._load, model)
                    if isinstance(loaded.engine, Engine):
                        loaded.engine.start()
                    self._loaded[model] = loaded
        return self._loaded[model]

    async def stats(self, owner: str) -> InferenceStats:
        """The engines' figures (none before the first chat loads one), per persona only for `owner`'s."""
        if self.daemon is not None:
            return await self._daemon_stats(owner)
        engine = self.engine
        if engine is None:
            return InferenceStats(loaded=False, engine=None, personas=[])
        return InferenceStats(loaded=True, engine=engine.stats(), personas=_personas(owner, engine.label_stats()))

    async def _daemon_stats(self, owner: str) -> InferenceStats:
        assert self.daemon is not None
        reply = await self.daemon.get("/v1/genome/stats")
        models, labels = [], []
        for entry in reply["models"]:
            status = entry["status"]
            engine = msgspec.convert(entry["engine"], EngineStats) if entry["engine"] is not None else None
            models.append(ModelFigures(model=status["model"], state=status["state"], pid=status["pid"],
                                       declared_bytes=status["declared_bytes"], in_flight=status["in_flight"],
                                       restarts=status["restarts"], engine=engine))
            labels += msgspec.convert(entry["labels"], list[LabelStats])
        default = next((m for m in models if m.model == self.services.settings.inference_model), None)
        engine = default.engine if default is not None else None
        return InferenceStats(loaded=engine is not None, engine=engine, personas=_personas(owner, labels),
                              daemon=self.daemon.base_url, models=models)

    async def daemon_metrics(self) -> bytes:
        """The inference daemon's metrics (its models' engines, labelled by model), or a comment saying why not."""
        assert self.daemon is not None
        try:
            return await self.daemon.text("/metrics")
        except DaemonRefused as error:
            return f"# the inference daemon's metrics are unavailable: {error}\n".encode()

    async def close(self) -> None:
        loaded, self._loaded = self._loaded, {}
        for entry in loaded.values():
            if isinstance(entry.engine, Engine):
                await entry.engine.close()
        if self.daemon is not None:
            await self.daemon.close()

    def _load(self, model: str) -> Loaded:
        settings = self.services.settings
        catalog = ModelCatalog(settings.resolved_models_dir)
        try:
            spec = catalog.get(model)
        except UnknownModel as error:
            raise ChatUnavailable(str(error)) from None
        if self.daemon is not None:
            try:
                folder: Path | None = catalog.folder(model)
            except (UnknownModel, ModelNotPulled):
                folder = None  # the daemon's machine has it; count tokens by estimate here
            engine: Engine | DaemonEngine = self.daemon.engine(model, timeout=settings.chat_timeout)
            resolver = StackResolver(self.services, spec, by_reference=True)
        else:
            if model != settings.inference_model:
                raise ChatUnavailable(
                    f"this process runs {settings.inference_model!r} in-process and no other model; {model!r} is served "
                    "through the inference daemon (`genome-service serve` starts one, or set GENOME_INFERENCE_URL)"
                )
            engine, folder = self._engine(catalog)
            resolver = StackResolver(self.services, spec)
        count_prompt, count_text, context = _counters(folder)
        return Loaded(engine, resolver, model, settings.chat_context_tokens or context, count_prompt, count_text)

    def _engine(self, catalog: ModelCatalog) -> tuple[Engine, Path | None]:
        from genome_service.services.backend import open_configured_backend

        settings = self.services.settings
        try:
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
        return engine, folder


def _personas(owner: str, labels: Sequence[LabelStats]) -> list[PersonaFigures]:
    mine = f"{owner}/"
    return [
        PersonaFigures(entry.label[len(mine):], entry.requests, entry.completion_tokens, entry.errors, entry.mean_queue_wait_ms)
        for entry in labels if entry.label.startswith(mine)
    ]  # fmt: skip


def _counters(folder: Path | None) -> tuple[Callable[[Sequence[ChatMessage]], int], Callable[[str], int], int]:
    """Exact counts with the model's own tokenizer and chat template where the model is local."""
    if folder is None:
        def estimate(messages: Sequence[ChatMessage]) -> int:
            return sum(len(m.content) // CHARS_PER_TOKEN + 8 for m in messages) + 8

        return estimate, lambda text: len(text) // CHARS_PER_TOKEN + 1, REMOTE_CONTEXT
    from inference.tokens import ChatTokenizer

    tokenizer = ChatTokenizer(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return tokenizer.count_prompt, tokenizer.count_text, int(config.get("max_position_embeddings") or REMOTE_CONTEXT)
