"""The ledger's gRPC server: `gateway.ledger.v1.Ledger` (ingest of traces, balances and look-ups), and
on the same port `Access` (what engine replicas ask: ledger/access_service.py) and the services the
caller adds (`Admin`).

A synchronous gRPC server over `Journal`: each `IngestRequest` is posted in one database
transaction and answered, once it committed, with one ack per trace, in order: one message per
trace, or one message for the whole request when it asks so (`ack_per_request`). A stream's next
requests are read ahead and prepared (decoded, checked, hashed: ledger/journal/prepared.py) in a
helper process while the current one is written (ledger/journal/prepare_pool.py).

Every call, on every address (loopback too), must carry ``authorization: Bearer <token>``
(`ensure_ledger_token` below; clients read it with `ledger/client/token.py`); a call without it, or
with another token, is answered UNAUTHENTICATED before any servicer code runs, so it reads and
writes nothing. Only the standard health check (`grpc.health.v1.Health`) answers without the
token. Reflection runs on the same port, behind the token like the ledger's own calls.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import queue
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from contextlib import closing
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy.exc import SQLAlchemyError

from ledger.access_service import SERVICE_NAME as ACCESS_SERVICE_NAME
from ledger.access_service import TransferExpiry, add_access_service
from ledger.client.token import configured_token, read_ledger_token
from ledger.client.trace_wire import trace_to_pb
from ledger.journal.journal import AddressBalance, IngestResult, Journal
from ledger.journal.prepare_pool import BatchPreparer, Outcome
from ledger.journal.usage import BUCKETS_DEFAULT, usage
from ledger.metrics import ingest_metrics
from statedir.layout import StateLayout
from wire.ledger.v1 import ledger_pb2, ledger_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = ledger_pb2.DESCRIPTOR.services_by_name["Ledger"].full_name
STATEMENT_LIMIT_DEFAULT = 100
STATEMENT_LIMIT_MAX = 10_000
ACKS_AHEAD = 2  # batches written whose acks are not sent yet
GROUP_TRACES = 256  # at most this many traces of requests already prepared written in one transaction
ACK_STATUS = {
    "accepted": ledger_pb2.IngestAck.STATUS_ACCEPTED,
    "duplicate": ledger_pb2.IngestAck.STATUS_DUPLICATE,
    "conflict": ledger_pb2.IngestAck.STATUS_CONFLICT,
    "rejected": ledger_pb2.IngestAck.STATUS_REJECTED,
}
Written = tuple[bool, list[IngestResult]]  # a committed request: its ack_per_request, its results in order


class LedgerServicer(ledger_pb2_grpc.LedgerServicer):
    """Thin over `Journal`: converts messages, maps errors to status codes."""

    def __init__(self, journal: Journal, preparer: BatchPreparer | None = None,
                 group_traces: int = GROUP_TRACES) -> None:
        self.journal = journal
        self.preparer = preparer or BatchPreparer(processes=0)
        self.group_traces = group_traces
        self.counters = {"accepted": 0, "duplicate": 0, "conflict": 0, "rejected": 0}
        self.metrics = ingest_metrics()

    def Ingest(self, request_iterator: Iterator[ledger_pb2.IngestRequest],  # noqa: N802
               context: grpc.ServicerContext) -> Iterator[ledger_pb2.IngestAck]:
        # A thread writes the batches (the next ones read and prepared meanwhile, see `BatchPreparer`);
        # this one sends each batch's acks (one message per trace, or one for the batch with
        # `ack_per_request`) while the next batch is written.
        written: queue.Queue[Written | BaseException | None] = queue.Queue(ACKS_AHEAD)
        stop = threading.Event()
        threading.Thread(target=self._write_all, args=(request_iterator, written, stop), name="ledger-ingest-write",
                         daemon=True).start()
        try:
            while (item := written.get()) is not None:
                if isinstance(item, SQLAlchemyError):  # nothing of that batch was committed; the sender retries
                    context.abort(grpc.StatusCode.UNAVAILABLE, f"ledger database error: {type(item).__name__}; retry")
                if isinstance(item, BaseException):
                    raise item
                per_request, results = item
                acks = [_ack(result) for result in results]
                if per_request:
                    if acks:
                        yield ledger_pb2.IngestAck(acks=acks)
                else:
                    yield from acks
        finally:
            stop.set()

    def _write_all(self, requests: Iterator[ledger_pb2.IngestRequest],
                   written: queue.Queue[Written | BaseException | None], stop: threading.Event) -> None:
        """Post each request in its own transaction, in order, putting (ack_per_request, its results) once
        committed; then None, or the error that ended the stream."""
        def put(item: Written | BaseException | None) -> bool:
            while not stop.is_set():
                try:
                    written.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            with closing(self.preparer.groups(requests, self.group_traces)) as groups:
                for group in groups:
                    started = time.perf_counter()
                    try:
                        answers = self._post(group)
                    except SQLAlchemyError as error:
                        log.exception("ledger database error while ingesting %d traces",
                                      sum(len(request.traces) for request, _ in group))
                        put(error)
                        return
                    self.metrics.batch_seconds.observe(time.perf_counter() - started)
                    for (request, _), results in zip(group, answers, strict=True):
                        for status, count in Counter(result.status for result in results).items():
                            self.counters[status] += count
                            self.metrics.traces.labels(status).inc(count)
                        if not put((request.ack_per_request, results)):
                            return
        except BaseException as error:  # the stream broke (cancelled, deadline): ends the call with it
            put(error)
            return
        put(None)

    def _post(self, group: list[tuple[ledger_pb2.IngestRequest, list[Outcome]]]) -> list[list[IngestResult]]:
        """Each request's results: invalid traces are rejected one by one; the valid ones of the whole
        group are posted in one transaction (in request order, so a repeat is a duplicate as if posted
        request by request)."""
        valid = [outcome for _, outcomes in group for outcome in outcomes if not isinstance(outcome, str)]
        posted = iter(self.journal.ingest_prepared(valid)) if valid else iter(())
        return [[IngestResult(message.trace_id, "rejected", 0, f"invalid trace: {outcome}")
                 if isinstance(outcome, str) else next(posted)
                 for message, outcome in zip(request.traces, outcomes, strict=True)]
                for request, outcomes in group]

    def GetBalance(self, request: ledger_pb2.GetBalanceRequest,  # noqa: N802
                   context: grpc.ServicerContext) -> ledger_pb2.Balance:
        if request.WhichOneof("subject") == "account":
            return ledger_pb2.Balance(subject=request.account,
                                      amount=str(self.journal.account_balance(request.account)))
        if request.WhichOneof("subject") != "address":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give an address or an account")
        return _balance_pb(_checked(context, lambda: self.journal.balance(request.address)))

    def GetStatement(self, request: ledger_pb2.GetStatementRequest,  # noqa: N802
                     context: grpc.ServicerContext) -> ledger_pb2.Statement:
        limit = request.limit or STATEMENT_LIMIT_DEFAULT
        if limit > STATEMENT_LIMIT_MAX:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"limit must be <= {STATEMENT_LIMIT_MAX}")
        balance = _checked(context, lambda: self.journal.balance(request.address))
        lines = self.journal.statement(balance.address, limit=limit, before_entry_id=request.before_entry_id)
        return ledger_pb2.Statement(
            address=balance.address, balance=_balance_pb(balance),
            lines=[ledger_pb2.StatementLine(entry_id=line.entry_id, kind=line.kind, ref=line.ref, account=line.account,
                                            amount=str(line.amount), role=line.role, created_at=line.created_at,
                                            tx_hash=line.tx_hash or "", traces=line.traces)
                   for line in lines],
        )

    def GetTrace(self, request: ledger_pb2.GetTraceRequest,  # noqa: N802
                 context: grpc.ServicerContext) -> ledger_pb2.TraceRecord:
        record = self.journal.trace(request.trace_id)
        if record is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no trace '{request.trace_id}' in the ledger")
        entry = record.entry
        return ledger_pb2.TraceRecord(
            trace=trace_to_pb(record.trace), content_sha256=record.content_sha256, fee=str(record.fee),
            price_per_1k_tokens=str(record.price_per_1k_tokens), received_at=record.received_at,
            entry=ledger_pb2.JournalEntry(
                id=entry.id, kind=entry.kind, ref=entry.ref, created_at=entry.created_at,
                postings=[ledger_pb2.Posting(account=p.account, amount=str(p.amount), role=p.role)
                          for p in entry.postings]),
        )

    def GetTotals(self, request: ledger_pb2.GetTotalsRequest,  # noqa: N802
                  context: grpc.ServicerContext) -> ledger_pb2.Totals:
        totals = self.journal.totals()
        return ledger_pb2.Totals(
            traces=totals.traces, entries=totals.entries, postings=totals.postings, conflicts=totals.conflicts,
            completion_tokens=totals.completion_tokens, attributed_tokens=totals.attributed_tokens,
            fees=str(totals.fees), by_class={k: str(v) for k, v in totals.by_class.items()},
            postings_sum=str(totals.postings_sum), unbalanced_entries=totals.unbalanced_entries,
        )

    def GetUsage(self, request: ledger_pb2.GetUsageRequest,  # noqa: N802
                 context: grpc.ServicerContext) -> ledger_pb2.Usage:
        found = _checked(context, lambda: usage(self.journal.engine, request.adapters, bucket=request.bucket or "day",
                                                buckets=request.buckets or BUCKETS_DEFAULT))
        return ledger_pb2.Usage(buckets=[
            ledger_pb2.UsageBucket(adapter=b.adapter, start=b.start.isoformat(), requests=b.requests,
                                   completion_tokens=b.completion_tokens, fees=str(b.fees))
            for b in found])


def _ack(result: IngestResult) -> ledger_pb2.IngestAck:
    if result.status in ("conflict", "rejected"):
        log.error("trace %s refused (%s): %s", result.trace_id, result.status, result.reason)
    return ledger_pb2.IngestAck(trace_id=result.trace_id, status=ACK_STATUS[result.status], entry_id=result.entry_id,
                                reason=result.reason)


def _balance_pb(balance: AddressBalance) -> ledger_pb2.Balance:
    return ledger_pb2.Balance(subject=balance.address, payable=str(balance.payable), pending=str(balance.pending),
                              paid=str(balance.paid))


def _checked(context: grpc.ServicerContext, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except ValueError as error:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` (health checks pass without it)."""

    OPEN_PREFIX = "/grpc.health.v1.Health/"

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the ledger needs a token")
        self._expected = f"Bearer {token}".encode()

        def deny(_request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong ledger token")

        self._deny = deny

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        if details.method.startswith(self.OPEN_PREFIX):
            return continuation(details)
        given = dict(details.invocation_metadata).get("authorization", "")
        if hmac.compare_digest(given.encode() if isinstance(given, str) else given, self._expected):
            return continuation(details)
        handler = continuation(details)
        if handler is not None and handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(lambda _it, ctx: self._deny(None, ctx))
        if handler is not None and handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(self._deny)
        if handler is not None and handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(self._deny)
        return grpc.unary_unary_rpc_method_handler(self._deny)


def ensure_ledger_token(state_dir: Path) -> str:
    """The token the ledger service requires: GATEWAY_LEDGER_TOKEN, else GATEWAY_LEDGER_TOKEN_FILE's, else
    `<state>/ledger-token`, generated (32 random bytes, URL-safe base64) into an owner-only file on first start."""
    configured = configured_token()
    if configured is not None:
        return configured
    path = StateLayout(state_dir).ledger_token
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_ledger_token(state_dir)
    try:
        with os.fdopen(descriptor, "w", encoding="ascii") as out:
            out.write(token + "\n")
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


Servicer = Callable[[grpc.Server], str]
"""Adds one more service to the ledger's server; returns its full name (for health and reflection)."""


class LedgerServer:
    """The running gRPC server and the expiry of transfers; `stop(grace)` ends both."""

    def __init__(self, server: grpc.Server, expiry: TransferExpiry, preparer: BatchPreparer | None = None) -> None:
        self.server = server
        self.expiry = expiry
        self.preparer = preparer

    def stop(self, grace: float | None) -> threading.Event:
        self.expiry.stop()
        stopped = self.server.stop(grace)
        if self.preparer is not None:
            self.preparer.close()
        return stopped


def start_server(journal: Journal, host: str, port: int, *, token: str, workers: int = 32,
                 servicers: Sequence[Servicer] = (), prepare_processes: int = 1) -> LedgerServer:
    """Serve the ledger on host:port, every call but health behind `token` (started; call `.stop(grace)`).

    The Access API (ledger/access_service.py: keys, terms, leases, holds, rate) is always on the same
    port; `servicers` add others (Admin) there too, behind the same token. `prepare_processes` helper
    processes prepare large ingest requests while the previous one is written (ledger/journal/
    prepare_pool.py; started at the first such request; 0: none)."""
    interceptors = [TokenAuthInterceptor(token)]  # ValueError without a token: there is no open mode
    # Each gateway keeps one long-lived Ingest stream (one worker thread) and pings it when idle.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ledger"),
                         interceptors=interceptors,
                         options=[("grpc.so_reuseport", 0), ("grpc.keepalive_permit_without_calls", 1),
                                  ("grpc.http2.min_ping_interval_without_data_ms", 5_000)])
    preparer = BatchPreparer(prepare_processes)
    ledger_pb2_grpc.add_LedgerServicer_to_server(LedgerServicer(journal, preparer), server)
    expiry = add_access_service(server, journal.engine)
    names = [SERVICE_NAME, ACCESS_SERVICE_NAME] + [add(server) for add in servicers]
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*names, reflection.SERVICE_NAME,
                                         health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        expiry.stop()
        preparer.close()
        raise OSError(f"cannot listen on {host}:{port} (in use?)")
    server.start()
    for name in ("", *names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("ledger listening on %s:%d", host, port)
    return LedgerServer(server, expiry, preparer)
