"""Ships the outbox's traces to the ledger over one long-lived `Ledger.Ingest` stream, exactly once.

Guarantees:
- a trace file leaves the outbox only after the ledger acknowledged its id: ACCEPTED or DUPLICATE
  remove it, CONFLICT or REJECTED move it to `rejected/` with the ledger's reason;
- after any stream error every unacknowledged trace is sent again on the next stream; the ledger is
  idempotent on trace id (DUPLICATE), so a trace is posted once however often it is sent;
- at most `window` requests of at most `batch_size` traces (and `REQUEST_BYTES_MAX` bytes) are in flight.

One shipper per outbox: a shipper ships only while it holds the outbox's lock (`flock` on
`<outbox>/.shipper.lock`, released by the kernel when its process dies). Every process that may ship
a node's outbox (the engine replicas of that node, `gateway up`'s supervisor) starts a shipper; one
ships, the others stand by and take over within `LOCK_RETRY_SECONDS` of its end.

Idle, it costs nothing: a stream is opened only when the outbox holds a trace and closed once nothing
was in flight for `idle_close_seconds` (a sync gRPC stream wakes its threads 5–10 times a second).
Between streams the thread sleeps on the outbox directory (inotify, attribution/outbox_watch.py) and
scans it after `poll_seconds`, doubling up to `idle_poll_max_seconds` while it stays empty, so a
trace waits at most that long even where inotify is not available.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

import grpc

from attribution.outbox import CorruptTrace, Outbox
from attribution.outbox_watch import OutboxWatch
from wire.ledger.v1 import ledger_pb2, ledger_pb2_grpc

log = logging.getLogger("attribution.shipper")

Ack = ledger_pb2.IngestAck
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.use_local_subchannel_pool", 1),  # a new channel connects afresh, not in a shared subchannel's backoff
)
REQUEST_BYTES_MAX = 4 * 1024 * 1024 - 64 * 1024  # under gRPC's default 4 MiB receive limit
RECONNECT_CONFIRM_SECONDS = 1.0  # a stream up this long (or acking) ends an outage
EMPTY_POLL_SECONDS = 0.02
IDLE_CLOSE_SECONDS = 10.0  # a stream with nothing in flight this long is closed
IDLE_POLL_MAX_SECONDS = 2.0  # the longest a trace waits for the shipper between streams without inotify
CHANNEL_CLOSE_DELAY_SECONDS = 1.0
LOCK_FILE = ".shipper.lock"  # hidden: never taken for a trace
LOCK_RETRY_SECONDS = 2.0  # how soon a standing-by shipper takes over from one that ended
_CONNECTED = object()
_WAKE = object()


class StreamBroken(Exception):
    """The Ingest stream ended: the ledger is unreachable, went away, or broke the protocol."""


class _IngestStream:
    """One Ingest call: `send` requests in; acks, READY and the call's end come out of `events`."""

    def __init__(self, target: str, metadata: tuple[tuple[str, str], ...] | None) -> None:
        self.events: queue.Queue[object] = queue.Queue()
        self._requests: queue.Queue[ledger_pb2.IngestRequest | None] = queue.Queue()
        self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._channel.subscribe(self._on_connectivity, try_to_connect=True)
        self._call = ledger_pb2_grpc.LedgerStub(self._channel).Ingest(self._request_stream(), metadata=metadata)
        self._reader = threading.Thread(target=self._read_acks, name="trace-shipper-acks", daemon=True)
        self._reader.start()

    def send(self, request: ledger_pb2.IngestRequest) -> None:
        self._requests.put(request)

    def wake(self) -> None:
        self.events.put(_WAKE)

    def connected(self) -> None:
        """Stop watching connectivity once READY (its poller wakes 5 times a second); a broken
        connection ends the call, which the ack reader reports."""
        self._channel.unsubscribe(self._on_connectivity)

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()
        self._channel.unsubscribe(self._on_connectivity)  # no-op when already unsubscribed
        # gRPC's connectivity poller thread raises if the channel closes under it; it notices the
        # unsubscribe within 0.2 s, so the (now idle) channel is closed a little later.
        closer = threading.Timer(CHANNEL_CLOSE_DELAY_SECONDS, self._channel.close)
        closer.daemon = True
        closer.start()
        self._reader.join(timeout=1.0)

    def _request_stream(self) -> Iterator[ledger_pb2.IngestRequest]:
        while (request := self._requests.get()) is not None:
            yield request

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        if state is grpc.ChannelConnectivity.READY:
            self.events.put(_CONNECTED)

    def _read_acks(self) -> None:
        try:
            for message in self._call:
                for ack in message.acks or (message,):  # one message per request, or (older ledgers) per trace
                    self.events.put(ack)
            self.events.put(StreamBroken("the ledger closed the stream"))
        except grpc.RpcError as error:
            self.events.put(StreamBroken(f"{error.code().name}: {error.details()}"))
        except Exception as error:  # noqa: BLE001 - handed to the shipper thread, which logs it
            self.events.put(StreamBroken(f"{type(error).__name__}: {error}"))


