"""The journal on SQLite and PostgreSQL: idempotent ingest, exact balanced entries, balances, look-ups."""

from __future__ import annotations

import pytest

from ledger.client.trace import AttributionTrace, TokenAttribution
from ledger.journal.journal import Journal
from tests.ledger.conftest import CIDS, OWNER, PRICE
from tests.registry.test_datanet_registry import ALICE, BOB


def trace(trace_id: str, tokens: list[TokenAttribution], *, adapter: str | None = "river-guide",
          prompt_tokens: int = 10) -> AttributionTrace:
    return AttributionTrace(trace_id=trace_id, model=adapter or "base", adapter=adapter, requester=None,
                            prompt_tokens=prompt_tokens, completion_tokens=len(tokens), tokens=tuple(tokens),
                            method="verbatim-span-v1")


def token(weights: dict[str, float], unattributed: float = 0.0, token_id: int = 5) -> TokenAttribution:
    return TokenAttribution(token_id=token_id, weights=tuple(weights.items()), unattributed=unattributed)


def test_a_trace_becomes_one_balanced_entry_with_the_documented_split(journal: Journal) -> None:
    # 10 prompt + 4 completion tokens at 1e22 per 1k: fee 1.4e20. Alice's contribution has 3 of the
    # 4 tokens; the last token is unattributed and goes to the lineage (Alice 2/3, Bob 1/3).
    tokens = [token({CIDS[0]: 1.0}) for _ in range(3)] + [token({}, 1.0)]
    [ack] = journal.ingest([trace("t-1", tokens)])
    assert ack.status == "accepted" and ack.entry_id > 0
    fee = PRICE * 14 // 1000
    record = journal.trace("t-1")
    assert record is not None and record.fee == fee and record.price_per_1k_tokens == PRICE
    postings = {(s.account, s.role): s.amount for s in record.entry.postings}
    pool = fee * 7000 // 10000
    alice = pool * 11 // 12  # (3 + 2/3) / 4
    bob = pool // 12  # (1/3) / 4
    assert postings == {
        ("revenue", "payer"): -fee,
        (f"payable:{ALICE.address}", "contributor"): alice,
        (f"payable:{BOB.address}", "contributor"): bob,
        (f"payable:{OWNER.address}", "adapter_owner"): fee * 2000 // 10000,
        ("treasury", "treasury"): fee - alice - bob - fee * 2000 // 10000,
    }
    assert sum(postings.values()) == 0
    assert record.trace == trace("t-1", tokens), "the stored trace is the one sent"


def test_idempotent_on_trace_id_and_conflicts_are_refused_and_recorded(journal: Journal) -> None:
    first = trace("t-1", [token({CIDS[0]: 0.5}, 0.5)])
    [accepted] = journal.ingest([first])
    # The same trace again, alone and inside a batch (twice): acknowledged, nothing posted again.
    acks = journal.ingest([first, trace("t-2", [token({CIDS[2]: 1.0})]), first])
    assert [(a.trace_id, a.status) for a in acks] == [("t-1", "duplicate"), ("t-2", "accepted"), ("t-1", "duplicate")]
    assert acks[0].entry_id == accepted.entry_id
    # Same id, other content: refused, reported, and the stored trace is unchanged.
    [conflict] = journal.ingest([trace("t-1", [token({CIDS[1]: 1.0})])])
    assert conflict.status == "conflict" and "other content" in conflict.reason
    [again] = journal.ingest([trace("t-1", [token({CIDS[1]: 1.0})])])
    assert again.status == "conflict", "a resent refused trace is refused again, and recorded once"
    record = journal.trace("t-1")
    assert record is not None and record.trace == first
    totals = journal.totals()
    assert (totals.traces, totals.entries, totals.conflicts) == (2, 2, 1)
    # A new id repeated inside one batch is posted once.
    batch = journal.ingest([trace("t-3", [token({}, 1.0)]), trace("t-3", [token({}, 1.0)])])
    assert [a.status for a in batch] == ["accepted", "duplicate"] and batch[0].entry_id == batch[1].entry_id
    assert journal.totals().entries == 3


def test_unknown_contributions_are_rejected_without_posting(journal: Journal) -> None:
    [ack] = journal.ingest([trace("t-x", [token({"ab" * 32: 1.0})])])
    assert ack.status == "rejected" and "unknown contribution" in ack.reason
    assert journal.trace("t-x") is None and journal.totals().entries == 0


