"""What the ledger holds, read through its API (`gateway.ledger.v1.Ledger`, behind the ledger token): balances,
statements, stored traces and adapter usage, as typed records.

For readers outside the ledger (the contributor portal): the ledger is the one owner of money state,
and this is how it is read, never through its database. Amounts are Python ints in base units
(decimal strings on the wire), times aware `datetime`s in UTC.

Errors: a request the ledger refuses as invalid (a malformed address, an unknown usage bucket, too
many buckets) is ValueError with the ledger's message; any other failure (down, unreachable, wrong
token, deadline) is `LedgerUnavailable`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from ledger.client.access import RPC_TIMEOUT_SECONDS, LedgerUnavailable
from ledger.client.config import LedgerClientConfig
from ledger.client.token import bearer_metadata, read_ledger_token
from ledger.client.trace import AttributionTrace
from ledger.client.trace_wire import trace_from_pb
from wire.ledger.v1 import ledger_pb2, ledger_pb2_grpc


@dataclass(frozen=True)
class Balances:
    """An address's accounts: earned and not yet in a payout (payable), in a payout not yet mined (pending), paid."""

    address: str  # checksummed
    payable: int
    pending: int
    paid: int


@dataclass(frozen=True)
class StatementLineView:
    """One posting on one of the address's accounts."""

    entry_id: int
    kind: str  # "inference", "payout_planned", …
    ref: str  # the trace id of an inference; the batch id of a payout
    account: str
    amount: int  # signed, credit to the address positive
    role: str
    created_at: datetime
    tx_hash: str | None  # payout lines: the transaction that paid the batch, once mined
    traces: tuple[str, ...]  # payout lines: the traces whose credits the payout pays


@dataclass(frozen=True)
class StatementPage:
    address: str
    lines: tuple[StatementLineView, ...]  # newest entry first
    balances: Balances  # after all entries, not only these lines


@dataclass(frozen=True)
class PostingView:
    account: str
    amount: int  # signed; an entry's postings sum to zero
    role: str


@dataclass(frozen=True)
class EntryView:
    id: int
    kind: str
    ref: str
    created_at: datetime
    postings: tuple[PostingView, ...]


@dataclass(frozen=True)
class TraceRecordView:
    """A stored trace, what it cost and the journal entry that credited its contributors."""

    trace: AttributionTrace
    content_sha256: str
    fee: int
    price_per_1k_tokens: int
    entry: EntryView
    received_at: datetime


@dataclass(frozen=True)
class UsageBucketView:
    """One adapter's traces received in one UTC day or hour."""

    adapter: str  # "" for the base model
    start: datetime
    requests: int
    completion_tokens: int
    fees: int


class LedgerReads:
    """Read-only look-ups on the ledger at `target` (one channel, thread-safe)."""

    def __init__(self, target: str, token: str, *, timeout: float = RPC_TIMEOUT_SECONDS) -> None:
        self.target = target
        self._metadata = bearer_metadata(token)
        self._timeout = timeout
        self._channel = grpc.insecure_channel(target)
        self._stub = ledger_pb2_grpc.LedgerStub(self._channel)

    @classmethod
    def for_state_dir(cls, state_dir: Path, config: LedgerClientConfig | None = None) -> LedgerReads:
        """The ledger of `config` (default: `GATEWAY_LEDGER_*`), with its token (`read_ledger_token`)."""
        config = config or LedgerClientConfig()
        return cls(config.target, read_ledger_token(state_dir, config))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> LedgerReads:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(self, method: str, request: object) -> Any:
        try:
            return getattr(self._stub, method)(request, metadata=self._metadata, timeout=self._timeout)
        except grpc.RpcError as error:
            code = error.code()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(error.details()) from None  # type: ignore[attr-defined]
            raise LedgerUnavailable(f"the ledger at {self.target} did not answer {method}: "
                                    f"{code.name}: {error.details()}") from None  # type: ignore[attr-defined]

    def balance(self, address: str) -> Balances:
        """The address's balances (any case in, checksummed out); ValueError when it is not an address."""
        return _balances(self._call("GetBalance", ledger_pb2.GetBalanceRequest(address=address)))

    def statement(self, address: str, *, limit: int = 100, before_entry_id: int = 0) -> StatementPage:
        """The newest `limit` postings on the address's accounts of entries before `before_entry_id` (0: from
        the newest); ValueError for a malformed address or a limit over the ledger's."""
        reply = self._call("GetStatement", ledger_pb2.GetStatementRequest(address=address, limit=limit,
                                                                          before_entry_id=before_entry_id))
        return StatementPage(
            address=reply.address, balances=_balances(reply.balance),
            lines=tuple(StatementLineView(entry_id=line.entry_id, kind=line.kind, ref=line.ref, account=line.account,
                                          amount=int(line.amount), role=line.role,
                                          created_at=_time(line.created_at), tx_hash=line.tx_hash or None,
                                          traces=tuple(line.traces))
                        for line in reply.lines))

    def trace_record(self, trace_id: str) -> TraceRecordView | None:
        """The stored trace with its fee and entry, or None when the ledger holds none by that id."""
        try:
            reply = self._stub.GetTrace(ledger_pb2.GetTraceRequest(trace_id=trace_id), metadata=self._metadata,
                                        timeout=self._timeout)
        except grpc.RpcError as error:
            code = error.code()  # type: ignore[attr-defined]
            if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                return None
            raise LedgerUnavailable(f"the ledger at {self.target} did not answer GetTrace: "
                                    f"{code.name}: {error.details()}") from None  # type: ignore[attr-defined]
        entry = reply.entry
        return TraceRecordView(
            trace=trace_from_pb(reply.trace), content_sha256=reply.content_sha256, fee=int(reply.fee),
            price_per_1k_tokens=int(reply.price_per_1k_tokens), received_at=_time(reply.received_at),
            entry=EntryView(id=entry.id, kind=entry.kind, ref=entry.ref, created_at=_time(entry.created_at),
                            postings=tuple(PostingView(p.account, int(p.amount), p.role) for p in entry.postings)))

    def usage(self, adapters: Sequence[str] = (), *, bucket: str = "day",
              buckets: int = 30) -> tuple[UsageBucketView, ...]:
        """Requests, completion tokens and fees per adapter ("" is the base model; all when `adapters` is
        empty) in each of the `buckets` most recent UTC days or hours, the current one included; buckets
        without traces are left out. Sorted by adapter, then start. ValueError for an unknown bucket or
        too many buckets (the ledger's limits: 366 days, 720 hours)."""
        if isinstance(adapters, str):  # one name, not its characters
            adapters = (adapters,)
        reply = self._call("GetUsage", ledger_pb2.GetUsageRequest(adapters=list(adapters), bucket=bucket,
                                                                  buckets=buckets))
        return tuple(UsageBucketView(adapter=b.adapter, start=_time(b.start), requests=b.requests,
                                     completion_tokens=b.completion_tokens, fees=int(b.fees))
                     for b in reply.buckets)


def _balances(message: ledger_pb2.Balance) -> Balances:
    return Balances(address=message.subject, payable=int(message.payable or 0), pending=int(message.pending or 0),
                    paid=int(message.paid or 0))


def _time(text: str) -> datetime:
    """An RFC 3339 time from the ledger, as an aware UTC datetime (a time without offset is UTC)."""
    moment = datetime.fromisoformat(text)
    return moment.replace(tzinfo=UTC) if moment.utcoffset() is None else moment.astimezone(UTC)