class _Window:
    """The batches sent on the current stream and not yet fully acknowledged."""

    def __init__(self) -> None:
        self._batches: deque[set[str]] = deque()
        self.ids: set[str] = set()

    def __len__(self) -> int:
        return len(self._batches)

    def add(self, trace_ids: list[str]) -> None:
        self._batches.append(set(trace_ids))
        self.ids.update(trace_ids)

    def ack(self, trace_id: str) -> bool | None:
        """Mark `trace_id` acknowledged: None if it is not in flight, else whether its batch is complete."""
        if trace_id not in self.ids:
            return None
        self.ids.discard(trace_id)
        for batch in self._batches:
            if trace_id in batch:
                batch.discard(trace_id)
                if not batch:
                    self._batches.remove(batch)
                    return True
                return False
        return False


class TraceShipper:
    """One daemon thread moving traces from an `Outbox` to the ledger at `target`."""

    def __init__(self, outbox: Outbox, target: str, *, token: str | Callable[[], str] | None = None,
                 batch_size: int = 64, window: int = 4, poll_seconds: float = 0.2, backoff_initial: float = 0.5,
                 backoff_max: float = 30.0, idle_close_seconds: float = IDLE_CLOSE_SECONDS,
                 idle_poll_max_seconds: float = IDLE_POLL_MAX_SECONDS) -> None:
        if batch_size < 1 or window < 1:
            raise ValueError(f"batch_size and window must be >= 1, got {batch_size} and {window}")
        if poll_seconds <= 0 or backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValueError("poll_seconds and backoff_initial must be > 0 and backoff_max >= backoff_initial")
        if idle_close_seconds <= 0 or idle_poll_max_seconds < poll_seconds:
            raise ValueError("idle_close_seconds must be > 0 and idle_poll_max_seconds >= poll_seconds")
        self.outbox = outbox
        self.target = target
        self.batch_size = batch_size
        self.window = window
        self.poll_seconds = poll_seconds
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.idle_close_seconds = idle_close_seconds
        self.idle_poll_max_seconds = idle_poll_max_seconds
        self._watch: OutboxWatch | None = None
        self._token = token  # or a function read before each stream: the token file may appear or change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stream: _IngestStream | None = None
        self._lock = threading.Lock()
        self._counters = {"shipped": 0, "duplicates": 0, "conflicts": 0, "rejected": 0, "send_failures": 0}
        self._connected = False
        self._in_flight = 0
        self._attempt = 0
        self._in_outage = False
        self._holds_lock = False
        self._lock_descriptor = -1

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("TraceShipper.start() called twice")
        self._watch = OutboxWatch(self.outbox.directory)
        self._lock_descriptor = os.open(self.outbox.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        self._try_outbox_lock()  # at once: a shipper that can ship reports so from its start
        self._thread = threading.Thread(target=self._run, name="trace-shipper", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop shipping (unacknowledged traces stay in the outbox); True when the thread has ended."""
        self._stop.set()
        if (stream := self._stream) is not None:
            stream.wake()
        if (watch := self._watch) is not None:
            watch.wake()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stats(self) -> dict[str, int | float | bool]:
        with self._lock:
            return {**self._counters, "in_flight": self._in_flight, "connected": self._connected,
                    "standby": not self._holds_lock}

    def wait_until_empty(self, timeout: float) -> bool:
        """Wait until the outbox is empty and nothing is in flight; False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                in_flight = self._in_flight
            if in_flight == 0 and self.outbox.depth() == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(EMPTY_POLL_SECONDS)

    def _run(self) -> None:
        assert self._watch is not None
        lock = self._take_outbox_lock()
        if lock is None:
            self._watch.close()
            return
        try:
            while not self._stop.is_set():
                try:
                    if not self._wait_for_work(self._watch):
                        break
                    self._ship_on_one_stream()
                    continue  # closed while idle (or stopping): no failure
                except StreamBroken as error:
                    reason = str(error)
                except Exception as error:  # noqa: BLE001 - the thread must survive; logged with traceback
                    log.exception("trace shipper: unexpected error, reconnecting")
                    reason = f"{type(error).__name__}: {error}"
                finally:
                    self._set_state(connected=False, in_flight=0)
                if self._stop.is_set():
                    break
                self._on_stream_failed(reason)
                self._stop.wait(self._next_backoff_seconds())
        finally:
            self._watch.close()
            with self._lock:
                self._holds_lock = False
            os.close(lock)  # releases the flock: a standing-by shipper takes over

    def _try_outbox_lock(self) -> bool:
        """Take the outbox's lock if no other shipper holds it (True when this shipper holds it)."""
        try:
            fcntl.flock(self._lock_descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        with self._lock:
            self._holds_lock = True
        return True

    def _take_outbox_lock(self) -> int | None:
        """Wait until this shipper is the outbox's only one (its lock's descriptor), or stop (None)."""
        if self._holds_lock:
            return self._lock_descriptor
        log.info("another process ships %s; this shipper stands by", self.outbox.directory)
        while not self._try_outbox_lock():
            if self._stop.wait(LOCK_RETRY_SECONDS):
                os.close(self._lock_descriptor)
                return None
        log.info("shipping %s (the shipper before ended)", self.outbox.directory)
        return self._lock_descriptor

    def _wait_for_work(self, watch: OutboxWatch) -> bool:
        """Sleep until the outbox holds a trace (True) or the shipper stops (False)."""
        delay = self.poll_seconds
        while not self._stop.is_set():
            watch.drain()  # arrivals from now on wake the wait; earlier ones the scan finds
            if self.outbox.pending(1):
                return True
            if not watch.wait(delay):
                delay = min(2 * delay, self.idle_poll_max_seconds)
        return False

    def _ship_on_one_stream(self) -> None:
        """Ship until stopped or idle for `idle_close_seconds` (returns), or until the stream breaks (raises)."""
        stream = _IngestStream(self.target, self._call_metadata())
        self._stream = stream
        window = _Window()
        ready_at: float | None = None
        confirmed = False
        scan_now, next_poll = True, 0.0
        busy_at = time.monotonic()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if len(window) < self.window and (scan_now or now >= next_poll):
                    scan_now = self._fill(stream, window)
                    next_poll = time.monotonic() + self.poll_seconds
                if window.ids or scan_now:
                    busy_at = now
                elif now - busy_at >= self.idle_close_seconds and (confirmed or ready_at is None):
                    return
                self._set_state(in_flight=len(window.ids))
                try:
                    event = stream.events.get(timeout=self.poll_seconds)
                except queue.Empty:
                    event = None
                if isinstance(event, StreamBroken):
                    raise event
                if event is _CONNECTED and ready_at is None:
                    ready_at = time.monotonic()
                    stream.connected()
                    self._set_state(connected=True)
                elif isinstance(event, Ack):
                    scan_now |= self._on_ack(event, window)
                if not confirmed and ready_at is not None and (
                        isinstance(event, Ack) or time.monotonic() - ready_at >= RECONNECT_CONFIRM_SECONDS):
                    confirmed = True
                    self._on_connected()
        finally:
            self._stream = None
            stream.close()

    def _call_metadata(self) -> tuple[tuple[str, str], ...] | None:
        try:
            token = self._token() if callable(self._token) else self._token
        except (LookupError, ValueError) as error:  # no token yet (ledger not started) or a damaged one
            raise StreamBroken(str(error)) from None
        return (("authorization", f"Bearer {token}"),) if token else None

    def _fill(self, stream: _IngestStream, window: _Window) -> bool:
        """Send the oldest traces not in flight, up to the window; True when more may be waiting."""
        wanted = (self.window - len(window)) * self.batch_size
        found = self.outbox.pending(wanted, exclude=window.ids)
        batch: list[ledger_pb2.AttributionTrace] = []
        batch_bytes = 0
        for trace_id, path in found:
            try:
                message = self.outbox.read_message(path)
            except FileNotFoundError:
                continue
            except CorruptTrace as error:
                self._reject(trace_id, str(error))
                continue
            size = message.ByteSize()
            if size > REQUEST_BYTES_MAX:
                self._reject(trace_id, f"{size} bytes on the wire, over REQUEST_BYTES_MAX ({REQUEST_BYTES_MAX})")
                continue
            if batch and (len(batch) == self.batch_size or batch_bytes + size > REQUEST_BYTES_MAX):
                self._send(stream, window, batch)
                batch, batch_bytes = [], 0
            batch.append(message)
            batch_bytes += size
        if batch:
            self._send(stream, window, batch)
        return len(found) == wanted

    def _send(self, stream: _IngestStream, window: _Window, batch: list[ledger_pb2.AttributionTrace]) -> None:
        window.add([message.trace_id for message in batch])
        stream.send(ledger_pb2.IngestRequest(traces=batch, ack_per_request=True))

    def _on_ack(self, ack: ledger_pb2.IngestAck, window: _Window) -> bool:
        """Settle one acknowledged trace; True when it completed a batch (a window slot is free)."""
        batch_done = window.ack(ack.trace_id)
        if batch_done is None:
            log.warning("ledger acknowledged trace %r, which is not in flight; ignored", ack.trace_id)
            return False
        if ack.status == Ack.STATUS_ACCEPTED:
            self.outbox.remove(ack.trace_id)
            self._count("shipped")
        elif ack.status == Ack.STATUS_DUPLICATE:
            self.outbox.remove(ack.trace_id)
            self._count("duplicates")
        elif ack.status == Ack.STATUS_CONFLICT:
            self.outbox.reject(ack.trace_id, f"ledger: conflict: {ack.reason}")
            self._count("conflicts")
        elif ack.status == Ack.STATUS_REJECTED:
            self.outbox.reject(ack.trace_id, f"ledger: rejected: {ack.reason}")
            self._count("rejected")
        else:
            raise StreamBroken(f"ledger acknowledged trace {ack.trace_id!r} with unknown status {ack.status}")
        return batch_done

    def _reject(self, trace_id: str, reason: str) -> None:
        self.outbox.reject(trace_id, reason)
        self._count("rejected")

    def _on_connected(self) -> None:
        # Streams open with every burst of traffic (they close when idle): only a reconnect is news.
        log.log(logging.INFO if self._in_outage else logging.DEBUG, "trace shipper %s the ledger at %s; %d traces "
                "pending", "reconnected to" if self._in_outage else "connected to", self.target, self.outbox.depth())
        self._in_outage = False
        self._attempt = 0

    def _on_stream_failed(self, reason: str) -> None:
        self._count("send_failures")
        if not self._in_outage:
            log.warning("ledger at %s unreachable (%s): traces stay in the outbox (%d waiting), retrying",
                        self.target, reason, self.outbox.depth())
            self._in_outage = True

    def _next_backoff_seconds(self) -> float:
        """Exponential backoff with full jitter."""
        cap = min(self.backoff_max, self.backoff_initial * 2 ** min(self._attempt, 32))
        self._attempt += 1
        return random.uniform(0.0, cap)

    def _count(self, name: str) -> None:
        with self._lock:
            self._counters[name] += 1

    def _set_state(self, *, connected: bool | None = None, in_flight: int | None = None) -> None:
        with self._lock:
            if connected is not None:
                self._connected = connected
            if in_flight is not None:
                self._in_flight = in_flight
