"""The Litestar app factory: the one place the HTTP app is assembled."""

from __future__ import annotations

import logging
import os
from typing import Any

from litestar import Controller, Litestar, Request
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.middleware.rate_limit import RateLimitConfig, get_remote_address
from litestar.datastructures import ResponseHeader
from litestar.openapi import OpenAPIConfig

from genome_service.academy.shared_engine import SharedEngine
from genome_service.academy.worker import embedded_worker
from genome_service.api import academy, chat, fine_tuning, genomes, inference, layers, openai_compat, personas, recipes, search
from genome_service.api.auth import PUBLIC_PATHS, ApiKeyAuthentication, is_loopback, presented_key
from genome_service.api.console import console_routes, offline_swagger
from genome_service.api.conventions import bound, dependencies
from genome_service.api.documented_limits import document_limits
from genome_service.api.errors import EXCEPTION_HANDLERS, problem_details_plugin
from genome_service.api.health import HealthController
from genome_service.api.mcp_mount import mcp_mount
from genome_service.api.metrics import RequestMetrics
from genome_service.api.openapi import document_conventions
from genome_service.chat.runtime import ChatRuntime
from genome_service.mcp.server import Features, features_of
from genome_service.recipes.service import RecipeRuns, Recipes
from genome_service.services.bootstrap import Services, build
from genome_service.services.fine_tuning import FineTuning
from genome_service.services.training_files import TrainingFiles
from genome_service.settings import Settings

PROCESS_HEADER = "X-Genome-Process"

log = logging.getLogger("genome_service")
REQUEST_TYPES = (
    personas.PersonaCreate, personas.PersonaUpdate, personas.GenomeAssignment,
    genomes.GenomeCreate, genomes.GenomeUpdate, genomes.LayerWeight, genomes.LayerAttachment,
    genomes.LayerStack, genomes.GenomeFork, layers.LayerUpdate, search.LayerSearch, search.KnowledgeCreate,
    chat.ChatCreate, chat.ChatMessageIn, openai_compat.CompletionCreate, openai_compat.StreamOptions,
    academy.SessionCreate, academy.HyperparametersBody, academy.ChallengeCreate, academy.ResponseCreate,
    fine_tuning.JobCreate, fine_tuning.HyperparametersIn, fine_tuning.MethodIn, fine_tuning.SupervisedIn,
    recipes.RecipeCreate, recipes.RecipeRevision, recipes.RunCreate,
)


def _rate_limit_identity(request: Request[Any, Any, Any]) -> str:
    return presented_key(request) or get_remote_address(request)


def create_app(services: Services) -> Litestar:
    settings = services.settings

    # The process's one inference engine: loaded on the first chat, closed on shutdown.
    runtime = ChatRuntime(services)

    def provide_services() -> Services:
        return services

    def catch_up() -> None:
        # Events appended by a process that did not project inline (a crash, a bulk import).
        applied = services.projector.catch_up()
        if applied:
            log.info("read models caught up on %d events", applied)
        if not services.keys.any_active():
            if is_loopback(settings.host):
                log.warning("no API keys exist: the API is open to anyone who can reach %s", settings.host)
            else:
                log.warning("no API key is active: requests are refused until one is created")

    # The academy generates with the same engine: one copy of the model in the process.
    academy_engine = SharedEngine(services, runtime)
    worker = embedded_worker(services, academy_engine)
    metrics = RequestMetrics(services)
    metrics.registry.register(chat.EngineCollector(runtime))
    middleware: list[Any] = [metrics.middleware, DefineMiddleware(ApiKeyAuthentication, keys=services.keys, open_allowed=is_loopback(settings.host))]
    if settings.rate_limit_per_minute:
        limit = RateLimitConfig(
            rate_limit=("minute", settings.rate_limit_per_minute),
            exclude=PUBLIC_PATHS,
            identifier_for_request=_rate_limit_identity,
        )
        middleware.insert(1, limit.middleware)
    features = features_of(services, runtime)
    mcp, mcp_lifespan = mcp_mount(features, settings.host)
    app = Litestar(
        route_handlers=[HealthController, metrics.controller(runtime.daemon_metrics if runtime.daemon else None), mcp, *console_routes(),
                        *_controllers(services, features, academy_engine, runtime, settings.max_adapter_bytes)],
        dependencies={"services": Provide(provide_services, sync_to_thread=False), **dependencies(services)},
        middleware=middleware,
        plugins=[problem_details_plugin()],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        request_max_body_size=settings.max_body_bytes,
        # Which API process answered: with several workers, the only way to tell them apart.
        response_headers=[ResponseHeader(name=PROCESS_HEADER, value=str(os.getpid()), description="The API process that answered")],
        on_startup=[catch_up, *([worker.start] if worker else [])],
        on_shutdown=[*([worker.stop] if worker else []), runtime.close, services.close],
        lifespan=[mcp_lifespan],
        openapi_config=OpenAPIConfig(
            title="Genome Service", version="0.1.0", path="/schema", render_plugins=[offline_swagger()]
        ),
    )
    document_conventions(app.openapi_schema, REQUEST_TYPES)
    document_limits(app.openapi_schema, settings)
    academy.document_events(app.openapi_schema)
    recipes.document_events(app.openapi_schema)
    chat.document_chat(app.openapi_schema)
    chat.document_chat(app.openapi_schema, "/v1/chat/completions")
    return app


def _controllers(services: Services, features: Features, academy_engine: SharedEngine, runtime: ChatRuntime,
                 max_adapter_bytes: int) -> list[type[Controller]]:
    """Each controller bound to the feature services it translates HTTP for (one instance of each per app)."""
    return [
        bound(genomes.GenomeController, genomes=features.genomes),
        bound(personas.PersonaController, personas=features.personas),
        layers.layer_controller(features.layers, max_adapter_bytes),
        bound(search.LayerSearchController, discovery=features.discovery),
        bound(search.KnowledgeController, knowledge=features.knowledge),
        bound(chat.ChatController, chat=features.chat, conversations=features.conversations),
        bound(openai_compat.OpenAIController, chat=features.chat, personas=features.personas, jobs=FineTuning(services)),
        fine_tuning.files_controller(TrainingFiles(services), services.settings.files_max_bytes),
        bound(fine_tuning.FineTuningController, jobs=FineTuning(services)),
        bound(academy.AcademyController, sessions=features.sessions, engine=academy_engine),
        bound(inference.InferenceController, runtime=runtime),
        bound(recipes.RecipeController, recipes=Recipes(services), runs=RecipeRuns(services)),
    ]


def create_app_from_env() -> Litestar:
    """Entry point for ASGI servers (``--factory``): settings come from ``GENOME_*``."""
    return create_app(build(Settings.from_env()))
