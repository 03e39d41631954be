"""HTTP conventions shared by every controller: the caller and the command as dependencies
(versions from If-Match, Idempotency-Key, request ids), ETag responses, controllers bound to
their feature services.

Handlers whose work is a few short queries run on the event loop
(``sync_to_thread=False``): a thread hop costs more CPU (GIL handoffs around each
call) than the queries block, and writes queue on one writer connection anyway.
Only adapter uploads and downloads, which move large files, go to a thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, BinaryIO, TypeVar

from litestar import Controller, MediaType, Request, Response
from litestar.datastructures import UploadFile
from litestar.di import NamedDependency, Provide
from litestar.exceptions import ClientException
from litestar.response import ServerSentEventMessage
from litestar.serialization import encode_json, get_serializer
from litestar.status_codes import HTTP_200_OK
from litestar.types import ASGIApp, Empty, Receive, Scope, Send
from litestar.utils.scope.state import ScopeState

from genome_service.services.bootstrap import Services
from genome_service.services.context import Caller, Command, command_metadata
from genome_service.services.reads import EventView

T = TypeVar("T")
C = TypeVar("C", bound=type[Controller])
MAX_IDEMPOTENCY_KEY = 200


async def sse_messages(events: AsyncIterator[EventView]) -> AsyncIterator[ServerSentEventMessage]:
    """Every event of a followed stream as an SSE message named by its type, in order."""
    async for view in events:
        yield ServerSentEventMessage(encode_json(view).decode(), event=view.type, id=str(view.version))


def etag(version: int) -> str:
    return f'"{version}"'


def bound(controller: C, **features: object) -> C:
    """The controller with its feature services as class attributes.

    Not Litestar dependencies: two dependencies at the same depth are resolved in an anyio
    task group, which costs a GET by id about half its own work (45 µs); a handler's only
    dependency is then its caller (reads) or its command (writes, which chains on the caller).
    """
    return type(controller.__name__, (controller,), {"__module__": controller.__module__, **features})  # type: ignore[return-value]


def dependencies(services: Services) -> dict[str, Provide]:
    """``caller`` (who asks, set by the key middleware) and ``command`` (the caller, the event
    metadata of this request and the version its If-Match expects), chained so that a handler
    taking both resolves them one after the other, never in a task group."""

    def caller(request: Request[Any, Any, Any]) -> Caller:
        return request.user  # type: ignore[no-any-return]  # set by ApiKeyAuthentication

    async def command(request: Request[Any, Any, Any], caller: NamedDependency[Caller]) -> Command:
        return Command(caller, await _metadata(request, caller.owner, services), expected_version(request))

    return {"caller": Provide(caller, sync_to_thread=False), "command": Provide(command)}


def expected_version(request: Request[Any, Any, Any]) -> int | None:
    """The stream version a client's ``If-Match`` names, if it sent one."""
    header = request.headers.get("if-match")
    if header is None:
        return None
    value = header.strip().removeprefix("W/").strip('"')
    if not value.isdigit() or int(value) < 1:
        raise ClientException(f"If-Match must be an ETag this service issued, like \"3\" (got {header!r})")
    return int(value)


async def _metadata(request: Request[Any, Any, Any], owner: str, services: Services) -> Any:
    """Who asked, the request id, and the Idempotency-Key with the request's fingerprint."""
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY:
        raise ClientException(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
    fingerprint = None
    if key is not None:
        digest = services.data_keys.master().fingerprint()
        # An uploaded adapter may be large: hash its files off the event loop.
        uploads = ScopeState.from_scope(request.scope).form is not Empty
        fingerprint = await asyncio.to_thread(request_fingerprint, request, digest) if uploads else request_fingerprint(request, digest)
    return command_metadata(
        owner, str(request.route_handler.operation_id), idempotency_key=key,
        correlation_id=request.headers.get("x-request-id"), fingerprint=fingerprint,
    )


def request_fingerprint(request: Request[Any, Any, Any], digest: Any) -> str:
    """``digest`` (an HMAC-SHA256 under a subkey of the master key) of the method, path,
    query and body, as the handler received them.

    Dependencies are resolved once the body is read (JSON) or parsed (multipart), so this
    reads what Litestar kept: the bytes, or the form's text parts and files.
    """
    digest.update(f"{request.method} {request.url.path}?{request.scope['query_string'].decode('latin-1')}\n".encode())
    state = ScopeState.from_scope(request.scope)
    if state.body is not Empty:
        digest.update(state.body)
    elif state.form is not Empty:
        for name, value in sorted(state.form.items()):
            for part in value if isinstance(value, list) else [value]:
                digest.update(f"\n{name}\n".encode())
                if isinstance(part, UploadFile):
                    digest.update(f"{part.filename}\n".encode())
                    _update_from_file(digest, part.file)
                else:
                    digest.update(str(part).encode())
    return str(digest.hexdigest())


def _update_from_file(digest: Any, file: BinaryIO) -> None:
    # The handler may still read this file: leave it where it was.
    at = file.tell()
    file.seek(0)
    for chunk in iter(lambda: file.read(1 << 20), b""):
        digest.update(chunk)
    file.seek(at)


def uploaded_files(parts: dict[str, Any]) -> dict[str, bytes]:
    """The files of a multipart body (every part but `metadata`), by file name."""
    files: dict[str, bytes] = {}
    for value in parts.values():
        for upload in value if isinstance(value, list) else [value]:
            if not isinstance(upload, UploadFile):
                raise ClientException("besides `metadata`, every part must be a file")
            if upload.filename in files:
                raise ClientException(f"the file {upload.filename!r} was sent twice")
            files[upload.filename] = upload.file.read()
    if not files:
        raise ClientException("no adapter files were uploaded")
    return files


def with_etag(body: T, version: int, status_code: int = HTTP_200_OK, location: str | None = None) -> Response[T]:
    headers = {"ETag": etag(version)} if location is None else {"ETag": etag(version), "Location": location}
    return VersionedResponse(body, status_code=status_code, headers=headers)


def created(body: Any, location: Callable[[Any], str]) -> Response[Any]:
    """201 with the new resource, its version and where it lives."""
    return with_etag(body, body.version, 201, location(body))


class VersionedResponse(Response[T]):
    """A resource as JSON with its headers, encoded straight into the two ASGI messages.

    Litestar's general path (header objects, merging, media-type checks) cost a GET by id
    about as much as its query; anything it would add here (route headers or cookies,
    background tasks, another media type, HEAD) takes that path still.
    """

    def to_asgi_response(  # type: ignore[override]
        self, app: Any, request: Request[Any, Any, Any], *, background: Any = None, cookies: Any = None,
        headers: dict[str, str] | None = None, is_head_response: bool = False, media_type: Any = None,
        status_code: int | None = None, **rest: Any,
    ) -> ASGIApp:
        kind = self.media_type or media_type or MediaType.JSON
        if headers or cookies or background or self.cookies or self.background or is_head_response or rest.get("encoded_headers") or kind != MediaType.JSON:
            return super().to_asgi_response(
                app, request, background=background, cookies=cookies, headers=headers, is_head_response=is_head_response,
                media_type=media_type, status_code=status_code, **rest,
            )
        body = encode_json(self.content, get_serializer(rest.get("type_encoders") or self.response_type_encoders))
        fields = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        fields += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in self.headers.items()]
        return _Encoded(self.status_code or status_code or HTTP_200_OK, fields, body)


class _Encoded:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": False})
