"""``genome-service``: run the server and administer its database, projections and log.

Exit status: 0 on success, 1 on a user or input error, 2 on a runtime or system error.
Heavy modules are imported inside the commands so that ``--help`` stays fast.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from genome_service.settings import Settings, SettingsError

if TYPE_CHECKING:
    import subprocess
    import threading

    from genome_service.services.bootstrap import Services

DAEMON_START_TIMEOUT_S = 60

app = typer.Typer(
    name="genome-service",
    help="Event-sourced genomes of LoRA layers and the personas that use them.",
    epilog="Example: genome-service db upgrade && genome-service serve --port 8000",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)
db_app = typer.Typer(
    help="Create and migrate the database schema (Alembic).",
    epilog="Example: genome-service db upgrade",
    no_args_is_help=True,
)
projections_app = typer.Typer(
    help="Inspect, catch up and rebuild the read models.",
    epilog="Example: genome-service projections rebuild",
    no_args_is_help=True,
)
events_app = typer.Typer(
    help="Read the event log.",
    epilog="Example: genome-service events tail --follow",
    no_args_is_help=True,
)
keys_app = typer.Typer(
    help="Create, list and revoke API keys (stored hashed).",
    epilog="Example: genome-service keys create --owner alice",
    no_args_is_help=True,
)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(projections_app, name="projections")
app.add_typer(events_app, name="events")
index_app = typer.Typer(
    help="The FAISS search indexes (layers, persona knowledge): a projection of the log.",
    epilog="Example: genome-service index rebuild",
    no_args_is_help=True,
)
app.add_typer(index_app, name="index")
model_app = typer.Typer(
    help="Pull, list and register base models (cached under --data-dir/models or GENOME_MODELS_DIR).",
    epilog="Example: genome-service model pull",
    no_args_is_help=True,
)
app.add_typer(model_app, name="model")
academy_app = typer.Typer(
    help="Train new layers for personas: academy sessions and the worker that runs them.",
    epilog='Example: genome-service academy run --persona 3f9a0c1b --goal "Answer like a patient maths tutor"',
    no_args_is_help=True,
)
app.add_typer(academy_app, name="academy")
recipe_app = typer.Typer(
    help="Recipes: declarative pipelines of steps (create personas, attach layers, train with the Academy...).",
    epilog='Example: genome-service recipe run genome-assembly --input persona_id=3f9a0c1b --input "goal=Sound calm."',
    no_args_is_help=True,
)
app.add_typer(recipe_app, name="recipe")
inference_app = typer.Typer(
    help="The inference daemon: each base model in a supervised worker process, over an OpenAI-compatible API.",
    epilog="Example: GENOME_INFERENCE_TOKEN=s3cret genome-service inference serve --host 0.0.0.0 --port 8100",
    no_args_is_help=True,
)
app.add_typer(inference_app, name="inference")


class UserError(Exception):
    """Something the user can fix: bad input, a missing migration. Exit status 1."""


class Context:
    def __init__(self, settings: Settings, quiet: bool) -> None:
        self.settings = settings
        self.quiet = quiet

    @contextmanager
    def services(self) -> Iterator[Services]:
        """The wired service on a migrated database, closed afterwards."""
        from genome_service.eventstore.migrations import current_revision, head_revision
        from genome_service.services.bootstrap import build

        url = self.settings.resolved_database_url
        if not self.settings.database_url:
            self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        if current_revision(url) != head_revision():
            raise UserError(f"the database at {_safe(url)} is not migrated: run `genome-service db upgrade` first")
        services = build(self.settings)
        try:
            yield services
        finally:
            services.close()

    def say(self, message: str) -> None:
        if not self.quiet:
            typer.echo(message, err=True)


@app.callback()
def _root(
    ctx: typer.Context,
    database_url: Annotated[Optional[str], typer.Option(help="Database URL (env GENOME_DATABASE_URL); default: SQLite in --data-dir.")] = None,  # noqa: UP045
    data_dir: Annotated[Optional[Path], typer.Option(help="Data directory (env GENOME_DATA_DIR).")] = None,  # noqa: UP045
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output; errors still go to stderr.")] = False,
) -> None:
    ctx.obj = Context(Settings.from_env(database_url=database_url, data_dir=data_dir), quiet)


@app.command(epilog="Example: genome-service serve --host 127.0.0.1 --port 8000 --workers 2")
def serve(
    ctx: typer.Context,
    host: Annotated[Optional[str], typer.Option(help="Address to bind (env GENOME_HOST).")] = None,  # noqa: UP045
    port: Annotated[Optional[int], typer.Option(help="Port (env GENOME_PORT).")] = None,  # noqa: UP045
    workers: Annotated[Optional[int], typer.Option(help="Worker processes (env GENOME_WORKERS).")] = None,  # noqa: UP045
) -> None:
    """Run the HTTP API on uvicorn."""
    import uvicorn

    context: Context = ctx.obj
    settings = Settings.from_env(
        database_url=context.settings.database_url or None, data_dir=context.settings.data_dir,
        host=host, port=port, workers=workers,
    )
    context.settings = settings
    # Fail fast, before forking workers, if the database is not ready or the bind is unsafe.
    with context.services() as services:
        from genome_service.api.auth import is_loopback, open_mode_is_safe

        if not open_mode_is_safe(settings.host, services.keys):
            raise UserError(
                f"refusing to listen on {settings.host} without API keys: anyone could write. "
                "Create one with `genome-service keys create --owner NAME`, or bind to 127.0.0.1"
            )
        if not services.keys.any_active() and is_loopback(settings.host):
            context.say("no API keys exist: serving open on loopback only, every request acts as owner 'local'")
    # Workers are separate processes: they read the same settings from the environment.
    os.environ.update({
        "GENOME_DATABASE_URL": settings.resolved_database_url,
        "GENOME_DATA_DIR": str(settings.data_dir),
        "GENOME_HOST": settings.host,  # the app refuses keyless requests off loopback
    })
    context.say(f"genome-service on http://{settings.host}:{settings.port} ({_safe(settings.resolved_database_url)})")
    context.say(f"console: http://{settings.host}:{settings.port}/console/")
    with _embedded_daemon(context, settings):
        uvicorn.run(
            "genome_service.api.app:create_app_from_env",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level=settings.log_level.lower(),
        )


@contextmanager
def _embedded_daemon(context: Context, settings: Settings) -> Iterator[None]:
    """Start the inference daemon before any API worker exists, so that they all share it.

    Not when a remote one is configured (GENOME_INFERENCE_URL) or the embedded one is off
    (GENOME_INFERENCE_DAEMON=off: each API process then loads its own model).
    """
    if settings.inference_url or settings.inference_daemon == "off":
        yield
        return
    import secrets
    import socket
    import subprocess
    import threading

    # A fresh token even on loopback: other local users can reach a loopback port too.
    token = secrets.token_urlsafe(32)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "genome_service.cli", "--quiet", "inference", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--parent-pid", str(os.getpid())]
    daemon = subprocess.Popen(command, env={**os.environ, "GENOME_INFERENCE_TOKEN": token, "GENOME_INFERENCE_URL": ""})
    # The API workers start meanwhile (they reach the daemon only on a first chat, and wait for
    # its port while it starts); this thread says when it answers, or that it never did.
    threading.Thread(target=_await_daemon, args=(context, daemon, url, token), name="daemon-start", daemon=True).start()
    os.environ.update({"GENOME_INFERENCE_URL": url, "GENOME_INFERENCE_TOKEN": token})
    try:
        yield
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=15)
        except subprocess.TimeoutExpired:
            daemon.kill()


def _await_daemon(context: Context, daemon: subprocess.Popen[bytes], url: str, token: str) -> None:
    import httpx

    deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
    while daemon.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {token}"}, timeout=1).status_code == 200:
                context.say(f"inference daemon on {url} (pid {daemon.pid}); models start on first use")
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)  # a process starting: nothing to await but its port
    typer.echo(f"error: the embedded inference daemon did not start on {url} (exit code {daemon.poll()}): chats will "
               "answer 503 inference_unavailable", err=True)


@inference_app.command("serve", epilog="Example: GENOME_INFERENCE_TOKEN=s3cret genome-service inference serve --host 0.0.0.0 --port 8100")
def inference_serve(
    ctx: typer.Context,
    host: Annotated[Optional[str], typer.Option(help="Address to bind (env GENOME_INFERENCE_DAEMON_HOST); off loopback GENOME_INFERENCE_TOKEN is required.")] = None,  # noqa: UP045, E501
    port: Annotated[Optional[int], typer.Option(help="Port (env GENOME_INFERENCE_DAEMON_PORT).")] = None,  # noqa: UP045
    memory_bytes: Annotated[Optional[int], typer.Option(help="Declared weight bytes the started models may hold (env GENOME_INFERENCE_MEMORY_BYTES; 0: half the machine's memory).")] = None,  # noqa: UP045, E501
    parent_pid: Annotated[Optional[int], typer.Option(hidden=True, help="Exit when this process is gone (the embedded daemon's API).")] = None,  # noqa: UP045, E501
) -> None:
    """Serve every registered base model over an OpenAI-compatible API, each in its own supervised worker process.

    A model's worker starts on its first request, within the memory budget (least recently
    used idle models stop to make room), restarts with backoff after a crash and is killed
    and restarted when a request runs past its timeout. Requests may carry their LoRA stack
    as adapter hashes with weights and scales (`genome_stack`), read from the API's blob folder
    (GENOME_BLOB_DIR) or fetched from the API (GENOME_INFERENCE_BLOBS_URL).
    """
    import uvicorn

    from genome_service.services.backend import daemon_pool
    from genome_service.settings import is_loopback
    from inference.daemon.app import create_daemon_app
    from inference.models import ModelCatalog

    context: Context = ctx.obj
    settings = Settings.from_env(
        database_url=context.settings.database_url or None, data_dir=context.settings.data_dir,
        inference_daemon_host=host, inference_daemon_port=port, inference_memory_bytes=memory_bytes,
    )  # fmt: skip
    if not is_loopback(settings.inference_daemon_host) and not settings.inference_token:
        raise UserError(f"refusing to listen on {settings.inference_daemon_host} without GENOME_INFERENCE_TOKEN: "
                        "whoever reaches the daemon runs models and reads adapters. Set one, or bind to 127.0.0.1")
    try:
        pool = daemon_pool(settings)
    except ValueError as error:
        raise UserError(str(error)) from None
    if parent_pid is not None:
        _exit_with(parent_pid)
    models = ModelCatalog(settings.resolved_models_dir).names()
    daemon = create_daemon_app(pool, token=settings.inference_token, models=models, default_timeout=settings.inference_timeout,
                               default_max_tokens=settings.chat_default_max_tokens)
    context.say(f"inference daemon on http://{settings.inference_daemon_host}:{settings.inference_daemon_port}: "
                f"{', '.join(models)}; memory budget {pool.settings.memory_bytes} bytes")
    # Embedded, the API's own access log already has every request.
    uvicorn.run(daemon, host=settings.inference_daemon_host, port=settings.inference_daemon_port,
                log_level=settings.log_level.lower(), access_log=parent_pid is None)


def _exit_with(parent_pid: int) -> None:
    """Stop this process (cleanly, through SIGTERM) once `parent_pid` has gone."""
    import signal
    import threading

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


@db_app.command("upgrade", epilog="Example: genome-service db upgrade")
def db_upgrade(ctx: typer.Context, revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Migrate the database to REVISION (default: the newest)."""
    from genome_service.eventstore.migrations import upgrade

    context: Context = ctx.obj
    url = context.settings.resolved_database_url
    if not context.settings.database_url:
        context.settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(url, revision)
    context.say(f"database at {_safe(url)} is at revision {revision}")


