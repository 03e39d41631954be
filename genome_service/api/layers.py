"""Layers over HTTP: LoRA adapters with their metadata, uploaded as multipart, downloaded byte for byte."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Response, delete, get, patch, post
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.exceptions import HTTPException
from litestar.handlers import BaseRouteHandler
from litestar.params import FromPath, FromQuery, JSONBody, MultipartBody, QueryParameter
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT, HTTP_415_UNSUPPORTED_MEDIA_TYPE

from genome_service.api.conventions import bound, created, uploaded_files, with_etag
from genome_service.domain.layer import TraitType
from genome_service.services.context import Caller, Command
from genome_service.services.layers import Layer, Layers
from genome_service.services.reads import MAX_PAGE, EventView, Page


class LayerUpdate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    description: str | None = None
    tags: list[str] | None = None
    public: bool | None = None
    license: str | None = None


def _location(layer: Layer) -> str:
    return f"/layers/{layer.id}"


def _upload(self: LayerController, command: NamedDependency[Command], data: MultipartBody[dict[str, Any]]) -> Response[Layer]:
    """Register a layer: a `metadata` JSON part plus the adapter files (mlx-lm or PEFT layout)."""
    layer = self.layers.register(command, data.pop("metadata", None), uploaded_files(data))
    return created(layer, _location)


def _multipart_only(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    # A guard runs before the body is parsed, so a JSON body gets 415, not a parse error.
    if not connection.headers.get("content-type", "").startswith(RequestEncodingType.MULTI_PART):
        raise HTTPException(
            status_code=HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            detail="upload a layer as multipart/form-data: a metadata part and the adapter files",
        )


def layer_controller(layers: Layers, max_adapter_bytes: int) -> type[Controller]:
    """The layers controller on ``layers``, its upload route given the adapter size limit (the rest keep the JSON one)."""
    upload = post(
        "/", operation_id="uploadLayer", status_code=HTTP_201_CREATED, sync_to_thread=True,
        request_max_body_size=max_adapter_bytes, guards=[_multipart_only],
    )(_upload)
    return bound(LayerController, upload=upload, layers=layers)


class LayerController(Controller):
    path = "/layers"
    tags = ["layers"]
    layers: Layers

    @get("/{layer_id:str}", operation_id="getLayer", sync_to_thread=False)
    def read(self, caller: NamedDependency[Caller], layer_id: FromPath[str]) -> Response[Layer]:
        """One layer (the caller's own, or a public one)."""
        layer = self.layers.get(caller, layer_id)
        return with_etag(layer, layer.version)

    @get("/", operation_id="listLayers", sync_to_thread=False)
    def list(
        self, caller: NamedDependency[Caller],
        trait_type: FromQuery[TraitType | None] = None,
        tag: FromQuery[str | None] = None,
        base_model: FromQuery[str | None] = None,
        creator: FromQuery[str | None] = None,
        public: FromQuery[bool | None] = None,
        deprecated: FromQuery[bool] = False,
        limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = 50,
        cursor: FromQuery[str | None] = None,
    ) -> Page:
        """Layers the caller may see (its own and public ones), filtered, a page at a time."""
        return self.layers.list(caller, trait_type=trait_type and trait_type.value, tag=tag, base_model=base_model,
                                creator=creator, public=public, deprecated=deprecated, limit=limit, cursor=cursor)

    @get("/{layer_id:str}/adapter", operation_id="downloadAdapter", sync_to_thread=True, media_type="application/octet-stream")
    def download(
        self, caller: NamedDependency[Caller], layer_id: FromPath[str],
        file: Annotated[Literal["weights", "config"], QueryParameter(description="Which file of the adapter.")] = "weights",
    ) -> Response[bytes]:
        """The adapter file exactly as uploaded, as a download (weights or config)."""
        name, content = self.layers.adapter(caller, layer_id, file)
        return Response(content, headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @patch("/{layer_id:str}", operation_id="updateLayer", sync_to_thread=False)
    def update(self, command: NamedDependency[Command], layer_id: FromPath[str], data: JSONBody[LayerUpdate]) -> Response[Layer]:
        """Change description, tags, license or sharing; honours If-Match."""
        layer = self.layers.update(command, layer_id, description=data.description, tags=data.tags, public=data.public,
                                   license=data.license)
        return with_etag(layer, layer.version)

    @delete("/{layer_id:str}", operation_id="deprecateLayer", status_code=HTTP_204_NO_CONTENT, sync_to_thread=False)
    def deprecate(self, command: NamedDependency[Command], layer_id: FromPath[str], reason: FromQuery[str] = "") -> None:
        """Deprecate: genomes that hold it keep it, but it can no longer be attached."""
        self.layers.deprecate(command, layer_id, reason)

    @get("/{layer_id:str}/events", operation_id="layerEvents", sync_to_thread=False)
    def events(self, caller: NamedDependency[Caller], layer_id: FromPath[str]) -> list[EventView]:
        """The layer's whole history, oldest first."""
        return self.layers.events(caller, layer_id)
