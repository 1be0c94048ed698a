"""Per-token attribution of every inference, off the client's critical path.

`AttributionService.submit` is called when a generation ends; the attribution itself runs on a
worker (one by default, so the engine keeps the CPU it needs) and the finished trace is kept
in a bounded in-memory store for `GET /v1/attributions/{trace_id}` and for shipping. With a trace
directory, each trace is also written there as ``<trace_id>.pb`` (its wire form, atomically, the newest
`traces_max` of this process kept), so any process on the node can answer a look-up: the
multi-replica ingress does, for traces of every replica.

An adapter's lineage (the indexes of the datanet versions it learned from, and who contributed
each document) is asked of the ledger's Access API and cached for `lineage_ttl_seconds`, so an
adapter trained on a newly published version is attributed without a restart. Adapters that are not
registered, and the base model, have no lineage: their traces are entirely unattributed. A lineage's
indexes are opened once per worker and shared by every request of that lineage.
A lineage names each index by a local directory or a store URL (s3://…) with its digest: reading the
lineage (on an attribution worker thread, never on the event loop) resolves each to a local directory
with a `StoreCache` (statedir/store_cache.py; ``<state>/cache/indexes/<digest hex>/``), downloading it
once per node and checking its digest. An index that cannot be had (store unreachable, digest
mismatch) fails the lineage read like an unreachable ledger: the trace is written unattributed.
Each adapter is attributed with the method recorded beside it (attribution/adapter_method.py): with
`adapter_dirs` (the node's local copy of an adapter, by name: the deployment passes
`AdapterStore.local_path`) the lineage read also reads the adapter's method. "verbatim+influence-v1"
adds gradient influence (attribution/influence.py) from the adapter's ``influence.safetensors`` against
`base_model_dir`, combined with the verbatim spans (`CombinedPolicy`), unless `influence` is off
(``GATEWAY_ATTRIBUTION_INFLUENCE=false``: verbatim only). When the features cannot be used (missing,
corrupt, or made for other weights) the trace is written at once with every token unattributed
(`FALLBACK_METHOD`, no retry); the reason is logged once per adapter per `FEATURES_WARN_SECONDS`, and
the features are not tried again for `FEATURES_RECHECK_SECONDS`.
With n > 1 choices every choice is attributed on its own (each continues the same prompt) and the
trace holds them one after the other (`choice_tokens`).

Billing does not depend on attribution succeeding. The response path queues a `UsageRecord`
(`record_usage`, attribution/usage_log.py) and submits it here, then waits for the record to be
durable before the response's last byte. When attribution fails
(after `ATTEMPTS` tries; a failed lineage read included) the trace is written anyway with every token
unattributed, so the existing unattributed policy routes its share. Records left by a replica that
died before their traces reached the outbox are attributed again by whichever process of the node
recovers them (at start and every `RECOVER_SECONDS`), as `recovered` traces.

With an outbox (attribution/outbox.py), every trace is also written there durably (fsync'd) on the
worker thread, for the shipper to deliver to the ledger; the request path only reads `outbox_full()`.

The search and the weighting run in worker processes (`processes=True`, attribution/search_pool.py),
`workers` of them, one per worker thread here: they hold no GIL of this process, and `workers`
processes use `workers` cores. Operators set `workers`, `queue_max` and `max_lag_seconds` as
``GATEWAY_ATTRIBUTION_*`` (attribution/config.py; `AttributionService.from_config`).

When attribution falls behind (the lag policy). At most `queue_max` responses are held in memory
waiting for (or under) attribution. A response that ends while that many are held, or while older
ones are already waiting on disk, is not queued: its usage record -- already durable in the usage
log, the billing record -- is what waits (spill to disk); only its trace id and end time stay in
memory. As room comes back, waiting records are read back from the usage log, oldest first, and
attributed; one that has waited longer than `max_lag_seconds` is not attributed but written at once
with every token unattributed (`OVERLOAD_METHOD`: shed), so it is still billed exactly once, and
the ledger hears of every response within about `max_lag_seconds`. A response waiting on disk gets
no `attribution` summary in its body (its trace is readable once written). Without a usage log there
is nothing durable to wait in: such a response is shed at once, on the calling thread. Records left
waiting when the process stops are recovered from the usage log like those of a crashed process.
Metrics: `gateway_attribution_queue_depth`, `gateway_attribution_deferred`,
`gateway_attribution_lag_seconds`, `gateway_attribution_shed_total`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from attribution.adapter_method import COMBINED, read_method
from attribution.attributor import MAX_CONTEXT_TOKENS
from attribution.config import MAX_LAG_SECONDS, QUEUE_MAX, WORKERS, AttributionConfig
from attribution.influence import FeaturesUnavailable
from attribution.metrics import AttributionMetrics, attribution_metrics
from attribution.outbox import TRACE_SUFFIX as TRACE_FILE_SUFFIX
from attribution.outbox import Outbox
from attribution.search_pool import LocalAttributors, ProcessAttributors, TokenAttributor
from attribution.usage_log import UsageLog, UsageRecord, recover
from ledger.client.access import LedgerUnavailable, LineageRecord
from ledger.client.trace import AttributionTrace, TokenAttribution
from ledger.client.trace_wire import trace_from_bytes, trace_to_bytes
from statedir.layout import StateDirSettings
from statedir.store_cache import StoreCache, StoreError

log = logging.getLogger(__name__)

TRACES_MAX = 10_000
OUTBOX_CHECK_SECONDS = 1.0
TRACE_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
METHOD = "verbatim-span-v1"
FALLBACK_METHOD = "unattributed-after-failure"  # attribution failed: every token unattributed
OVERLOAD_METHOD = "unattributed-overload"  # attribution was too far behind: every token unattributed
CATCH_UP_SECONDS = 0.5
ATTEMPTS = 2
RETRY_DELAY_SECONDS = 0.5
RECOVER_SECONDS = 10.0
FEATURES_WARN_SECONDS = 60.0  # an adapter's unusable influence features are logged at most this often
FEATURES_RECHECK_SECONDS = 10.0  # and not tried again for this long (its traces are unattributed meanwhile)
CLOSE_WAIT_SECONDS = 4.0


def usage_record(trace_id: str, model: str, adapter: str | None, requester: str | None,
                 prompt_ids: Sequence[int], choices: Sequence[Sequence[int]]) -> UsageRecord:
    """The usage record of a response (the prompt kept only as far back as attribution reads)."""
    return UsageRecord(trace_id=trace_id, model=model, adapter=adapter, requester=requester,
                       prompt_tokens=len(prompt_ids), prompt_tail=tuple(prompt_ids[-MAX_CONTEXT_TOKENS:]),
                       choices=tuple(tuple(choice) for choice in choices))


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
        return trace_from_bytes((trace_dir / f"{trace_id}{TRACE_FILE_SUFFIX}").read_bytes())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Lineage:
    """What attributing an adapter's output needs: its indexes and who owns each contribution."""

    index_dirs: tuple[str, ...]
    owners: dict[str, tuple[str, str]]  # contribution id → (contributor address, datanet name)
    adapter_dir: str | None = None  # the node's local copy of the adapter (when the deployment says where)
    method: str = METHOD  # the adapter's recorded method (attribution/adapter_method.py)

    @classmethod
    def empty(cls) -> Lineage:
        return cls((), {})


