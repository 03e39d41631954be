"""The adapter LRU keeps to its byte budget; the stack cache reuses assembled stacks."""

from __future__ import annotations

import numpy as np
import pytest

from inference.lora.cache import AdapterCache, LoadedAdapter, StackCache


def adapter(floats: int, seed: int = 0) -> LoadedAdapter:
    """An adapter of `floats` * 2 float32 values (A is (1, floats), B is (floats, 1))."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((1, floats)).astype(np.float32)
    b = rng.standard_normal((floats, 1)).astype(np.float32)
    return LoadedAdapter({"layers.0.q_proj": (a, b)}, 1.0)


class Loader:
    def __init__(self, floats: int = 100) -> None:
        self.floats = floats
        self.calls: list[str] = []

    def __call__(self, layer_id: str) -> LoadedAdapter:
        self.calls.append(layer_id)
        return adapter(self.floats, seed=len(self.calls))


def test_least_recently_used_adapters_go_first_once_past_the_byte_budget() -> None:
    load = Loader(100)  # 800 bytes each
    cache = AdapterCache(max_bytes=2000)
    for layer_id in ("a", "b", "a", "c"):  # "a" is used again before "c" arrives
        cache.get(layer_id, load)
    assert load.calls == ["a", "b", "c"]
    assert "a" in cache and "c" in cache and "b" not in cache
    assert cache.nbytes == 1600 <= cache.max_bytes
    assert (cache.hits, cache.misses) == (1, 3)


def test_an_adapter_larger_than_the_budget_is_used_but_not_kept() -> None:
    cache = AdapterCache(max_bytes=100)
    got = cache.get("big", Loader(100))
    assert got.nbytes == 800 and "big" not in cache and cache.nbytes == 0


def test_a_stack_is_built_once_per_ordered_weighted_layer_list() -> None:
    load = Loader(100)
    stacks = StackCache(max_stacks=2, adapters=AdapterCache(max_bytes=1 << 20))
    first = stacks.get([("a", 1.0), ("b", 0.5)], load)
    assert stacks.get([("a", 1.0), ("b", 0.5)], load) is first
    assert stacks.get([("b", 0.5), ("a", 1.0)], load) is not first  # order is part of the stack
    assert stacks.get([("a", 1.0), ("b", 0.25)], load).key != first.key
    assert load.calls == ["a", "b"]  # adapters decoded once, shared by all three stacks
    assert (stacks.hits, stacks.misses) == (1, 3) and stacks.hit_rate == 0.25


def test_a_scale_given_replaces_the_adapters_own_and_keys_the_stack_apart() -> None:
    load = Loader(10)
    stacks = StackCache(max_stacks=8, adapters=AdapterCache(max_bytes=1 << 20))
    own = stacks.get([("a", 0.5)], load)
    assert stacks.get([("a", 0.5)], load, [None]) is own  # None keeps the adapter's own (1.0 here)
    scaled = stacks.get([("a", 0.5)], load, [3.0])
    assert scaled is not own and scaled.key != own.key  # backends cache converted weights by the key
    assert [part.gain for part in own.parts] == pytest.approx([0.5]) and [part.gain for part in scaled.parts] == pytest.approx([1.5])
    _, b = own.modules["layers.0.q_proj"]
    np.testing.assert_allclose(scaled.modules["layers.0.q_proj"][1], 3.0 * b, rtol=1e-6)
    assert stacks.get([("a", 0.5)], load, [3.0]) is scaled and load.calls == ["a"]


def test_the_oldest_stack_is_dropped_past_the_count() -> None:
    load = Loader(10)
    stacks = StackCache(max_stacks=1, adapters=AdapterCache(max_bytes=1 << 20))
    first = stacks.get([("a", 1.0)], load)
    stacks.get([("b", 1.0)], load)
    assert stacks.get([("a", 1.0)], load) is not first
    assert stacks.hits == 0


def test_a_failed_load_caches_nothing() -> None:
    def broken(layer_id: str) -> LoadedAdapter:
        raise ValueError(f"layer {layer_id!r} does not exist")

    stacks = StackCache(max_stacks=2, adapters=AdapterCache(max_bytes=1 << 20))
    with pytest.raises(ValueError, match="layer 'x' does not exist"):
        stacks.get([("x", 1.0)], broken)
    assert "x" not in stacks.adapters and stacks.get([("y", 1.0)], Loader()).layers == (("y", 1.0),)


@pytest.mark.parametrize("make", [lambda: AdapterCache(0), lambda: StackCache(0, AdapterCache(1))])
def test_empty_budgets_are_refused(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="expected"):
        make()
