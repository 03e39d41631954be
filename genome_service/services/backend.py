"""The inference backend the settings choose, on the model they name: one way to open it."""

from __future__ import annotations

from pathlib import Path

from genome_service.settings import Settings
from inference.backends.base import Backend
from inference.models import ModelCatalog


def open_configured_backend(settings: Settings, catalog: ModelCatalog) -> tuple[Backend, Path | None]:
    """The backend and, for a local one, the model folder it loaded.

    Raises `UnknownModel` or `ModelNotPulled` (both `LookupError`s) before anything loads.
    """
    from inference.backends import detect_backend, open_backend

    name = settings.inference_backend if settings.inference_backend != "auto" else detect_backend()
    folder = None if name == "openai" else catalog.folder(settings.inference_model)
    backend = open_backend(
        name, folder=folder, model=settings.openai_model or settings.inference_model, device=settings.inference_device,
        stack_cache_size=settings.stack_cache_size, base_url=settings.openai_base_url,
        api_key=settings.openai_api_key, adapter_protocol=settings.openai_adapter_protocol,
        adapters_dir=settings.resolved_openai_adapters_dir,
    )  # fmt: skip
    return backend, folder
