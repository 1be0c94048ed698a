"""Per-API-key rate limits: requests per second and tokens per minute, as token buckets (pure logic, no I/O).

The ledger keeps one `RateLimiter` for the whole deployment; engine replicas take chunks of a key's
budget from it (`take`, through the Access API) and spend them locally (serving/rate_grants.py).
While the ledger is unreachable a replica limits each key with a `RateLimiter` of its own (the
same rule, per replica), so it is here, in the part of the ledger both sides use.

Each key has up to two buckets, both starting full:

- requests: capacity ``max(1, requests_per_second)``, refilled at ``requests_per_second`` per second;
- tokens: capacity ``tokens_per_minute``, refilled at ``tokens_per_minute / 60`` per second.

So a key that has been idle may send a burst up to each capacity, then settles at the refill rate.

Guarantees:

- ``admit`` is all or nothing: it takes one request and the request's worst-case token count
  (prompt + max_tokens) when both buckets hold enough, otherwise it takes nothing and says how long
  until both would (``retry_after_seconds``).
- A request needing more tokens than ``tokens_per_minute`` can never pass; it is refused with its own
  reason and no retry-after, so the caller can say so instead of asking the client to retry.
- ``settle`` refunds what a finished request reserved but did not use, never above capacity.
- Thread-safe (one lock held for O(1) work per call) and bounded memory: every call looks at a couple
  of the least recently touched keys and forgets those whose buckets are full again (a forgotten key
  behaves exactly like a key never seen). Unlimited keys are not tracked at all.

Changing a key's limit keeps what it has used: levels are clamped to the new capacities, so raising a
limit does not grant a fresh burst.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "REASON_REQUEST_LARGER_THAN_TOKENS_PER_MINUTE",
    "REASON_REQUESTS_PER_SECOND",
    "REASON_TOKENS_PER_MINUTE",
    "Decision",
    "Grant",
    "RateLimit",
    "RateLimiter",
    "retry_after_header",
]

REASON_REQUESTS_PER_SECOND: Final = "requests per second"
REASON_TOKENS_PER_MINUTE: Final = "tokens per minute"
REASON_REQUEST_LARGER_THAN_TOKENS_PER_MINUTE: Final = "request larger than tokens per minute"

SWEEP_KEYS_PER_CALL: Final = 2  # keys inspected for eviction per call; > 1 so the sweep outpaces new keys
_EPSILON: Final = 1e-9  # float slack, so a client retrying exactly after retry_after_seconds gets through


@dataclass(frozen=True)
class RateLimit:
    """The limits of one API key; None means unlimited."""

    requests_per_second: float | None = None
    """Sustained requests per second; bursts up to max(1, requests_per_second)."""
    tokens_per_minute: int | None = None
    """Sustained tokens (prompt + max_tokens, reserved up front) per minute; bursts up to the same amount."""

    def __post_init__(self) -> None:
        rps = self.requests_per_second
        if rps is not None and (
            isinstance(rps, bool) or not isinstance(rps, int | float) or not math.isfinite(rps) or rps <= 0
        ):
            raise ValueError(f"requests_per_second must be a positive finite number or None (unlimited), got {rps!r}")
        tpm = self.tokens_per_minute
        if tpm is not None and (isinstance(tpm, bool) or not isinstance(tpm, int) or tpm <= 0):
            raise ValueError(f"tokens_per_minute must be a positive integer or None (unlimited), got {tpm!r}")

    @property
    def unlimited(self) -> bool:
        return self.requests_per_second is None and self.tokens_per_minute is None


@dataclass(frozen=True)
class Decision:
    """The answer to one admit: allowed, or refused with a reason and (if waiting can help) a retry-after."""

    allowed: bool
    retry_after_seconds: float | None = None
    """Seconds until the same request would be admitted; None when allowed or when it never can be."""
    reason: str = ""
    """Empty when allowed; otherwise one of the REASON_* constants."""


ALLOWED: Final = Decision(allowed=True)


@dataclass(frozen=True)
class Grant:
    """What `take` handed out: requests and tokens (both 0 with a refusal `decision`)."""

    requests: int
    tokens: int
    decision: Decision = ALLOWED


def retry_after_header(decision: Decision) -> str:
    """The HTTP ``retry-after`` value of a refusal: whole seconds, rounded up, at least 1."""
    if decision.retry_after_seconds is None:
        raise ValueError(
            f"decision has no retry_after_seconds (allowed={decision.allowed}, reason={decision.reason!r})"
        )
    return str(max(1, math.ceil(decision.retry_after_seconds - _EPSILON)))


class _Bucket:
    __slots__ = ("capacity", "rate_per_second", "level")

    def __init__(self, capacity: float, rate_per_second: float) -> None:
        self.capacity = capacity
        self.rate_per_second = rate_per_second
        self.level = capacity

    def refill(self, elapsed_seconds: float) -> None:
        self.level = min(self.capacity, self.level + elapsed_seconds * self.rate_per_second)

    def wait_seconds(self, amount: float) -> float:
        if self.level + _EPSILON >= amount:
            return 0.0
        return (amount - self.level) / self.rate_per_second

    def seconds_to_full(self) -> float:
        return (self.capacity - self.level) / self.rate_per_second


def _buckets(limit: RateLimit) -> tuple[_Bucket | None, _Bucket | None]:
    rps, tpm = limit.requests_per_second, limit.tokens_per_minute
    requests = None if rps is None else _Bucket(max(1.0, float(rps)), float(rps))
    tokens = None if tpm is None else _Bucket(float(tpm), tpm / 60.0)
    return requests, tokens


class _KeyState:
    __slots__ = ("limit", "requests", "tokens", "updated_at", "full_at")

    def __init__(self, limit: RateLimit, now: float) -> None:
        self.limit = limit
        self.requests, self.tokens = _buckets(limit)
        self.updated_at = now
        self.full_at = now

    def advance(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated_at)
        for bucket in (self.requests, self.tokens):
            if bucket is not None:
                bucket.refill(elapsed)
        self.updated_at = max(self.updated_at, now)

    def apply(self, limit: RateLimit) -> None:
        """Switch to a changed limit, keeping what was used (clamped to the new capacities)."""
        if limit == self.limit:
            return
        requests, tokens = _buckets(limit)
        for old, new in ((self.requests, requests), (self.tokens, tokens)):
            if old is not None and new is not None:
                new.level = min(new.capacity, old.level)
        self.limit, self.requests, self.tokens = limit, requests, tokens

    def update_full_at(self) -> None:
        seconds = max((b.seconds_to_full() for b in (self.requests, self.tokens) if b is not None), default=0.0)
        self.full_at = self.updated_at + seconds


class RateLimiter:
    """Token buckets per API key id. Call ``admit`` before serving and ``settle`` once the request finished."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: OrderedDict[str, _KeyState] = OrderedDict()  # least recently touched or inspected first

    def __len__(self) -> int:
        """Keys currently tracked (keys whose buckets are not known to be full again)."""
        return len(self._keys)

    def admit(self, key_id: str, limit: RateLimit, tokens: int) -> Decision:
        """Take one request and ``tokens`` (worst case: prompt + max_tokens) if both buckets allow, else nothing."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"tokens must be a non-negative integer, got {tokens!r}")
        return self.take(key_id, limit, 1, tokens, min_requests=1, min_tokens=tokens).decision

    def take(self, key_id: str, limit: RateLimit, requests: int, tokens: int, *, min_requests: int = 1,
             min_tokens: int = 0) -> Grant:
        """Take up to `requests` requests and `tokens` tokens at once (a replica's chunk), at least
        `min_requests` and `min_tokens` (else nothing, with the refusal's reason and retry-after). An
        unlimited bucket grants all that was asked."""
        for name, value in (("requests", requests), ("tokens", tokens), ("min_requests", min_requests),
                            ("min_tokens", min_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if min_requests > requests or min_tokens > tokens:
            raise ValueError(f"the minimum ({min_requests}, {min_tokens}) exceeds what was asked ({requests}, {tokens})")
        if limit.tokens_per_minute is not None and min_tokens > limit.tokens_per_minute:
            return Grant(0, 0, Decision(allowed=False, reason=REASON_REQUEST_LARGER_THAN_TOKENS_PER_MINUTE))
        with self._lock:
            now = self._clock()
            self._sweep(now)
            if limit.unlimited:
                self._keys.pop(key_id, None)
                return Grant(requests, tokens)
            state = self._keys.get(key_id)
            if state is None:
                state = self._keys[key_id] = _KeyState(limit, now)
            else:
                self._keys.move_to_end(key_id)
                state.advance(now)
                state.apply(limit)
            requests_wait = 0.0 if state.requests is None else state.requests.wait_seconds(min_requests)
            tokens_wait = 0.0 if state.tokens is None else state.tokens.wait_seconds(min_tokens)
            if requests_wait > 0 or tokens_wait > 0:
                state.update_full_at()
                reason = REASON_REQUESTS_PER_SECOND if requests_wait >= tokens_wait else REASON_TOKENS_PER_MINUTE
                return Grant(0, 0, Decision(allowed=False, retry_after_seconds=max(requests_wait, tokens_wait),
                                            reason=reason))
            granted_requests, granted_tokens = requests, tokens
            if state.requests is not None:
                granted_requests = max(min_requests, min(requests, int(state.requests.level + _EPSILON)))
                state.requests.level = max(0.0, state.requests.level - granted_requests)
            if state.tokens is not None:
                granted_tokens = max(min_tokens, min(tokens, int(state.tokens.level + _EPSILON)))
                state.tokens.level = max(0.0, state.tokens.level - granted_tokens)
            state.update_full_at()
            return Grant(granted_requests, granted_tokens)

    def settle(self, key_id: str, reserved_tokens: int, actual_tokens: int) -> None:
        """Refund ``reserved_tokens - actual_tokens`` (never above capacity) after a request finished.

        Using more than reserved is not charged: admit reserves the worst case, so that would be a caller's bug.
        """
        for name, value in (("reserved_tokens", reserved_tokens), ("actual_tokens", actual_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        refund = reserved_tokens - actual_tokens
        if refund <= 0:
            return
        with self._lock:
            state = self._keys.get(key_id)
            if state is None or state.tokens is None:
                return  # forgotten because full again, or no token limit: nothing to refund into
            state.advance(self._clock())
            state.tokens.level = min(state.tokens.capacity, state.tokens.level + refund)
            state.update_full_at()

    def _sweep(self, now: float) -> None:
        """Inspect the least recently touched keys; forget the full ones, rotate the others to the back."""
        for _ in range(min(SWEEP_KEYS_PER_CALL, len(self._keys))):
            key_id, state = self._keys.popitem(last=False)
            if state.full_at > now:
                self._keys[key_id] = state
