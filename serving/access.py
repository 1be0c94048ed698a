"""Who may call, what they may see, and what they may spend: API keys, private adapters, limits, holds.

Per request, in the engine replica, before the engine sees it:

1. `authenticate`: `Authorization: Bearer dgk-…` (HTTP header or gRPC metadata) → the key's
   `Caller`; a missing, malformed, unknown or revoked key is 401 / UNAUTHENTICATED. Look-ups are
   cached for `key_cache_seconds` (so a revocation takes effect within that time).
2. `visible`: a private adapter exists only for the accounts it is shared with (404 otherwise, and
   absent from `/v1/models`).
3. `admit`: the key's rate limits (429 / RESOURCE_EXHAUSTED with retry-after), then a hold of the
   request's worst-case cost — (prompt + max_tokens) at the adapter's price — on the key's account
   (402 / FAILED_PRECONDITION when it exceeds the available balance).
4. `finish`: the hold shrinks to the actual cost; the ledger deletes it when it posts the trace (which
   carries the key id, never the key), debiting the account by exactly that fee.

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
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, select

from ledger.accounts.accounts import Accounts, InsufficientCredit
from ledger.accounts.api_keys import ApiKeys
from ledger.journal.fee_split import fee_for
from ledger.models import AdapterAccess
from registry.adapters import parse_price
from registry.models import Adapter
from serving.config import AccessConfig
from serving.errors import Forbidden, InsufficientQuota, RateLimited, TraceNotFound, Unauthenticated
from serving.rate_limits import REASON_REQUEST_LARGER_THAN_TOKENS_PER_MINUTE, RateLimit, RateLimiter, retry_after_header

MISSING_KEY = ("No API key provided: send `Authorization: Bearer <key>` (the local key of `make up` is in "
               "<state>/local-api-key).")
INVALID_KEY = "The API key is not valid (unknown, malformed or revoked)."
ADMIN_ONLY = "This is an operator view: it needs an admin key (`gateway keys create --admin`)."
KEY_ACCOUNTS_MAX = 10_000  # key id -> account look-ups kept (a key never changes account)
TERMS_SECONDS = 5.0  # prices and private-adapter lists are re-read this often


@dataclass(frozen=True)
class Caller:
    key_id: str
    account_id: str
    admin: bool
    limit: RateLimit


@dataclass
class Admission:
    """What `admit` reserved for one request, for `finish` to settle."""

    caller: Caller
    request_id: str
    reserved_tokens: int
    price_per_1k_tokens: int
    held: int


class AccessControl:
    def __init__(self, engine: Engine, config: AccessConfig, clock: Any = time.monotonic) -> None:
        self.engine = engine
        self.config = config
        self.enabled = config.auth
        self.keys = ApiKeys(engine)
        self.accounts = Accounts(engine)
        self.limiter = RateLimiter(clock)
        self._clock = clock
        self._default = RateLimit(config.rate_requests_per_second, config.rate_tokens_per_minute)
        self._callers: dict[str, tuple[float, Caller | None]] = {}
        self._terms: tuple[float, dict[str, int], dict[str, frozenset[str]]] | None = None
        self._key_accounts: dict[str, str] = {}
        self._lock = threading.Lock()

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
        cache_key = hashlib.sha256(presented.encode()).hexdigest()  # the key itself is never kept in memory maps
        now = self._clock()
        with self._lock:
            cached = self._callers.get(cache_key)
        if cached is not None and now < cached[0]:
            return cached[1]
        key = self.keys.verify(presented)
        caller = None if key is None else Caller(
            key.id, key.account_id, key.admin,
            RateLimit(key.requests_per_second if key.requests_per_second is not None else self._default.requests_per_second,
                      key.tokens_per_minute if key.tokens_per_minute is not None else self._default.tokens_per_minute))
        with self._lock:
            if len(self._callers) > 10_000:
                self._callers.clear()
            self._callers[cache_key] = (now + self.config.key_cache_seconds, caller)
        return caller

    # ---- what -----------------------------------------------------------------------------
    def visible(self, caller: Caller | None, model: str) -> bool:
        """Whether `model` exists for this caller (a private adapter only for its accounts)."""
        if caller is None and not self.enabled:
            return True
        allowed = self._read_terms()[1].get(model)
        return allowed is None or (caller is not None and caller.account_id in allowed)

    def price(self, adapter: str | None) -> int:
        return 0 if adapter is None else self._read_terms()[0].get(adapter, 0)

    def _read_terms(self) -> tuple[dict[str, int], dict[str, frozenset[str]]]:
        now = self._clock()
        with self._lock:
            terms = self._terms
        if terms is None or now >= terms[0]:
            with Session(self.engine) as session:
                prices = {name: parse_price(price) for name, price in
                          session.exec(select(Adapter.name, Adapter.price_per_1k_tokens)).all()}
                shared: dict[str, set[str]] = {}
                for adapter, account in session.exec(select(AdapterAccess.adapter_name, AdapterAccess.account_id)):
                    shared.setdefault(adapter, set()).add(account)
            terms = (now + TERMS_SECONDS, prices, {a: frozenset(s) for a, s in shared.items()})
            with self._lock:
                self._terms = terms
        return terms[1], terms[2]

    # ---- who may read what -----------------------------------------------------------------
    def may_read(self, caller: Caller | None, requester: str | None) -> bool:
        """Whether `caller` may read a trace whose request was made by key id `requester`: any key of
        that key's account, and admin keys. A trace without a requester (made with auth off) is for
        admin keys only. With auth off, anyone may."""
        if not self.enabled:
            return True
        if caller is None:
            return False
        if caller.admin or (requester is not None and requester == caller.key_id):
            return True
        return requester is not None and self.account_of(requester) == caller.account_id

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
        row = self.keys.get(key_id)
        if row is None:
            return None
        with self._lock:
            if len(self._key_accounts) >= KEY_ACCOUNTS_MAX:
                self._key_accounts.clear()
            self._key_accounts[key_id] = row.account_id
        return row.account_id

    # ---- how much -------------------------------------------------------------------------
    def admit(self, caller: Caller | None, request_id: str, adapter: str | None, prompt_tokens: int,
              max_tokens: int) -> Admission | None:
        """Take the key's rate limits and hold the worst-case cost (RateLimited / InsufficientQuota)."""
        if caller is None:
            return None
        worst = prompt_tokens + max_tokens
        decision = self.limiter.admit(caller.key_id, caller.limit, worst)
        if not decision.allowed:
            if decision.reason == REASON_REQUEST_LARGER_THAN_TOKENS_PER_MINUTE:
                raise RateLimited(f"This request may use {worst} tokens, more than the key's limit of "
                                  f"{caller.limit.tokens_per_minute} tokens per minute; lower max_tokens.",
                                  param="max_tokens")
            raise RateLimited(f"Rate limit of the key reached ({decision.reason}); retry after "
                              f"{retry_after_header(decision)} s.", headers={"retry-after": retry_after_header(decision)})
        price = self.price(adapter)
        hold = fee_for(price, worst)
        if hold > 0:
            try:
                self.accounts.hold(request_id, caller.account_id, hold)
            except InsufficientCredit as short:
                self.limiter.settle(caller.key_id, worst, 0)
                raise InsufficientQuota(
                    f"This request may cost {short.needed} base units and account '{caller.account_id}' has "
                    f"{max(short.available, 0)} available; add credit or lower max_tokens.") from None
        return Admission(caller, request_id, worst, price, hold)

    def finish(self, admission: Admission | None, prompt_tokens: int, completion_tokens: int, *,
               billed: bool) -> None:
        """Return unused tokens to the rate limit; keep only the actual cost held (or nothing, if no
        trace will bill this request)."""
        if admission is None:
            return
        used = prompt_tokens + completion_tokens
        self.limiter.settle(admission.caller.key_id, admission.reserved_tokens, used)
        if admission.held:
            if billed:
                self.accounts.shrink_hold(admission.request_id, fee_for(admission.price_per_1k_tokens, used))
            else:
                self.accounts.release(admission.request_id)
