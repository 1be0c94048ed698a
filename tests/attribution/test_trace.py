"""AttributionTrace / TokenAttribution: validation, fractions, totals and an exact JSON round trip."""

from __future__ import annotations

import json

import pytest

from ledger.client.trace import AttributionTrace, TokenAttribution

A, B = "aa" * 32, "bb" * 32


def make_trace(tokens: tuple[TokenAttribution, ...]) -> AttributionTrace:
    return AttributionTrace(trace_id="t-1", model="tiny", adapter="ad-1", requester="0xabc", prompt_tokens=7,
                            completion_tokens=len(tokens), tokens=tokens, method="verbatim-span-v1")


def test_fractions_and_totals() -> None:
    trace = make_trace((
        TokenAttribution(5, ((A, 0.5), (B, 0.25)), 0.25),
        TokenAttribution(6, ((A, 0.1),), 0.9),
        TokenAttribution.unattributed_token(7),
    ))
    assert trace.unattributed_fraction == pytest.approx((0.25 + 0.9 + 1.0) / 3)
    assert trace.attributed_fraction == pytest.approx(1 - (0.25 + 0.9 + 1.0) / 3)
    assert trace.contribution_totals() == pytest.approx({A: 0.6 / 3, B: 0.25 / 3})
    assert trace.token_ids == [5, 6, 7]


def test_empty_completion_is_wholly_unattributed() -> None:
    trace = make_trace(())
    assert trace.unattributed_fraction == 1.0
    assert trace.attributed_fraction == 0.0
    assert trace.contribution_totals() == {}


def test_round_trip_is_exact_through_json() -> None:
    trace = make_trace((TokenAttribution(1, ((A, 1 / 3), (B, 1 / 7)), 1 - 1 / 3 - 1 / 7),
                        TokenAttribution.unattributed_token(2)))
    assert AttributionTrace.from_dict(json.loads(json.dumps(trace.to_dict()))) == trace
    trace_no_adapter = AttributionTrace("t-2", "tiny", None, None, 0, 0, (), "none")
    assert AttributionTrace.from_dict(json.loads(json.dumps(trace_no_adapter.to_dict()))) == trace_no_adapter


@pytest.mark.parametrize(("weights", "unattributed"), [
    (((A, 0.5),), 0.4),  # sums to 0.9
    (((A, -0.1),), 1.1),  # negative weight
    (((A, 0.5),), -0.0 - 0.5),  # negative unattributed
    (((A, 0.5), (A, 0.5)), 0.0),  # repeated contribution
    ((("", 0.5),), 0.5),  # empty id
    (((A, float("nan")),), 0.0),
])
def test_token_validation(weights: tuple[tuple[str, float], ...], unattributed: float) -> None:
    with pytest.raises(ValueError):
        TokenAttribution(1, weights, unattributed)


def test_token_id_and_trace_validation() -> None:
    with pytest.raises(ValueError):
        TokenAttribution(-1, (), 1.0)
    with pytest.raises(ValueError):
        AttributionTrace("t", "m", None, None, 0, 2, (TokenAttribution.unattributed_token(1),), "x")
    with pytest.raises(ValueError):
        AttributionTrace("", "m", None, None, 0, 0, (), "x")
    with pytest.raises(ValueError):
        AttributionTrace("t", "m", None, None, -1, 0, (), "x")


def test_choices_and_the_recovered_mark_survive_json_and_the_wire() -> None:
    from ledger.client.trace_wire import canonical_json, trace_from_pb, trace_to_pb

    tokens = tuple(TokenAttribution.unattributed_token(t) for t in (1, 2, 3))
    two = AttributionTrace(trace_id="t", model="m", adapter=None, requester=None, prompt_tokens=1,
                           completion_tokens=3, tokens=tokens, method="x", choice_tokens=(2, 1), recovered=True)
    assert AttributionTrace.from_dict(two.to_dict()) == two == trace_from_pb(trace_to_pb(two))
    one = AttributionTrace(trace_id="t", model="m", adapter=None, requester=None, prompt_tokens=1,
                           completion_tokens=3, tokens=tokens, method="x", choice_tokens=(3,))
    assert one.choices == (3,) and one == trace_from_pb(trace_to_pb(one))
    assert b"choice_tokens" not in canonical_json(one) and b"recovered" not in canonical_json(one), \
        "a one-choice trace hashes as it always did"
    with pytest.raises(ValueError, match="do not sum"):
        AttributionTrace(trace_id="t", model="m", adapter=None, requester=None, prompt_tokens=1,
                         completion_tokens=3, tokens=tokens, method="x", choice_tokens=(1, 1))
