"""Which backend runs, and the settings that choose it, refused when they cannot work."""

from __future__ import annotations

from pathlib import Path

import pytest

from genome_service.settings import Settings, SettingsError
from inference.backends import detect_backend, open_backend


@pytest.mark.parametrize(
    ("system", "machine", "expected"),
    [("Darwin", "arm64", "mlx"), ("Darwin", "x86_64", "torch"), ("Linux", "x86_64", "torch"), ("Linux", "aarch64", "torch")],
)
def test_mlx_on_apple_silicon_and_torch_elsewhere(system: str, machine: str, expected: str) -> None:
    assert detect_backend(system, machine) == expected


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("openai", {}, "the openai backend needs a server: set GENOME_OPENAI_BASE_URL"),
        ("torch", {}, "the torch backend needs a model folder, got none"),
        ("tpu", {"folder": Path(".")}, "backend: expected auto, torch, mlx or openai, got 'tpu'"),
    ],
)
def test_a_backend_that_cannot_run_is_refused_before_loading_anything(name: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        open_backend(name, **options)  # type: ignore[arg-type]


def test_inference_settings_default_to_the_data_dir_and_refuse_bad_values() -> None:
    settings = Settings.from_env({"GENOME_DATA_DIR": "/srv/genome"})
    assert settings.resolved_models_dir == Path("/srv/genome/models") and settings.inference_backend == "auto"
    assert Settings.from_env({"GENOME_MODELS_DIR": "/models"}).resolved_models_dir == Path("/models")
    with pytest.raises(SettingsError, match="GENOME_INFERENCE_BACKEND: Invalid enum value 'cuda'"):
        Settings.from_env({"GENOME_INFERENCE_BACKEND": "cuda"})
    with pytest.raises(SettingsError, match="GENOME_INFERENCE_TIMEOUT must be > 0 seconds"):
        Settings.from_env({"GENOME_INFERENCE_TIMEOUT": "0"})
    with pytest.raises(SettingsError, match="GENOME_ADAPTER_CACHE_BYTES, GENOME_STACK_CACHE_SIZE"):
        Settings.from_env({"GENOME_STACK_CACHE_SIZE": "0"})
