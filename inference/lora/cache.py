"""Two caches in front of stack assembly: decoded adapters by bytes, assembled stacks by key.

A persona's turn needs its stack; building one means reading, validating and decoding each
adapter, then concatenating. Adapters shared by many personas sit decoded in an LRU bounded
by bytes; whole stacks sit in an LRU keyed by the hash of their (layer id, weight) list, so
a returning persona costs one dictionary lookup.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from inference.lora.adapter import Canonical
from inference.lora.stack import LoraStack, assemble, stack_key


@dataclass(frozen=True, slots=True, eq=False)
class LoadedAdapter:
    """One layer's validated factors in canonical form and the adapter's own scale."""

    canonical: Canonical
    scale: float

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.canonical.values())


class AdapterCache:
    """Decoded adapters by layer id, least recently used evicted past `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"adapter cache: expected a byte budget of at least 1, got {max_bytes}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, layer_id: str) -> bool:
        return layer_id in self._entries

    def get(self, layer_id: str, load: Callable[[str], LoadedAdapter]) -> LoadedAdapter:
        with self._lock:
            found = self._entries.get(layer_id)
            if found is not None:
                self._entries.move_to_end(layer_id)
                self.hits += 1
                return found
            self.misses += 1
        adapter = load(layer_id)
        with self._lock:
            self._put(layer_id, adapter)
        return adapter

    def _put(self, layer_id: str, adapter: LoadedAdapter) -> None:
        # An adapter larger than the whole budget is used once and not kept: keeping it
        # would evict everything else and still break the budget.
        if adapter.nbytes > self.max_bytes or layer_id in self._entries:
            return
        self._entries[layer_id] = adapter
        self.nbytes += adapter.nbytes
        while self.nbytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.nbytes


class StackCache:
    """Assembled stacks by `stack_key`, at most `max_stacks`, built from an `AdapterCache`."""

    def __init__(self, max_stacks: int, adapters: AdapterCache) -> None:
        if max_stacks < 1:
            raise ValueError(f"stack cache: expected room for at least 1 stack, got {max_stacks}")
        self.max_stacks = max_stacks
        self.adapters = adapters
        self.hits = 0
        self.misses = 0
        self._stacks: OrderedDict[str, LoraStack] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def get(self, layers: Sequence[tuple[str, float]], load: Callable[[str], LoadedAdapter],
            scales: Sequence[float | None] = ()) -> LoraStack:
        """The stack for `layers` (ordered (layer id, weight)); `load` reads an adapter the cache lacks.

        `scales`, one per layer where given, replace the adapters' own alpha / r (None keeps it).
        """
        key = stack_key(layers, scales)
        with self._lock:
            found = self._stacks.get(key)
            if found is not None:
                self._stacks.move_to_end(key)
                self.hits += 1
                return found
            self.misses += 1
        given = list(scales) or [None] * len(layers)
        parts = []
        for (layer_id, weight), scale in zip(layers, given, strict=True):
            adapter = self.adapters.get(layer_id, load)
            parts.append((layer_id, weight, adapter.canonical, adapter.scale if scale is None else scale))
        stack = assemble(parts, key)
        with self._lock:
            self._stacks[key] = stack
            if len(self._stacks) > self.max_stacks:
                self._stacks.popitem(last=False)
        return stack
