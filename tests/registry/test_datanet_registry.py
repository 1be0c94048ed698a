"""The datanet registry on SQLite and PostgreSQL: what each bad contribution gets, publishing, proofs.

The chain is an in-memory stand-in here (the registry logic sits above it); the real contract on
anvil is exercised in tests/ledger/test_registry_anvil.py and end to end in tests/test_datanet_cli.py.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from eth_account import Account

from registry.adapters import AdapterRegistry
from registry.anchor import datanet_key
from registry.config import DatanetConfig
from registry.contribution_content import content_id, normalize, sign_contribution
from registry.datanets import DatanetRegistry, SignedText
from registry.errors import AlreadyExists, AnchorFailed, InvalidInput, NothingToPublish, NotFound
from registry.merkle import verify_proof
from storage.database import open_database
from tests.support.memory_anchor import MemoryAnchor, listing_index

ALICE = Account.from_key("0x" + "a1" * 32)
BOB = Account.from_key("0x" + "b2" * 32)
LONG = (
    "Bees visit thousands of flowers every day, carrying pollen from one plant to the next. A healthy hive "
    "keeps its queen warm through the winter, and the workers dance to tell each other where the best "
    "fields are found, how far away they lie, and in which direction to fly."
)
NEAR_COPY = LONG.replace("healthy", "strong")  # one word changed: word-3-gram similarity about 0.87
TEXTS = [
    "Rivers carry sediment from the mountains to the sea, building wide deltas over thousands of years.",
    "A good loaf of bread needs flour, water, salt, yeast and above all patience while the dough rises.",
    "The night sky over the desert shows the band of the galaxy clearly when the moon has already set.",
]


def signed(account, datanet_id: str, text: str, source: str = "item", claimed: str | None = None) -> SignedText:  # type: ignore[no-untyped-def]
    signature = sign_contribution(account.key, datanet_id, content_id(normalize(text)))
    return SignedText(source=source, text=text, contributor=claimed or account.address, signature=signature)


@pytest.fixture()
def registry(database_url: str) -> DatanetRegistry:
    return DatanetRegistry(open_database(database_url), DatanetConfig(max_contribution_bytes=400,
                                                                      max_bytes_per_contributor_per_day=1000))


def contribute(registry: DatanetRegistry, *items: SignedText, name: str = "rivers"):  # type: ignore[no-untyped-def]
    return registry.contribute(name, list(items))


def test_create_rejects_bad_names_and_duplicates(registry: DatanetRegistry) -> None:
    datanet = registry.create("rivers", "sediment and deltas")
    assert len(datanet.id) == 32
    with pytest.raises(AlreadyExists, match="already exists"):
        registry.create("rivers")
    for bad in ("", "Upper", "../x", "a" * 65, "space name"):
        with pytest.raises(InvalidInput, match="not a datanet name"):
            registry.create(bad)
    with pytest.raises(NotFound, match="no datanet named 'lakes'"):
        registry.get("lakes")


def test_contributions_are_recovered_from_signatures(registry: DatanetRegistry) -> None:
    datanet = registry.create("rivers")
    result = contribute(registry, signed(ALICE, datanet.id, TEXTS[0], "a.txt"))
    assert [(a.contributor, a.source) for a in result.accepted] == [(ALICE.address, "a.txt")]
    assert result.accepted[0].id == content_id(normalize(TEXTS[0]))


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("other-key", "signature is not"),
        ("other-datanet", "signature is not"),
        ("garbage-signature", "malformed signature"),
        ("bad-address", "is not an Ethereum address"),
        ("empty", "empty contribution"),
        ("too-large", "too large: 401 bytes, the limit is 400"),
    ],
)
def test_each_bad_contribution_gets_its_reason_and_nothing_is_stored(registry: DatanetRegistry, case: str,
                                                                      reason: str) -> None:
    datanet = registry.create("rivers")
    other = registry.create("lakes")
    text = TEXTS[1]
    item = {
        "other-key": signed(BOB, datanet.id, text, claimed=ALICE.address),  # Bob signs in Alice's name
        "other-datanet": signed(ALICE, other.id, text),  # a signature for another datanet replayed here
        "garbage-signature": SignedText("item", text, ALICE.address, "0x1234"),
        "bad-address": SignedText("item", text, "0xnot-an-address", "0x" + "00" * 65),
        "empty": signed(ALICE, datanet.id, " \n\t \r\n"),
        "too-large": signed(ALICE, datanet.id, "x" * 401),
    }[case]
    result = contribute(registry, item)
    assert result.accepted == []
    assert [r.source for r in result.rejected] == ["item"]
    assert reason in result.rejected[0].reason
    assert registry.contributions("rivers") == []


def test_exact_duplicates_are_rejected_across_datanets_and_versions(registry: DatanetRegistry) -> None:
    rivers, lakes = registry.create("rivers"), registry.create("lakes")
    assert contribute(registry, signed(ALICE, rivers.id, TEXTS[0])).accepted
    registry.publish("rivers", listing_index, MemoryAnchor(), Path("/nonexistent-unused"))  # type: ignore[arg-type]
    # Same text after normalization (trailing spaces, CRLF) from another contributor, another datanet.
    copy = TEXTS[0] + "  \r\n"
    for name, dn in (("rivers", rivers), ("lakes", lakes)):
        result = contribute(registry, signed(BOB, dn.id, copy), name=name)
        assert result.accepted == [] and "exact duplicate of contribution" in result.rejected[0].reason
        assert "'rivers'" in result.rejected[0].reason


def test_near_duplicates_are_rejected_and_distinct_texts_pass(registry: DatanetRegistry) -> None:
    datanet = registry.create("rivers")
    result = contribute(
        registry,
        signed(ALICE, datanet.id, LONG, "first"),
        signed(BOB, datanet.id, NEAR_COPY, "near"),
        signed(BOB, datanet.id, TEXTS[2], "distinct"),
    )
    assert [a.source for a in result.accepted] == ["first", "distinct"]
    assert result.rejected[0].source == "near"
    assert "near-duplicate of contribution " + content_id(normalize(LONG)) in result.rejected[0].reason
    assert ">= 0.80" in result.rejected[0].reason


def test_near_duplicate_threshold_is_configurable(database_url: str) -> None:
    registry = DatanetRegistry(open_database(database_url), DatanetConfig(near_duplicate_threshold=1.0))
    datanet = registry.create("rivers")
    result = contribute(registry, signed(ALICE, datanet.id, LONG), signed(BOB, datanet.id, NEAR_COPY))
    assert len(result.accepted) == 2


def test_daily_limit_per_contributor(database_url: str) -> None:
    now = [datetime(2026, 11, 25, 23, 0, tzinfo=UTC)]
    registry = DatanetRegistry(open_database(database_url), DatanetConfig(max_bytes_per_contributor_per_day=150),
                               clock=lambda: now[0])
    datanet = registry.create("rivers")
    first = contribute(registry, signed(ALICE, datanet.id, TEXTS[0]), signed(ALICE, datanet.id, TEXTS[1]))
    assert len(first.accepted) == 1
    assert "daily limit reached" in first.rejected[0].reason
    assert contribute(registry, signed(BOB, datanet.id, TEXTS[1])).accepted, "the limit is per contributor"
    now[0] += timedelta(hours=2)  # the next UTC day
    assert contribute(registry, signed(ALICE, datanet.id, TEXTS[2])).accepted


def test_publish_freezes_versions_cumulatively_and_proofs_verify(registry: DatanetRegistry, tmp_path: Path) -> None:
    anchor = MemoryAnchor()
    datanet = registry.create("rivers")
    with pytest.raises(NothingToPublish, match="no new contributions since it was created"):
        registry.publish("rivers", listing_index, anchor, tmp_path)
    contribute(registry, signed(ALICE, datanet.id, TEXTS[0]), signed(BOB, datanet.id, TEXTS[1]))
    v1 = registry.publish("rivers", listing_index, anchor, tmp_path)
    assert (v1.version, v1.contributions) == (1, 2)
    assert json.loads((Path(v1.index_path) / "contributions.json").read_text()) == sorted(
        content_id(normalize(t)) for t in TEXTS[:2])
    assert anchor.root_of(datanet_key(datanet.id), 1) == bytes.fromhex(v1.merkle_root[2:])
    with pytest.raises(NothingToPublish, match="since version 1"):
        registry.publish("rivers", listing_index, anchor, tmp_path)

    contribute(registry, signed(ALICE, datanet.id, TEXTS[2]))
    assert [c.status for c in registry.contributions("rivers")] == ["published", "published", "pending"]
    v2 = registry.publish("rivers", listing_index, anchor, tmp_path)
    assert (v2.version, v2.contributions) == (2, 3)
    assert len(registry.contributions("rivers", version=1)) == 2, "version 1 stays frozen"

    first = content_id(normalize(TEXTS[0]))
    for version in (1, 2):
        proof = registry.proof("rivers", first, anchor, version=version)
        assert proof.verified_on_chain and proof.root == proof.root_on_chain
    tampered = content_id(normalize(TEXTS[0] + " (edited)"))
    proof = registry.proof("rivers", first, anchor)
    assert not verify_proof(bytes.fromhex(proof.root[2:]), bytes.fromhex(tampered),
                            [bytes.fromhex(p[2:]) for p in proof.proof])
    with pytest.raises(NotFound, match="is not in datanet 'rivers'"):
        registry.proof("rivers", tampered, anchor)
    with pytest.raises(NotFound, match="published in version 2, after 1"):
        registry.proof("rivers", content_id(normalize(TEXTS[2])), anchor, version=1)


def test_failed_anchor_is_finished_by_the_next_publish(registry: DatanetRegistry, tmp_path: Path) -> None:
    anchor = MemoryAnchor()
    datanet = registry.create("rivers")
    contribute(registry, signed(ALICE, datanet.id, TEXTS[0]))
    anchor.fail = True
    with pytest.raises(AnchorFailed, match="version 1 of 'rivers' is published but its root is not anchored yet"):
        registry.publish("rivers", listing_index, anchor, tmp_path)
    assert registry.version("rivers").anchor_tx is None
    anchor.fail = False
    retried = registry.publish("rivers", listing_index, anchor, tmp_path)
    assert retried.version == 1 and retried.tx_hash.startswith("0x")
    assert registry.version("rivers").anchor_tx == retried.tx_hash


def test_adapter_lineage_names_published_versions(registry: DatanetRegistry, tmp_path: Path) -> None:
    adapters = AdapterRegistry(registry.engine, registry)
    datanet = registry.create("rivers")
    contribute(registry, signed(ALICE, datanet.id, TEXTS[0]))
    registry.publish("rivers", listing_index, MemoryAnchor(), tmp_path)
    lineage = adapters.resolve_lineage(["rivers"])
    record = adapters.register("river-guide", uri="file:///store/river-guide", base_model="tiny", owner=BOB.address,
                               price_per_1k_tokens=10**19, lineage=lineage, source="trained")
    assert record.to_json()["lineage"] == ["rivers@1"]
    assert [Path(e.index_path) for e in record.lineage] == [tmp_path / datanet.id / "v1"], "attribution finds the index"
    assert adapters.get("river-guide").price_per_1k_tokens == 10**19, "prices beyond 64 bits are exact"
    with pytest.raises(AlreadyExists):
        adapters.register("river-guide", uri="x", base_model="tiny", owner=BOB.address, price_per_1k_tokens=1,
                          lineage=lineage, source="trained")
    with pytest.raises(NotFound, match="has no version 7"):
        adapters.resolve_lineage(["rivers@7"])
    with pytest.raises(InvalidInput, match="positive integer"):
        adapters.resolve_lineage(["rivers@x"])
    with pytest.raises(InvalidInput, match="not an Ethereum address"):
        adapters.register("other", uri="x", base_model="tiny", owner="bob", price_per_1k_tokens=1, lineage=lineage,
                          source="trained")
    assert [a.name for a in adapters.list()] == ["river-guide"]


def test_duplicates_within_one_submission_keep_the_first(registry: DatanetRegistry) -> None:
    datanet = registry.create("rivers")
    result = contribute(registry, signed(ALICE, datanet.id, TEXTS[0], "one"), signed(BOB, datanet.id, TEXTS[0], "two"))
    assert [a.source for a in result.accepted] == ["one"]
    assert result.rejected[0].source == "two" and "exact duplicate" in result.rejected[0].reason
    assert [c.contributor for c in registry.contributions("rivers")] == [ALICE.address]
