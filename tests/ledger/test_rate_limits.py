"""Per-key token buckets, on a fake clock (no sleeps)."""

from __future__ import annotations

import threading

import pytest

from ledger.client.rate_limits import (
    REASON_REQUEST_LARGER_THAN_TOKENS_PER_MINUTE,
    REASON_REQUESTS_PER_SECOND,
    REASON_TOKENS_PER_MINUTE,
    Decision,
    RateLimit,
    RateLimiter,
    retry_after_header,
)
from tests.support.clock import ManualClock


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(1000.0)


@pytest.fixture
def limiter(clock: ManualClock) -> RateLimiter:
    return RateLimiter(clock=clock)


def admit_until_refused(limiter: RateLimiter, key: str, limit: RateLimit, tokens: int = 0) -> tuple[int, Decision]:
    for allowed in range(10_000):
        decision = limiter.admit(key, limit, tokens)
        if not decision.allowed:
            return allowed, decision
    raise AssertionError("never refused")


def test_requests_per_second_allows_a_burst_of_capacity_then_refuses_with_retry_after(limiter: RateLimiter) -> None:
    allowed, refusal = admit_until_refused(limiter, "k", RateLimit(requests_per_second=5))
    assert allowed == 5
    assert refusal == Decision(allowed=False, retry_after_seconds=pytest.approx(0.2), reason=REASON_REQUESTS_PER_SECOND)


def test_a_rate_below_one_per_second_still_allows_one_request(limiter: RateLimiter, clock: ManualClock) -> None:
    limit = RateLimit(requests_per_second=0.5)
    allowed, refusal = admit_until_refused(limiter, "k", limit)
    assert allowed == 1
    assert refusal.retry_after_seconds == pytest.approx(2.0)
    clock.advance(2.0)
    assert limiter.admit("k", limit, 0).allowed


def test_requests_refill_over_time(limiter: RateLimiter, clock: ManualClock) -> None:
    limit = RateLimit(requests_per_second=3)
    assert admit_until_refused(limiter, "k", limit)[0] == 3
    clock.advance(1 / 3)  # exactly the retry-after: float slack must not refuse it
    assert limiter.admit("k", limit, 0).allowed
    assert not limiter.admit("k", limit, 0).allowed
    clock.advance(10)  # refills to capacity, not beyond
    assert admit_until_refused(limiter, "k", limit)[0] == 3


def test_tokens_per_minute_reserves_the_worst_case_and_settle_refunds_the_unused(
    limiter: RateLimiter, clock: ManualClock
) -> None:
    limit = RateLimit(tokens_per_minute=600)  # refills 10 tokens per second
    assert limiter.admit("k", limit, 500).allowed
    refusal = limiter.admit("k", limit, 200)
    assert refusal.reason == REASON_TOKENS_PER_MINUTE
    assert refusal.retry_after_seconds == pytest.approx(10.0)  # 100 available, 100 missing at 10/s

    limiter.settle("k", reserved_tokens=500, actual_tokens=300)  # 200 back: 300 available
    assert limiter.admit("k", limit, 300).allowed
    assert not limiter.admit("k", limit, 1).allowed

    clock.advance(6.0)
    assert limiter.admit("k", limit, 60).allowed


def test_settle_never_refunds_above_capacity(limiter: RateLimiter, clock: ManualClock) -> None:
    limit = RateLimit(tokens_per_minute=600)
    assert limiter.admit("k", limit, 100).allowed
    limiter.settle("k", reserved_tokens=100, actual_tokens=0)
    limiter.settle("k", reserved_tokens=100, actual_tokens=0)  # a repeat must not push past capacity
    assert limiter.admit("k", limit, 600).allowed
    assert not limiter.admit("k", limit, 1).allowed