def test_base_model_and_unregistered_adapters_cost_nothing(journal: Journal) -> None:
    acks = journal.ingest([trace("t-base", [token({}, 1.0)], adapter=None),
                           trace("t-unreg", [token({}, 1.0)], adapter="not-registered")])
    assert [a.status for a in acks] == ["accepted", "accepted"]
    for trace_id in ("t-base", "t-unreg"):
        record = journal.trace(trace_id)
        assert record is not None and record.fee == 0 and record.entry.postings == []


def test_balances_statements_and_totals_are_exact_beyond_64_bits(journal: Journal) -> None:
    traces = [trace(f"t-{i}", [token({CIDS[0]: 1.0}) for _ in range(990)]) for i in range(3)]
    assert [a.status for a in journal.ingest(traces)] == ["accepted"] * 3
    fee = PRICE * 1000 // 1000  # 10 prompt + 990 completion tokens
    alice = journal.balance(ALICE.address.lower())
    assert alice.address == ALICE.address
    assert (alice.payable, alice.pending, alice.paid) == (3 * fee * 7000 // 10000, 0, 0)
    assert alice.payable > 2**64, "sums exceed 64 bits and stay exact"
    assert journal.balance(BOB.address).payable == 0
    lines = journal.statement(ALICE.address)
    assert [line.ref for line in lines] == ["t-2", "t-1", "t-0"], "newest first, each naming its trace"
    assert {line.role for line in lines} == {"contributor"}
    assert [line.ref for line in journal.statement(ALICE.address, limit=1, before_entry_id=lines[0].entry_id)] == ["t-1"]
    totals = journal.totals()
    assert totals.fees == 3 * fee and totals.completion_tokens == 2970 and totals.attributed_tokens == 2970
    assert totals.postings_sum == 0 and totals.unbalanced_entries == 0
    assert totals.by_class["revenue"] == -3 * fee
    assert totals.by_class["treasury"] + totals.by_class["payable"] == 3 * fee
    assert journal.account_balance("treasury") == totals.by_class["treasury"]
    with pytest.raises(ValueError, match="not an Ethereum address"):
        journal.balance("alice")


def test_a_recovered_trace_of_a_stored_id_is_a_duplicate_whatever_its_content(journal: Journal) -> None:
    """A replica died after its trace was shipped; the usage record was attributed again (differently):
    the response stays billed once."""
    first = trace("t-1", [token({CIDS[0]: 1.0})])
    [accepted] = journal.ingest([first])
    again = AttributionTrace(**{**first.__dict__, "tokens": (token({}, 1.0),), "recovered": True,
                                "method": "unattributed-after-failure"})
    [ack] = journal.ingest([again])
    assert (ack.status, ack.entry_id) == ("duplicate", accepted.entry_id)
    totals = journal.totals()
    assert (totals.traces, totals.entries, totals.conflicts) == (1, 1, 0)
    record = journal.trace("t-1")
    assert record is not None and record.trace == first
    # A recovered trace of an id the ledger never saw is billed like any other.
    [new] = journal.ingest([AttributionTrace(**{**first.__dict__, "trace_id": "t-2", "recovered": True})])
    assert new.status == "accepted" and journal.trace("t-2").trace.recovered  # type: ignore[union-attr]


def test_every_choice_is_billed_and_credited(journal: Journal) -> None:
    """n = 2: the fee covers the prompt once and both choices' tokens, as `usage` reports them."""
    choice_0 = [token({CIDS[0]: 1.0}) for _ in range(3)]
    choice_1 = [token({CIDS[2]: 1.0}) for _ in range(5)]
    two = AttributionTrace(trace_id="t-n", model="river-guide", adapter="river-guide", requester=None,
                           prompt_tokens=10, completion_tokens=8, tokens=tuple(choice_0 + choice_1),
                           method="verbatim-span-v1", choice_tokens=(3, 5))
    [ack] = journal.ingest([two])
    assert ack.status == "accepted"
    record = journal.trace("t-n")
    assert record is not None and record.fee == PRICE * (10 + 3 + 5) // 1000
    assert record.trace.choices == (3, 5)
    credited = {s.account for s in record.entry.postings if s.role == "contributor"}
    assert credited == {f"payable:{ALICE.address}", f"payable:{BOB.address}"}
    assert sum(s.amount for s in record.entry.postings) == 0
