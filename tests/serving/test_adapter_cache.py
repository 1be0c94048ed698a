"""The per-replica adapter LRU, with an in-memory adapter source (the store is tested separately)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from serving.adapter_cache import AdapterCache, ResolvedAdapter
from serving.errors import AdapterUnavailable


class MemorySource:
    def __init__(self, broken: set[str] = frozenset()) -> None:
        self.fetches: list[str] = []
        self.forgotten: list[str] = []
        self.broken = set(broken)

    def has(self, name: str) -> bool:
        return True

    def local_path(self, name: str) -> Path:
        self.fetches.append(name)
        return Path("/adapters") / name

    def check(self, path: Path) -> None:
        if path.name in self.broken:
            raise AdapterUnavailable(f"adapter '{path.name}' is broken")

    def forget_local_copy(self, name: str) -> None:
        self.forgotten.append(name)


def make(capacity: int, source: MemorySource) -> tuple[AdapterCache, list[ResolvedAdapter]]:
    unloaded: list[ResolvedAdapter] = []

    async def unload(adapter: ResolvedAdapter) -> None:
        unloaded.append(adapter)

    return AdapterCache(source, capacity, unload), unloaded


async def test_least_recently_used_is_evicted_before_a_load() -> None:
    source = MemorySource()
    cache, unloaded = make(2, source)
    a = await cache.get("a")
    await cache.get("b")
    await cache.get("a")  # a is now the most recent
    await cache.get("c")
    assert cache.loaded() == ["a", "c"]
    assert [u.name for u in unloaded] == ["b"]
    assert source.forgotten == ["b"]
    assert (await cache.get("a")) is a
    assert cache.loads == 3 and cache.evictions == 1


async def test_reloaded_adapter_gets_a_fresh_engine_id() -> None:
    cache, _ = make(1, MemorySource())
    first = await cache.get("a")
    await cache.get("b")
    again = await cache.get("a")
    assert again.lora_id != first.lora_id


async def test_concurrent_requests_load_once() -> None:
    source = MemorySource()
    cache, _ = make(4, source)
    results = await asyncio.gather(*(cache.get("same") for _ in range(20)))
    assert source.fetches == ["same"]
    assert len({r.lora_id for r in results}) == 1


async def test_broken_adapter_is_not_cached_and_evicts_nothing() -> None:
    source = MemorySource(broken={"bad"})
    cache, unloaded = make(1, source)
    await cache.get("good")
    with pytest.raises(AdapterUnavailable):
        await cache.get("bad")
    assert cache.loaded() == ["good"] and unloaded == []
    source.broken.clear()
    assert (await cache.get("bad")).name == "bad", "a repaired adapter loads on the next request"


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        make(0, MemorySource())


async def test_metrics_count_hits_loads_evictions_and_residency() -> None:
    from prometheus_client import CollectorRegistry

    from serving.metrics import AdapterMetrics

    registry = CollectorRegistry()

    async def unload(adapter: ResolvedAdapter) -> None:
        return None

    cache = AdapterCache(MemorySource(), 2, unload, AdapterMetrics(registry))
    for name in ("a", "b", "a", "c", "a"):  # loads a, b; hit a; load c evicting b; hit a
        await cache.get(name)

    def value(name: str) -> float:
        return registry.get_sample_value(name) or 0.0

    assert (value("gateway_adapter_loads_total"), value("gateway_adapter_cache_hits_total"),
            value("gateway_adapter_evictions_total"), value("gateway_adapters_resident")) == (3, 2, 1, 2)
    assert value("gateway_adapter_load_seconds_count") == 3
