"""The daemon's HTTP face: OpenAI-compatible chat completions, routed by base model.

`model` names a base model. One extension carries the LoRA stack and the API's bookkeeping:
`genome_stack` ([{adapter_sha256, weight, scale}], in precedence order, each adapter once;
`scale` left out is the adapter's own alpha / r), `genome_priority`, `genome_timeout`
(seconds) and `genome_label` (whose figures the request counts in).
Every response names the worker process that served it (`X-Genome-Worker-Pid`). A refusal
before the first token is `application/problem+json` with a `rule`; a failure mid-stream is
an SSE `error` event with the same body, never a silent end.

Off loopback every request needs `Authorization: Bearer <GENOME_INFERENCE_TOKEN>`: whoever
reaches the daemon runs models and reads adapters.
"""

from __future__ import annotations

import hmac
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException
from litestar.response import Stream

from inference.backends.base import ChatMessage, Finish, Token
from inference.daemon.pool import ModelPool, ModelRefused, Served
from inference.daemon.protocol import Generate, StackEntry

PROBLEM_BASE = "https://genome-service.dev/problems/"
PID_HEADER = "X-Genome-Worker-Pid"
MAX_BODY_BYTES = 4 * 1024 * 1024
# OpenAI's API speaks of "stop" and "length"; the engine's repetition stop is a stop.
_OPENAI_REASONS = {"stop": "stop", "length": "length", "repetition": "stop"}


class StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool = False


class CompletionRequest(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    messages: list[ChatMessage]
    stream: bool = False
    temperature: float = 1.0  # OpenAI's default
    top_p: float = 1.0
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream_options: StreamOptions | None = None
    genome_stack: list[StackEntry] = []
    genome_priority: int = 0
    genome_timeout: float | None = None
    genome_label: str | None = None
    genome_ignore_eos: bool = False


def problem(status: int, rule: str, detail: str) -> Response[bytes]:
    body = {"type": PROBLEM_BASE + rule, "title": rule.replace("_", " "), "status": status, "rule": rule, "detail": detail}
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/problem+json")


def create_daemon_app(pool: ModelPool, *, token: str, models: list[str] | None = None, default_timeout: float = 300.0,
                      default_max_tokens: int = 256) -> Litestar:
    """The daemon's app over `pool`; `models` lists what `/v1/models` offers (None: what the pool knows)."""

    async def authorised(request: Request[Any, Any, Any]) -> Response[bytes] | None:
        if not token:
            return None
        given = request.headers.get("authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return None
        return problem(401, "invalid_token", "this inference daemon needs `Authorization: Bearer <GENOME_INFERENCE_TOKEN>`")

    @post("/v1/chat/completions", status_code=200)
    async def completions(request: Request[Any, Any, Any]) -> Response[Any]:
        body = await request.body()  # past MAX_BODY_BYTES Litestar raises 413, answered by `_http_problem`
        try:
            ask = msgspec.json.decode(body, type=CompletionRequest)
        except msgspec.ValidationError as exc:
            return problem(422, "invalid_request", str(exc))
        except msgspec.DecodeError as exc:
            return problem(400, "malformed_json", str(exc))
        if not ask.messages:
            return problem(422, "invalid_request", "messages: expected at least one message, got none")
        hashes = [entry.adapter_sha256 for entry in ask.genome_stack]
        if len(set(hashes)) != len(hashes):
            return problem(422, "invalid_stack", "genome_stack: expected each adapter once (its weight says how much), "
                                                 f"got {len(hashes) - len(set(hashes))} repeated")
        stops = [ask.stop] if isinstance(ask.stop, str) else list(ask.stop or [])
        work = Generate(
            id=0, messages=ask.messages, stack=ask.genome_stack, temperature=ask.temperature, top_p=ask.top_p,
            max_tokens=ask.max_completion_tokens or ask.max_tokens or default_max_tokens, stop=stops, seed=ask.seed,
            ignore_eos=ask.genome_ignore_eos, priority=ask.genome_priority,
            timeout=ask.genome_timeout if ask.genome_timeout and ask.genome_timeout > 0 else default_timeout,
            label=ask.genome_label,
        )  # fmt: skip
        try:
            served, events = await pool.generate(ask.model, work)
        except ModelRefused as exc:
            return problem(exc.status, exc.rule, str(exc))
        headers = {PID_HEADER: str(served.pid)}
        if ask.stream:
            include_usage = ask.stream_options is not None and ask.stream_options.include_usage
            return Stream(_chunks(ask.model, served, events, include_usage), media_type="text/event-stream",
                          headers={**headers, "Cache-Control": "no-store"})
        return await _whole(ask.model, served, events, headers)

    @get("/v1/models")
    async def list_models() -> dict[str, Any]:
        states = {status.model: status.state for status in pool.status()}
        names = models if models is not None else sorted(states)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "genome-service", "genome_state": states.get(name, "stopped")}
            for name in names
        ]}  # fmt: skip

    @get("/health")
    async def health() -> Response[bytes]:
        statuses = pool.status()
        degraded = any(status.state == "unhealthy" for status in statuses)
        body = {"status": "degraded" if degraded else "ok", "memory_budget_bytes": pool.settings.memory_bytes,
                "memory_used_bytes": pool.used_bytes, "models": statuses}
        return Response(msgspec.json.encode(body), media_type="application/json")

    @get("/v1/genome/stats")
    async def stats() -> Response[bytes]:
        """Each model's state and, for a running one, its engine's figures."""
        entries = []
        for status in pool.status():
            figures = await pool.figures(status.model)
            entries.append({
                "status": status,
                "engine": msgspec.Raw(figures.engine) if figures else None,
                "labels": msgspec.Raw(figures.labels) if figures else [],
            })  # fmt: skip
        return Response(msgspec.json.encode({"models": entries}), media_type="application/json")

    @get("/metrics")
    async def metrics() -> Response[bytes]:
        expositions = {}
        for status in pool.status():
            figures = await pool.figures(status.model)
            if figures is not None:
                expositions[status.model] = figures.metrics
        lines = _pool_metrics(pool) + _labelled(expositions)
        return Response("\n".join(lines).encode() + b"\n", media_type="text/plain; version=0.0.4; charset=utf-8")

    async def started(app: Litestar) -> None:
        pool.start()

    async def stopped(app: Litestar) -> None:
        await pool.close()

    return Litestar(
        [completions, list_models, health, stats, metrics], before_request=authorised,
        on_startup=[started], on_shutdown=[stopped], request_max_body_size=MAX_BODY_BYTES, openapi_config=None,
        exception_handlers={HTTPException: _http_problem},
    )  # fmt: skip


