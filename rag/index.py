"""A FAISS index of unit vectors by string key, with attributes to filter on, saved with its position.

Inner product over L2-normalised vectors is cosine similarity: for |q| = |x| = 1,
q.x = cos(q, x), so a max-inner-product search is a cosine search.

- Below ``exact_below`` live vectors the index is exact: ``IndexIDMap2`` over
  ``IndexFlatIP``, where removal is real (``remove_ids``).
- At ``exact_below`` it is rebuilt as HNSW (``IndexHNSWFlat``). HNSW cannot remove,
  so a removed or replaced vector stays in the graph as a tombstone, excluded by
  an ID selector; once tombstones pass ``compact_ratio`` of the graph it is rebuilt
  from the live vectors (as HNSW again, or exact if fewer than half the threshold
  remain, so that the kind does not flap around the threshold).

Every entry lives in a *slot* (an int64 id, given in insertion order). In HNSW
mode a slot is the graph's own id; in exact mode it is the IDMap2 id.

Filtering: attributes are small strings (owner, trait type, persona...) stored as
integer codes per slot, and tags as an inverted index; a filter becomes a boolean
mask over slots, passed to FAISS as an ``IDSelectorBitmap``. When an HNSW search
may see only a few vectors (``brute_force_below``), they are scored exactly
instead: a graph walk that rejects almost every node it visits finds little.

Determinism: the same operations in the same order give the same index, bit for
bit, whether applied in one process or saved, loaded and continued in another.
FAISS draws an HNSW node's level from a generator that is not saved with the
index, and adds a batch of nodes in parallel; here every node is added alone,
with its level preset from a hash of its slot. That is what lets an index saved
before a crash and caught up from the log answer exactly like one rebuilt from it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import numpy as np

FORMAT = 1
_MASK64 = (1 << 64) - 1


class VectorError(ValueError):
    """A vector the index cannot take; ``rule`` names the check that failed."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


def normalise(vector: Iterable[float] | np.ndarray, dimension: int) -> np.ndarray:
    """``vector / |vector|`` as float32, after checking its dimension and that it is finite and not zero."""
    array = np.asarray(vector, dtype=np.float64)
    if array.ndim != 1 or array.shape[0] != dimension:
        raise VectorError("vector_dimension_mismatch", f"the vector must have {dimension} numbers (got {array.size})")
    if not np.isfinite(array).all():
        raise VectorError("vector_not_finite", "every number of the vector must be finite (no NaN or infinity)")
    norm = float(np.linalg.norm(array))
    if norm == 0.0 or not math.isfinite(norm):
        raise VectorError("vector_zero", "the vector must not be all zeros")
    return (array / norm).astype(np.float32)


class IndexConfig(msgspec.Struct, frozen=True, kw_only=True):
    exact_below: int = 20_000
    hnsw_m: int = 16
    ef_construction: int = 80
    # At 1M clustered vectors recall@10 was 0.927 at 64, 0.965 at 128 (benchmarks/search.py ef_sweep).
    ef_search: int = 128
    compact_ratio: float = 0.2
    brute_force_below: int = 4096

    def __post_init__(self) -> None:
        if min(self.exact_below, self.hnsw_m, self.ef_construction, self.ef_search) < 1:
            raise ValueError("exact_below, hnsw_m, ef_construction and ef_search must be >= 1")
        if not 0.0 < self.compact_ratio < 1.0:
            raise ValueError("compact_ratio must be within (0, 1)")


class Hit(NamedTuple):
    key: str
    score: float


class Filter(msgspec.Struct, frozen=True):
    """Entries whose every named attribute takes one of the given values, and that carry every tag."""

    equals: Mapping[str, frozenset[str]] = {}
    tags: frozenset[str] = frozenset()


class _Saved(msgspec.Struct, frozen=True):
    format: int
    fingerprint: str
    position: int
    dimension: int
    attributes: tuple[str, ...]
    config: IndexConfig
    hnsw: bool
    keys: list[str | None]
    vocabulary: list[str]
    tags: list[list[str]]
    dead: int


