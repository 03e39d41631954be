"""Adapters for a daemon worker, fetched by content hash and validated before first use.

A layer's adapter reference is the SHA-256 of a small JSON manifest naming its files by
their own hashes (the API's blob store layout). The daemon reads them from the API's blob
folder, or over HTTP from the API where no folder is shared, and checks every blob's bytes
against its name: a hash is the only thing a request can say about an adapter.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Protocol

import httpx
import msgspec

from inference.lora.adapter import AdapterRejected, parse_adapter, to_canonical
from inference.lora.cache import AdapterCache, LoadedAdapter, StackCache
from inference.lora.stack import LoraStack
from inference.models import ModelSpec

_SHA256 = re.compile(r"[0-9a-f]{64}")


class AdapterMissing(LookupError):
    """No blob with that hash (or one whose bytes do not match it)."""


class _Manifest(msgspec.Struct, frozen=True):
    files: dict[str, str]


class BlobSource(Protocol):
    def read(self, sha256: str) -> bytes: ...


class FolderBlobs:
    """The API's blob folder (`<root>/<first two hex digits>/<sha256>`), shared with this machine."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def read(self, sha256: str) -> bytes:
        try:
            return _checked(sha256, (self.root / sha256[:2] / sha256).read_bytes())
        except FileNotFoundError:
            raise AdapterMissing(f"no blob {sha256} in {self.root}") from None


class HttpBlobs:
    """Blobs from the API's `GET /inference/blobs/{sha256}`, authorised by the daemon's token."""

    def __init__(self, base_url: str, token: str, timeout: float = 30.0) -> None:
        self._client = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout,
                                    headers={"Authorization": f"Bearer {token}"} if token else {})

    def read(self, sha256: str) -> bytes:
        response = self._client.get(f"/inference/blobs/{sha256}")
        if response.status_code == 404:
            raise AdapterMissing(f"the API has no blob {sha256}")
        response.raise_for_status()
        return _checked(sha256, response.content)


def _checked(sha256: str, data: bytes) -> bytes:
    if hashlib.sha256(data).hexdigest() != sha256:
        raise AdapterMissing(f"blob {sha256}: its bytes do not match its hash")
    return data


class AdapterStacks:
    """Stacks of adapters named by hash, for one model, through byte-bounded caches."""

    def __init__(self, source: BlobSource, spec: ModelSpec, *, max_rank: int, adapter_cache_bytes: int,
                 stack_cache_size: int) -> None:
        self._source = source
        self._spec = spec
        self._max_rank = max_rank
        self.cache = StackCache(stack_cache_size, AdapterCache(adapter_cache_bytes))

    def stack(self, entries: list[tuple[str, float, float | None]]) -> LoraStack | None:
        """The assembled stack of (adapter hash, weight, scale or None for the adapter's own),
        None for no entries; raises `AdapterMissing` or `AdapterRejected`."""
        for sha256, _, _ in entries:
            if not _SHA256.fullmatch(sha256):
                raise AdapterRejected("invalid_adapter_hash", f"adapter_sha256: expected 64 lowercase hex digits, got {sha256!r}")
        if not entries:
            return None
        return self.cache.get([(sha256, weight) for sha256, weight, _ in entries], self._load, [scale for _, _, scale in entries])

    def _load(self, sha256: str) -> LoadedAdapter:
        try:
            manifest = msgspec.json.decode(self._source.read(sha256), type=_Manifest)
        except msgspec.DecodeError:
            raise AdapterRejected("invalid_adapter", f"adapter {sha256}: its manifest is not an adapter manifest") from None
        if not all(_SHA256.fullmatch(blob) for blob in manifest.files.values()):
            raise AdapterRejected("invalid_adapter", f"adapter {sha256}: its manifest names a file by something else than a hash")
        files = {name: self._source.read(blob) for name, blob in manifest.files.items()}
        try:
            info = parse_adapter(files, self._spec, max_rank=self._max_rank)
        except AdapterRejected as exc:
            raise AdapterRejected(exc.reason, f"adapter {sha256}: {exc}") from None
        return LoadedAdapter(to_canonical(files, info), info.scale)