# Litestar's own refusals (a body past the limit, an unknown path or method), as problems too.
_HTTP_RULES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def _http_problem(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    detail = f"the request body is over the limit of {MAX_BODY_BYTES} bytes" if exc.status_code == 413 else exc.detail
    rule = _HTTP_RULES.get(exc.status_code, "invalid_request" if exc.status_code < 500 else "internal_error")
    return problem(exc.status_code, rule, detail)


def _chunk(completion_id: str, model: str, created: int, delta: dict[str, str], finish_reason: str | None,
           **extra: Any) -> bytes:
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
    return b"data: " + msgspec.json.encode(body) + b"\n\n"


async def _chunks(model: str, served: Served, events: AsyncIterator[list[Token | Finish]],
                  include_usage: bool) -> AsyncIterator[bytes]:
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    try:
        yield _chunk(completion_id, model, created, {"role": "assistant", "content": ""}, None)
        async for ready in events:
            # One write for the tokens that came together (a batch step gives several).
            out = [_chunk(completion_id, model, created, {"content": e.text}, None) for e in ready if isinstance(e, Token)]
            finish = ready[-1]
            if isinstance(finish, Finish):
                out.append(_ending(completion_id, model, created, served, finish, include_usage))
            yield b"".join(out)
    finally:
        await events.aclose()  # type: ignore[attr-defined]


def _ending(completion_id: str, model: str, created: int, served: Served, event: Finish, include_usage: bool) -> bytes:
    """The finishing chunk, the usage chunk if asked and `[DONE]`; or an `error` event with the problem."""
    if event.reason not in _OPENAI_REASONS:
        rule = event.rule or ("generation_cancelled" if event.reason == "cancelled" else "generation_failed")
        body = {"type": PROBLEM_BASE + rule, "title": rule.replace("_", " "), "status": 503, "rule": rule,
                "detail": event.error or event.reason, "genome_worker_pid": served.pid}
        return b"event: error\ndata: " + msgspec.json.encode(body) + b"\n\n"
    out = _chunk(completion_id, model, created, {}, _OPENAI_REASONS[event.reason],
                 genome_finish_reason=event.reason, genome_worker_pid=served.pid)
    if include_usage:
        usage = {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                 "total_tokens": event.prompt_tokens + event.completion_tokens}
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [], "usage": usage}
        out += b"data: " + msgspec.json.encode(body) + b"\n\n"
    return out + b"data: [DONE]\n\n"