def test_settle_ignores_overuse_and_unknown_keys(limiter: RateLimiter) -> None:
    limit = RateLimit(tokens_per_minute=600)
    assert limiter.admit("k", limit, 100).allowed
    limiter.settle("k", reserved_tokens=100, actual_tokens=150)  # not charged
    limiter.settle("unknown", reserved_tokens=100, actual_tokens=0)
    assert limiter.admit("k", limit, 500).allowed
    assert not limiter.admit("k", limit, 1).allowed
    assert len(limiter) == 1


def test_a_request_larger_than_the_minute_capacity_is_refused_without_retry_after(limiter: RateLimiter) -> None:
    limit = RateLimit(requests_per_second=1, tokens_per_minute=1000)
    refusal = limiter.admit("k", limit, 1001)
    assert refusal == Decision(
        allowed=False, retry_after_seconds=None, reason=REASON_REQUEST_LARGER_THAN_TOKENS_PER_MINUTE
    )
    assert limiter.admit("k", limit, 1000).allowed  # the refusal took nothing


def test_unlimited_always_passes_and_is_not_tracked(limiter: RateLimiter) -> None:
    for _ in range(1000):
        assert limiter.admit("k", RateLimit(), 10**9).allowed
    assert len(limiter) == 0


def test_each_dimension_is_unlimited_on_its_own(limiter: RateLimiter) -> None:
    assert admit_until_refused(limiter, "rps", RateLimit(requests_per_second=2), tokens=10**9)[0] == 2
    assert admit_until_refused(limiter, "tpm", RateLimit(tokens_per_minute=100), tokens=10)[0] == 10


def test_keys_are_independent(limiter: RateLimiter) -> None:
    limit = RateLimit(requests_per_second=2, tokens_per_minute=100)
    assert admit_until_refused(limiter, "a", limit, tokens=10)[0] == 2
    assert admit_until_refused(limiter, "b", limit, tokens=10)[0] == 2
    limiter.settle("b", reserved_tokens=10, actual_tokens=0)
    assert admit_until_refused(limiter, "a", RateLimit(tokens_per_minute=100), tokens=10)[0] == 8


def test_a_token_refusal_consumes_no_request(limiter: RateLimiter) -> None:
    limit = RateLimit(requests_per_second=2, tokens_per_minute=100)
    assert limiter.admit("k", limit, 60).allowed
    assert limiter.admit("k", limit, 60).reason == REASON_TOKENS_PER_MINUTE
    assert limiter.admit("k", limit, 40).allowed  # the second request slot was still there


def test_a_request_refusal_consumes_no_tokens(limiter: RateLimiter, clock: ManualClock) -> None:
    limit = RateLimit(requests_per_second=1, tokens_per_minute=600)
    assert limiter.admit("k", limit, 100).allowed
    assert limiter.admit("k", limit, 100).reason == REASON_REQUESTS_PER_SECOND
    clock.advance(1.0)  # +1 request, +10 tokens
    assert limiter.admit("k", limit, 510).allowed


def test_retry_after_waits_for_both_buckets_and_names_the_longer_wait(limiter: RateLimiter) -> None:
    limit = RateLimit(requests_per_second=1, tokens_per_minute=60)  # 1 request/s, 1 token/s
    assert limiter.admit("k", limit, 60).allowed
    refusal = limiter.admit("k", limit, 5)
    assert refusal.reason == REASON_TOKENS_PER_MINUTE
    assert refusal.retry_after_seconds == pytest.approx(5.0)
    refusal = limiter.admit("k", limit, 0)
    assert refusal.reason == REASON_REQUESTS_PER_SECOND
    assert refusal.retry_after_seconds == pytest.approx(1.0)


def test_lowering_a_limit_clamps_and_raising_it_grants_no_fresh_burst(limiter: RateLimiter) -> None:
    assert limiter.admit("k", RateLimit(requests_per_second=10), 0).allowed  # 9 left
    assert admit_until_refused(limiter, "k", RateLimit(requests_per_second=3))[0] == 3  # clamped to 3
    assert not limiter.admit("k", RateLimit(requests_per_second=100), 0).allowed  # still empty


