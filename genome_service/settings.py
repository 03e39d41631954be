"""The one typed settings object, read once from the environment (``GENOME_*``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import msgspec

ENV_PREFIX = "GENOME_"


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    data_dir: Path = Path("./data")
    # Where adapter blobs live (content-addressed); default: ``data_dir/blobs``.
    blob_dir: Path | None = None
    # Empty means the embedded default: a SQLite file inside ``data_dir``.
    database_url: str = ""
    # WAL + NORMAL survives a crashed process (not a lost power supply) and is
    # what SQLite recommends for WAL; FULL fsyncs every commit.
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = "NORMAL"
    # Seconds a writer waits for SQLite's write lock before failing.
    sqlite_busy_timeout: float = 30.0
    # A snapshot is written whenever a stream's version crosses a multiple of this.
    snapshot_every: int = 100
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Largest JSON request body; adapter uploads have their own, larger limit.
    max_body_bytes: int = 1_048_576
    max_adapter_bytes: int = 268_435_456
    max_lora_rank: int = 64
    # Requests per minute per API key (or per address without one); 0 turns limiting off.
    rate_limit_per_minute: int = 1200

    def __post_init__(self) -> None:
        if self.snapshot_every < 1:
            raise ValueError("GENOME_SNAPSHOT_EVERY must be >= 1")
        if not 1 <= self.port <= 65535:
            raise ValueError("GENOME_PORT must be within 1..65535")
        if self.workers < 1:
            raise ValueError("GENOME_WORKERS must be >= 1")
        if min(self.max_body_bytes, self.max_adapter_bytes, self.max_lora_rank) < 1:
            raise ValueError("GENOME_MAX_BODY_BYTES, GENOME_MAX_ADAPTER_BYTES and GENOME_MAX_LORA_RANK must be >= 1")
        if self.rate_limit_per_minute < 0:
            raise ValueError("GENOME_RATE_LIMIT_PER_MINUTE must be >= 0 (0 turns limiting off)")

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'genome.db').resolve()}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from ``GENOME_*`` variables; ``overrides`` (e.g. CLI flags) win."""
        environ = os.environ if environ is None else environ
        fields = set(cls.__struct_fields__)
        raw: dict[str, object] = {}
        for key, value in environ.items():
            if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX):].lower() in fields:
                raw[key[len(ENV_PREFIX):].lower()] = value
        raw.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return msgspec.convert(raw, cls, strict=False, dec_hook=_decode_path)
        except msgspec.ValidationError as exc:
            message = str(exc)
            field = message.rpartition("at `$.")[2].rstrip("`")
            if field in fields:
                message = f"{ENV_PREFIX}{field.upper()}: {message.partition(' - at ')[0]}"
            raise SettingsError(message) from exc


def _decode_path(kind: type, value: object) -> object:
    if kind is Path and isinstance(value, (str, Path)):
        return Path(value)
    raise NotImplementedError(f"cannot read {kind.__name__} from {value!r}")


class SettingsError(ValueError):
    """A ``GENOME_*`` variable or flag has a value the service cannot use."""
