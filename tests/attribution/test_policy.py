"""SpanWeightingPolicy: normalization, monotonicity, sharing; lineage allocation of the unattributed share."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attribution.policy import (
    DEFAULT_MIN_SPAN_TOKENS,
    MatchedSpan,
    SpanWeightingPolicy,
    UnattributedPolicy,
    lineage_allocation,
)

POLICY = SpanWeightingPolicy(min_span_tokens=3)
IDS = [f"{i:02x}" * 32 for i in range(6)]

spans_strategy = st.lists(
    st.builds(
        lambda start, length, count, contributions, surprisal: MatchedSpan(
            start, start + length, max(count, len(contributions)), tuple(sorted(contributions)), surprisal * length),
        st.integers(0, 40), st.integers(1, 30), st.integers(1, 2000),
        st.sets(st.sampled_from(IDS), min_size=1, max_size=4), st.floats(0, 20),
    ),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(spans=spans_strategy, completion_start=st.integers(0, 20), completion_length=st.integers(0, 40))
def test_weights_sum_to_one_per_token(spans: list[MatchedSpan], completion_start: int, completion_length: int) -> None:
    tokens = POLICY.token_weights(spans, list(range(completion_length)), completion_start)
    assert len(tokens) == completion_length
    for token in tokens:
        assert all(weight >= 0 for _, weight in token.weights)
        assert 0 <= token.unattributed <= 1
        assert math.fsum(w for _, w in token.weights) + token.unattributed == pytest.approx(1, abs=1e-9)


def single_span_share(length: int, contributions: int, mean_surprisal: float, count: int | None = None) -> float:
    span = MatchedSpan(0, length, count or contributions, tuple(IDS[:contributions]), mean_surprisal * length)
    tokens = POLICY.token_weights([span], [1], completion_start=length - 1)
    return tokens[0].attributed


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 60), extra=st.integers(0, 20), contributions=st.integers(1, 5),
       fewer=st.integers(0, 4), surprisal=st.floats(0, 20), more=st.floats(0, 10))
def test_longer_or_rarer_spans_never_get_less(length: int, extra: int, contributions: int, fewer: int,
                                              surprisal: float, more: float) -> None:
    base = single_span_share(length, contributions, surprisal)
    assert single_span_share(length + extra, contributions, surprisal) >= base
    assert single_span_share(length, max(1, contributions - fewer), surprisal) >= base
    assert single_span_share(length, contributions, surprisal + more) >= base


def test_rule_values() -> None:
    # a borderline span (L0 tokens, one contribution, reference surprisal) attributes half a token
    assert single_span_share(3, 1, POLICY.reference_surprisal_nats) == pytest.approx(0.5)
    assert single_span_share(2, 1, 6.0) == 0.0  # below L0
    assert single_span_share(40, 1, 6.0) > 0.97
    # shared equally among the distinct contributions
    span = MatchedSpan(0, 10, 2, (IDS[0], IDS[1]), 60.0)
    (token,) = POLICY.token_weights([span], [9], completion_start=5)
    assert dict(token.weights)[IDS[0]] == pytest.approx(dict(token.weights)[IDS[1]])
    # spans above max_count are ignored; completion tokens outside every span are unattributed
    capped = SpanWeightingPolicy(min_span_tokens=3, max_count=5)
    assert capped.token_weights([MatchedSpan(0, 10, 6, (IDS[0],), 60.0)], [1, 2], 0)[0].unattributed == 1.0
    tokens = POLICY.token_weights([MatchedSpan(0, 4, 1, (IDS[0],), 24.0)], [1, 2, 3], completion_start=2)
    assert [t.unattributed == 1.0 for t in tokens] == [False, False, True]


def test_policy_validation_and_default() -> None:
    assert SpanWeightingPolicy().min_span_tokens == DEFAULT_MIN_SPAN_TOKENS
    for bad in ({"min_span_tokens": 0}, {"max_count": 0}, {"half_share_evidence": 0.0},
                {"rarity_floor": 5.0, "rarity_cap": 1.0}, {"count_exponent": -1.0}):
        with pytest.raises(ValueError):
            SpanWeightingPolicy(**bad)  # type: ignore[arg-type]


def test_lineage_allocation() -> None:
    allocation = lineage_allocation(0.3, [IDS[0], IDS[1], IDS[0], IDS[2]])
    assert allocation == pytest.approx({IDS[0]: 0.1, IDS[1]: 0.1, IDS[2]: 0.1})
    assert math.fsum(allocation.values()) == pytest.approx(0.3)
    assert lineage_allocation(0.3, []) == {}
    assert lineage_allocation(0.0, [IDS[0]]) == {}
    assert UnattributedPolicy("treasury").allocate(0.3, [IDS[0]]) == {}
    assert UnattributedPolicy().allocate(0.2, [IDS[0]]) == {IDS[0]: 0.2}
    with pytest.raises(ValueError):
        lineage_allocation(-0.1, [IDS[0]])