@pytest.mark.parametrize(
    ("seconds", "header"),
    [(0.0001, "1"), (0.2, "1"), (1.0, "1"), (1.0000000000001, "1"), (1.01, "2"), (2.5, "3"), (59.9, "60")],
)
def test_retry_after_header_rounds_up_to_whole_seconds_at_least_one(seconds: float, header: str) -> None:
    assert retry_after_header(Decision(False, seconds, REASON_REQUESTS_PER_SECOND)) == header


def test_retry_after_header_needs_a_retry_after() -> None:
    with pytest.raises(ValueError, match="no retry_after_seconds"):
        retry_after_header(Decision(False, None, REASON_REQUEST_LARGER_THAN_TOKENS_PER_MINUTE))


@pytest.mark.parametrize("rps", [0, -1, float("nan"), float("inf"), True, "5"])
def test_invalid_requests_per_second_is_refused(rps: object) -> None:
    with pytest.raises(ValueError, match="requests_per_second must be a positive finite number or None"):
        RateLimit(requests_per_second=rps)  # type: ignore[arg-type]


@pytest.mark.parametrize("tpm", [0, -5, 1.5, True])
def test_invalid_tokens_per_minute_is_refused(tpm: object) -> None:
    with pytest.raises(ValueError, match="tokens_per_minute must be a positive integer or None"):
        RateLimit(tokens_per_minute=tpm)  # type: ignore[arg-type]


def test_invalid_token_counts_are_refused(limiter: RateLimiter) -> None:
    with pytest.raises(ValueError, match="tokens must be a non-negative integer"):
        limiter.admit("k", RateLimit(tokens_per_minute=10), -1)
    with pytest.raises(ValueError, match="reserved_tokens must be a non-negative integer"):
        limiter.settle("k", reserved_tokens=-1, actual_tokens=0)
    with pytest.raises(ValueError, match="actual_tokens must be a non-negative integer"):
        limiter.settle("k", reserved_tokens=1, actual_tokens=-1)


@pytest.mark.parametrize(
    ("limit", "tokens", "capacity"),
    [(RateLimit(requests_per_second=50), 0, 50), (RateLimit(tokens_per_minute=1000), 10, 100)],
)
def test_concurrent_admits_never_exceed_capacity(limit: RateLimit, tokens: int, capacity: int) -> None:
    limiter = RateLimiter(clock=lambda: 1000.0)  # frozen: nothing refills
    threads_count, attempts_per_thread = 16, 100
    barrier = threading.Barrier(threads_count)
    allowed = [0] * threads_count

    def worker(index: int) -> None:
        barrier.wait()
        for _ in range(attempts_per_thread):
            if limiter.admit("k", limit, tokens).allowed:
                allowed[index] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(allowed) == capacity


def test_idle_buckets_are_forgotten_once_full_again(limiter: RateLimiter, clock: ManualClock) -> None:
    limit = RateLimit(requests_per_second=1, tokens_per_minute=600)
    for i in range(1000):
        assert limiter.admit(f"idle-{i}", limit, 600).allowed
    assert len(limiter) == 1000

    clock.advance(59.0)  # tokens not yet full: nothing may be forgotten
    for _ in range(2000):
        limiter.admit("busy", RateLimit(requests_per_second=10**6), 0)
    assert len(limiter) == 1001

    clock.advance(1.0)  # now all full again
    for _ in range(1000):
        limiter.admit("busy", RateLimit(requests_per_second=10**6), 0)
    assert len(limiter) <= 2


def test_a_forgotten_key_starts_full_like_a_new_one(limiter: RateLimiter, clock: ManualClock) -> None:
    limit = RateLimit(requests_per_second=2)
    assert admit_until_refused(limiter, "k", limit)[0] == 2
    clock.advance(1.0)
    limiter.admit("other", RateLimit(), 0)  # unlimited: untracked, but it sweeps
    assert len(limiter) == 0
    assert admit_until_refused(limiter, "k", limit)[0] == 2