async def _whole(model: str, served: Served, events: AsyncIterator[list[Token | Finish]], headers: dict[str, str]) -> Response[Any]:
    parts: list[str] = []
    try:
        async for ready in events:
            parts += [event.text for event in ready if isinstance(event, Token)]
            event = ready[-1]
            if not isinstance(event, Finish):
                continue
            if event.reason not in _OPENAI_REASONS:
                failed = problem(503, event.rule or "generation_failed", event.error or event.reason)
                failed.headers.update(headers)
                return failed
            body = {
                "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                             "finish_reason": _OPENAI_REASONS[event.reason]}],
                "usage": {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                          "total_tokens": event.prompt_tokens + event.completion_tokens},
                "genome_finish_reason": event.reason, "genome_worker_pid": served.pid,
            }  # fmt: skip
            return Response(msgspec.json.encode(body), media_type="application/json", headers=headers)
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    raise AssertionError("unreachable: a stream always ends with a Finish")


def _pool_metrics(pool: ModelPool) -> list[str]:
    lines = [
        "# HELP genome_daemon_memory_budget_bytes The daemon's memory budget for model weights.",
        "# TYPE genome_daemon_memory_budget_bytes gauge",
        f"genome_daemon_memory_budget_bytes {pool.settings.memory_bytes}",
        "# HELP genome_daemon_memory_used_bytes Declared weight bytes of the models started now.",
        "# TYPE genome_daemon_memory_used_bytes gauge",
        f"genome_daemon_memory_used_bytes {pool.used_bytes}",
    ]
    per_model = (
        ("up", "gauge", "1 when the model's worker is ready.", lambda s: int(s.state == "ready")),
        ("unhealthy", "gauge", "1 when the model crashed too often in a row to restart.", lambda s: int(s.state == "unhealthy")),
        ("memory_bytes", "gauge", "The model's declared weight bytes.", lambda s: s.declared_bytes),
        ("in_flight", "gauge", "Requests the model's worker is running.", lambda s: s.in_flight),
        ("restarts_total", "counter", "Restarts of the model's worker after a crash.", lambda s: s.restarts),
    )
    statuses = pool.status()
    for name, kind, text, value in per_model:
        lines += [f"# HELP genome_daemon_model_{name} {text}", f"# TYPE genome_daemon_model_{name} {kind}"]
        lines += [f'genome_daemon_model_{name}{{model="{s.model}"}} {value(s)}' for s in statuses]
    return lines


def _labelled(expositions: dict[str, str]) -> list[str]:
    """The workers' engine metrics, each sample labelled with its model (the names stay the engine's)."""
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.utils import floatToGoString

    families: dict[str, tuple[str, str, list[str]]] = {}
    for model, exposition in expositions.items():
        for family in text_string_to_metric_families(exposition):
            kind = family.type if family.type in ("counter", "gauge", "histogram", "summary") else "untyped"
            _, _, samples = families.setdefault(family.name, (family.documentation, kind, []))
            for sample in family.samples:
                labels = ",".join(f'{key}="{_escape(value)}"' for key, value in {"model": model, **sample.labels}.items())
                samples.append(f"{sample.name}{{{labels}}} {floatToGoString(sample.value)}")
    lines: list[str] = []
    for name, (documentation, kind, samples) in families.items():
        lines += [f"# HELP {name} {_escape(documentation)}", f"# TYPE {name} {kind}", *samples]
    return lines


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
