"""Per-replica LRU of resolved adapters: just-in-time load on first use, least recently used evicted.

Guarantees: one load per adapter at a time (a per-name lock, re-checked after acquiring it); the
cache never holds more than `capacity` adapters (eviction happens before a load); an adapter that
fails its checks is not cached, so a fixed adapter is picked up on the next request.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from serving.metrics import AdapterMetrics


@dataclass(frozen=True)
class ResolvedAdapter:
    name: str
    lora_id: int
    path: Path


class AdapterSource(Protocol):
    """Where adapter files come from and how they are checked (the store, in production)."""

    def has(self, name: str) -> bool: ...
    def local_path(self, name: str) -> Path: ...
    def check(self, path: Path) -> None: ...
    def forget_local_copy(self, name: str) -> None: ...


class AdapterCache:
    def __init__(
        self,
        source: AdapterSource,
        capacity: int,
        unload: Callable[[ResolvedAdapter], Awaitable[None]],
        metrics: AdapterMetrics | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.source = source
        self.capacity = capacity
        self._unload = unload
        self._entries: OrderedDict[str, ResolvedAdapter] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self._ids = itertools.count(1)
        self.loads = 0
        self.evictions = 0
        self.metrics = metrics
        if metrics is not None:
            metrics.watch_residency(lambda: len(self._entries))

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def loaded(self) -> list[str]:
        """Names in least-recently-used-first order."""
        return list(self._entries)

    async def get(self, name: str) -> ResolvedAdapter:
        """The resolved adapter, loading it (and evicting the LRU one) if needed."""
        entry = self._entries.get(name)
        if entry is not None:
            self._entries.move_to_end(name)
            if self.metrics is not None:
                self.metrics.hits.inc()
            return entry
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            entry = self._entries.get(name)
            if entry is not None:
                self._entries.move_to_end(name)
                return entry
            started = time.perf_counter()
            path = await asyncio.to_thread(self._fetch_and_check, name)
            while len(self._entries) >= self.capacity:
                _, victim = self._entries.popitem(last=False)
                self.evictions += 1
                if self.metrics is not None:
                    self.metrics.evictions.inc()
                await self._unload(victim)
                self.source.forget_local_copy(victim.name)
            entry = ResolvedAdapter(name=name, lora_id=next(self._ids), path=path)
            self._entries[name] = entry
            self.loads += 1
            if self.metrics is not None:
                self.metrics.loads.inc()
                self.metrics.load_seconds.observe(time.perf_counter() - started)
        self._locks.pop(name, None)
        return entry

    def _fetch_and_check(self, name: str) -> Path:
        path = self.source.local_path(name)
        self.source.check(path)
        return path