class IndexUnavailable(Exception):
    """An index of a lineage could not be had locally (its store did not answer, or its copy has another digest)."""


class LedgerLineages:
    """Adapter → Lineage from the ledger's Access API, cached for `ttl_seconds`; its indexes local.

    A look-up the ledger does not answer is retried for up to `retry_seconds`; past that, the last
    lineage read is used, and without one the error is raised (the trace is then written
    unattributed, as for any failed attribution, so billing never waits for the ledger). After a
    failure, look-ups of adapters never read fail at once for `down_seconds`: one outage costs one
    wait, not one per trace.

    Each index of a lineage read is resolved to a local directory by `store_cache` (default: under
    ``<GATEWAY_STATE_DIR>/cache/indexes``): store URLs are downloaded and checked by digest, local
    directories with a digest are checked once per process. When that fails (IndexUnavailable), the
    last lineage read is used, and without one the adapter's look-ups fail at once for `down_seconds`
    (no download per trace)."""

    def __init__(self, ledger: LineageSource, ttl_seconds: float = 5.0, retry_seconds: float = 2.0,
                 down_seconds: float = 5.0, store_cache: StoreCache | None = None,
                 adapter_dirs: Callable[[str], Path] | None = None) -> None:
        """`adapter_dirs(name)` is the node's local copy of an adapter (its method is read from it)."""
        self.ledger = ledger
        self.adapter_dirs = adapter_dirs
        self.ttl_seconds = ttl_seconds
        self.retry_seconds = retry_seconds
        self.down_seconds = down_seconds
        self.store_cache = store_cache or StoreCache(StateDirSettings().layout.index_cache.resolve())
        self._down_until = 0.0
        self._cache: dict[str, tuple[float, Lineage]] = {}
        self._unavailable: dict[str, tuple[float, str]] = {}  # adapter → (failed until, reason)
        self._lock = threading.Lock()

    def lineage(self, adapter: str | None) -> Lineage:
        if adapter is None:
            return Lineage.empty()
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(adapter)
            if cached and now - cached[0] < self.ttl_seconds:
                return cached[1]
        try:
            if now < self._down_until:
                raise LedgerUnavailable("the ledger did not answer a moment ago")
            with self._lock:
                failed = self._unavailable.get(adapter)
            if failed and now < failed[0]:
                raise IndexUnavailable(failed[1])
            found = self._local(adapter, self._read(adapter))
        except LedgerUnavailable:
            if cached:
                return cached[1]
            self._down_until = max(self._down_until, time.monotonic() + self.down_seconds)
            raise
        except IndexUnavailable:
            if cached:
                return cached[1]
            raise
        with self._lock:
            self._cache[adapter] = (now, found)
            self._unavailable.pop(adapter, None)
        return found

    def cached(self, adapter: str | None) -> Lineage:
        """The lineage last read for `adapter`, whatever its age (no look-up unless never read).

        An adapter whose indexes could not be had a moment ago has none (no download on the caller's thread)."""
        with self._lock:
            cached = self._cache.get(adapter) if adapter is not None else None
            failed = self._unavailable.get(adapter) if adapter is not None else None
        if cached:
            return cached[1]
        if failed and time.monotonic() < failed[0]:
            return Lineage.empty()
        return self.lineage(adapter)

    def _read(self, adapter: str) -> LineageRecord:
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.2
        while True:
            try:
                return self.ledger.lineage(adapter)
            except LedgerUnavailable:
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _local(self, adapter: str, record: LineageRecord) -> Lineage:
        """The lineage with each index at a local directory (fetched and checked); IndexUnavailable otherwise."""
        local = []
        for location, digest in zip(record.index_dirs, record.digests(), strict=True):
            try:
                local.append(str(self.store_cache.fetch(location, digest or None)))
            except (StoreError, ValueError, OSError) as exc:
                reason = f"adapter '{adapter}': index {location} is unavailable: {exc}"
                log.warning("%s; its responses are billed unattributed for now", reason)
                with self._lock:
                    self._unavailable[adapter] = (time.monotonic() + self.down_seconds, reason)
                raise IndexUnavailable(reason) from None
        adapter_dir, method = self._adapter_method(adapter) if record.owners else (None, METHOD)
        return Lineage(tuple(local), record.owners, adapter_dir, method)

    def _adapter_method(self, adapter: str) -> tuple[str | None, str]:
        """(local adapter directory, its method); verbatim when it cannot be had or read (with a warning)."""
        if self.adapter_dirs is None:
            return None, METHOD
        try:
            adapter_dir = Path(self.adapter_dirs(adapter))
            return str(adapter_dir), read_method(adapter_dir)
        except Exception as exc:  # the store's own errors included: attribution cannot name them
            log.warning("adapter '%s': its attribution method cannot be read (%s); attributed verbatim", adapter, exc)
            return None, METHOD


