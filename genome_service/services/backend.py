"""The inference backend the settings choose, on the model they name, and the daemon's pool of them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from genome_service.settings import Settings
from inference.backends.base import Backend
from inference.models import ModelCatalog, ModelNotPulled, UnknownModel, declared_weight_bytes

if TYPE_CHECKING:
    from inference.daemon.pool import ModelPool


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


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def daemon_pool(settings: Settings) -> ModelPool:
    """The daemon's pool of model workers, configured by `settings` (see `inference/daemon/pool.py`)."""
    from inference.backends import detect_backend
    from inference.daemon.pool import ModelPool, ModelRefused, ModelSource, PoolSettings
    from inference.daemon.worker import WorkerConfig

    backend = settings.inference_backend if settings.inference_backend != "auto" else detect_backend()
    if backend == "openai":
        raise ValueError("the inference daemon hosts local models (torch or mlx): an OpenAI-compatible server is a "
                         "daemon of its own; point GENOME_OPENAI_BASE_URL at it instead")
    catalog = ModelCatalog(settings.resolved_models_dir)
    # float32 on the CPU; an accelerator loads bfloat16 (torch) or the file's dtype (mlx).
    bytes_per_parameter = 4 if settings.inference_device in ("auto", "cpu") and backend == "torch" else 2
    blobs_dir = None if settings.inference_blobs_url else str(settings.resolved_blob_dir.resolve())

    def source(model: str) -> ModelSource | None:
        try:
            folder = catalog.folder(model)
        except UnknownModel:
            return None
        except ModelNotPulled as error:
            raise ModelRefused(503, "model_unavailable", str(error)) from None
        config = WorkerConfig(
            model=model, folder=str(folder), backend=backend, device=settings.inference_device, blobs_dir=blobs_dir,
            blobs_url=settings.inference_blobs_url or None, token=settings.inference_token,
            max_lora_rank=settings.max_lora_rank, adapter_cache_bytes=settings.adapter_cache_bytes,
            stack_cache_size=settings.stack_cache_size, max_queue=settings.inference_queue_size,
            timeout=settings.inference_timeout, max_batch=settings.inference_max_batch,
            max_batch_tokens=settings.inference_max_batch_tokens, prefill_chunk=settings.inference_prefill_chunk,
        )  # fmt: skip
        return ModelSource(config, declared_weight_bytes(folder, bytes_per_parameter))

    pool_settings = PoolSettings(
        memory_bytes=settings.inference_memory_bytes or physical_memory_bytes() // 2,
        restart_backoff_s=settings.inference_restart_backoff_seconds, max_crashes=settings.inference_max_crashes,
        stuck_grace_s=settings.inference_stuck_grace_seconds,
    )  # fmt: skip
    return ModelPool(source, pool_settings)
