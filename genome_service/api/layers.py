"""Layers: LoRA adapters with their metadata, uploaded as multipart, downloaded byte for byte."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
import sqlalchemy as sa
from litestar import Controller, Request, Response, delete, get, patch, post
from litestar.connection import ASGIConnection
from litestar.datastructures import UploadFile
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.exceptions import (
    ClientException,
    HTTPException,
    PermissionDeniedException,
)
from litestar.handlers import BaseRouteHandler
from litestar.params import FromPath, FromQuery, JSONBody, MultipartBody, QueryParameter
from litestar.status_codes import (
    HTTP_201_CREATED,
    HTTP_204_NO_CONTENT,
    HTTP_415_UNSUPPORTED_MEDIA_TYPE,
)

from genome_service.api.auth import Caller
from genome_service.api.conventions import Page, command_metadata, expected_version
from genome_service.api.resources import (
    MAX_PAGE,
    EventView,
    caller_of,
    event_views,
    page,
    visible_row,
    with_etag,
)
from genome_service.domain import layer as domain
from genome_service.eventstore.repository import Aggregate
from genome_service.projections.tables import LayerRow
from genome_service.services.bootstrap import Services
from genome_service.services.layers import LayerDetails, adapter_file, register_layer

TABLE = LayerRow.__table__  # type: ignore[attr-defined]


class LayerUpdate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    description: str | None = None
    tags: list[str] | None = None
    public: bool | None = None
    license: str | None = None


class Layer(msgspec.Struct, frozen=True):
    id: str
    owner: str
    name: str
    description: str
    base_model: str
    adapter_sha256: str
    adapter_format: str
    rank: int
    target_modules: list[str]
    trait_type: str
    tags: list[str]
    creator: str
    license: str
    public: bool
    parent_layer_id: str | None
    training_metrics: dict[str, Any] | None
    deprecated: bool
    deprecation_reason: str
    version: int
    created_at: datetime
    updated_at: datetime


def _from_fields(fields: dict[str, Any], version: int, created_at: datetime, updated_at: datetime) -> Layer:
    fields = {**fields, "id": fields.pop("layer_id"), "version": version, "created_at": created_at, "updated_at": updated_at}
    return msgspec.convert(fields, Layer)


def _from_aggregate(aggregate: Aggregate[domain.Layer]) -> Layer:
    assert aggregate.state is not None and aggregate.created_at and aggregate.updated_at
    return _from_fields(msgspec.to_builtins(aggregate.state), aggregate.version, aggregate.created_at, aggregate.updated_at)


def _from_row(row: dict[str, Any]) -> Layer:
    fields = {k: v for k, v in row.items() if k not in ("version", "created_at", "updated_at")}
    return _from_fields(fields, row["version"], row["created_at"], row["updated_at"])


def _readable(services: Services, layer_id: str, caller: Caller) -> dict[str, Any]:
    return visible_row(services, TABLE, "layer_id", layer_id, caller, "layer", archived_column=None, public_column="public")


def _tag_filter(services: Services, tag: str) -> sa.ColumnElement[bool]:
    if services.database.dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import JSONB

        return sa.cast(TABLE.c.tags, JSONB).contains([tag])
    each = sa.func.json_each(TABLE.c.tags).table_valued("value")
    return sa.exists(sa.select(1).select_from(each).where(each.c.value == tag))


def _upload(
    self: Controller, request: Request[Any, Any, Any], services: NamedDependency[Services],
    data: MultipartBody[dict[str, Any]],
) -> Response[Layer]:
    """Register a layer: a `metadata` JSON part plus the adapter files (mlx-lm or PEFT layout)."""
    raw_metadata = data.pop("metadata", None)
    if not isinstance(raw_metadata, str):
        raise ClientException("the multipart body needs a `metadata` part holding the layer's JSON details")
    try:
        details = msgspec.json.decode(raw_metadata, type=LayerDetails)
    except msgspec.DecodeError as error:
        raise ClientException(f"metadata: {error}") from error
    files = _uploaded_files(data)
    caller = caller_of(request)
    outcome = register_layer(services, caller.owner, details, files, command_metadata(request, caller.owner, services.data_keys))
    layer = _from_aggregate(outcome.aggregate)
    return with_etag(layer, layer.version, HTTP_201_CREATED, {"Location": f"/layers/{layer.id}"})


def _multipart_only(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    # A guard runs before the body is parsed, so a JSON body gets 415, not a parse error.
    if not connection.headers.get("content-type", "").startswith(RequestEncodingType.MULTI_PART):
        raise HTTPException(
            status_code=HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            detail="upload a layer as multipart/form-data: a metadata part and the adapter files",
        )


def layer_controller(max_adapter_bytes: int) -> type[Controller]:
    """The layers controller, its upload route given the adapter size limit (the rest keep the JSON one)."""
    upload = post(
        "/", operation_id="uploadLayer", status_code=HTTP_201_CREATED, sync_to_thread=True,
        request_max_body_size=max_adapter_bytes, guards=[_multipart_only],
    )(_upload)
    return type("LayerController", (LayerController,), {"upload": upload})


def _uploaded_files(parts: dict[str, Any]) -> dict[str, bytes]:
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


class LayerController(Controller):
    path = "/layers"
    tags = ["layers"]

    @get("/{layer_id:str}", operation_id="getLayer", sync_to_thread=False)
    def read(self, request: Request[Any, Any, Any], services: NamedDependency[Services], layer_id: FromPath[str]) -> Response[Layer]:
        """One layer (the caller's own, or a public one)."""
        row = _readable(services, layer_id, caller_of(request))
        return with_etag(_from_row(row), row["version"])

    @get("/", operation_id="listLayers", sync_to_thread=False)
    def list(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services],
        trait_type: FromQuery[domain.TraitType | None] = None,
        tag: FromQuery[str | None] = None,
        base_model: FromQuery[str | None] = None,
        creator: FromQuery[str | None] = None,
        public: FromQuery[bool | None] = None,
        deprecated: FromQuery[bool] = False,
        limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = 50,
        cursor: FromQuery[str | None] = None,
    ) -> Page:
        """Layers the caller may see (its own and public ones), filtered, a page at a time."""
        owner = caller_of(request).owner

        def load(_connection: object) -> Page:
            where = [sa.or_(TABLE.c.owner == owner, TABLE.c.public.is_(True)), TABLE.c.deprecated == deprecated]
            for column, value in (("trait_type", trait_type and trait_type.value), ("base_model", base_model), ("creator", creator), ("public", public)):
                if value is not None:
                    where.append(TABLE.c[column] == value)
            if tag is not None:
                where.append(_tag_filter(services, tag.strip().lower()))
            rows, next_cursor = page(services, TABLE, "layer_id", where, cursor, limit)
            return Page([_from_row(row) for row in rows], next_cursor)

        key = ("layers", owner, trait_type, tag, base_model, creator, public, deprecated, limit, cursor)
        return services.database.read_through(key, load)

    @get("/{layer_id:str}/adapter", operation_id="downloadAdapter", sync_to_thread=True, media_type="application/octet-stream")
    def download(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services], layer_id: FromPath[str],
        file: Annotated[Literal["weights", "config"], QueryParameter(description="Which file of the adapter.")] = "weights",
    ) -> Response[bytes]:
        """The adapter file exactly as uploaded, as a download (weights or config)."""
        row = _readable(services, layer_id, caller_of(request))
        name, content = adapter_file(services, row["adapter_sha256"], file)
        return Response(content, headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @patch("/{layer_id:str}", operation_id="updateLayer", sync_to_thread=False)
    def update(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services], layer_id: FromPath[str],
        data: JSONBody[LayerUpdate],
    ) -> Response[Layer]:
        """Change description, tags, license or sharing; honours If-Match."""
        tags = tuple(data.tags) if data.tags is not None else None
        return self._execute(request, services, layer_id, domain.ChangeLayerDetails(data.description, tags, data.public, data.license))

    @delete("/{layer_id:str}", operation_id="deprecateLayer", status_code=HTTP_204_NO_CONTENT, sync_to_thread=False)
    def deprecate(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services], layer_id: FromPath[str],
        reason: FromQuery[str] = "",
    ) -> None:
        """Deprecate: genomes that hold it keep it, but it can no longer be attached."""
        self._execute(request, services, layer_id, domain.DeprecateLayer(reason))

    @get("/{layer_id:str}/events", operation_id="layerEvents", sync_to_thread=False)
    def events(self, request: Request[Any, Any, Any], services: NamedDependency[Services], layer_id: FromPath[str]) -> list[EventView]:
        """The layer's whole history, oldest first."""
        _readable(services, layer_id, caller_of(request))
        return event_views(services.store.read_stream(layer_id))

    def _execute(self, request: Request[Any, Any, Any], services: Services, layer_id: str, command: Any) -> Response[Layer]:
        caller = caller_of(request)
        if _readable(services, layer_id, caller)["owner"] != caller.owner:
            raise PermissionDeniedException("a public layer can be changed only by its owner")
        outcome = services.commands.execute(
            domain.LAYER, layer_id, command,
            expected_version=expected_version(request), metadata=command_metadata(request, caller.owner, services.data_keys),
        )
        layer = _from_aggregate(outcome.aggregate)
        return with_etag(layer, layer.version)
