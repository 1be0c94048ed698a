"""Per-token attribution of every inference, off the client's critical path.

`AttributionService.submit` is called when a generation ends; the attribution itself runs on a
worker thread (one by default, so the engine keeps the CPU it needs) and the finished trace is kept
in a bounded in-memory store for `GET /v1/attributions/{trace_id}` and for shipping. With a trace
directory, each trace is also written there as ``<trace_id>.json`` (atomically, the newest
`traces_max` of this process kept), so any process on the node can answer a look-up: the
multi-replica ingress does, for traces of every replica.

An adapter's lineage (the indexes of the datanet versions it learned from, and who contributed
each document) is read from the ledger's database and cached for `lineage_ttl_seconds`, so an
adapter trained on a newly published version is attributed without a restart. Adapters that are not
registered, and the base model, have no lineage: their traces are entirely unattributed. One
infini-gram engine is opened per distinct lineage and shared by every request of that lineage.
With n > 1 choices the trace covers the first choice.

With an outbox (attribution/outbox.py), every trace is also written there durably (fsync'd) on the
worker thread, for the shipper to deliver to the ledger; the request path only reads `outbox_full()`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attribution.attributor import Attributor
from attribution.metrics import AttributionMetrics, attribution_metrics
from attribution.outbox import Outbox
from attribution.trace import AttributionTrace, TokenAttribution

log = logging.getLogger(__name__)

TRACES_MAX = 10_000
OUTBOX_CHECK_SECONDS = 1.0
ATTRIBUTORS_MAX = 32
TRACE_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def _hard_link(source: Path, target: Path) -> bool:
    try:
        os.link(source, target)
    except OSError:  # another file system, or the shipper removed the source already
        return False
    return True


def read_trace_file(trace_dir: Path, trace_id: str) -> AttributionTrace | None:
    """A trace written by some replica of this node, or None (also for ids that are not trace ids)."""
    if not TRACE_ID.match(trace_id):
        return None
    try:
        return AttributionTrace.from_dict(json.loads((trace_dir / f"{trace_id}.json").read_text()))
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Lineage:
    """What attributing an adapter's output needs: its indexes and who owns each contribution."""

    index_dirs: tuple[str, ...]
    owners: dict[str, tuple[str, str]]  # contribution id → (contributor address, datanet name)

    @classmethod
    def empty(cls) -> Lineage:
        return cls((), {})


class LedgerLineages:
    """Adapter → Lineage from the ledger's database, cached for a few seconds."""

    def __init__(self, database_url: str, ttl_seconds: float = 5.0) -> None:
        self.database_url = database_url
        self.ttl_seconds = ttl_seconds
        self._engine: Any = None
        self._cache: dict[str, tuple[float, Lineage]] = {}
        self._lock = threading.Lock()

    def lineage(self, adapter: str | None) -> Lineage:
        if adapter is None:
            return Lineage.empty()
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(adapter)
            if cached and now - cached[0] < self.ttl_seconds:
                return cached[1]
        found = self._read(adapter)
        with self._lock:
            self._cache[adapter] = (now, found)
        return found

    def cached(self, adapter: str | None) -> Lineage:
        """The lineage last read for `adapter`, whatever its age (no database read unless never read)."""
        with self._lock:
            cached = self._cache.get(adapter) if adapter is not None else None
        return cached[1] if cached else self.lineage(adapter)

    def _read(self, adapter: str) -> Lineage:
        from sqlmodel import Session

        from ledger.adapters import lineage_contents
        from ledger.database import open_database

        if self._engine is None:
            self._engine = open_database(self.database_url)
        with Session(self._engine) as session:
            contents = lineage_contents(session, adapter)
        return Lineage(contents.index_paths, contents.contributions)