@db_app.command("downgrade", epilog="Example: genome-service db downgrade base")
def db_downgrade(ctx: typer.Context, revision: Annotated[str, typer.Argument(help="Target revision, e.g. base.")]) -> None:
    """Migrate the database back to REVISION (base removes every table, events included)."""
    from genome_service.eventstore.migrations import downgrade

    context: Context = ctx.obj
    downgrade(context.settings.resolved_database_url, revision)
    context.say(f"database is at revision {revision}")


@db_app.command("current", epilog="Example: genome-service db current")
def db_current(ctx: typer.Context) -> None:
    """Print the database's revision and the newest one."""
    from genome_service.eventstore.migrations import current_revision, head_revision

    context: Context = ctx.obj
    typer.echo(f"current: {current_revision(context.settings.resolved_database_url)}  head: {head_revision()}")


@keys_app.command("create", epilog="Example: genome-service keys create --owner alice")
def keys_create(ctx: typer.Context, owner: Annotated[str, typer.Option(help="Who the key acts as; owns what it creates.")]) -> None:
    """Issue a key and print it once (only its hash is stored)."""
    with ctx.obj.services() as services:
        try:
            issued = services.keys.create(owner)
        except ValueError as error:
            raise UserError(str(error)) from error
        typer.echo(issued.secret)
        ctx.obj.say(f"key {issued.key_id} for {issued.owner}: keep it now, it cannot be shown again")