class LineageSource(Protocol):
    def lineage(self, adapter: str) -> LineageRecord: ...


class AttributionDeferred(Exception):
    """The response's attribution waits in the usage log (attribution is behind); no summary for it."""


@dataclass
class _Waiting:
    """A response whose attribution waits on disk: when it ended, and its record until that is durable."""

    ended: float  # time.monotonic()
    record: UsageRecord | None


class AttributionService:
    """Runs attribution for finished generations and keeps their traces."""

    def __init__(self, lineages: LedgerLineages, *, trace_dir: Path | None = None, outbox: Outbox | None = None,
                 usage_log: UsageLog | None = None, workers: int = WORKERS, traces_max: int = TRACES_MAX,
                 metrics: AttributionMetrics | None = None, recover_seconds: float = RECOVER_SECONDS,
                 delay_seconds: float = 0.0, processes: bool = True, attributors: TokenAttributor | None = None,
                 queue_max: int = QUEUE_MAX, max_lag_seconds: float = MAX_LAG_SECONDS,
                 base_model_dir: Path | None = None, influence: bool = True) -> None:
        """`workers` threads (and as many processes with `processes`) attribute; `attributors` replaces
        where the search runs (tests); `queue_max` and `max_lag_seconds` are the lag policy's bounds
        (operators set all three as `AttributionConfig`: `from_config`). Adapters recorded as
        "verbatim+influence-v1" get influence too when `influence` is on and `base_model_dir` is given."""
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if queue_max < 1:
            raise ValueError(f"queue_max must be >= 1, got {queue_max}")
        if not max_lag_seconds > 0 or max_lag_seconds == float("inf"):
            raise ValueError(f"max_lag_seconds must be a finite number > 0, got {max_lag_seconds}")
        self.lineages = lineages
        self.metrics = metrics or attribution_metrics()
        self.trace_dir = trace_dir
        self.outbox = outbox
        self.usage_log = usage_log
        self.delay_seconds = delay_seconds  # a test hook (ServingConfig.attribution_delay_seconds)
        self.recovered = 0
        self.traces_max = traces_max
        self._written: deque[Path] = deque()
        if trace_dir is not None:
            trace_dir.mkdir(parents=True, exist_ok=True)
        self.workers = workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="attribution")
        self._attributors: TokenAttributor = attributors or (
            ProcessAttributors(workers) if processes else LocalAttributors())
        self.queue_max = queue_max
        self.max_lag_seconds = max_lag_seconds
        self._held = 0  # responses in memory, queued or being attributed (<= queue_max)
        self._waiting: OrderedDict[str, _Waiting] = OrderedDict()  # spilled: their records wait in the usage log
        self._lag_lock = threading.Lock()
        self.shed = 0
        self.base_model_dir = base_model_dir
        self.influence = influence
        self._features_down: dict[str, tuple[float, str]] = {}  # adapter dir → (not tried until, reason)
        self._features_warned: dict[str, float] = {}  # adapter → when its features were last logged
        self._features_lock = threading.Lock()
        self._traces: OrderedDict[str, AttributionTrace] = OrderedDict()
        self._pending: dict[str, asyncio.Future[AttributionTrace]] = {}
        self._work: set[concurrent.futures.Future[AttributionTrace]] = set()  # queued or running, for close()
        self._work_lock = threading.Lock()
        self.failures = 0
        self.outbox_failures = 0
        self._outbox_full = False
        self._closed = threading.Event()
        self.metrics.queue_depth.set(0)
        self.metrics.deferred.set(0)
        if usage_log is not None:
            threading.Thread(target=self._catch_up_periodically, name="attribution-catch-up", daemon=True).start()
        if outbox is not None:
            self._outbox_full = outbox.is_full()
            threading.Thread(target=self._watch_outbox, name="outbox-watch", daemon=True).start()
            if usage_log is not None:
                threading.Thread(target=self._recover_periodically, args=(recover_seconds,), name="usage-recovery",
                                 daemon=True).start()

    @classmethod
    def from_config(cls, lineages: LedgerLineages, config: AttributionConfig | None = None,
                    **kwargs: Any) -> AttributionService:
        """A service with the operator's settings (``GATEWAY_ATTRIBUTION_*`` unless `config` is given)."""
        config = config or AttributionConfig()
        return cls(lineages, workers=config.workers, queue_max=config.queue_max,
                   max_lag_seconds=config.max_lag_seconds, influence=config.influence, **kwargs)

    def record_usage(self, record: UsageRecord) -> concurrent.futures.Future[None] | None:
        """Queue the response's usage record; the future resolves once it is durable (None: no usage log)."""
        if self.usage_log is None:
            return None
        written = self.usage_log.append(record)
        written.add_done_callback(lambda done: self._usage_written(record.trace_id, done))
        return written

    def submit(self, record: UsageRecord) -> asyncio.Future[AttributionTrace]:
        """Start attributing a finished generation; the returned future resolves to its trace.

        Past the lag policy's bound it fails at once with `AttributionDeferred` (the record waits in the
        usage log), or, without a usage log, resolves to the trace written unattributed (shed)."""
        ended = time.monotonic()
        with self._lag_lock:
            queued = self._held < self.queue_max and not self._waiting
            if queued:
                self._held += 1
            elif self.usage_log is not None:
                durable = self.usage_log.is_written(record.trace_id)
                self._waiting[record.trace_id] = _Waiting(ended, None if durable else record)
            self._show_depth()
        if queued:
            work = self._executor.submit(self._attribute_held, record, ended)
        elif self.usage_log is not None:
            return self._settled_future(exception=AttributionDeferred(record.trace_id))
        else:
            trace = self._shed(record, ended)
            self._keep(trace)
            return self._settled_future(result=trace)
        with self._work_lock:
            self._work.add(work)
        work.add_done_callback(self._forget_work)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a response generator finalized outside the loop: nobody awaits this one
            return work  # type: ignore[return-value]
        future = asyncio.wrap_future(work, loop=loop)
        self._pending[record.trace_id] = future
        future.add_done_callback(lambda done: self._finish(record.trace_id, done))
        return future

    def lag_state(self) -> tuple[int, int, int]:
        """(responses held in memory for attribution, responses whose attribution waits on disk, of those
        the ones still in memory because their usage record is being written)."""
        with self._lag_lock:
            return self._held, len(self._waiting), sum(1 for w in self._waiting.values() if w.record is not None)

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
        held, waiting, _ = self.lag_state()
        return {"traces_kept": len(self._traces), "traces_pending": len(self._pending),
                "attribution_queue_depth": held, "attribution_deferred": waiting, "attribution_shed_total": self.shed,
                "attribution_failures_total": self.failures,
                "attribution_indexes_open": self._attributors.indexes_open(),
                "outbox_write_failures_total": self.outbox_failures, "usage_records_recovered_total": self.recovered,
                "usage_records_unsettled": self.usage_log.unsettled() if self.usage_log is not None else 0}

    def close(self, wait_seconds: float = CLOSE_WAIT_SECONDS) -> None:
        """Stop: attributions already queued get `wait_seconds` to finish; whatever is left stays in the
        usage log, for the next process on this node to recover."""
        self._closed.set()
        self._executor.shutdown(wait=False, cancel_futures=False)
        with self._work_lock:
            queued = list(self._work)
        concurrent.futures.wait(queued, timeout=wait_seconds)
        if self.usage_log is not None:
            self.usage_log.close()
        self._attributors.close()

    # ---- internals ---------------------------------------------------------------------
    def _forget_work(self, work: concurrent.futures.Future[AttributionTrace]) -> None:
        with self._work_lock:
            self._work.discard(work)

    def _finish(self, trace_id: str, done: asyncio.Future[AttributionTrace]) -> None:
        self._pending.pop(trace_id, None)
        if done.cancelled() or done.exception() is not None:
            self.failures += 1
            return
        self._keep(done.result())

    def _keep(self, trace: AttributionTrace) -> None:
        """Remember the trace for look-ups (the newest `traces_max`; on the event loop)."""
        self._traces[trace.trace_id] = trace
        while len(self._traces) > self.traces_max:
            self._traces.popitem(last=False)

    def _attribute_held(self, record: UsageRecord, ended: float) -> AttributionTrace:
        """A held response: attributed (or shed when it waited too long), then its place is freed."""
        try:
            if time.monotonic() - ended > self.max_lag_seconds:
                return self._shed(record, ended)
            return self._attribute(record, ended)
        finally:
            with self._lag_lock:
                self._held -= 1
                self._show_depth()
            self._catch_up()

    def _attribute(self, record: UsageRecord, ended: float | None = None) -> AttributionTrace:
        if self.delay_seconds:
            self._closed.wait(self.delay_seconds)
        started = time.perf_counter()
        trace = self._trace_of(record)
        self.metrics.observe(time.perf_counter() - started, trace.completion_tokens, trace.attributed_fraction)
        return self._store(trace, ended)

    def _store(self, trace: AttributionTrace, ended: float | None) -> AttributionTrace:
        queued = self._queue_for_ledger(trace) if self.outbox is not None else None
        if self.trace_dir is not None and TRACE_ID.match(trace.trace_id):
            self._write(trace, queued)
        if ended is not None:
            self.metrics.lag.observe(time.monotonic() - ended)
        return trace

    def _shed(self, record: UsageRecord, ended: float) -> AttributionTrace:
        """Write the record's trace unattributed: billed, not attributed (the lag policy)."""
        self.shed += 1
        self.metrics.shed.inc()
        return self._store(self._attributed(record, OVERLOAD_METHOD, recovered=False), ended)

    # ---- the lag policy: records waiting in the usage log ---------------------------------
    def _usage_written(self, trace_id: str, written: concurrent.futures.Future[None]) -> None:
        """The usage log wrote (or failed to write) a record: a waiting one need not stay in memory."""
        if written.cancelled() or written.exception() is not None:
            return  # kept in memory: it is attributed (or shed) from there
        with self._lag_lock:
            waiting = self._waiting.get(trace_id)
            if waiting is not None:
                waiting.record = None

    def _catch_up_periodically(self) -> None:
        while not self._closed.wait(CATCH_UP_SECONDS):
            try:
                self._catch_up()
            except Exception:
                log.exception("taking up responses waiting for attribution failed")

    def _catch_up(self) -> None:
        """Move waiting records, oldest first, into the room left under `queue_max`."""
        if self._closed.is_set() or self.usage_log is None:
            return
        taken: list[tuple[str, _Waiting]] = []
        with self._lag_lock:
            room = self.queue_max - self._held
            while self._waiting and len(taken) < room:
                taken.append(self._waiting.popitem(last=False))
            self._held += len(taken)
            self._show_depth()
        if not taken:
            return
        from_disk = self.usage_log.read_written([t for t, w in taken if w.record is None])
        for trace_id, waiting in taken:
            record = waiting.record or from_disk.get(trace_id)
            if record is None:  # its trace reached the outbox some other way (cannot happen today)
                log.error("the usage record of %s is gone; it was not attributed here", trace_id)
                with self._lag_lock:
                    self._held -= 1
                    self._show_depth()
                continue
            try:
                work = self._executor.submit(self._attribute_held, record, waiting.ended)
            except RuntimeError:  # shutting down: the record stays in the usage log for recovery
                with self._lag_lock:
                    self._held -= 1
                    self._show_depth()
                continue
            with self._work_lock:
                self._work.add(work)
            work.add_done_callback(self._forget_work)

    def _show_depth(self) -> None:
        """Update the gauges (call with _lag_lock held)."""
        self.metrics.queue_depth.set(self._held)
        self.metrics.deferred.set(len(self._waiting))

    @staticmethod
    def _settled_future(result: AttributionTrace | None = None,
                        exception: BaseException | None = None) -> asyncio.Future[AttributionTrace]:
        try:
            future: asyncio.Future[AttributionTrace] = asyncio.get_running_loop().create_future()
        except RuntimeError:
            future = concurrent.futures.Future()  # type: ignore[assignment]
        if exception is not None:
            future.set_exception(exception)
            if isinstance(future, asyncio.Future):
                future.add_done_callback(lambda done: done.exception())  # nobody may await it: not an error
        else:
            future.set_result(result)  # type: ignore[arg-type]
        return future

    def _trace_of(self, record: UsageRecord, recovered: bool = False) -> AttributionTrace:
        """The record's trace: attributed (tried `ATTEMPTS` times), else every token unattributed."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return self._attributed(record, METHOD, recovered)
            except FeaturesUnavailable as exc:  # not retried: the same files give the same answer
                self._features_unavailable(record.adapter, exc)
                break
            except Exception:
                log.exception("attribution of %s failed (attempt %d of %d)", record.trace_id, attempt, ATTEMPTS)
                if attempt < ATTEMPTS and not self._closed.wait(RETRY_DELAY_SECONDS):
                    continue
                break
        self.failures += 1
        return self._attributed(record, FALLBACK_METHOD, recovered)

    def _attributed(self, record: UsageRecord, method: str, recovered: bool) -> AttributionTrace:
        """The trace attributed as the adapter's lineage says (`method` METHOD: attempt it), or unattributed."""
        lineage = self.lineages.lineage(record.adapter) if method == METHOD else Lineage.empty()
        influence = self._influence_of(lineage)
        if influence is not None:
            method = COMBINED
        tokens: list[TokenAttribution] = []
        for choice in record.choices:
            if influence is not None:
                tokens += self._attributors.attribute(lineage.index_dirs, record.prompt_tail, choice, influence)
            elif lineage.index_dirs:
                tokens += self._attributors.attribute(lineage.index_dirs, record.prompt_tail, choice)
            else:
                tokens += [TokenAttribution.unattributed_token(t) for t in choice]
        return AttributionTrace(
            trace_id=record.trace_id, model=record.model, adapter=record.adapter, requester=record.requester,
            prompt_tokens=record.prompt_tokens, completion_tokens=len(tokens), tokens=tuple(tokens), method=method,
            choice_tokens=tuple(len(choice) for choice in record.choices), recovered=recovered,
        )

    def _influence_of(self, lineage: Lineage) -> tuple[str, str, tuple[str, ...]] | None:
        """What the worker needs to add influence (None: verbatim only); raises FeaturesUnavailable while the
        adapter's features were found unusable a moment ago."""
        if (lineage.method != COMBINED or not self.influence or self.base_model_dir is None
                or lineage.adapter_dir is None):
            return None
        with self._features_lock:
            down = self._features_down.get(lineage.adapter_dir)
        if down is not None and time.monotonic() < down[0]:
            raise FeaturesUnavailable(down[1])
        return str(self.base_model_dir), lineage.adapter_dir, tuple(sorted(lineage.owners))

    def _features_unavailable(self, adapter: str | None, exc: FeaturesUnavailable) -> None:
        """Remember unusable features for a while; log them once per adapter per FEATURES_WARN_SECONDS."""
        now = time.monotonic()
        adapter_dir = self.lineages.cached(adapter).adapter_dir if adapter is not None else None
        with self._features_lock:
            down = self._features_down.get(adapter_dir) if adapter_dir is not None else None
            if adapter_dir is not None and (down is None or now >= down[0]):  # not extended by its own refusals
                self._features_down[adapter_dir] = (now + FEATURES_RECHECK_SECONDS, str(exc))
            last = self._features_warned.get(adapter or "")
            warn = last is None or now - last >= FEATURES_WARN_SECONDS
            if warn:
                self._features_warned[adapter or ""] = now
        if warn:
            log.warning("adapter '%s': influence attribution is unavailable, its responses are billed unattributed "
                        "(%s): %s", adapter, type(exc).__name__, exc)

    def _queue_for_ledger(self, trace: AttributionTrace) -> Path | None:
        """Write the trace to the outbox durably (its file); admitted requests are written even past the bound.

        Once it is there, its usage record is settled. When it cannot be written, the record stays in
        the usage log, and the next process on this node attributes it again.
        """
        try:
            path = self.outbox.put(trace, admitted=True)  # type: ignore[union-attr]
        except (OSError, ValueError):
            self.outbox_failures += 1
            log.exception("trace %s could not be written to the outbox; its usage record is kept", trace.trace_id)
            return None
        if self.usage_log is not None:
            self.usage_log.settle(trace.trace_id)
        return path

    # ---- records of dead replicas ----------------------------------------------------------
    def _recover_periodically(self, every_seconds: float) -> None:
        while True:
            try:
                self._executor.submit(self.recover_orphans).result()
            except RuntimeError:  # the executor was shut down
                return
            except Exception:
                log.exception("recovering usage records failed; retrying in %.0f s", every_seconds)
            if self._closed.wait(every_seconds):
                return

    def recover_orphans(self) -> int:
        """Attribute the records that dead processes of this node left, and queue their traces."""
        found = recover(self.usage_log.directory, self._recover_one)  # type: ignore[union-attr]
        if found:
            log.warning("recovered %d usage records left by a process that stopped", found)
        return found

    def _recover_one(self, record: UsageRecord) -> None:
        outbox: Outbox = self.outbox  # type: ignore[assignment]
        if outbox.path_of(record.trace_id) is not None:
            return  # its trace made it to the outbox before the crash
        outbox.put(self._trace_of(record, recovered=True), admitted=True)
        self.recovered += 1

    def _write(self, trace: AttributionTrace, queued: Path | None = None) -> None:
        """Publish the trace file atomically; drop this process's oldest beyond `traces_max` (worker thread).

        A trace already in the outbox is hard-linked rather than written again (same bytes, same disk).
        """
        target = self.trace_dir / f"{trace.trace_id}{TRACE_FILE_SUFFIX}"  # type: ignore[operator]
        staging = target.with_name(f".{target.name}.tmp")
        staging.unlink(missing_ok=True)
        if queued is None or queued.suffix != TRACE_FILE_SUFFIX or not _hard_link(queued, staging):
            staging.write_bytes(trace_to_bytes(trace))
        os.replace(staging, target)
        self._written.append(target)
        while len(self._written) > self.traces_max:
            self._written.popleft().unlink(missing_ok=True)

    def summary(self, trace: AttributionTrace, adapter: str | None) -> dict[str, Any]:
        """The `attribution` object of a response: weights as fractions of the completion, by contributor.

        Runs on the event loop: it uses the lineage the trace was just computed with (no look-up).
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
