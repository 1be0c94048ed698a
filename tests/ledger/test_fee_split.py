"""Conservation, as properties: for any weights, prices and percentages no base unit is made or lost."""

from __future__ import annotations

import uuid
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.client.trace import AttributionTrace, TokenAttribution
from ledger.client.fees import fee_for
from ledger.journal.fee_split import BPS, FeeSplitPolicy, exact_float_sum, split_fee
from ledger.journal.journal import Journal
from tests.ledger.conftest import CIDS, OWNER

ADDRESSES = [f"0x{i:040x}" for i in range(1, 9)]
weights = st.floats(min_value=0, max_value=1, allow_nan=False, allow_infinity=False)
policies = st.builds(
    lambda c, o, mode: FeeSplitPolicy(c, min(o, BPS - c), mode),
    st.integers(0, BPS), st.integers(0, BPS), st.sampled_from(["lineage_pro_rata", "treasury"]),
)


@given(policy=policies, price=st.integers(0, 10**30), tokens=st.integers(0, 10**6),
       attributed=st.dictionaries(st.sampled_from(ADDRESSES), weights.map(lambda w: Fraction(w) * 100)),
       unattributed=weights.map(Fraction), lineage=st.dictionaries(st.sampled_from(ADDRESSES), st.integers(0, 50)),
       owner=st.none() | st.sampled_from(ADDRESSES))
def test_every_split_sums_to_zero_and_the_fee_equals_the_shares(policy: FeeSplitPolicy, price: int, tokens: int,
                                                                 attributed: dict[str, Fraction],
                                                                 unattributed: Fraction, lineage: dict[str, int],
                                                                 owner: str | None) -> None:
    fee = fee_for(price, tokens)
    assert 0 <= fee * 1000 <= price * tokens < (fee + 1) * 1000, "rounded down, by less than one unit"
    shares = split_fee(policy, fee, owner=owner, attributed=attributed, unattributed=unattributed,
                       lineage_counts=lineage)
    assert sum(s.amount for s in shares) == 0
    credits = [s for s in shares if s.role != "payer"]
    assert sum(s.amount for s in credits) == fee and all(s.amount > 0 for s in credits)
    contributors = sum(s.amount for s in credits if s.role == "contributor")
    assert contributors <= fee * policy.contributors_bps // BPS, "contributors never get more than their part"
    owner_part = sum(s.amount for s in credits if s.role == "adapter_owner")
    assert owner_part == (fee * policy.owner_bps // BPS if owner else 0)
    treasury = sum(s.amount for s in credits if s.role == "treasury")
    assert treasury >= fee * policy.treasury_bps // BPS, "the treasury gets its part and the remainders"
    if policy.unattributed == "treasury" or not any(lineage.values()):
        total = sum(attributed.values(), Fraction(0)) + unattributed
        for share in credits:
            if share.role == "contributor":
                address = share.account.removeprefix("payable:")
                assert share.amount == (fee * policy.contributors_bps // BPS) * attributed[address] // total


def test_bad_policies_are_refused() -> None:
    with pytest.raises(ValueError, match="must be <= 10000"):
        FeeSplitPolicy(8000, 3000)
    with pytest.raises(ValueError, match="contributors_bps"):
        FeeSplitPolicy(-1, 0)


token_weights = st.lists(st.tuples(st.sampled_from(CIDS), weights), max_size=3, unique_by=lambda p: p[0])


def _token(pairs: list[tuple[str, float]]) -> TokenAttribution:
    total = sum(w for _, w in pairs)
    scaled = tuple((cid, w / total * 0.999) for cid, w in pairs) if total > 1 else tuple(pairs)
    return TokenAttribution(token_id=1, weights=scaled, unattributed=max(0.0, 1.0 - sum(w for _, w in scaled)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tokens=st.lists(token_weights.map(_token), max_size=40), prompt=st.integers(0, 2000),
       adapter=st.sampled_from(["river-guide", None, "unregistered"]))
def test_ingested_traces_keep_the_journal_balanced(journal: Journal, tokens: list[TokenAttribution],
                                                   prompt: int, adapter: str | None) -> None:
    before = journal.totals()
    trace = AttributionTrace(trace_id=uuid.uuid4().hex, model="m", adapter=adapter, requester=None,
                             prompt_tokens=prompt, completion_tokens=len(tokens), tokens=tuple(tokens), method="x")
    [ack] = journal.ingest([trace])
    [again] = journal.ingest([trace])
    assert (ack.status, again.status, again.entry_id) == ("accepted", "duplicate", ack.entry_id)
    record = journal.trace(trace.trace_id)
    assert record is not None and sum(p.amount for p in record.entry.postings) == 0
    assert sum(p.amount for p in record.entry.postings if p.role != "payer") == record.fee
    after = journal.totals()
    assert after.fees - before.fees == record.fee and after.entries == before.entries + 1
    assert after.postings_sum == 0 and after.unbalanced_entries == 0
    assert after.by_class.get("revenue", 0) == -after.fees


def test_the_owner_is_paid_on_every_priced_trace(journal: Journal) -> None:
    trace = AttributionTrace(trace_id="o-1", model="m", adapter="river-guide", requester=None, prompt_tokens=1000,
                             completion_tokens=0, tokens=(), method="x")
    journal.ingest([trace])
    assert journal.balance(OWNER.address).payable == 10**22 * 2000 // BPS


@given(st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False), max_size=50))
def test_float_sums_are_exact(values: list[float]) -> None:
    assert exact_float_sum(values) == sum((Fraction(v) for v in values), Fraction(0))