@keys_app.command("list", epilog="Example: genome-service keys list")
def keys_list(ctx: typer.Context) -> None:
    """List keys: id, owner, created, revoked."""
    with ctx.obj.services() as services:
        for key in services.keys.list():
            revoked = key.revoked_at.isoformat() if key.revoked_at else "active"
            typer.echo(f"{key.key_id}  {key.owner}  {key.created_at.isoformat()}  {revoked}")


@keys_app.command("revoke", epilog="Example: genome-service keys revoke 3f9a0c1b2d4e")
def keys_revoke(ctx: typer.Context, key_id: Annotated[str, typer.Argument(help="The key's id, as `keys list` shows it.")]) -> None:
    """Revoke a key at once; requests with it get 401."""
    with ctx.obj.services() as services:
        if not services.keys.revoke(key_id):
            raise UserError(f"no active key with id {key_id!r}")
        ctx.obj.say(f"key {key_id} revoked")


@projections_app.command("status", epilog="Example: genome-service projections status")
def projections_status(ctx: typer.Context) -> None:
    """Print the log's last position, the read models' checkpoint and the lag."""
    with ctx.obj.services() as services:
        with services.database.read() as connection:
            last = services.store.last_position(connection)
            checkpoint = services.projector.checkpoint(connection)
        typer.echo(f"last position: {last}  checkpoint: {checkpoint}  lag: {last - checkpoint}")


