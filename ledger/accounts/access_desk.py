"""The ledger's side of the Access API: what replicas ask, answered from the ledger's own database.

`AccessDesk` keeps the `AccessLedger` contract of ledger/client/access.py (the gRPC servicer in
ledger/access_service.py converts messages to and from it). It owns, for the whole deployment:

- key look-ups (`authenticate`, `key_account`), terms (prices, private adapters) and lineage;
- credit leases and request holds (ledger/accounts/transfers.py: two-phase transfers);
- per-key rate limits: one `RateLimiter` in the ledger process, from which replicas take chunks.
  It lives in memory: a ledger restart refills every key's buckets (at most one burst more).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy import Engine
from sqlmodel import Session, select

from ledger.accounts.accounts import InsufficientCredit, UnknownAccount
from ledger.accounts.api_keys import ApiKeys
from ledger.client.rate_limits import RateLimit, RateLimiter
from ledger.accounts.transfers import (
    DEFAULT_HOLD_TTL_SECONDS,
    DEFAULT_LEASE_TTL_SECONDS,
    Expired,
    HoldReport,
    TransferConflict,
    TransferRecord,
    Transfers,
    UnknownTransfer,
)
from ledger.client.access import (
    AdapterTerms,
    HoldItem,
    HoldResult,
    KeyGrant,
    LeaseGrant,
    LineageRecord,
    NoCredit,
    RateGrant,
)
from ledger.models import AdapterAccess, RequesterAccount
from registry.adapters import lineage_contents, parse_price
from registry.models import Adapter

log = logging.getLogger(__name__)
REFUSED = "refused"


class AccessDesk:
    def __init__(self, engine: Engine, *, lease_ttl_seconds: float = DEFAULT_LEASE_TTL_SECONDS,
                 hold_ttl_seconds: float = DEFAULT_HOLD_TTL_SECONDS, limiter: RateLimiter | None = None) -> None:
        self.engine = engine
        self.keys = ApiKeys(engine)
        self.transfers = Transfers(engine)
        self.limiter = limiter if limiter is not None else RateLimiter()  # (an empty limiter is falsy)
        self.lease_ttl_seconds = lease_ttl_seconds
        self.hold_ttl_seconds = hold_ttl_seconds

    # ---- who and what ---------------------------------------------------------------------
    def authenticate(self, presented: str) -> KeyGrant | None:
        key = self.keys.verify(presented)
        if key is None:
            return None
        return KeyGrant(key.id, key.account_id, key.admin, key.requests_per_second, key.tokens_per_minute)

    def key_account(self, key_id: str) -> str | None:
        key = self.keys.get(key_id)
        return key.account_id if key is not None else None

    def terms(self) -> dict[str, AdapterTerms]:
        with Session(self.engine) as session:
            prices = {name: parse_price(price) for name, price in
                      session.exec(select(Adapter.name, Adapter.price_per_1k_tokens)).all()}
            shared: dict[str, set[str]] = {}
            for adapter, account in session.exec(select(AdapterAccess.adapter_name, AdapterAccess.account_id)):
                shared.setdefault(adapter, set()).add(account)
        return {name: AdapterTerms(price, frozenset(shared.get(name, ()))) for name, price in prices.items()}

    def lineage(self, adapter: str) -> LineageRecord:
        with Session(self.engine) as session:
            contents = lineage_contents(session, adapter)
        return LineageRecord(tuple(contents.index_paths), dict(contents.contributions),
                             tuple(contents.index_digests))

    # ---- credit ---------------------------------------------------------------------------
    def lease(self, lease_id: str, account_id: str, amount: int, owner: str, *,
              ttl_seconds: float = 0.0) -> LeaseGrant:
        """Lease min(amount, available) of the account to `owner`; NoCredit when nothing is available."""
        try:
            lease = self.transfers.lease(lease_id, account_id, amount, owner,
                                         ttl_seconds or self.lease_ttl_seconds)
        except InsufficientCredit as short:
            raise NoCredit(account_id, amount, short.available) from None
        except UnknownAccount:
            raise NoCredit(account_id, amount, 0) from None
        available = self._available(account_id)
        return LeaseGrant(lease.id, lease.amount, available)

    def return_lease(self, lease_id: str, holds: Sequence[HoldItem] = ()) -> tuple[HoldResult, ...]:
        results = self.report(holds)
        try:
            self.transfers.close_lease(lease_id)
        except UnknownTransfer:
            pass
        return results

    def report(self, holds: Sequence[HoldItem]) -> tuple[HoldResult, ...]:
        """Holds first (one transaction), then voids; one result per item, in order."""
        reports = [HoldReport(h.hold_id, h.account_id, h.amount, h.lease_id or None, ttl_seconds=self.hold_ttl_seconds)
                   for h in holds if not h.void]
        reported = iter(self.transfers.hold_many(reports) if reports else ())
        results: list[HoldResult] = []
        for item in holds:
            if not item.void:
                results.append(_result(item.hold_id, next(reported)))
                continue
            try:
                results.append(_result(item.hold_id, self.transfers.void(item.hold_id)))
            except (TransferConflict, UnknownTransfer) as refused:
                results.append(_result(item.hold_id, refused))
        for result in results:
            if result.state == REFUSED:
                log.warning("hold %s refused: %s", result.hold_id, result.reason)
        return tuple(results)

    def expire(self) -> Expired:
        return self.transfers.expire()

    def _available(self, account_id: str) -> int:
        with Session(self.engine) as session:
            account = session.get(RequesterAccount, account_id)
            return account.balance - account.held if account is not None else 0

    # ---- rate -----------------------------------------------------------------------------
    def take_rate(self, key_id: str, requests_per_second: float | None, tokens_per_minute: int | None,
                  requests: int, tokens: int, *, min_requests: int = 1, min_tokens: int = 0) -> RateGrant:
        grant = self.limiter.take(key_id, RateLimit(requests_per_second, tokens_per_minute), requests, tokens,
                                  min_requests=min_requests, min_tokens=min_tokens)
        if not grant.decision.allowed:
            return RateGrant(0, 0, grant.decision.retry_after_seconds or 0.0, grant.decision.reason)
        return RateGrant(grant.requests, grant.tokens)


def _result(hold_id: str, outcome: TransferRecord | Exception) -> HoldResult:
    if isinstance(outcome, Exception):
        return HoldResult(hold_id, REFUSED, str(outcome))
    return HoldResult(hold_id, outcome.state)
