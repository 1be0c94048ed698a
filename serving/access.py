"""Who may call, what they may see, and what they may spend: API keys, private adapters, limits, holds.

Per request, in the engine replica, before the engine sees it. Everything comes from the ledger's
Access API (ledger/client/access.py), cached; the replica opens no database:

1. `authenticate`: `Authorization: Bearer dgk-…` (HTTP header or gRPC metadata) → the key's
   `Caller`; a missing, malformed, unknown or revoked key is 401 / UNAUTHENTICATED. Look-ups are
   cached for `key_cache_seconds` (so a revocation takes effect within that time).
2. `visible`: a private adapter exists only for the accounts it is shared with (404 otherwise, and
   absent from `/v1/models`).
3. `admit`: the key's rate limits, deployment-wide (serving/rate_grants.py; 429 /
   RESOURCE_EXHAUSTED with retry-after), then a hold of the request's worst-case cost —
   (prompt + max_tokens) at the adapter's price — from this replica's credit lease on the key's
   account (serving/credit_book.py; 402 / FAILED_PRECONDITION when the account cannot cover it).
   Neither calls the ledger unless a chunk or a lease has run out.
4. `finish`: unused tokens go back to the rate chunk, the unused part of the hold back to the lease;
   the ledger posts the hold when it ingests the trace (which carries the key id, never the key),
   debiting the account by exactly the fee, or voids it when no trace will bill the request.

With the ledger unreachable, serving goes on: a key looked up in the last `KEY_STALE_SECONDS` is
trusted as last answered (a revocation waits for the ledger), rate limits hold per replica
(serving/rate_grants.py), and credit is spent from the leases the replica holds. Requests that
need the ledger (a key never seen, a lease run out) get 503 `ledger_unavailable`.

Reads follow ownership (`may_read`, `check_read`, `require_admin`; used by every door):

* a trace (`GET /v1/attributions/{id}`) is readable by the keys of the account whose key made the
  request (the trace's `requester` key id, mapped to its account) and by admin keys; every other
  key gets the very 404 of an unknown id, so whether a trace exists is not told;
* operator views (`/stats`, `/metrics` on the API port) need an admin key: 403 `admin_key_required`
  for any other key (401 without one).

With auth off (`--no-auth`) every request is anonymous: no limits, no holds, the base `revenue`
account pays as before, and every local client may read every trace, `/stats` and `/metrics`.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ledger.client.access import AccessLedger, AdapterTerms, LedgerUnavailable, NoCredit, may_read_trace
from ledger.client.fees import fee_for
from serving.config import AccessConfig
from serving.credit_book import CreditBook
from serving.errors import (Forbidden, InsufficientQuota, LedgerUnreachable, RateLimited, TraceNotFound,
                            Unauthenticated)
from serving.rate_grants import REASON_LARGER_THAN_TOKENS_PER_MINUTE, KeyLimit, RateGrants

MISSING_KEY = ("No API key provided: send `Authorization: Bearer <key>` (the local key of `make up` is in "
               "<state>/local-api-key).")
INVALID_KEY = "The API key is not valid (unknown, malformed or revoked)."
ADMIN_ONLY = "This is an operator view: it needs an admin key (`gateway keys create --admin`)."
KEY_ACCOUNTS_MAX = 10_000  # key id -> account look-ups kept (a key never changes account)
CALLERS_MAX = 10_000
KEY_STALE_SECONDS = 300.0  # with the ledger unreachable, a key look-up this old is still used
TERMS_SECONDS = 5.0  # prices and private-adapter lists are re-read this often


@dataclass(frozen=True)
class Caller:
    key_id: str
    account_id: str
    admin: bool
    limit: KeyLimit


@dataclass
class Admission:
    """What `admit` reserved for one request, for `finish` to settle."""

    caller: Caller
    request_id: str
    reserved_tokens: int
    price_per_1k_tokens: int
    held: int


def _unavailable(away: LedgerUnavailable) -> LedgerUnreachable:
    return LedgerUnreachable(f"The ledger is not reachable ({away}); retry shortly.", headers={"retry-after": "1"})


class AccessControl:
    def __init__(self, ledger: AccessLedger, config: AccessConfig, owner: str, *,
                 clock: Callable[[], float] = time.monotonic, background: bool = True) -> None:
        self.ledger = ledger
        self.config = config
        self.enabled = config.auth
        self.credit = CreditBook(ledger, owner, lease_requests=config.lease_requests,
                                 idle_return_seconds=config.lease_idle_seconds, clock=clock, background=background)
        self.rates = RateGrants(ledger, clock=clock)
        self._clock = clock
        self._default = KeyLimit(config.rate_requests_per_second, config.rate_tokens_per_minute)
        self._callers: dict[str, tuple[float, Caller | None]] = {}
        self._terms: tuple[float, dict[str, AdapterTerms]] | None = None
        self._key_accounts: dict[str, str] = {}
        self._refreshing: set[str] = set()
        self._terms_refreshing = False
        self._refresher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="key-refresh")
        self._lock = threading.Lock()

    def close(self) -> None:
        """Report what is queued and return this replica's leases to the ledger."""
        self._refresher.shutdown(wait=False, cancel_futures=True)
        self.credit.close()

    # ---- who ------------------------------------------------------------------------------
    def authenticate(self, authorization: str | None) -> Caller | None:
        """The caller of a request (None when auth is off); Unauthenticated otherwise."""
        if not self.enabled:
            return None
        if not authorization:
            raise Unauthenticated(MISSING_KEY)
        scheme, _, presented = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise Unauthenticated(MISSING_KEY)
        caller = self._lookup(presented.strip())
        if caller is None:
            raise Unauthenticated(INVALID_KEY)
        return caller

    def _lookup(self, presented: str) -> Caller | None:
        """The key's caller, from the cache while it is fresh. Past half its life a look-up is
        refreshed in the background (a busy key never waits for the ledger); once expired it is
        looked up on the request's path (a revocation bites within `key_cache_seconds`)."""
        cache_key = hashlib.sha256(presented.encode()).hexdigest()  # the key itself is never kept in memory maps
        now = self._clock()
        with self._lock:
            cached = self._callers.get(cache_key)
            refresh = (cached is not None and now < cached[0]
                       and now >= cached[0] - self.config.key_cache_seconds / 2 and cache_key not in self._refreshing)
            if refresh:
                self._refreshing.add(cache_key)
        if refresh:
            self._refresher.submit(self._refresh, presented, cache_key)
        if cached is not None and now < cached[0]:
            return cached[1]
        return self._ask(presented, cache_key)

    def _refresh(self, presented: str, cache_key: str) -> None:
        try:
            self._ask(presented, cache_key)
        except LedgerUnreachable:
            pass  # the request path asks again once the entry expires
        finally:
            with self._lock:
                self._refreshing.discard(cache_key)

    def _ask(self, presented: str, cache_key: str) -> Caller | None:
        now = self._clock()
        try:
            key = self.ledger.authenticate(presented)
        except LedgerUnavailable as away:
            with self._lock:
                cached = self._callers.get(cache_key)
            if cached is not None and now < cached[0] - self.config.key_cache_seconds + KEY_STALE_SECONDS:
                return cached[1]  # the ledger is away: the last answer stands a while (revocations wait for it)
            raise _unavailable(away) from None
        caller = None if key is None else Caller(
            key.key_id, key.account_id, key.admin,
            KeyLimit(key.requests_per_second if key.requests_per_second is not None
                     else self._default.requests_per_second,
                     key.tokens_per_minute if key.tokens_per_minute is not None
                     else self._default.tokens_per_minute))
        with self._lock:
            if len(self._callers) > CALLERS_MAX:
                self._callers.clear()
            self._callers[cache_key] = (now + self.config.key_cache_seconds, caller)
        return caller

    # ---- what -----------------------------------------------------------------------------
    def visible(self, caller: Caller | None, model: str) -> bool:
        """Whether `model` exists for this caller (a private adapter only for its accounts)."""
        if caller is None and not self.enabled:
            return True
        terms = self._read_terms().get(model)
        return terms is None or not terms.shared_with or (caller is not None and caller.account_id in terms.shared_with)

    def price(self, adapter: str | None) -> int:
        terms = self._read_terms().get(adapter) if adapter is not None else None
        return terms.price_per_1k_tokens if terms is not None else 0

    def _read_terms(self) -> dict[str, AdapterTerms]:
        """Prices and shares, never older than TERMS_SECONDS: past half that age they are re-read in
        the background (a busy replica never waits for them); once expired, on the request's path
        (with the ledger away, the last ones read stand; never read: 503)."""
        now = self._clock()
        with self._lock:
            terms = self._terms
            refresh = (terms is not None and terms[0] - TERMS_SECONDS / 2 <= now < terms[0]
                       and not self._terms_refreshing)
            if refresh:
                self._terms_refreshing = True
        if terms is None or now >= terms[0]:
            try:
                return self._fetch_terms()
            except LedgerUnreachable:
                if terms is None:
                    raise
                return terms[1]
        if refresh:
            self._refresher.submit(self._refresh_terms)
        return terms[1]

    def _fetch_terms(self) -> dict[str, AdapterTerms]:
        try:
            fresh = self.ledger.terms()
        except LedgerUnavailable as away:
            raise _unavailable(away) from None
        with self._lock:
            self._terms = (self._clock() + TERMS_SECONDS, fresh)
        return fresh

    def _refresh_terms(self) -> None:
        try:
            self._fetch_terms()
        except LedgerUnreachable:
            pass  # the last terms stand; the next request tries again
        finally:
            with self._lock:
                self._terms_refreshing = False

    # ---- who may read what -----------------------------------------------------------------
    def may_read(self, caller: Caller | None, requester: str | None) -> bool:
        """Whether `caller` may read a trace whose request was made by key id `requester`: any key of
        that key's account, and admin keys. A trace without a requester (made with auth off) is for
        admin keys only. With auth off, anyone may."""
        if not self.enabled:
            return True
        if caller is None:
            return False
        return may_read_trace(caller.key_id, caller.account_id, caller.admin, requester, self.account_of)

    def check_read(self, caller: Caller | None, trace_id: str, requester: str | None) -> None:
        """TraceNotFound — the same error as for an id that does not exist — unless `may_read`."""
        if not self.may_read(caller, requester):
            raise TraceNotFound(trace_id)

    def require_admin(self, caller: Caller | None) -> None:
        """Operator views: Forbidden (403) unless the caller's key is an admin key (nothing with auth off)."""
        if self.enabled and (caller is None or not caller.admin):
            raise Forbidden(ADMIN_ONLY)

    def account_of(self, key_id: str) -> str | None:
        """The account of a key id (revoked keys included), or None for an unknown id. Cached: a key
        never changes account."""
        with self._lock:
            account = self._key_accounts.get(key_id)
        if account is not None:
            return account
        try:
            account = self.ledger.key_account(key_id)
        except LedgerUnavailable as away:
            raise _unavailable(away) from None
        if account is None:
            return None
        with self._lock:
            if len(self._key_accounts) >= KEY_ACCOUNTS_MAX:
                self._key_accounts.clear()
            self._key_accounts[key_id] = account
        return account

    # ---- how much -------------------------------------------------------------------------
    def admit(self, caller: Caller | None, request_id: str, adapter: str | None, prompt_tokens: int,
              max_tokens: int) -> Admission | None:
        """Take the key's rate limits and hold the worst-case cost (RateLimited / InsufficientQuota)."""
        if caller is None:
            return None
        worst = prompt_tokens + max_tokens
        try:
            refusal = self.rates.admit(caller.key_id, caller.limit, worst)
        except LedgerUnavailable as away:
            raise _unavailable(away) from None
        if refusal is not None:
            if refusal.reason == REASON_LARGER_THAN_TOKENS_PER_MINUTE:
                raise RateLimited(f"This request may use {worst} tokens, more than the key's limit of "
                                  f"{caller.limit.tokens_per_minute} tokens per minute; lower max_tokens.",
                                  param="max_tokens")
            raise RateLimited(f"Rate limit of the key reached ({refusal.reason}); retry after "
                              f"{refusal.retry_after_header} s.", headers={"retry-after": refusal.retry_after_header})
        price = self.price(adapter)
        hold = fee_for(price, worst)
        try:
            self.credit.hold(request_id, caller.account_id, hold)
        except NoCredit as short:
            self.rates.settle(caller.key_id, worst, 0)
            raise InsufficientQuota(
                f"This request may cost {short.needed} base units and account '{caller.account_id}' has "
                f"{max(short.available, 0)} available; add credit or lower max_tokens.") from None
        except LedgerUnavailable as away:
            self.rates.settle(caller.key_id, worst, 0)
            raise _unavailable(away) from None
        return Admission(caller, request_id, worst, price, hold)

    def finish(self, admission: Admission | None, prompt_tokens: int, completion_tokens: int, *,
               billed: bool) -> None:
        """Return unused tokens to the rate chunk and the unused part of the hold to the lease (all of
        it, and a void for the ledger, if no trace will bill this request)."""
        if admission is None:
            return
        used = prompt_tokens + completion_tokens
        self.rates.settle(admission.caller.key_id, admission.reserved_tokens, used)
        if admission.held:
            self.credit.finish(admission.request_id, fee_for(admission.price_per_1k_tokens, used), billed=billed)