@projections_app.command("catch-up", epilog="Example: genome-service projections catch-up")
def projections_catch_up(ctx: typer.Context) -> None:
    """Apply the events past the read models' checkpoint."""
    context: Context = ctx.obj
    with context.services() as services:
        with _progress(context, "catching up") as advance:
            applied = services.projector.catch_up(advance)
        context.say(f"applied {applied} events")


@projections_app.command("rebuild", epilog="Example: genome-service projections rebuild")
def projections_rebuild(ctx: typer.Context) -> None:
    """Recreate every read model from the first event (one transaction; readers see the old rows until it commits)."""
    context: Context = ctx.obj
    with context.services() as services:
        with _progress(context, "rebuilding") as advance:
            position = services.projector.rebuild(advance)
        context.say(f"read models rebuilt from {position} events")


@index_app.command("rebuild", epilog="Example: genome-service --quiet index rebuild")
def index_rebuild(ctx: typer.Context) -> None:
    """Re-embed and re-index every layer and knowledge chunk from the first event, then save."""
    context: Context = ctx.obj
    with context.services() as services:
        with _progress(context, "indexing") as advance:
            position = services.search.rebuild(advance)
        context.say(f"indexes rebuilt from {position} events: {len(services.search.layers.index)} layers, "  # type: ignore[arg-type]
                    f"{len(services.search.knowledge.index)} knowledge chunks in {services.search.directory}")  # type: ignore[arg-type]


@index_app.command("status", epilog="Example: genome-service index status")
def index_status(ctx: typer.Context) -> None:
    """Print the saved indexes' positions against the log's last position."""
    from rag.index import VectorIndex

    with ctx.obj.services() as services:
        search, last = services.search, services.store.last_position()
        for projection in (search.layers, search.knowledge):
            path = search.path(projection)
            saved = VectorIndex.saved_position(path)
            typer.echo(f"{projection.name}: {path}  saved at: {saved if saved is not None else 'never'}  last position: {last}")


@events_app.command("tail", epilog="Example: genome-service events tail --limit 50 --follow")
def events_tail(
    ctx: typer.Context,
    after: Annotated[Optional[int], typer.Option("--after", help="Start after this global position (default: the last --limit events).")] = None,  # noqa: UP045
    limit: Annotated[int, typer.Option(min=1, help="How many recent events to show when --after is not given.")] = 20,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events until interrupted.")] = False,
    stream: Annotated[Optional[str], typer.Option(help="Only events of this stream id.")] = None,  # noqa: UP045
) -> None:
    """Print events as JSON lines (position, stream, type, version, data, metadata, time)."""
    import msgspec

    from genome_service.eventstore.subscription import CatchUpSubscription

    encoder = msgspec.json.Encoder()
    with ctx.obj.services() as services:
        start = after if after is not None else max(0, services.store.last_position() - limit)
        subscription = CatchUpSubscription(services.store, after_position=start)
        try:
            for batch in subscription.batches(follow=follow):
                for event in batch:
                    if stream is None or event.stream_id == stream:
                        sys.stdout.write(encoder.encode(event).decode() + "\n")
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass


@model_app.command("pull", epilog="Example: genome-service model pull")
def model_pull(
    ctx: typer.Context,
    name: Annotated[Optional[str], typer.Argument(help="Model name (default: GENOME_INFERENCE_MODEL).")] = None,  # noqa: UP045
) -> None:
    """Fetch and convert the default model once; later pulls only verify its checksums."""
    from inference.models import DEFAULT_MODEL, ModelCatalog
    from inference.pull import pull_default

    context: Context = ctx.obj
    name = name or context.settings.inference_model
    models_dir = context.settings.resolved_models_dir
    if name != DEFAULT_MODEL:
        if name not in ModelCatalog(models_dir).names():
            raise UserError(
                f"only {DEFAULT_MODEL} can be pulled; register a local model folder with "
                f"`genome-service model register {name} FOLDER`"
            )
        context.say(f"{name} is a registered local model: nothing to pull")
        return
    with _steps(context, f"pulling {name}") as step:
        folder, converted = pull_default(models_dir, step)
    context.say(f"{name} {'converted' if converted else 'already pulled, checksums verified'}: {folder}")


@model_app.command("list", epilog="Example: genome-service model list")
def model_list(ctx: typer.Context) -> None:
    """Print each known model, whether it is on disk, and its folder."""
    from inference.models import ModelCatalog, ModelNotPulled

    catalog = ModelCatalog(ctx.obj.settings.resolved_models_dir)
    for name in catalog.names():
        try:
            typer.echo(f"{name}\tready\t{catalog.folder(name)}")
        except ModelNotPulled:
            typer.echo(f"{name}\tnot pulled\trun `genome-service model pull`")


