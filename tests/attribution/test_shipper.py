"""TraceShipper against a real gRPC server running a scripted ledger: delivery, batching, acks, outages."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from attribution.outbox import Outbox
from attribution.shipper import TraceShipper
from ledger.client.trace import AttributionTrace, TokenAttribution
from tests.conftest import free_port
from wire.ledger.v1 import ledger_pb2, ledger_pb2_grpc

Ack = ledger_pb2.IngestAck
SERVER_OPTIONS = [("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.min_ping_interval_without_data_ms", 5000)]
SHIPPER_DEFAULTS = {"poll_seconds": 0.02, "backoff_initial": 0.02, "backoff_max": 0.1}


class ScriptedLedger(ledger_pb2_grpc.LedgerServicer):
    """A test double of the ledger's Ingest: records what it receives and answers as configured."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[str] = []  # every trace id received, resends included
        self.accepted: list[str] = []  # trace ids stored, in order (each at most once)
        self.message_sizes: list[int] = []
        self.metadata: list[dict[str, str | bytes]] = []  # one per stream
        self.conflicts: dict[str, str] = {}  # trace id -> reason
        self.rejects: dict[str, str] = {}  # trace id -> reason
        self.abort_after: int | None = None  # abort a stream once, after receiving this many traces in all
        self.ack_delay_seconds = 0.0
        self.open_streams = 0

    def Ingest(self, request_iterator, context):  # type: ignore[no-untyped-def]
        with self.lock:
            self.metadata.append(dict(context.invocation_metadata()))
            self.open_streams += 1
        try:
            for request in request_iterator:
                with self.lock:
                    self.message_sizes.append(len(request.traces))
                for trace in request.traces:
                    ack, abort = self._receive(trace.trace_id)
                    if abort:
                        context.abort(grpc.StatusCode.UNAVAILABLE, "scripted abort")
                    if self.ack_delay_seconds:
                        time.sleep(self.ack_delay_seconds)
                    yield ack
        finally:
            with self.lock:
                self.open_streams -= 1

    def _receive(self, trace_id: str) -> tuple[ledger_pb2.IngestAck, bool]:
        with self.lock:
            self.received.append(trace_id)
            abort = self.abort_after is not None and len(self.received) >= self.abort_after
            if abort:
                self.abort_after = None
            if trace_id in self.conflicts:
                return Ack(trace_id=trace_id, status=Ack.STATUS_CONFLICT, reason=self.conflicts[trace_id]), abort
            if trace_id in self.rejects:
                return Ack(trace_id=trace_id, status=Ack.STATUS_REJECTED, reason=self.rejects[trace_id]), abort
            if trace_id in self.accepted:
                return Ack(trace_id=trace_id, status=Ack.STATUS_DUPLICATE), abort
            self.accepted.append(trace_id)
            return Ack(trace_id=trace_id, status=Ack.STATUS_ACCEPTED, entry_id=len(self.accepted)), abort


def make_trace(trace_id: str) -> AttributionTrace:
    token = TokenAttribution(3, (("aa" * 32, 0.25),), 0.75)
    return AttributionTrace(trace_id=trace_id, model="tiny", adapter=None, requester="key-1", prompt_tokens=4,
                            completion_tokens=1, tokens=(token,), method="verbatim-span-v1")


def put_traces(outbox: Outbox, count: int, prefix: str = "t") -> list[str]:
    ids = [f"{prefix}-{n:04d}" for n in range(count)]
    for trace_id in ids:
        outbox.put(make_trace(trace_id))
    return ids


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.fixture()
def ledger() -> ScriptedLedger:
    return ScriptedLedger()


@pytest.fixture()
def serve(ledger: ScriptedLedger) -> Iterator[Callable[[int], grpc.Server]]:
    """Start the scripted ledger on 127.0.0.1:<port> (again after a stop, too); all stopped at teardown."""
    started: list[tuple[grpc.Server, ThreadPoolExecutor]] = []

    def start(port: int) -> grpc.Server:
        executor = ThreadPoolExecutor(max_workers=8)
        server = grpc.server(executor, options=SERVER_OPTIONS)
        ledger_pb2_grpc.add_LedgerServicer_to_server(ledger, server)
        assert server.add_insecure_port(f"127.0.0.1:{port}") == port
        server.start()
        started.append((server, executor))
        return server

    yield start
    for server, executor in started:
        server.stop(None).wait()
        executor.shutdown(wait=True)


