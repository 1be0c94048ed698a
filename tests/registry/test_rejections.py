"""Stored rejections on SQLite and PostgreSQL: only refusals of signature-proven submissions, never their text."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import inspect, text

from registry.config import DatanetConfig
from registry.contribution_content import content_id, normalize
from registry.datanets import DatanetRegistry, RejectionRecord, SignedText
from registry.errors import InvalidInput, NotFound
from storage.database import open_database
from tests.registry.test_datanet_registry import ALICE, BOB, LONG, NEAR_COPY, TEXTS, signed

START = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


@pytest.fixture()
def clock() -> list[datetime]:
    return [START]


@pytest.fixture()
def registry(database_url: str, clock: list[datetime]) -> DatanetRegistry:
    # 400 bytes a day: LONG (270 bytes) and one short text fit, a second short text does not.
    return DatanetRegistry(open_database(database_url), DatanetConfig(max_contribution_bytes=400,
                                                                      max_bytes_per_contributor_per_day=400),
                           clock=lambda: clock[0])


def stored_rows(registry: DatanetRegistry) -> list[tuple]:
    with registry.engine.connect() as connection:
        return [tuple(row) for row in connection.execute(text("SELECT * FROM contributionrejection ORDER BY id"))]


def every_cell(registry: DatanetRegistry) -> list[str]:
    """Every value of every table, as text (bytes decoded leniently)."""
    cells: list[str] = []
    with registry.engine.connect() as connection:
        for table in inspect(connection).get_table_names():
            for row in connection.execute(text(f'SELECT * FROM "{table}"')):
                cells += [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in row]
    return cells


def test_refusals_after_the_signature_are_stored_with_the_proven_contributor(registry: DatanetRegistry) -> None:
    rivers = registry.create("rivers")
    result = registry.contribute("rivers", [
        signed(ALICE, rivers.id, LONG, "alice/long.txt"),
        signed(ALICE, rivers.id, TEXTS[1], "alice/bread.txt"),
        signed(ALICE, rivers.id, TEXTS[2], "alice/sky.txt"),  # over Alice's 400 bytes today
        signed(BOB, rivers.id, NEAR_COPY, "bob/near.txt"),
        signed(BOB, rivers.id, TEXTS[1] + "  \r\n", "bob/copy.txt"),
        signed(BOB, rivers.id, TEXTS[0], "bob/river.txt"),
    ])
    assert [a.source for a in result.accepted] == ["alice/long.txt", "alice/bread.txt", "bob/river.txt"]
    assert {c.id for c in registry.contributions("rivers")} == {content_id(normalize(t))
                                                                for t in (LONG, TEXTS[1], TEXTS[0])}
    reasons = {r.source: r.reason for r in result.rejected}
    assert reasons["alice/sky.txt"].startswith("daily limit reached")
    assert reasons["bob/near.txt"].startswith("near-duplicate of contribution " + content_id(normalize(LONG)))
    assert reasons["bob/copy.txt"].startswith("exact duplicate of contribution " + content_id(normalize(TEXTS[1])))

    stored = registry.rejections("rivers")
    assert all(isinstance(r, RejectionRecord) for r in stored)
    assert [(r.source, r.contributor, r.content_id, r.reason) for r in stored] == [  # same call: last item first
        ("bob/copy.txt", BOB.address, content_id(normalize(TEXTS[1])), reasons["bob/copy.txt"]),
        ("bob/near.txt", BOB.address, content_id(normalize(NEAR_COPY)), reasons["bob/near.txt"]),
        ("alice/sky.txt", ALICE.address, content_id(normalize(TEXTS[2])), reasons["alice/sky.txt"]),
    ]
    assert {r.created_at for r in stored} == {START}
    assert all(r.created_at.tzinfo is not None for r in stored)


def test_unproven_refusals_are_returned_but_store_nothing(registry: DatanetRegistry) -> None:
    rivers, lakes = registry.create("rivers"), registry.create("lakes")
    registry.contribute("rivers", [signed(ALICE, rivers.id, TEXTS[0]), signed(BOB, rivers.id, TEXTS[0], "dup")])
    before = stored_rows(registry)
    assert len(before) == 1
    result = registry.contribute("rivers", [
        signed(BOB, rivers.id, TEXTS[1], "in-alice's-name", claimed=ALICE.address),
        signed(ALICE, lakes.id, TEXTS[1], "other-datanet"),
        SignedText("garbage-signature", TEXTS[1], ALICE.address, "0x1234"),
        SignedText("bad-address", TEXTS[1], "0xnot-an-address", "0x" + "00" * 65),
        signed(ALICE, rivers.id, " \n\t \r\n", "empty"),
        signed(ALICE, rivers.id, "x" * 401, "too-large"),
        signed(BOB, rivers.id, TEXTS[2], "accepted"),
    ])
    assert [r.source for r in result.rejected] == ["in-alice's-name", "other-datanet", "garbage-signature",
                                                   "bad-address", "empty", "too-large"]
    assert [a.source for a in result.accepted] == ["accepted"], "the accepted item of the call is still stored"
    assert content_id(normalize(TEXTS[2])) in {c.id for c in registry.contributions("rivers")}
    assert stored_rows(registry) == before
    assert [r.source for r in registry.rejections("rivers")] == ["dup"]


def test_the_rejected_text_is_not_in_the_database(registry: DatanetRegistry) -> None:
    rivers = registry.create("rivers")
    registry.contribute("rivers", [signed(ALICE, rivers.id, LONG, "first"), signed(BOB, rivers.id, NEAR_COPY, "near"),
                                   signed(BOB, rivers.id, LONG, "copy")])
    assert [r.source for r in registry.rejections("rivers")] == ["copy", "near"]
    for row in stored_rows(registry):
        assert not any(LONG[:40] in str(v) or "strong hive" in str(v) for v in row)
    assert not any("strong hive" in cell for cell in every_cell(registry)), "the near copy is nowhere in the ledger"


def test_filter_order_limit_and_unknown_datanet(registry: DatanetRegistry, clock: list[datetime]) -> None:
    rivers, lakes = registry.create("rivers"), registry.create("lakes")
    registry.contribute("rivers", [signed(ALICE, rivers.id, TEXTS[0], "a0"), signed(ALICE, rivers.id, TEXTS[2], "a0b"),
                                   signed(BOB, rivers.id, TEXTS[1], "b0")])
    clock[0] += timedelta(minutes=1)
    registry.contribute("rivers", [signed(BOB, rivers.id, TEXTS[0], "b1")])
    clock[0] += timedelta(minutes=1)
    registry.contribute("lakes", [signed(BOB, lakes.id, TEXTS[0], "b-lakes")])
    clock[0] += timedelta(minutes=1)
    registry.contribute("rivers", [signed(ALICE, rivers.id, TEXTS[1] + " ", "a2")])
    clock[0] += timedelta(minutes=1)
    registry.contribute("rivers", [signed(BOB, rivers.id, TEXTS[2] + "\n", "b3")])
    clock[0] += timedelta(minutes=1)
    # replays: a copy of Bob's refused submission, and of Alice's own stored contribution, are refused again
    # but recorded no more (a signature proves who signed a text, not who sent it)
    replay = registry.contribute("rivers", [signed(BOB, rivers.id, TEXTS[0], "b1-again"),
                                            signed(ALICE, rivers.id, TEXTS[0], "a0-again")])
    assert [r.source for r in replay.rejected] == ["b1-again", "a0-again"]

    assert [(r.source, r.created_at) for r in registry.rejections("rivers")] == [
        ("b3", START + timedelta(minutes=4)), ("a2", START + timedelta(minutes=3)),
        ("b1", START + timedelta(minutes=1))]
    assert [r.source for r in registry.rejections("rivers", contributor=BOB.address)] == ["b3", "b1"]
    assert [r.source for r in registry.rejections("rivers", contributor=BOB.address.lower())] == ["b3", "b1"]
    assert [r.source for r in registry.rejections("rivers", contributor=ALICE.address)] == ["a2"]
    assert [r.source for r in registry.rejections("lakes")] == ["b-lakes"]
    assert [r.source for r in registry.rejections("rivers", limit=1)] == ["b3"]
    assert len(registry.rejections("rivers", limit=1000)) == 3
    for limit in (0, -1, 1001, True, 2.5):
        with pytest.raises(InvalidInput, match="limit must be an integer from 1 to 1000"):
            registry.rejections("rivers", limit=limit)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="not an Ethereum address"):
        registry.rejections("rivers", contributor="bob")
    with pytest.raises(NotFound, match="no datanet named 'seas'"):
        registry.rejections("seas")


def test_a_long_source_keeps_its_last_255_characters(registry: DatanetRegistry) -> None:
    rivers = registry.create("rivers")
    source = "d/" * 200 + "copy.txt"
    registry.contribute("rivers", [signed(ALICE, rivers.id, TEXTS[0]), signed(BOB, rivers.id, TEXTS[0], source)])
    assert [r.source for r in registry.rejections("rivers")] == [source[-255:]]
