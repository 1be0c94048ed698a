"""Per-key rate limits for the whole deployment, spent locally: a replica takes chunks from the ledger.

The ledger keeps each key's token buckets (ledger/client/rate_limits.py, through `TakeRate`). A
replica takes `chunk_seconds` worth of a key's rate at a time (at least what the request at hand
needs) and admits requests against it without a call; the next chunk is taken in the background
once the current one is half spent or half way to lapsing, so a busy key's requests make no call.
What a finished request did not use goes back into the chunk. A chunk lapses `grant_seconds`
after its last grant, used or not, so a replica never sits on a key's rate: across replicas a key
gets at most its limit plus two chunks per replica inside any `grant_seconds`. A key without
limits is never looked up.

With the ledger unreachable, a key whose chunk ran out is limited by this replica alone (a
`RateLimiter` of its own, the same rule): serving goes on, and the key's limit holds per replica
until the ledger answers again.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from ledger.client.access import AccessLedger, LedgerUnavailable
from ledger.client.rate_limits import RateLimit, RateLimiter
from serving.metrics import ledger_dealings

CHUNK_SECONDS = 0.1
PREFETCH_WAIT_SECONDS = 0.5  # a request whose chunk ran out waits this long at most for the next one on its way
GRANT_SECONDS = 1.0
REASON_LARGER_THAN_TOKENS_PER_MINUTE = "request larger than tokens per minute"
KEYS_MAX = 100_000


@dataclass(frozen=True)
class KeyLimit:
    """One key's limits (None: unlimited)."""

    requests_per_second: float | None = None
    tokens_per_minute: int | None = None

    @property
    def unlimited(self) -> bool:
        return self.requests_per_second is None and self.tokens_per_minute is None


@dataclass(frozen=True)
class Refusal:
    reason: str
    retry_after_seconds: float | None  # None: waiting will not help

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil((self.retry_after_seconds or 0) - 1e-9)))


@dataclass
class _Chunk:
    requests: int
    tokens: int
    expires_at: float


class RateGrants:
    def __init__(self, ledger: AccessLedger, *, chunk_seconds: float = CHUNK_SECONDS,
                 grant_seconds: float = GRANT_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.ledger = ledger
        self.chunk_seconds = chunk_seconds
        self.grant_seconds = grant_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._chunks: dict[str, _Chunk] = {}
        self._local = RateLimiter(clock)  # while the ledger is away
        self.local_admissions = 0
        self._dealings = ledger_dealings()  # exported from the start, at zero
        self._prefetching: dict[str, Future[None] | None] = {}
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rate-prefetch")

    def admit(self, key_id: str, limit: KeyLimit, tokens: int) -> Refusal | None:
        """Take one request and `tokens` for `key_id`; a Refusal when its limits do not allow it now."""
        if limit.unlimited:
            return None
        tpm, rps = limit.tokens_per_minute, limit.requests_per_second
        if tpm is not None and tokens > tpm:
            return Refusal(REASON_LARGER_THAN_TOKENS_PER_MINUTE, None)
        need_requests = 1 if rps is not None else 0
        need_tokens = tokens if tpm is not None else 0
        ask_requests = max(need_requests, math.ceil(rps * self.chunk_seconds)) if rps is not None else 0
        ask_tokens = max(need_tokens, math.ceil(tpm / 60 * self.chunk_seconds)) if tpm is not None else 0
        spent = self._spend(key_id, need_requests, need_tokens, ask_requests, ask_tokens)
        if spent is not None:
            if spent:  # half spent or half lapsed: the next chunk, in the background
                future = self._prefetcher.submit(self._prefetch, key_id, limit, ask_requests, ask_tokens)
                with self._lock:
                    if key_id in self._prefetching:
                        self._prefetching[key_id] = future
            return None
        with self._lock:
            pending = self._prefetching.get(key_id)
        if pending is not None:  # the next chunk is on its way: it may be what this request needs
            try:
                pending.result(timeout=PREFETCH_WAIT_SECONDS)
            except Exception:  # noqa: BLE001 (timed out or failed: ask below)
                pass
            if self._spend(key_id, need_requests, need_tokens, ask_requests, ask_tokens) is not None:
                return None
        try:
            grant = self.ledger.take_rate(key_id, rps, tpm, ask_requests, ask_tokens, min_requests=need_requests,
                                          min_tokens=need_tokens)
        except LedgerUnavailable:
            return self._admit_locally(key_id, limit, tokens)
        if grant.requests < need_requests or grant.tokens < need_tokens:
            return Refusal(grant.reason or "rate limit", grant.retry_after_seconds)
        self._add(key_id, grant.requests - need_requests, grant.tokens - need_tokens)
        return None

    def _add(self, key_id: str, requests: int, tokens: int) -> None:
        """Put a grant into the key's chunk (a new chunk once the old one lapsed)."""
        with self._lock:
            now = self._clock()
            chunk = self._chunks.get(key_id)
            if chunk is None or chunk.expires_at <= now:
                if len(self._chunks) >= KEYS_MAX:
                    self._chunks = {k: c for k, c in self._chunks.items() if c.expires_at > now}
                chunk = self._chunks[key_id] = _Chunk(0, 0, now + self.grant_seconds)
            else:
                chunk.expires_at = now + self.grant_seconds  # a fresh grant keeps the chunk alive
            chunk.requests += requests
            chunk.tokens += tokens

    def _prefetch(self, key_id: str, limit: KeyLimit, requests: int, tokens: int) -> None:
        try:
            grant = self.ledger.take_rate(key_id, limit.requests_per_second, limit.tokens_per_minute, requests,
                                          tokens, min_requests=0, min_tokens=0)
            if grant.requests or grant.tokens:
                self._add(key_id, grant.requests, grant.tokens)
        except LedgerUnavailable:
            pass  # the request that runs out asks (or limits locally)
        finally:
            with self._lock:
                self._prefetching.pop(key_id, None)

    def _admit_locally(self, key_id: str, limit: KeyLimit, tokens: int) -> Refusal | None:
        decision = self._local.admit(key_id, RateLimit(limit.requests_per_second, limit.tokens_per_minute), tokens)
        if not decision.allowed:
            return Refusal(decision.reason, decision.retry_after_seconds)
        self.local_admissions += 1
        self._dealings.local_rate_admissions.inc()
        return None

    def settle(self, key_id: str, reserved_tokens: int, used_tokens: int) -> None:
        """Give back what a finished request reserved and did not use (into the key's current chunk)."""
        unused = reserved_tokens - used_tokens
        if unused <= 0:
            return
        with self._lock:
            chunk = self._chunks.get(key_id)
            if chunk is not None and chunk.expires_at > self._clock():
                chunk.tokens += unused

    def _spend(self, key_id: str, requests: int, tokens: int, chunk_requests: int, chunk_tokens: int) -> bool | None:
        """Take from the key's chunk: None when it cannot cover the request; else whether the next
        chunk should be fetched now (half spent or half lapsed, and no fetch under way)."""
        with self._lock:
            now = self._clock()
            chunk = self._chunks.get(key_id)
            if chunk is None or chunk.expires_at <= now:
                return None
            if chunk.requests < requests or chunk.tokens < tokens:
                return None
            chunk.requests -= requests
            chunk.tokens -= tokens
            low = (chunk.requests < chunk_requests / 2 or chunk.tokens < chunk_tokens / 2
                   or chunk.expires_at - now < self.grant_seconds / 2)
            if low and key_id not in self._prefetching:
                self._prefetching[key_id] = None  # its future once submitted
                return True
            return False