@model_app.command("register", epilog="Example: genome-service model register my-llama ~/models/my-llama")
def model_register(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Name to use for the model in layers and settings.")],
    folder: Annotated[Path, typer.Argument(help="A Hugging Face Llama folder (config.json, safetensors, tokenizer).")],
) -> None:
    """Register a local model folder; its weights stay where they are."""
    from inference.models import ModelCatalog

    try:
        spec = ModelCatalog(ctx.obj.settings.resolved_models_dir).register_local(name, folder)
    except ValueError as error:
        raise UserError(str(error)) from None
    ctx.obj.say(f"registered {spec.name}: {spec.num_hidden_layers} blocks, hidden size {spec.hidden_size}")


MCP_CLIENT_CONFIG = """Example: genome-service mcp --key gsk_...

A client's configuration (Claude Desktop, Cursor, the MCP Inspector):

\b
  {"mcpServers": {"genome-service": {
     "command": "genome-service", "args": ["mcp"],
     "env": {"GENOME_API_KEY": "gsk_...", "GENOME_DATA_DIR": "/path/to/data"}}}}

Over HTTP instead, a running `genome-service serve` answers at http://HOST:PORT/mcp
(streamable HTTP, with the key as Authorization: Bearer)."""


@app.command(epilog=MCP_CLIENT_CONFIG)
def mcp(
    ctx: typer.Context,
    key: Annotated[Optional[str], typer.Option(envvar="GENOME_API_KEY", help="Act as this API key's owner (env GENOME_API_KEY); none: open mode, while no key exists.")] = None,  # noqa: UP045
) -> None:
    """Serve the MCP tools (personas, knowledge, layers, the Academy) over stdio to one client."""
    from genome_service.mcp.stdio import serve_stdio
    from genome_service.services.errors import Unauthorized

    context: Context = ctx.obj
    with context.services() as services:
        try:
            serve_stdio(services, key)
        except Unauthorized as error:
            raise UserError(str(error)) from None


