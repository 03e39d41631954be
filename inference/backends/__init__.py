"""Backends behind one protocol (`inference.backends.base`): torch, mlx and openai.

Each backend lives in its own module and is imported only when chosen: torch, mlx and
the HTTP client are heavy, and a process runs one of them.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Literal

from inference.backends.base import Backend

BackendName = Literal["torch", "mlx", "openai"]


def detect_backend(system: str | None = None, machine: str | None = None) -> BackendName:
    """mlx on Apple silicon (Metal), torch everywhere else."""
    system = system or platform.system()
    machine = machine or platform.machine()
    return "mlx" if system == "Darwin" and machine == "arm64" else "torch"


def open_backend(
    name: BackendName | Literal["auto"],
    *,
    folder: Path | None = None,
    model: str = "",
    device: str = "auto",
    stack_cache_size: int = 16,
    base_url: str = "",
    api_key: str = "",
    adapter_protocol: Literal["vllm", "mlx-lm"] = "vllm",
    adapters_dir: Path | None = None,
) -> Backend:
    """Load the chosen backend: a local one from the model `folder`, or openai at `base_url`."""
    chosen = detect_backend() if name == "auto" else name
    if chosen == "openai":
        from inference.backends.openai import OpenAIBackend

        if not base_url:
            raise ValueError("the openai backend needs a server: set GENOME_OPENAI_BASE_URL (e.g. http://127.0.0.1:8080/v1)")
        return OpenAIBackend(base_url, api_key, model, adapters=adapter_protocol, adapters_dir=adapters_dir)
    if folder is None:
        raise ValueError(f"the {chosen} backend needs a model folder, got none")
    if chosen == "mlx":
        from inference.backends.mlx import MlxBackend

        return MlxBackend(folder, stack_cache_size=stack_cache_size)
    if chosen == "torch":
        from inference.backends.torch import TorchBackend

        return TorchBackend(folder, device=device, stack_cache_size=stack_cache_size)
    raise ValueError(f"backend: expected auto, torch, mlx or openai, got {name!r}")
