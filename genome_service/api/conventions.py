"""HTTP conventions shared by every controller: versions as ETags, If-Match, Idempotency-Key, cursors."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any, BinaryIO

import msgspec
from litestar import Request
from litestar.datastructures import UploadFile
from litestar.exceptions import ClientException
from litestar.types import Empty
from litestar.utils.scope.state import ScopeState

from genome_service.eventstore.cipher import MasterKey
from genome_service.eventstore.data_keys import DataKeys
from genome_service.eventstore.records import EventMetadata

MAX_IDEMPOTENCY_KEY = 200


def etag(version: int) -> str:
    return f'"{version}"'


def expected_version(request: Request[Any, Any, Any]) -> int | None:
    """The stream version a client's ``If-Match`` names, if it sent one."""
    header = request.headers.get("if-match")
    if header is None:
        return None
    value = header.strip().removeprefix("W/").strip('"')
    if not value.isdigit() or int(value) < 1:
        raise ClientException(f"If-Match must be an ETag this service issued, like \"3\" (got {header!r})")
    return int(value)


def command_metadata(request: Request[Any, Any, Any], owner: str, keys: DataKeys) -> EventMetadata:
    """Who asked, and the Idempotency-Key namespaced by owner and operation: a key never
    replays another owner's request, nor a different kind of request. ``keys`` gives the
    master key that keys the request's fingerprint."""
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY:
        raise ClientException(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
    correlation = request.headers.get("x-request-id")
    return EventMetadata(
        actor=owner,
        correlation_id=correlation[:200] if correlation else None,
        idempotency_key=f"{owner}:{request.route_handler.operation_id}:{key}" if key is not None else None,
        request_fingerprint=request_fingerprint(request, keys.master()) if key is not None else None,
    )


def request_fingerprint(request: Request[Any, Any, Any], master: MasterKey) -> str:
    """HMAC-SHA256 (under a subkey of the master key) of the method, path, query and body,
    as the handler received them.

    Handlers run once their body is read (JSON) or parsed (multipart), so this reads
    what Litestar kept: the bytes, or the form's text parts and files.
    """
    digest = master.fingerprint()
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
    return digest.hexdigest()


def _update_from_file(digest: Any, file: BinaryIO) -> None:
    # The handler may still read this file: leave it where it was.
    at = file.tell()
    file.seek(0)
    for chunk in iter(lambda: file.read(1 << 20), b""):
        digest.update(chunk)
    file.seek(at)


class Cursor(msgspec.Struct, array_like=True, frozen=True):
    """Keyset position: the (created_at, id) of the last item of the previous page."""

    created_at: datetime
    id: str

    def encode(self) -> str:
        return base64.urlsafe_b64encode(msgspec.json.encode(self)).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> Cursor:
        try:
            return msgspec.json.decode(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)), type=cls)
        except (ValueError, msgspec.DecodeError) as exc:
            raise ClientException(f"cursor {token[:40]!r} is not one this service issued") from exc


class Page(msgspec.Struct, frozen=True):
    items: list[Any]
    next_cursor: str | None
