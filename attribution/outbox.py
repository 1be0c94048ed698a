"""A durable on-disk queue of attribution traces on their way to the ledger, one file per trace.

Several processes of one node share an outbox: engine replicas `put` traces, one shipper reads them
(attribution/shipper.py). Guarantees:
- `put` returns only once `<dir>/<trace_id>.pb` and its directory entry are fsync'd; a file is
  written under a hidden staging name and renamed, so readers never see a partial trace;
- a trace file leaves the outbox only by `remove` (the ledger acknowledged it) or `reject` (moved
  with a reason into `<dir>/rejected/`, never deleted);
- the outbox holds at most `max_traces` traces (`OutboxFull` otherwise), checked against a count
  that costs at most one directory scan per second per process. The gateway checks the bound when
  it admits a request and writes the traces of admitted requests with `admitted=True`, so a trace
  of a request that was served is never dropped (the bound is exceeded by at most the requests in flight).

A file holds the trace in its wire form (`gateway.ledger.v1.AttributionTrace`, deterministic
serialization): the replica converts the trace once, when it stores it, and the shipper sends the
message as it reads it (`read_message`), so the ledger's own conversion is the only other one.
Files of an older gateway (`<trace_id>.json`, canonical JSON) are still read and shipped.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from google.protobuf.message import DecodeError

from ledger.client.trace import AttributionTrace
from ledger.client.trace_wire import trace_from_pb, trace_to_bytes, trace_to_pb
from statedir.durable_files import fsync_path, write_durably
from wire.ledger.v1 import ledger_pb2

log = logging.getLogger("attribution.outbox")

TRACE_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")
TRACE_SUFFIX = ".pb"
LEGACY_SUFFIX = ".json"  # canonical JSON, written by gateways before the wire form
SUFFIXES = (TRACE_SUFFIX, LEGACY_SUFFIX)
STAGING_SUFFIX = ".tmp"
REJECTED_DIR = "rejected"
COUNT_REFRESH_SECONDS = 1.0
STALE_STAGING_SECONDS = 60.0


class OutboxFull(Exception):
    """The outbox holds `max_traces` traces: the ledger is not keeping up (or not reachable)."""


class CorruptTrace(Exception):
    """A trace file that cannot be parsed; `path` names it."""

    def __init__(self, path: Path, cause: str) -> None:
        super().__init__(f"{path}: not a readable attribution trace ({cause})")
        self.path = path


def check_trace_id(trace_id: str) -> str:
    """`trace_id` when it is safe as a file name (`[A-Za-z0-9_-]{1,128}`); ValueError otherwise."""
    if not isinstance(trace_id, str) or not TRACE_ID_PATTERN.fullmatch(trace_id):
        raise ValueError(f"trace id must match [A-Za-z0-9_-]{{1,128}}, got {trace_id!r}")
    return trace_id


class Outbox:
    """Traces waiting for the ledger's acknowledgement, as files in `directory`."""

    def __init__(self, directory: Path, max_traces: int = 100_000) -> None:
        if max_traces < 1:
            raise ValueError(f"max_traces must be >= 1, got {max_traces}")
        self.directory = Path(directory)
        self.max_traces = max_traces
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._scanned_count = 0
        self._scanned_at: float | None = None
        self._puts_since_scan = 0
        self._remove_stale_staging()

    @property
    def rejected_dir(self) -> Path:
        return self.directory / REJECTED_DIR

    def put(self, trace: AttributionTrace, *, admitted: bool = False) -> Path:
        """Store `trace` durably and return its file; the same trace id again replaces the file.

        `admitted`: the request was served already, so the trace is written even past the bound.
        """
        trace_id = check_trace_id(trace.trace_id)
        if not admitted and self.is_full():
            raise OutboxFull(
                f"outbox {self.directory} holds {self.max_traces} traces or more (max_traces={self.max_traces}); "
                "the ledger is not acknowledging traces: is it reachable and is the shipper running?"
            )
        staging = self.directory / f".{trace_id}.{os.getpid()}.{secrets.token_hex(4)}{STAGING_SUFFIX}"
        final = self.directory / f"{trace_id}{TRACE_SUFFIX}"
        try:
            write_durably(staging, trace_to_bytes(trace))
            os.replace(staging, final)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
        fsync_path(self.directory)
        with self._lock:
            self._puts_since_scan += 1
        return final

    def is_full(self) -> bool:
        """Whether the outbox holds `max_traces` traces, by a count refreshed at most once per second."""
        with self._lock:
            now = time.monotonic()
            if self._scanned_at is None or now - self._scanned_at >= COUNT_REFRESH_SECONDS:
                self._record_scan(sum(1 for _ in self._trace_entries()), now)
            return self._scanned_count + self._puts_since_scan >= self.max_traces

    def depth(self) -> int:
        """How many traces wait in the outbox (a fresh directory scan)."""
        count = sum(1 for _ in self._trace_entries())
        with self._lock:
            self._record_scan(count, time.monotonic())
        return count

    def oldest_age_seconds(self) -> float:
        """Age of the oldest waiting trace file (by mtime), 0.0 when the outbox is empty."""
        return self.backlog()[1]

    def backlog(self) -> tuple[int, float]:
        """(depth, age in seconds of the oldest waiting trace) from one directory scan (for metrics)."""
        count, oldest = 0, None
        for mtime_ns, _, _ in self._stat_traces():
            count += 1
            oldest = mtime_ns if oldest is None else min(oldest, mtime_ns)
        with self._lock:
            self._record_scan(count, time.monotonic())
        return count, 0.0 if oldest is None else max(0.0, (time.time_ns() - oldest) / 1e9)

    def pending(self, limit: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[tuple[str, Path]]:
        """Up to `limit` (trace id, path) pairs, oldest first (mtime, then name), skipping ids in `exclude`."""
        candidates = ((mtime_ns, path.name, trace_id, path) for mtime_ns, trace_id, path in self._stat_traces()
                      if trace_id not in exclude)
        return [(trace_id, path) for _, _, trace_id, path in heapq.nsmallest(limit, candidates)]

    def read_message(self, path: Path) -> ledger_pb2.AttributionTrace:
        """The trace in `path` as the ledger receives it; CorruptTrace when it cannot be parsed
        (FileNotFoundError when it is gone)."""
        data = path.read_bytes()
        try:
            if path.suffix == LEGACY_SUFFIX:
                message = trace_to_pb(AttributionTrace.from_dict(json.loads(data)))
            else:
                message = ledger_pb2.AttributionTrace.FromString(data)
        except (DecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CorruptTrace(path, f"{type(error).__name__}: {error}") from error
        if f"{message.trace_id}{path.suffix}" != path.name:
            raise CorruptTrace(path, f"it holds trace id {message.trace_id!r}")
        return message

    def read(self, path: Path) -> AttributionTrace:
        """The trace in `path` (CorruptTrace when it cannot be parsed or is not a valid trace)."""
        message = self.read_message(path)
        try:
            return trace_from_pb(message)
        except ValueError as error:
            raise CorruptTrace(path, f"ValueError: {error}") from error

    def path_of(self, trace_id: str) -> Path | None:
        """The file of a waiting trace, or None."""
        for suffix in SUFFIXES:
            path = self.directory / f"{check_trace_id(trace_id)}{suffix}"
            if path.exists():
                return path
        return None

    def remove(self, trace_id: str) -> None:
        """Drop an acknowledged trace (a crash that undoes this only causes a DUPLICATE resend)."""
        for suffix in SUFFIXES:
            (self.directory / f"{check_trace_id(trace_id)}{suffix}").unlink(missing_ok=True)

    def reject(self, trace_id: str, reason: str) -> Path | None:
        """Move a trace the ledger refused (or that cannot be read) into `rejected/`, beside a reason file.

        An earlier rejected file of the same id is kept: the new one gets a `.<n>` suffix. Returns the
        rejected file, or None when the trace is no longer in the outbox.
        """
        source = self.path_of(trace_id)
        if source is None:
            return None
        self.rejected_dir.mkdir(exist_ok=True)
        stem = self._free_rejected_stem(trace_id)
        write_durably(self.rejected_dir / f"{stem}.reason.txt", reason.encode() + b"\n")
        target = self.rejected_dir / f"{stem}{source.suffix}"
        os.replace(source, target)
        fsync_path(self.rejected_dir)
        fsync_path(self.directory)
        log.error("trace %s rejected, kept in %s: %s", trace_id, target, reason)
        return target

    def _free_rejected_stem(self, trace_id: str) -> str:
        stem, n = trace_id, 0
        while any((self.rejected_dir / f"{stem}{suffix}").exists() for suffix in SUFFIXES):
            n += 1
            stem = f"{trace_id}.{n}"
        return stem

    def _record_scan(self, count: int, now: float) -> None:
        self._scanned_count, self._scanned_at, self._puts_since_scan = count, now, 0

    def _trace_entries(self) -> Iterator[os.DirEntry[str]]:
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.endswith(SUFFIXES) and not entry.name.startswith(".") and entry.is_file():
                    yield entry

    def _stat_traces(self) -> Iterator[tuple[int, str, Path]]:
        for entry in self._trace_entries():
            try:
                mtime_ns = entry.stat().st_mtime_ns
            except FileNotFoundError:  # acknowledged or rejected meanwhile
                continue
            yield mtime_ns, entry.name.rsplit(".", 1)[0], Path(entry.path)

    def _remove_stale_staging(self) -> None:
        cutoff_ns = time.time_ns() - int(STALE_STAGING_SECONDS * 1e9)
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if not (entry.name.startswith(".") and entry.name.endswith(STAGING_SUFFIX) and entry.is_file()):
                    continue
                try:
                    if entry.stat().st_mtime_ns < cutoff_ns:
                        os.unlink(entry.path)
                        log.info("removed staging file %s left by a crashed writer", entry.path)
                except FileNotFoundError:
                    continue