@app.command(epilog='Example: genome-service generate --layers 3f9a0c1b:0.8,77d2e4aa:0.5 --max-tokens 64 "What is the capital of France?"')
def generate(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    persona: Annotated[Optional[str], typer.Option(help="Speak as this persona: its system prompt and genome.")] = None,  # noqa: UP045
    layers: Annotated[Optional[str], typer.Option(help="A stack without a persona: LAYER_ID:WEIGHT,... (weight 0..1).")] = None,  # noqa: UP045
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass, (0, 1].")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Fixes sampled tokens.")] = None,  # noqa: UP045
    backend: Annotated[Optional[str], typer.Option(help="auto, torch, mlx or openai (env GENOME_INFERENCE_BACKEND).")] = None,  # noqa: UP045
) -> None:
    """Stream a model's answer to the terminal, with a persona's or an explicit LoRA stack."""
    import asyncio

    from inference.backends.base import ChatMessage, Sampling
    from inference.lora.adapter import AdapterRejected

    context: Context = ctx.obj
    if persona and layers:
        raise UserError("give --persona or --layers, not both")
    settings = Settings.from_env(
        database_url=context.settings.database_url or None, data_dir=context.settings.data_dir,
        inference_backend=backend,
    )  # fmt: skip
    try:
        sampling = Sampling(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
        system, stack = _resolve_stack(context, settings, persona, _parse_layers(layers) if layers else [])
    except (ValueError, AdapterRejected) as error:
        raise UserError(str(error)) from None
    messages = [ChatMessage("system", system)] if system else []
    messages.append(ChatMessage("user", prompt))
    finish = asyncio.run(_stream_answer(_open_backend(context, settings), messages, stack, sampling))
    if finish.reason == "error":
        raise RuntimeError(f"generation failed: {finish.error}")
    if finish.reason in ("length", "repetition"):
        context.say(f"(stopped: {'--max-tokens reached' if finish.reason == 'length' else 'a repetition loop'})")


def _parse_layers(text: str) -> list[tuple[str, float]]:
    stack = []
    for item in text.split(","):
        layer_id, _, weight = item.strip().partition(":")
        try:
            stack.append((layer_id, float(weight) if weight else 1.0))
        except ValueError:
            raise UserError(f"--layers: expected LAYER_ID:WEIGHT with a number for the weight, got {item!r}") from None
        if not layer_id:
            raise UserError(f"--layers: expected LAYER_ID:WEIGHT, got {item!r}")
    return stack


def _resolve_stack(context: Context, settings: Settings, persona: str | None, layers: list[tuple[str, float]]):  # type: ignore[no-untyped-def]
    """(system prompt, stack) from the read models; no database is opened for the bare model."""
    if persona is None and not layers:
        return "", None
    from genome_service.services.stacks import StackResolver
    from inference.models import ModelCatalog

    spec = ModelCatalog(settings.resolved_models_dir).get(settings.inference_model)
    with context.services() as services:
        resolver = StackResolver(services, spec)
        system, layers = resolver.persona(persona) if persona else ("", layers)
        return system, resolver.stack(layers)


def _open_backend(context: Context, settings: Settings):  # type: ignore[no-untyped-def]
    from transformers.utils import logging as hf_logging

    from genome_service.services.backend import open_configured_backend
    from inference.models import ModelCatalog

    hf_logging.disable_progress_bar()
    context.say(f"loading {settings.inference_model} ({settings.inference_backend} backend)")
    try:
        return open_configured_backend(settings, ModelCatalog(settings.resolved_models_dir))[0]
    except LookupError as error:
        raise UserError(str(error)) from None


async def _stream_answer(backend, messages, stack, sampling):  # type: ignore[no-untyped-def]
    from inference.backends.base import Finish
    from inference.engine import Engine

    async with Engine(backend) as engine:
        async for event in engine.stream(messages, stack, sampling):
            if isinstance(event, Finish):
                sys.stdout.write("\n")
                sys.stdout.flush()
                return event
            sys.stdout.write(event.text)
            sys.stdout.flush()
    raise AssertionError("unreachable: a stream ends with a Finish")


@academy_app.command("worker", epilog="Example: genome-service academy worker --once")
def academy_worker(
    ctx: typer.Context,
    once: Annotated[bool, typer.Option("--once", help="Exit when no session is left to claim.")] = False,
) -> None:
    """Claim academy sessions and recipe runs and run them (several workers are safe together);
    resumes crashed ones.

    SIGTERM or Ctrl-C stops the session or run in progress at its next step or token, leaving it
    running for the next worker to resume, and exits 0; a second signal exits at once.
    """
    import threading

    from genome_service.academy.worker import Worker
    from genome_service.recipes.chat_turns import OwnLoopChat
    from genome_service.recipes.executor import Executor

    context: Context = ctx.obj
    stop = threading.Event()
    with context.services() as services:
        chat = OwnLoopChat(services)
        worker = Worker(services, lambda: _academy_runner(context, services, stop),
                        make_executor=lambda: Executor(services, chat, stopping=stop))
        context.say("academy worker: waiting for sessions" if not once else "academy worker: running open sessions")
        received = _stop_on_signals(stop)
        try:
            worker.run(stop, until_idle=once, on_finished=lambda state: context.say(_finished_line(state)))
        finally:
            chat.close()
    if received:
        context.say(f"academy worker: stopped by {received[0]}; an unfinished session stays running, to resume")


def _finished_line(state) -> str:  # type: ignore[no-untyped-def]
    """What a worker says of a session or a recipe run that ended."""
    from genome_service.domain.academy import AcademySession

    if isinstance(state, AcademySession):
        return f"session {state.session_id}: {state.status.value}"
    return f"run {state.run_id}: {state.status.value}" + (f" ({state.reason})" if state.reason else "")


def _stop_on_signals(stop: threading.Event) -> list[str]:
    """Set `stop` on the first SIGTERM or SIGINT; the list returned gets the signal's name."""
    import signal
    import threading

    received: list[str] = []

    def handle(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum).name)
        # The default action from now on: a second signal ends the process even inside a long C call.
        for each in (signal.SIGTERM, signal.SIGINT):
            signal.signal(each, signal.SIG_DFL)
        # Not `stop.set()` here: the handler runs on the main thread, which may be inside
        # `stop.wait()` holding the Event's lock, and would deadlock on it.
        threading.Thread(target=stop.set, name="academy-worker-stop", daemon=True).start()

    for each in (signal.SIGTERM, signal.SIGINT):
        signal.signal(each, handle)
    return received


@academy_app.command(
    "run", epilog='Example: genome-service academy run --persona 3f9a0c1b --goal "Sound calm" --steps 200 --plot loss.png'
)
def academy_run(
    ctx: typer.Context,
    persona: Annotated[str, typer.Option(help="The persona to train a layer for (its genome gets the layer).")],
    goal: Annotated[str, typer.Option(help="What the persona should become better at.")],
    steps: Annotated[int, typer.Option(help="Budget: training steps.")] = 100,
    seconds: Annotated[float, typer.Option(help="Budget: seconds of training.")] = 3600.0,
    target_similarity: Annotated[float, typer.Option(help="An existing layer this close to the goal is used as is.")] = 0.95,
    plot: Annotated[Optional[Path], typer.Option(help="Where to write the loss curve PNG (default: data dir).")] = None,  # noqa: UP045
) -> None:
    """Start a session for a persona and run it here, with a progress bar and a loss plot at the end."""
    from genome_service.services.academy_sessions import loss_curve, start_session

    context: Context = ctx.obj
    with context.services() as services:
        session_id = start_session(services, persona, goal, budget_steps=steps, budget_seconds=seconds,
                                   target_similarity=target_similarity)
        context.say(f"session {session_id}")
        state = _run_with_progress(context, services, _academy_runner(context, services), session_id)
        curve = loss_curve(services, session_id)
        if curve:
            path = plot or context.settings.data_dir / "academy" / session_id / "loss.png"
            _plot_loss(curve, path, goal)
            context.say(f"loss curve: {path}")
    typer.echo(f"{session_id} {state.status.value}" + (f": {state.reason}" if state.reason else ""))
    if state.status.value != "completed":
        raise typer.Exit(2)


