"""The ledger's Access API as an engine replica sees it: keys, terms, lineage, credit leases, holds, rate.

`AccessLedger` is the contract (typed records below). Two implementations keep it:
`LedgerAccessClient` here (gRPC, what replicas use: `gateway.ledger.v1.Access`, behind the ledger
token) and `ledger.accounts.access_desk.AccessDesk` (the ledger's own, over its database; the
servicer in ledger/access_service.py is a conversion of one into the other). A replica never opens
the database: what it knows of money and terms comes through here, and it caches it.

Errors: `NoCredit` (a lease found nothing available), `LedgerUnavailable` (the ledger did not
answer: the caller decides whether to wait, refuse or go on with what it has). Amounts are integer
base units (Python ints; decimal strings on the wire).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import grpc

from ledger.client.config import LedgerClientConfig
from ledger.client.token import bearer_metadata, read_ledger_token
from wire.ledger.v1 import access_pb2, access_pb2_grpc

RPC_TIMEOUT_SECONDS = 5.0


class LedgerUnavailable(Exception):
    """The ledger's Access API did not answer (down, restarting, or unreachable)."""


class NoCredit(Exception):
    """A lease found nothing to lend: the account's available credit is `available` (≤ 0)."""

    def __init__(self, account_id: str, needed: int, available: int) -> None:
        super().__init__(f"account {account_id!r} has {available} available, {needed} was asked")
        self.account_id, self.needed, self.available = account_id, needed, available


@dataclass(frozen=True)
class KeyGrant:
    """A live API key: whose it is, and its own limits (None: the gateway's default applies)."""

    key_id: str
    account_id: str
    admin: bool
    requests_per_second: float | None = None
    tokens_per_minute: int | None = None


def may_read_trace(key_id: str, account_id: str, admin: bool, requester: str | None,
                   account_of: Callable[[str], str | None]) -> bool:
    """The ownership rule of traces, the same at every door: a trace made with key `requester` is read by
    every key of that key's account (`account_of` maps a key id to its account) and by admin keys. A trace
    without a requester (served with auth off) is for admin keys only."""
    if admin or (requester is not None and requester == key_id):
        return True
    return requester is not None and account_of(requester) == account_id


@dataclass(frozen=True)
class AdapterTerms:
    price_per_1k_tokens: int
    shared_with: frozenset[str] = frozenset()  # empty: public


@dataclass(frozen=True)
class LineageRecord:
    """What attributing an adapter's output needs: its indexes and who owns each contribution.

    `index_dirs` are local directories or store URLs (s3://…); `index_digests` is parallel to them
    ("sha256:<hex>", "" = none recorded), and the replica checks each copy it uses against it."""

    index_dirs: tuple[str, ...] = ()
    owners: dict[str, tuple[str, str]] = field(default_factory=dict)  # contribution id → (contributor, datanet)
    index_digests: tuple[str, ...] = ()

    def digests(self) -> tuple[str, ...]:
        """One digest per index ("" where none was recorded, e.g. from a ledger that sends none)."""
        return tuple(self.index_digests[i] if i < len(self.index_digests) else "" for i in range(len(self.index_dirs)))


@dataclass(frozen=True)
class HoldItem:
    """One request's hold (its worst-case cost, drawn from `lease_id`), or its void."""

    hold_id: str
    account_id: str
    amount: int
    lease_id: str
    void: bool = False


@dataclass(frozen=True)
class HoldResult:
    hold_id: str
    state: str  # pending, voided, posted, expired; "refused" with `reason`
    reason: str = ""


@dataclass(frozen=True)
class LeaseGrant:
    lease_id: str
    granted: int
    available: int  # the account's available credit after the grant


@dataclass(frozen=True)
class RateGrant:
    requests: int
    tokens: int
    retry_after_seconds: float = 0.0  # when nothing was granted
    reason: str = ""


class AccessLedger(Protocol):
    def authenticate(self, presented: str) -> KeyGrant | None: ...
    def key_account(self, key_id: str) -> str | None: ...
    def terms(self) -> dict[str, AdapterTerms]: ...
    def lineage(self, adapter: str) -> LineageRecord: ...
    def lease(self, lease_id: str, account_id: str, amount: int, owner: str, *,
              ttl_seconds: float = 0.0) -> LeaseGrant: ...
    def return_lease(self, lease_id: str, holds: Sequence[HoldItem] = ()) -> tuple[HoldResult, ...]: ...
    def report(self, holds: Sequence[HoldItem]) -> tuple[HoldResult, ...]: ...
    def take_rate(self, key_id: str, requests_per_second: float | None, tokens_per_minute: int | None,
                  requests: int, tokens: int, *, min_requests: int = 1, min_tokens: int = 0) -> RateGrant: ...


def hold_to_pb(item: HoldItem) -> access_pb2.HoldItem:
    return access_pb2.HoldItem(hold_id=item.hold_id, account_id=item.account_id,
                               amount="" if item.void else str(item.amount), lease_id=item.lease_id, void=item.void)


def hold_from_pb(message: access_pb2.HoldItem) -> HoldItem:
    """ValueError for an amount that is not a non-negative integer."""
    amount = 0 if message.void else int(message.amount)
    if amount < 0:
        raise ValueError(f"hold {message.hold_id!r}: a negative amount")
    return HoldItem(message.hold_id, message.account_id, amount, message.lease_id, message.void)


def _results(messages: Sequence[access_pb2.HoldResult]) -> tuple[HoldResult, ...]:
    return tuple(HoldResult(m.hold_id, m.state, m.reason) for m in messages)