class VectorIndex:
    def __init__(self, dimension: int, attributes: tuple[str, ...], config: IndexConfig | None = None) -> None:
        import faiss

        self._faiss_module = faiss
        self.dimension = dimension
        self.attributes = attributes
        self.config = config or IndexConfig()
        self._column = {name: i for i, name in enumerate(attributes)}
        self._reset(hnsw=False)

    def _reset(self, *, hnsw: bool) -> None:
        faiss = self._faiss_module
        if hnsw:
            self._index: Any = faiss.IndexHNSWFlat(self.dimension, self.config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self._index.hnsw.efConstruction = self.config.ef_construction
            self._index.hnsw.efSearch = self.config.ef_search
            self._level_probabilities = faiss.vector_to_array(self._index.hnsw.assign_probas)
        else:
            self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dimension))
        self.hnsw = hnsw
        self._keys: list[str | None] = []
        self._slot_of: dict[str, int] = {}
        self._codes = np.zeros((0, len(self.attributes)), dtype=np.int32)
        self._live = np.zeros(0, dtype=bool)
        self._vocabulary: dict[str, int] = {}
        self._tags: list[tuple[str, ...]] = []
        self._tag_slots: dict[str, set[int]] = {}
        self._dead = 0

    @classmethod
    def bulk_hnsw(cls, keys: list[str], vectors: np.ndarray, attributes: Mapping[str, str], config: IndexConfig | None = None) -> VectorIndex:
        """An HNSW index filled by one parallel FAISS add, every entry with the same attributes.

        Many times faster than adding one node at a time, but the graph then depends on
        thread scheduling: for loading benchmark sets, never for the service's projection,
        which must replay to the same bits.
        """
        index = cls(vectors.shape[1], tuple(attributes), config)
        index._reset(hnsw=True)
        n = len(keys)
        index._keys = list(keys)
        index._slot_of = {key: slot for slot, key in enumerate(keys)}
        index._tags = [()] * n
        index._live = np.ones(n, dtype=bool)
        index._vocabulary = {value: code for code, value in enumerate(dict.fromkeys(attributes.values()))}
        index._codes = np.tile(np.array([index._vocabulary[attributes[a]] for a in index.attributes], dtype=np.int32), (n, 1))
        index._index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return index

    # Reading
    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, key: object) -> bool:
        return key in self._slot_of

    @property
    def tombstones(self) -> int:
        return self._dead

    def vector(self, key: str) -> np.ndarray:
        return self._vectors([self._slot_of[key]])[0]

    def keys_where(self, where: Filter) -> list[str]:
        """The live keys ``where`` admits, in slot order."""
        mask = self._mask(where)
        slots = range(len(self._keys)) if mask is None else np.flatnonzero(mask)
        return [key for key in (self._keys[slot] for slot in slots) if key is not None]

    def search(self, query: np.ndarray, k: int, where: Filter | None = None) -> list[Hit]:
        """The ``k`` entries most similar to ``query`` (cosine), best first, among those ``where`` admits."""
        if k < 1:
            raise ValueError(f"k must be >= 1 (got {k})")
        q = normalise(query, self.dimension)
        if not self._slot_of:
            return []
        mask = self._mask(where)
        allowed = len(self._slot_of) if mask is None else int(mask.sum())
        if allowed == 0:
            return []
        if self.hnsw and mask is not None and allowed <= self.config.brute_force_below:
            return self._scan(q, np.flatnonzero(mask), k)
        return self._faiss_search(q, k, mask, allowed)

    def _scan(self, q: np.ndarray, slots: np.ndarray, k: int) -> list[Hit]:
        scores = self._vectors(slots) @ q
        best = np.argsort(-scores, kind="stable")[:k]
        return [Hit(self._keys[slots[i]], float(scores[i])) for i in best]  # type: ignore[misc]

    def _faiss_search(self, q: np.ndarray, k: int, mask: np.ndarray | None, allowed: int) -> list[Hit]:
        faiss = self._faiss_module
        selector = None
        if mask is not None:
            bits = np.packbits(mask, bitorder="little")
            selector = faiss.IDSelectorBitmap(bits)
        if self.hnsw:
            # A filter hides part of the graph; widen the beam by the share hidden, up to 4x.
            ef = max(self.config.ef_search, k)
            ef = int(min(ef * len(self._keys) / allowed, 4 * ef))
            params = faiss.SearchParametersHNSW(efSearch=ef, sel=selector)
        else:
            params = faiss.SearchParameters(sel=selector)
        scores, slots = self._index.search(q[None, :], min(k, allowed), params=params)
        return [Hit(self._keys[s], float(d)) for d, s in zip(scores[0], slots[0], strict=True) if s >= 0]  # type: ignore[misc]

    def _mask(self, where: Filter | None) -> np.ndarray | None:
        """Slots a search may return, or None for "every live one" when nothing needs hiding."""
        n = len(self._keys)
        if where is None or (not where.equals and not where.tags):
            return None if self._dead == 0 else self._live[:n]
        mask = self._live[:n].copy()
        for attribute, values in where.equals.items():
            codes = [self._vocabulary[v] for v in values if v in self._vocabulary]
            mask &= np.isin(self._codes[:n, self._column[attribute]], codes)
        for tag in where.tags:
            having = np.zeros(n, dtype=bool)
            having[list(self._tag_slots.get(tag, ()))] = True
            mask &= having
        return mask

    def _vectors(self, slots: Iterable[int]) -> np.ndarray:
        if self.hnsw:
            faiss = self._faiss_module
            storage = faiss.downcast_index(self._index.storage)
            xb = faiss.rev_swig_ptr(storage.get_xb(), self._index.ntotal * self.dimension)
            return np.asarray(xb).reshape(self._index.ntotal, self.dimension)[np.asarray(list(slots), dtype=np.int64)]
        return np.stack([self._index.reconstruct(int(slot)) for slot in slots])

    # Writing
    def upsert(self, key: str, vector: np.ndarray, attributes: Mapping[str, str], tags: Iterable[str] = ()) -> None:
        """Add ``key``, or replace its vector, attributes and tags. An unchanged vector is not re-added."""
        unit = normalise(vector, self.dimension)
        slot = self._slot_of.get(key)
        if slot is not None and np.array_equal(self._vectors([slot])[0], unit):
            self._describe(slot, attributes, tuple(tags))
            return
        if slot is not None:
            self._drop(key)
        self._append(key, unit, attributes, tuple(tags))
        if not self.hnsw and len(self._slot_of) >= self.config.exact_below:
            self._rebuild(hnsw=True)

    def remove(self, key: str) -> bool:
        if key not in self._slot_of:
            return False
        self._drop(key)
        if self.hnsw and self._dead > self.config.compact_ratio * len(self._keys):
            self._rebuild(hnsw=len(self._slot_of) >= self.config.exact_below // 2)
        return True

    def purge(self, where: Filter) -> int:
        """Remove every entry ``where`` admits and leave no trace of them: an HNSW graph is
        rebuilt at once instead of keeping them as tombstones (erased data must not stay in
        a saved file). Returns how many were removed."""
        keys = self.keys_where(where)
        for key in keys:
            self._drop(key)
        if keys and self.hnsw:
            self._rebuild(hnsw=len(self._slot_of) >= self.config.exact_below // 2)
        return len(keys)

    def _append(self, key: str, unit: np.ndarray, attributes: Mapping[str, str], tags: tuple[str, ...]) -> None:
        slot = len(self._keys)
        self._keys.append(key)
        self._slot_of[key] = slot
        self._tags.append(())
        if slot >= len(self._live):
            capacity = max(64, 2 * len(self._live))
            self._live = np.resize(self._live, capacity)
            self._codes = np.resize(self._codes, (capacity, len(self.attributes)))
        self._live[slot] = True
        self._describe(slot, attributes, tags)
        if self.hnsw:
            # Preset level (1 + the node's top layer), so FAISS draws none.
            self._index.hnsw.levels.push_back(self._level(slot) + 1)
            self._index.add(unit[None, :])
        else:
            self._index.add_with_ids(unit[None, :], np.array([slot], dtype=np.int64))

    def _describe(self, slot: int, attributes: Mapping[str, str], tags: tuple[str, ...]) -> None:
        if set(attributes) != set(self.attributes):
            raise ValueError(f"attributes must be exactly {', '.join(self.attributes)} (got {', '.join(attributes)})")
        for name, value in attributes.items():
            self._codes[slot, self._column[name]] = self._vocabulary.setdefault(value, len(self._vocabulary))
        for tag in self._tags[slot]:
            self._tag_slots[tag].discard(slot)
        self._tags[slot] = tags
        for tag in tags:
            self._tag_slots.setdefault(tag, set()).add(slot)

    def _drop(self, key: str) -> None:
        slot = self._slot_of.pop(key)
        self._live[slot] = False
        for tag in self._tags[slot]:
            self._tag_slots[tag].discard(slot)
        self._tags[slot] = ()
        self._keys[slot] = None
        if self.hnsw:
            self._dead += 1
        else:
            self._index.remove_ids(np.array([slot], dtype=np.int64))

    def _level(self, slot: int) -> int:
        """An HNSW level drawn as FAISS would (P(level) from ``assign_probas``), from a hash of the slot."""
        z = (slot * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15) & _MASK64  # splitmix64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        u = ((z ^ (z >> 31)) >> 11) / float(1 << 53)
        for level, p in enumerate(self._level_probabilities):
            if u < p:
                return level
            u -= p
        return len(self._level_probabilities) - 1

    def _rebuild(self, *, hnsw: bool) -> None:
        """Re-add the live entries in slot order into a fresh index of the chosen kind (new slots)."""
        slots = [slot for slot, key in enumerate(self._keys) if key is not None]
        vectors = self._vectors(slots) if slots else np.zeros((0, self.dimension), dtype=np.float32)
        vocabulary = list(self._vocabulary)
        entries = [
            (self._keys[slot], {name: vocabulary[self._codes[slot, i]] for name, i in self._column.items()}, self._tags[slot])
            for slot in slots
        ]
        self._reset(hnsw=hnsw)
        for (key, attributes, tags), vector in zip(entries, vectors, strict=True):
            self._append(key, np.ascontiguousarray(vector), attributes, tags)  # type: ignore[arg-type]

    # Persistence
    def save(self, path: Path, *, position: int, fingerprint: str) -> None:
        """Write the index and the log position it reflects to ``path`` atomically (temp file + rename)."""
        n = len(self._keys)
        saved = _Saved(
            FORMAT, fingerprint, position, self.dimension, self.attributes, self.config, self.hnsw, self._keys,
            list(self._vocabulary), [list(tags) for tags in self._tags], self._dead,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with temporary.open("wb") as handle:
                np.savez(
                    handle, meta=np.frombuffer(msgspec.json.encode(saved), dtype=np.uint8),
                    faiss=self._faiss_module.serialize_index(self._index), codes=self._codes[:n], live=self._live[:n],
                )
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a crash
        finally:
            os.close(directory)

    @staticmethod
    def saved_position(path: Path) -> int | None:
        """The log position a saved index reflects, without loading it; None if none is saved."""
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as data:
            return msgspec.json.decode(data["meta"].tobytes(), type=_Saved).position

    @classmethod
    def load(
        cls, path: Path, *, dimension: int, attributes: tuple[str, ...], config: IndexConfig, fingerprint: str,
    ) -> tuple[VectorIndex, int] | None:
        """The saved index and its position; None if there is none, or it was made another way
        (another model, dimension, attributes or configuration) and must be rebuilt from the log."""
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as data:
            saved = msgspec.json.decode(data["meta"].tobytes(), type=_Saved)
            made_here = (saved.format, saved.fingerprint, saved.dimension, saved.attributes, saved.config)
            if made_here != (FORMAT, fingerprint, dimension, attributes, config):
                return None
            index = cls(dimension, attributes, config)
            index._index = index._faiss_module.deserialize_index(data["faiss"])
            index._codes, index._live = data["codes"].copy(), data["live"].copy()
        index.hnsw = saved.hnsw
        if saved.hnsw:
            index._level_probabilities = index._faiss_module.vector_to_array(index._index.hnsw.assign_probas)
        index._keys = saved.keys
        index._slot_of = {key: slot for slot, key in enumerate(saved.keys) if key is not None}
        index._vocabulary = {value: code for code, value in enumerate(saved.vocabulary)}
        index._tags = [tuple(tags) for tags in saved.tags]
        for slot, tags in enumerate(index._tags):
            for tag in tags:
                index._tag_slots.setdefault(tag, set()).add(slot)
        index._dead = saved.dead
        return index, saved.position