def _run_with_progress(context: Context, services: Services, runner, session_id: str):  # type: ignore[no-untyped-def]
    """Run the session on a thread while a bar shows its recorded steps; Ctrl-C cancels the session."""
    import threading

    from genome_service.domain.academy import ACADEMY_SESSION, ChangeSessionStatus, SessionStatus
    from genome_service.domain.common import DomainError

    finished: list = []
    thread = threading.Thread(target=lambda: finished.append(runner.run(session_id)), daemon=True)
    thread.start()
    try:
        with _progress(context, "training") as advance:
            while thread.is_alive():
                state = services.repository.load(ACADEMY_SESSION, session_id).state
                advance(sum(step for _, step in state.trained_steps), state.budget_steps)
                thread.join(timeout=0.5)
    except KeyboardInterrupt:
        try:
            services.commands.execute(ACADEMY_SESSION, session_id, ChangeSessionStatus(SessionStatus.CANCELLED, "interrupted"))
        except DomainError:
            pass  # it finished meanwhile: that status stands
        thread.join()
    return finished[0] if finished else services.repository.load(ACADEMY_SESSION, session_id).state


def _academy_runner(context: Context, services: Services, stopping: threading.Event | None = None):  # type: ignore[no-untyped-def]
    from genome_service.academy.worker import open_runner
    from inference.models import ModelNotPulled

    context.say(f"loading {context.settings.inference_model}")
    try:
        return open_runner(services, stopping)
    except (KeyError, ModelNotPulled) as error:
        raise UserError(str(error)) from None


@recipe_app.command("list", epilog="Example: genome-service recipe list --owner alice")
def recipe_list(
    ctx: typer.Context,
    owner: Annotated[str, typer.Option(help="Whose recipes (and the public and built-in ones).")] = "local",
) -> None:
    """The recipes an owner may run: name, revision, steps and description, one a line."""
    from genome_service.recipes.service import Recipes
    from genome_service.services.context import Caller

    context: Context = ctx.obj
    with context.services() as services:
        cursor = None
        while True:
            found = Recipes(services).list(Caller(owner), limit=200, cursor=cursor)
            for recipe in found.items:
                steps = " -> ".join(step.id for step in recipe.definition.steps)
                typer.echo(f"{recipe.name}\t{recipe.id}\trev {recipe.revision}\t{steps}")
            if (cursor := found.next_cursor) is None:
                break


@recipe_app.command("show", epilog="Example: genome-service recipe show genome-assembly")
def recipe_show(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The recipe's name or id.")],
    owner: Annotated[str, typer.Option(help="Who asks (a private recipe is its owner's only).")] = "local",
) -> None:
    """A recipe's definition (inputs, steps, output) as JSON."""
    import msgspec

    from genome_service.services.context import Caller

    context: Context = ctx.obj
    with context.services() as services:
        recipe = _recipe(services, Caller(owner), name)
    typer.echo(msgspec.json.format(msgspec.json.encode(recipe)).decode())


@recipe_app.command("commands", epilog="Example: genome-service recipe commands")
def recipe_commands(ctx: typer.Context) -> None:
    """The commands a recipe step can run, one a line (GET /recipes/commands gives their schemas)."""
    from genome_service.recipes.catalogue import catalogue

    for command in catalogue():
        typer.echo(f"{command.name}{' (async)' if command.asynchronous else ''}\t{command.summary}")


@recipe_app.command(
    "run", epilog='Example: genome-service recipe run genome-assembly --input persona_id=3f9a0c1b '
                  '--input "goal=Sound calm. Explain maths patiently." --input target_similarity=0.8'
)
def recipe_run(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The recipe's name or id (built-in: genome-assembly).")],
    inputs: Annotated[list[str], typer.Option("--input", "-i", help="An input as NAME=VALUE; repeat for each. "
                                              "A string input takes VALUE as it is; any other type reads it as JSON.")] = [],  # noqa: B006
    owner: Annotated[str, typer.Option(help="Who the run acts as (it owns what the run creates).")] = "local",
) -> None:
    """Start a run of a recipe and run it here, with its progress step by step; prints the run's id, its
    status and its output (JSON). Ctrl-C cancels the run. A worker that holds the run already runs it:
    this command then follows it. Exit 0 when the run completed, 2 when it failed or was cancelled."""
    import threading
    from contextlib import suppress

    import msgspec

    from genome_service.academy.worker import Worker
    from genome_service.domain.common import DomainError
    from genome_service.recipes.chat_turns import OwnLoopChat
    from genome_service.recipes.executor import Executor
    from genome_service.recipes.service import RecipeRuns
    from genome_service.services.context import Caller, Command, command_metadata

    context: Context = ctx.obj
    caller = Caller(owner)
    with context.services() as services:
        recipe = _recipe(services, caller, name)
        given = _recipe_inputs(inputs, {k: v.type for k, v in recipe.definition.inputs.items()})
        runs = RecipeRuns(services)
        run = runs.start(Command(caller, command_metadata(owner, "cli")), recipe.id, given)
        context.say(f"run {run.id} of {recipe.name} (revision {recipe.revision})")
        stop, chat = threading.Event(), OwnLoopChat(services)
        worker = Worker(services, lambda: _academy_runner(context, services, stop),
                        make_executor=lambda: Executor(services, chat, stopping=stop))
        thread = threading.Thread(target=worker.see_through, args=(run.id, stop), daemon=True)
        thread.start()
        try:
            _follow_steps(context, runs, caller, run.id, thread)
        except KeyboardInterrupt:
            with suppress(DomainError):  # it ended meanwhile: that status stands
                runs.cancel(Command(caller, command_metadata(owner, "cli")), run.id)
            stop.set()
            thread.join()
        finally:
            chat.close()
        final = runs.get(caller, run.id)
    typer.echo(f"{final.id} {final.status.value}" + (f": {final.reason}" if final.reason else ""))
    typer.echo(msgspec.json.encode(final.output).decode())
    if final.status.value != "completed":
        raise typer.Exit(2)