@pytest.fixture()
def outbox(tmp_path: Path) -> Outbox:
    return Outbox(tmp_path / "outbox")


@pytest.fixture()
def make_shipper(outbox: Outbox) -> Iterator[Callable[..., TraceShipper]]:
    """A started shipper to 127.0.0.1:<port> with test-sized poll and backoff; stopped at teardown."""
    shippers: list[TraceShipper] = []

    def make(port: int, **options: object) -> TraceShipper:
        shipper = TraceShipper(outbox, f"127.0.0.1:{port}", **{**SHIPPER_DEFAULTS, **options})  # type: ignore[arg-type]
        shipper.start()
        shippers.append(shipper)
        return shipper

    yield make
    for shipper in shippers:
        assert shipper.stop(timeout=5.0), "shipper thread did not stop"


def test_traces_arrive_and_outbox_empties_on_one_long_lived_stream(
        ledger: ScriptedLedger, serve: Callable[[int], grpc.Server], make_shipper: Callable[..., TraceShipper],
        outbox: Outbox) -> None:
    port = free_port()
    serve(port)
    ids = put_traces(outbox, 5)
    shipper = make_shipper(port)
    assert shipper.wait_until_empty(5.0)
    assert sorted(ledger.accepted) == ids

    later = put_traces(outbox, 3, prefix="later")  # picked up by polling while the stream stays open
    assert shipper.wait_until_empty(5.0)
    assert sorted(ledger.accepted) == sorted(ids + later)
    wait_for(lambda: shipper.stats()["connected"] is True)
    assert len(ledger.metadata) == 1
    assert "authorization" not in ledger.metadata[0]
    stats = shipper.stats()
    assert (stats["shipped"], stats["duplicates"], stats["send_failures"], stats["in_flight"]) == (8, 0, 0, 0)


def test_many_pending_traces_are_batched(ledger: ScriptedLedger, serve: Callable[[int], grpc.Server],
                                         make_shipper: Callable[..., TraceShipper], outbox: Outbox) -> None:
    port = free_port()
    serve(port)
    ids = put_traces(outbox, 50)
    shipper = make_shipper(port, batch_size=16, window=2)
    assert shipper.wait_until_empty(5.0)
    assert sorted(ledger.accepted) == ids
    assert ledger.message_sizes[0] == 16
    assert max(ledger.message_sizes) == 16 and sum(ledger.message_sizes) == 50


def test_duplicates_across_a_stream_break_are_acked_and_removed(
        ledger: ScriptedLedger, serve: Callable[[int], grpc.Server], make_shipper: Callable[..., TraceShipper],
        outbox: Outbox) -> None:
    port = free_port()
    serve(port)
    ledger.abort_after = 5  # the 5th trace is stored, then the stream breaks before its ack
    ids = put_traces(outbox, 12)
    shipper = make_shipper(port, batch_size=4, window=2)
    assert shipper.wait_until_empty(5.0)
    assert sorted(ledger.accepted) == ids
    assert ledger.received.count(ids[4]) == 2
    stats = shipper.stats()
    assert stats["send_failures"] >= 1
    assert stats["duplicates"] >= 1 and stats["shipped"] + stats["duplicates"] >= 12
    assert len(ledger.metadata) >= 2