class AttributionService:
    """Runs attribution for finished generations and keeps their traces."""

    def __init__(self, lineages: LedgerLineages, *, trace_dir: Path | None = None, outbox: Outbox | None = None,
                 workers: int = 1, traces_max: int = TRACES_MAX, metrics: AttributionMetrics | None = None) -> None:
        self.lineages = lineages
        self.metrics = metrics or attribution_metrics()
        self.trace_dir = trace_dir
        self.outbox = outbox
        self.traces_max = traces_max
        self._written: deque[Path] = deque()
        if trace_dir is not None:
            trace_dir.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="attribution")
        self._attributors: OrderedDict[tuple[str, ...], Attributor] = OrderedDict()
        self._attributors_lock = threading.Lock()
        self._traces: OrderedDict[str, AttributionTrace] = OrderedDict()
        self._pending: dict[str, asyncio.Future[AttributionTrace]] = {}
        self.failures = 0
        self.outbox_failures = 0
        self._outbox_full = False
        self._closed = threading.Event()
        if outbox is not None:
            self._outbox_full = outbox.is_full()
            threading.Thread(target=self._watch_outbox, name="outbox-watch", daemon=True).start()

    def submit(self, trace_id: str, model: str, adapter: str | None, prompt_ids: Sequence[int],
               completion_ids: Sequence[int], requester: str | None = None) -> asyncio.Future[AttributionTrace]:
        """Start attributing a finished generation; the returned future resolves to its trace."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._attribute, trace_id, model, adapter,
                                      list(prompt_ids), list(completion_ids), requester)
        self._pending[trace_id] = future
        future.add_done_callback(lambda done: self._finish(trace_id, done))
        return future

    async def get(self, trace_id: str) -> AttributionTrace | None:
        """A trace by id (waiting for it if it is still being computed); None when unknown."""
        pending = self._pending.get(trace_id)
        if pending is not None:
            try:
                return await asyncio.shield(pending)
            except Exception:
                return None
        trace = self._traces.get(trace_id)
        if trace is None and self.trace_dir is not None:
            trace = read_trace_file(self.trace_dir, trace_id)
        return trace

    def outbox_full(self) -> bool:
        """True when the outbox is at its bound (new requests are refused); a flag, refreshed every second."""
        return self._outbox_full

    def _watch_outbox(self) -> None:
        while not self._closed.wait(OUTBOX_CHECK_SECONDS):
            try:
                self._outbox_full = self.outbox.is_full()  # type: ignore[union-attr]
            except OSError:
                log.exception("cannot count the outbox")

    def stats(self) -> dict[str, int]:
        return {"traces_kept": len(self._traces), "traces_pending": len(self._pending),
                "attribution_failures_total": self.failures, "attribution_indexes_open": len(self._attributors),
                "outbox_write_failures_total": self.outbox_failures}

    def close(self) -> None:
        self._closed.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._attributors_lock:
            for attributor in self._attributors.values():
                attributor.close()
            self._attributors.clear()

    # ---- internals ---------------------------------------------------------------------
    def _finish(self, trace_id: str, done: asyncio.Future[AttributionTrace]) -> None:
        self._pending.pop(trace_id, None)
        if done.cancelled() or done.exception() is not None:
            self.failures += 1
            return
        self._traces[trace_id] = done.result()
        while len(self._traces) > self.traces_max:
            self._traces.popitem(last=False)

    def _attribute(self, trace_id: str, model: str, adapter: str | None, prompt_ids: list[int],
                   completion_ids: list[int], requester: str | None) -> AttributionTrace:
        started = time.perf_counter()
        lineage = self.lineages.lineage(adapter)
        if lineage.index_dirs:
            tokens = self._attributor(lineage.index_dirs).attribute(prompt_ids, completion_ids)
        else:
            tokens = [TokenAttribution.unattributed_token(t) for t in completion_ids]
        trace = AttributionTrace(
            trace_id=trace_id, model=model, adapter=adapter, requester=requester, prompt_tokens=len(prompt_ids),
            completion_tokens=len(completion_ids), tokens=tuple(tokens), method="verbatim-span-v1",
        )
        self.metrics.observe(time.perf_counter() - started, trace.completion_tokens, trace.attributed_fraction)
        queued = self._queue_for_ledger(trace) if self.outbox is not None else None
        if self.trace_dir is not None and TRACE_ID.match(trace_id):
            self._write(trace, queued)
        return trace

    def _queue_for_ledger(self, trace: AttributionTrace) -> Path | None:
        """Write the trace to the outbox durably (its file); admitted requests are written even past the bound."""
        try:
            return self.outbox.put(trace, admitted=True)  # type: ignore[union-attr]
        except (OSError, ValueError):
            self.outbox_failures += 1
            log.exception("trace %s could not be written to the outbox: it will not be billed", trace.trace_id)
            return None

    def _write(self, trace: AttributionTrace, queued: Path | None = None) -> None:
        """Publish the trace file atomically; drop this process's oldest beyond `traces_max` (worker thread).

        A trace already in the outbox is hard-linked rather than written again (same bytes, same disk).
        """
        target = self.trace_dir / f"{trace.trace_id}.json"  # type: ignore[operator]
        staging = target.with_name(f".{target.name}.tmp")
        staging.unlink(missing_ok=True)
        if queued is None or not _hard_link(queued, staging):
            staging.write_text(json.dumps(trace.to_dict(), separators=(",", ":")))
        os.replace(staging, target)
        self._written.append(target)
        while len(self._written) > self.traces_max:
            self._written.popleft().unlink(missing_ok=True)

    def _attributor(self, index_dirs: tuple[str, ...]) -> Attributor:
        with self._attributors_lock:
            attributor = self._attributors.get(index_dirs)
            if attributor is None:
                attributor = Attributor([Path(d) for d in index_dirs])
                self._attributors[index_dirs] = attributor
                while len(self._attributors) > ATTRIBUTORS_MAX:
                    self._attributors.popitem(last=False)[1].close()
            self._attributors.move_to_end(index_dirs)
            return attributor

    def summary(self, trace: AttributionTrace, adapter: str | None) -> dict[str, Any]:
        """The `attribution` object of a response: weights as fractions of the completion, by contributor.

        Runs on the event loop: it uses the lineage the trace was just computed with (no database read).
        """
        owners = self.lineages.cached(adapter).owners
        by_contributor: dict[str, list[dict[str, Any]]] = {}
        for cid, weight in sorted(trace.contribution_totals().items(), key=lambda item: (-item[1], item[0])):
            contributor, datanet = owners.get(cid, ("unknown", "unknown"))
            by_contributor.setdefault(contributor, []).append({"id": cid, "datanet": datanet, "weight": weight})
        contributors = [
            {"address": address, "weight": sum(c["weight"] for c in items), "contributions": items}
            for address, items in by_contributor.items()
        ]
        contributors.sort(key=lambda c: (-c["weight"], c["address"]))
        return {"trace_id": trace.trace_id, "attributed_fraction": trace.attributed_fraction,
                "contributors": contributors}
