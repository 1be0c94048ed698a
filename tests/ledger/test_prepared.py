"""The journal's wire path (ledger/journal/prepared.py) against the reference path: the same traces
accepted with the same canonical JSON, hash, exact weights and split; the same ones refused, with
the same reasons. No database."""

from __future__ import annotations

import random
from collections.abc import Callable
from fractions import Fraction

import pytest

from ledger.client.trace import AttributionTrace, TokenAttribution
from ledger.client.trace_wire import canonical_json, content_sha256, trace_from_pb, trace_to_pb
from ledger.journal.fee_split import FeeSplitPolicy, exact_float_sum, split_fee, split_fee_scaled
from ledger.journal.prepared import PreparedTrace, _prepare_checked, prepare, prepare_message
from wire.ledger.v1 import ledger_pb2

IDS = ["a" * 64, "b" * 64, "c" * 64, 'qu"ote\\', "ünïcødé-☃", "\x01ctl"]
AWKWARD = [0.0, 5e-324, 1e-300, 1 / 3, 0.1, 0.45, 0.5, 1.0 - 1e-12]


def random_trace(rng: random.Random, index: int) -> AttributionTrace:
    tokens = []
    for _ in range(rng.choice((0, 1, 3, 17, 64))):
        picked = rng.sample(IDS, rng.choice((0, 1, 2, 3)))
        weights = [rng.choice(AWKWARD) / max(len(picked), 1) for _ in picked]
        rest = 1.0 - sum(weights)
        tokens.append(TokenAttribution(rng.randrange(50_000), tuple(zip(picked, weights, strict=True)), max(rest, 0.0)))
    choices: tuple[int, ...] = ()
    if len(tokens) >= 2 and rng.random() < 0.3:
        choices = (1, len(tokens) - 1)
    return AttributionTrace(trace_id=f"t-{index}-\"é", model=rng.choice(["m", "river-guide", "mødel"]),
                            adapter=rng.choice([None, "river-guide", "x\\y"]), requester=rng.choice([None, "key_1"]),
                            prompt_tokens=rng.randrange(5000), completion_tokens=len(tokens), tokens=tuple(tokens),
                            method="verbatim-span-v1", choice_tokens=choices, recovered=rng.random() < 0.2)


def test_the_wire_path_prepares_exactly_what_the_reference_path_does() -> None:
    rng = random.Random(7)
    for index in range(300):
        trace = random_trace(rng, index)
        message = ledger_pb2.AttributionTrace.FromString(trace_to_pb(trace).SerializeToString())
        fast = _prepare_checked(message)  # the one-pass path itself, not its fallback
        assert fast is not None and fast == prepare_message(message)
        assert fast == prepare(trace_from_pb(message)) == prepare(trace), trace
        assert fast.body.encode() == canonical_json(trace) and fast.sha == content_sha256(trace)
        assert fast.attributed_tokens == trace.attributed_fraction * trace.completion_tokens
        exact = {cid: exact_float_sum(w for t in trace.tokens for c, w in t.weights if c == cid) for cid in fast.weights}
        unattributed = exact_float_sum(t.unattributed for t in trace.tokens) if trace.tokens else Fraction(1)
        for cid, units in fast.weights.items():  # same ratios as the exact sums
            assert units * unattributed == exact[cid] * fast.unattributed


def test_the_integer_split_equals_the_fraction_split() -> None:
    rng = random.Random(3)
    policy = FeeSplitPolicy()
    lineage = {"0xA": 2, "0xB": 1, "0xC": 0}
    for _ in range(300):
        trace = random_trace(rng, 0)
        prepared = prepare(trace)
        owner_of = {cid: rng.choice(["0xA", "0xB", "0xD"]) for cid in IDS}
        attributed: dict[str, int] = {}
        for cid, units in prepared.weights.items():
            attributed[owner_of[cid]] = attributed.get(owner_of[cid], 0) + units
        by_address: dict[str, list[float]] = {}
        for token in trace.tokens:
            for cid, weight in token.weights:
                by_address.setdefault(owner_of[cid], []).append(weight)
        reference = split_fee(policy, 10**20 + rng.randrange(10**6), owner="0xO",
                              attributed={a: exact_float_sum(w) for a, w in by_address.items()},
                              unattributed=exact_float_sum(t.unattributed for t in trace.tokens) if trace.tokens
                              else Fraction(1), lineage_counts=lineage)
        fee = -reference[0].amount
        assert split_fee_scaled(policy, fee, owner="0xO", attributed=attributed, unattributed=prepared.unattributed,
                                lineage_counts=lineage) == reference


def _valid() -> ledger_pb2.AttributionTrace:
    trace = AttributionTrace(trace_id="t", model="m", adapter=None, requester=None, prompt_tokens=3, completion_tokens=2,
                             tokens=(TokenAttribution(1, ((IDS[0], 0.25), (IDS[1], 0.5)), 0.25),
                                     TokenAttribution(2, (), 1.0)), method="m")
    return trace_to_pb(trace)


def _weight(message: ledger_pb2.AttributionTrace) -> ledger_pb2.Weight:
    return message.tokens[0].weights[0]


BROKEN: list[Callable[[ledger_pb2.AttributionTrace], object]] = [
    lambda m: setattr(m, "trace_id", ""),
    lambda m: setattr(m, "completion_tokens", 3),
    lambda m: m.choice_tokens.extend([1, 2]),
    lambda m: m.choice_tokens.extend([5]),
    lambda m: setattr(_weight(m), "contribution_id", ""),
    lambda m: setattr(_weight(m), "weight", -0.25),
    lambda m: setattr(_weight(m), "weight", float("nan")),
    lambda m: setattr(_weight(m), "weight", float("inf")),
    lambda m: setattr(m.tokens[0].weights[1], "contribution_id", IDS[0]),
    lambda m: setattr(m.tokens[0], "unattributed", 0.5),
    lambda m: setattr(m.tokens[1], "unattributed", float("nan")),
    lambda m: setattr(m.tokens[1], "unattributed", -0.0 - 1e-3),
]


@pytest.mark.parametrize("breaks", range(len(BROKEN)))
def test_a_broken_trace_is_refused_with_the_reference_reason(breaks: int) -> None:
    message = _valid()
    assert isinstance(prepare_message(message), PreparedTrace)
    BROKEN[breaks](message)
    assert _prepare_checked(message) is None, "the one-pass path hands it to the reference path"
    with pytest.raises(ValueError) as reference:
        trace_from_pb(message)
    with pytest.raises(ValueError) as fast:
        prepare_message(message)
    assert str(fast.value) == str(reference.value)