def _recipe(services: Services, caller, name: str):  # type: ignore[no-untyped-def]
    """The recipe `name` names for `caller`; one that does not exist (or is retired) is the user's error."""
    from genome_service.recipes.service import Recipes
    from genome_service.services.errors import Gone, NotFound

    try:
        return Recipes(services).get(caller, name)
    except (NotFound, Gone) as error:
        raise UserError(str(error)) from None


def _recipe_inputs(pairs: list[str], types: dict[str, str]) -> dict[str, object]:
    import json

    given: dict[str, object] = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals:
            raise UserError(f"--input {pair!r}: expected NAME=VALUE")
        if types.get(key, "string") == "string":
            given[key] = value
            continue
        try:
            given[key] = json.loads(value)
        except json.JSONDecodeError:
            raise UserError(f"--input {key}: {value!r} is not JSON, which a {types[key]} input needs") from None
    return given


def _follow_steps(context: Context, runs, caller, run_id: str, thread) -> None:  # type: ignore[no-untyped-def]
    """A bar over the run's steps, named by the step under way, and a line on stderr as each step
    ends, until the thread running it ends."""
    said: dict[str, str] = {}
    with _steps(context, "recipe") as bar:
        while True:
            alive = thread.is_alive()
            view = runs.get(caller, run_id)
            for number, step in enumerate(view.steps, 1):
                if step.status in ("completed", "skipped") and said.get(step.id) != step.status:
                    said[step.id] = step.status
                    why = f": {step.reason}" if step.reason else ""
                    context.say(f"step {number}/{len(view.steps)} {step.id} ({step.command}): {step.status}{why}")
                elif step.status in ("running", "awaiting"):
                    waiting = f", waiting for session {view.waiting_on}" if view.waiting_on else ""
                    bar(f"{step.id} ({step.command}{waiting})", number, len(view.steps))
            if not alive:
                return
            thread.join(timeout=0.5)


def _plot_loss(curve: list[tuple[int, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot([step for step, _ in curve], [loss for _, loss in curve], marker="o")
    axes.set(xlabel="step", ylabel="training loss", title=title[:80])
    axes.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def _steps(context: Context, label: str):  # type: ignore[no-untyped-def]
    """A progress bar over named steps: the callback takes (name, number, total)."""
    from contextlib import contextmanager

    @contextmanager
    def bar():  # type: ignore[no-untyped-def]
        if context.quiet:
            yield lambda name, number, total: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as progress:
            task = progress.add_task(label, total=None)

            def step(name: str, number: int, total: int) -> None:
                # A step is shown as done once the next one starts; the last one when the bar closes.
                progress.update(task, description=f"{label}: {name}", completed=number - 1, total=total)

            yield step
            progress.update(task, completed=progress.tasks[0].total)

    return bar()


def _progress(context: Context, label: str):  # type: ignore[no-untyped-def]
    from contextlib import contextmanager

    @contextmanager
    def bar():  # type: ignore[no-untyped-def]
        if context.quiet:
            yield lambda done, total: None
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=False) as progress:
            task = progress.add_task(label, total=None)

            def advance(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total or None)

            yield advance

    return bar()


def _safe(url: str) -> str:
    """A URL fit for logs: the password hidden."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="genome-service", standalone_mode=False)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        sys.exit(1)
    except typer.TyperException as error:  # usage errors: a bad command, option or value
        error.show()  # type: ignore[attr-defined]
        sys.exit(1)
    except (UserError, SettingsError) as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(1)
    except Exception as error:  # noqa: BLE001 - the last line of defence: a runtime error, said plainly
        from genome_service.domain.common import DomainError

        typer.echo(f"error: {error}", err=True)
        sys.exit(1 if isinstance(error, DomainError) else 2)


if __name__ == "__main__":
    main()