class LedgerAccessClient:
    """`AccessLedger` over gRPC (one channel, thread-safe). Every failure to reach the ledger is
    `LedgerUnavailable`; a refused lease is `NoCredit`; a refused argument is ValueError."""

    def __init__(self, target: str, token: str, *, timeout: float = RPC_TIMEOUT_SECONDS) -> None:
        self.target = target
        self._metadata = bearer_metadata(token)
        self._timeout = timeout
        self._channel = grpc.insecure_channel(target)
        self._stub = access_pb2_grpc.AccessStub(self._channel)

    @classmethod
    def for_state_dir(cls, state_dir: Path, config: LedgerClientConfig | None = None) -> LedgerAccessClient:
        """The ledger of `config` (default: `GATEWAY_LEDGER_*`), with its token (`read_ledger_token`)."""
        config = config or LedgerClientConfig()
        return cls(config.target, read_ledger_token(state_dir, config))

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: str, request: object) -> object:
        try:
            return getattr(self._stub, method)(request, metadata=self._metadata, timeout=self._timeout)
        except grpc.RpcError as error:
            code = error.code()  # type: ignore[attr-defined]
            if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS):
                raise ValueError(error.details()) from None  # type: ignore[attr-defined]
            raise LedgerUnavailable(f"the ledger at {self.target} did not answer {method}: "
                                    f"{code.name}: {error.details()}") from None  # type: ignore[attr-defined]

    def authenticate(self, presented: str) -> KeyGrant | None:
        reply = self._call("Authenticate", access_pb2.AuthenticateRequest(presented=presented))
        if not reply.found:  # type: ignore[attr-defined]
            return None
        return KeyGrant(reply.key_id, reply.account_id, reply.admin,  # type: ignore[attr-defined]
                        reply.requests_per_second if reply.HasField("requests_per_second") else None,  # type: ignore[attr-defined]
                        reply.tokens_per_minute if reply.HasField("tokens_per_minute") else None)  # type: ignore[attr-defined]

    def key_account(self, key_id: str) -> str | None:
        reply = self._call("GetKeyAccount", access_pb2.GetKeyAccountRequest(key_id=key_id))
        return reply.account_id if reply.found else None  # type: ignore[attr-defined]

    def terms(self) -> dict[str, AdapterTerms]:
        reply = self._call("GetTerms", access_pb2.GetTermsRequest())
        return {a.name: AdapterTerms(int(a.price_per_1k_tokens), frozenset(a.shared_with))
                for a in reply.adapters}  # type: ignore[attr-defined]

    def lineage(self, adapter: str) -> LineageRecord:
        reply = self._call("GetLineage", access_pb2.GetLineageRequest(adapter=adapter))
        return LineageRecord(tuple(reply.index_dirs),  # type: ignore[attr-defined]
                             {o.contribution_id: (o.contributor, o.datanet) for o in reply.owners},  # type: ignore[attr-defined]
                             tuple(reply.index_digests))  # type: ignore[attr-defined]

    def lease(self, lease_id: str, account_id: str, amount: int, owner: str, *,
              ttl_seconds: float = 0.0) -> LeaseGrant:
        request = access_pb2.LeaseRequest(lease_id=lease_id, account_id=account_id, amount=str(amount), owner=owner,
                                          ttl_seconds=ttl_seconds)
        try:
            reply = self._stub.Lease(request, metadata=self._metadata, timeout=self._timeout)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.FAILED_PRECONDITION:  # type: ignore[attr-defined]
                available = dict(error.trailing_metadata() or ()).get("available", "0")  # type: ignore[attr-defined]
                raise NoCredit(account_id, amount, int(available)) from None
            if error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS):  # type: ignore[attr-defined]
                raise ValueError(error.details()) from None  # type: ignore[attr-defined]
            raise LedgerUnavailable(f"the ledger at {self.target} did not answer Lease: "
                                    f"{error.code().name}: {error.details()}") from None  # type: ignore[attr-defined]
        return LeaseGrant(reply.lease_id, int(reply.granted), int(reply.available))

    def return_lease(self, lease_id: str, holds: Sequence[HoldItem] = ()) -> tuple[HoldResult, ...]:
        reply = self._call("ReturnLease", access_pb2.ReturnLeaseRequest(
            lease_id=lease_id, holds=[hold_to_pb(h) for h in holds]))
        return _results(reply.holds)  # type: ignore[attr-defined]

    def report(self, holds: Sequence[HoldItem]) -> tuple[HoldResult, ...]:
        reply = self._call("ReportHolds", access_pb2.ReportHoldsRequest(holds=[hold_to_pb(h) for h in holds]))
        return _results(reply.holds)  # type: ignore[attr-defined]

    def take_rate(self, key_id: str, requests_per_second: float | None, tokens_per_minute: int | None,
                  requests: int, tokens: int, *, min_requests: int = 1, min_tokens: int = 0) -> RateGrant:
        request = access_pb2.TakeRateRequest(key_id=key_id, requests=requests, tokens=tokens,
                                             min_requests=min_requests, min_tokens=min_tokens)
        if requests_per_second is not None:
            request.requests_per_second = requests_per_second
        if tokens_per_minute is not None:
            request.tokens_per_minute = tokens_per_minute
        reply = self._call("TakeRate", request)
        return RateGrant(reply.requests, reply.tokens, reply.retry_after_seconds, reply.reason)  # type: ignore[attr-defined]