def test_conflict_and_rejected_traces_are_kept_with_reasons(
        ledger: ScriptedLedger, serve: Callable[[int], grpc.Server], make_shipper: Callable[..., TraceShipper],
        outbox: Outbox, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    serve(port)
    ledger.conflicts["t-0001"] = "stored with different content"
    ledger.rejects["t-0002"] = "completion_tokens != len(tokens)"
    put_traces(outbox, 3)
    with caplog.at_level(logging.ERROR, logger="attribution.outbox"):
        shipper = make_shipper(port)
        assert shipper.wait_until_empty(5.0)
    rejected = outbox.rejected_dir
    assert sorted(path.name for path in rejected.iterdir()) == [
        "t-0001.pb", "t-0001.reason.txt", "t-0002.pb", "t-0002.reason.txt"]
    assert (rejected / "t-0001.reason.txt").read_text() == "ledger: conflict: stored with different content\n"
    assert (rejected / "t-0002.reason.txt").read_text() == "ledger: rejected: completion_tokens != len(tokens)\n"
    assert outbox.read(rejected / "t-0001.pb") == make_trace("t-0001")
    stats = shipper.stats()
    assert (stats["shipped"], stats["conflicts"], stats["rejected"]) == (1, 1, 1)
    assert "t-0001" in caplog.text and "t-0002" in caplog.text


def test_unreadable_file_is_rejected_not_sent(ledger: ScriptedLedger, serve: Callable[[int], grpc.Server],
                                              make_shipper: Callable[..., TraceShipper], outbox: Outbox) -> None:
    port = free_port()
    serve(port)
    (outbox.directory / "broken.json").write_bytes(b'{"trace_id": "broken"')
    ids = put_traces(outbox, 2)
    shipper = make_shipper(port)
    assert shipper.wait_until_empty(5.0)
    assert sorted(ledger.received) == ids
    assert (outbox.rejected_dir / "broken.json").read_bytes() == b'{"trace_id": "broken"'
    assert "not a readable attribution trace" in (outbox.rejected_dir / "broken.reason.txt").read_text()
    assert shipper.stats()["rejected"] == 1


def test_ledger_down_at_start_then_everything_delivered_once(
        ledger: ScriptedLedger, serve: Callable[[int], grpc.Server], make_shipper: Callable[..., TraceShipper],
        outbox: Outbox, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    ids = put_traces(outbox, 10)
    with caplog.at_level(logging.INFO, logger="attribution.shipper"):
        shipper = make_shipper(port)
        wait_for(lambda: shipper.stats()["send_failures"] >= 3)
        assert outbox.depth() == 10
        assert shipper.stats()["connected"] is False
        warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
        assert len(warnings) == 1  # one per outage, not one per retry
        assert f"127.0.0.1:{port}" in warnings[0].getMessage()

        serve(port)
        assert shipper.wait_until_empty(5.0)
        wait_for(lambda: "reconnected" in caplog.text)
    assert sorted(ledger.accepted) == ids
    assert sorted(ledger.received) == ids  # nothing reached the ledger twice
    assert shipper.stats()["shipped"] == 10


def test_ledger_stopped_mid_stream_and_restarted_loses_nothing(
        ledger: ScriptedLedger, serve: Callable[[int], grpc.Server], make_shipper: Callable[..., TraceShipper],
        outbox: Outbox) -> None:
    port = free_port()
    server = serve(port)
    ledger.ack_delay_seconds = 0.002
    ids = put_traces(outbox, 200)
    shipper = make_shipper(port, batch_size=8, window=2)
    wait_for(lambda: len(ledger.received) >= 40)
    server.stop(None).wait()
    assert outbox.depth() > 0
    serve(port)
    assert shipper.wait_until_empty(10.0)
    assert sorted(ledger.accepted) == ids  # each stored exactly once
    stats = shipper.stats()
    assert stats["send_failures"] >= 1
    assert stats["shipped"] + stats["duplicates"] >= 200


def test_token_is_sent_as_bearer_metadata(ledger: ScriptedLedger, serve: Callable[[int], grpc.Server],
                                          make_shipper: Callable[..., TraceShipper], outbox: Outbox) -> None:
    port = free_port()
    serve(port)
    put_traces(outbox, 1)
    shipper = make_shipper(port, token="s3cret")
    assert shipper.wait_until_empty(5.0)
    assert ledger.metadata[0]["authorization"] == "Bearer s3cret"


def test_unexpected_error_is_logged_and_the_thread_survives(
        ledger: ScriptedLedger, serve: Callable[[int], grpc.Server], make_shipper: Callable[..., TraceShipper],
        outbox: Outbox, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    serve(port)
    ids = put_traces(outbox, 3)
    real_pending, calls = outbox.pending, []

    def failing_once(limit: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[tuple[str, Path]]:
        calls.append(limit)
        if len(calls) == 1:
            raise OSError("disk hiccup")
        return real_pending(limit, exclude)

    monkeypatch.setattr(outbox, "pending", failing_once)
    with caplog.at_level(logging.ERROR, logger="attribution.shipper"):
        shipper = make_shipper(port)
        assert shipper.wait_until_empty(5.0)
    assert sorted(ledger.accepted) == ids
    assert shipper.stats()["send_failures"] == 1
    assert any(record.exc_info and "disk hiccup" in str(record.exc_info[1]) for record in caplog.records)


def test_stop_is_prompt_during_a_backoff(make_shipper: Callable[..., TraceShipper], outbox: Outbox) -> None:
    put_traces(outbox, 1)
    shipper = make_shipper(free_port(), backoff_initial=30.0, backoff_max=30.0)
    wait_for(lambda: shipper.stats()["send_failures"] >= 1)
    started = time.monotonic()
    assert shipper.stop(timeout=5.0)
    assert time.monotonic() - started < 1.0
    assert outbox.depth() == 1


def test_shipping_metrics_show_the_outbox_and_the_ledgers_answers(
        ledger: ScriptedLedger, serve: Callable[[int], grpc.Server], make_shipper: Callable[..., TraceShipper],
        outbox: Outbox) -> None:
    from prometheus_client import CollectorRegistry

    from attribution.metrics import ShippingCollector

    put_traces(outbox, 3)
    time.sleep(0.05)
    port = free_port()  # nothing listens yet: the traces wait and the failures are counted
    shipper = make_shipper(port)
    registry = CollectorRegistry()
    registry.register(ShippingCollector(shipper))
    assert registry.get_sample_value("gateway_outbox_traces") == 3
    assert registry.get_sample_value("gateway_outbox_oldest_age_seconds") >= 0.05
    wait_for(lambda: (registry.get_sample_value("gateway_trace_send_failures_total") or 0) >= 1)

    serve(port)
    assert shipper.wait_until_empty(10.0)
    assert registry.get_sample_value("gateway_outbox_traces") == 0
    assert registry.get_sample_value("gateway_outbox_oldest_age_seconds") == 0
    assert registry.get_sample_value("gateway_traces_shipped_total", {"ack": "accepted"}) == 3
    assert registry.get_sample_value("gateway_traces_shipped_total", {"ack": "rejected"}) == 0


def test_an_empty_outbox_opens_no_stream_and_an_idle_stream_is_closed(
        ledger: ScriptedLedger, serve: Callable[[int], grpc.Server], make_shipper: Callable[..., TraceShipper],
        outbox: Outbox) -> None:
    """Idle, the shipper holds no stream (a sync gRPC stream wakes its threads several times a second)."""
    port = free_port()
    serve(port)
    shipper = make_shipper(port, idle_close_seconds=0.3)
    time.sleep(0.5)
    assert ledger.metadata == []  # nothing to ship: never connected
    ids = put_traces(outbox, 3)
    assert shipper.wait_until_empty(5.0)
    wait_for(lambda: ledger.open_streams == 0 and shipper.stats()["connected"] is False)
    assert sorted(ledger.accepted) == ids
    assert len(ledger.metadata) == 1
    assert shipper.stats()["send_failures"] == 0  # closing an idle stream is no failure


def test_a_trace_after_a_long_idle_period_is_shipped_at_once(
        ledger: ScriptedLedger, serve: Callable[[int], grpc.Server], make_shipper: Callable[..., TraceShipper],
        outbox: Outbox) -> None:
    """inotify wakes the idle shipper: far sooner than its longest poll (30 s here)."""
    port = free_port()
    serve(port)
    shipper = make_shipper(port, poll_seconds=0.2, idle_poll_max_seconds=30.0, idle_close_seconds=0.2)
    assert shipper._watch is not None and shipper._watch.notifies
    for round_ in range(2):  # first with no stream ever opened, then after an idle close
        wait_for(lambda: ledger.open_streams == 0 and shipper.stats()["connected"] is False)
        time.sleep(3.5)  # idle polls 0.2, 0.4, 0.8, 1.6 s: the one under way ends ~3 s from now
        started = time.monotonic()
        [trace_id] = put_traces(outbox, 1, prefix=f"late{round_}")
        wait_for(lambda: trace_id in ledger.accepted, timeout=5.0)
        assert time.monotonic() - started < 1.0
    assert len(ledger.metadata) == 2


def test_without_inotify_an_idle_shipper_finds_a_trace_within_its_longest_poll(
        ledger: ScriptedLedger, serve: Callable[[int], grpc.Server], outbox: Outbox,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import attribution.outbox_watch

    monkeypatch.setattr(attribution.outbox_watch, "_inotify_fd", lambda directory: None)  # as on macOS
    port = free_port()
    serve(port)
    shipper = TraceShipper(outbox, f"127.0.0.1:{port}", poll_seconds=0.1, idle_poll_max_seconds=0.8)
    shipper.start()
    try:
        assert shipper._watch is not None and not shipper._watch.notifies
        time.sleep(2.0)  # backed off to its longest poll
        started = time.monotonic()
        [trace_id] = put_traces(outbox, 1)
        wait_for(lambda: trace_id in ledger.accepted, timeout=5.0)
        assert time.monotonic() - started < 0.8 + 0.5
    finally:
        assert shipper.stop(timeout=5.0)


def test_a_stream_waiting_for_slow_acks_is_not_closed_as_idle(
        ledger: ScriptedLedger, serve: Callable[[int], grpc.Server], make_shipper: Callable[..., TraceShipper],
        outbox: Outbox) -> None:
    port = free_port()
    serve(port)
    ledger.ack_delay_seconds = 0.4  # each ack longer than idle_close_seconds
    ids = put_traces(outbox, 3)
    shipper = make_shipper(port, batch_size=1, window=1, idle_close_seconds=0.2)
    assert shipper.wait_until_empty(10.0)
    assert sorted(ledger.accepted) == ids
    assert sorted(ledger.received) == ids  # nothing sent twice: the stream was never cut
    assert len(ledger.metadata) == 1


def test_idle_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        TraceShipper(Outbox.__new__(Outbox), "127.0.0.1:1", idle_close_seconds=0)
    with pytest.raises(ValueError):
        TraceShipper(Outbox.__new__(Outbox), "127.0.0.1:1", poll_seconds=0.5, idle_poll_max_seconds=0.1)


def test_stop_is_prompt_while_idle(make_shipper: Callable[..., TraceShipper]) -> None:
    shipper = make_shipper(free_port(), idle_poll_max_seconds=30.0)
    time.sleep(0.3)
    started = time.monotonic()
    assert shipper.stop(timeout=5.0)
    assert time.monotonic() - started < 0.5


def test_one_shipper_per_outbox_and_a_standing_by_one_takes_over(
        ledger: ScriptedLedger, serve: Callable[[int], grpc.Server], make_shipper: Callable[..., TraceShipper],
        outbox: Outbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes of one node (replicas, the supervisor) start shippers on the same outbox: one ships,
    the other stands by (and reports no backlog) until the first ends, then ships what arrives next."""
    from prometheus_client import CollectorRegistry

    from attribution import shipper as shipper_module
    from attribution.metrics import ShippingCollector

    monkeypatch.setattr(shipper_module, "LOCK_RETRY_SECONDS", 0.05)
    port = free_port()
    serve(port)
    first = make_shipper(port)
    second = make_shipper(port)
    assert (first.stats()["standby"], second.stats()["standby"]) == (False, True)
    standby_metrics = CollectorRegistry()
    standby_metrics.register(ShippingCollector(second))
    early = put_traces(outbox, 20, prefix="early")
    assert first.wait_until_empty(5.0)
    assert standby_metrics.get_sample_value("gateway_outbox_traces") is None  # the shipping one reports it
    assert first.stats()["shipped"] == 20 and second.stats()["shipped"] == 0

    assert first.stop(timeout=5.0)
    wait_for(lambda: second.stats()["standby"] is False)
    late = put_traces(outbox, 5, prefix="late")
    assert second.wait_until_empty(5.0)
    assert second.stats()["shipped"] == 5
    assert sorted(ledger.received) == sorted(early + late)  # each sent once: never by both
