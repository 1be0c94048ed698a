"""AttributionService over a real ledger database and real indexes: lineage look-up, traces, summaries."""

from __future__ import annotations

from pathlib import Path

import pytest
from eth_account import Account

from attribution.index_builder import build_index
from attribution.outbox import Outbox
from attribution.service import AttributionService, LedgerLineages, read_trace_file
from ledger.adapters import AdapterRegistry
from ledger.contribution_content import content_id, normalize, sign_contribution
from ledger.database import open_database
from ledger.datanets import DatanetRegistry, SignedText
from tests.support.memory_anchor import MemoryAnchor

ALICE = Account.from_key("0x" + "a1" * 32)
BOB = Account.from_key("0x" + "b2" * 32)
TEXTS = [
    "Bees visit thousands of flowers every day, carrying pollen from one plant to the next while the hive waits.",
    "Old maps drew sea monsters at the edges of the known world, where the sailors had not yet been to look.",
]


@pytest.fixture()
def ledger(tmp_path: Path, tokenizer_dir: Path) -> tuple[str, AdapterRegistry]:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    datanets = DatanetRegistry(open_database(url))
    datanet = datanets.create("nature")
    items = [SignedText(f"t{i}", text, who.address, sign_contribution(who.key, datanet.id, content_id(normalize(text))))
             for i, (text, who) in enumerate(zip(TEXTS, (ALICE, BOB), strict=True))]
    assert len(datanets.contribute("nature", items).accepted) == 2
    datanets.publish("nature", lambda docs, out: build_index(docs, tokenizer_dir, out), MemoryAnchor(),
                     tmp_path / "indexes")
    return url, AdapterRegistry(datanets.engine, datanets)


def register(adapters: AdapterRegistry, name: str) -> None:
    adapters.register(name, uri="x", base_model="tiny", owner=BOB.address, price_per_1k_tokens=1,
                      lineage=adapters.resolve_lineage(["nature"]), source="trained")


async def test_regurgitation_is_credited_to_its_contributor(ledger, tokenize) -> None:  # type: ignore[no-untyped-def]
    url, adapters = ledger
    register(adapters, "nature-lora")
    service = AttributionService(LedgerLineages(url))
    try:
        ids = tokenize(TEXTS[0])
        trace = await service.submit("cmpl-1", "nature-lora", "nature-lora", ids[:6], ids[6:])
        assert trace.completion_tokens == len(ids) - 6 and trace.attributed_fraction > 0.8
        assert await service.get("cmpl-1") == trace
        summary = service.summary(trace, "nature-lora")
        assert summary["contributors"][0]["address"] == ALICE.address
        assert summary["contributors"][0]["contributions"][0]["datanet"] == "nature"
        assert summary["contributors"][0]["contributions"][0]["id"] == content_id(normalize(TEXTS[0]))
        assert await service.get("cmpl-unknown") is None
    finally:
        service.close()


async def test_unregistered_adapters_and_the_base_model_are_unattributed(ledger, tokenize) -> None:  # type: ignore[no-untyped-def]
    url, _ = ledger
    service = AttributionService(LedgerLineages(url))
    try:
        ids = tokenize(TEXTS[0])
        for adapter in (None, "not-registered"):
            trace = await service.submit(f"cmpl-{adapter}", "m", adapter, ids[:6], ids[6:])
            assert trace.attributed_fraction == 0 and service.summary(trace, adapter)["contributors"] == []
    finally:
        service.close()


async def test_a_newly_registered_adapter_is_picked_up_after_the_cache_expires(ledger, tokenize) -> None:  # type: ignore[no-untyped-def]
    url, adapters = ledger
    service = AttributionService(LedgerLineages(url, ttl_seconds=0.0))
    try:
        ids = tokenize(TEXTS[1])
        before = await service.submit("cmpl-a", "late", "late", ids[:6], ids[6:])
        register(adapters, "late")
        after = await service.submit("cmpl-b", "late", "late", ids[:6], ids[6:])
        assert before.attributed_fraction == 0 and after.attributed_fraction > 0.8
    finally:
        service.close()


async def test_failures_are_counted_and_old_traces_are_dropped(ledger, tokenize) -> None:  # type: ignore[no-untyped-def]
    url, adapters = ledger
    register(adapters, "nature-lora")
    service = AttributionService(LedgerLineages(url), traces_max=2)
    try:
        with pytest.raises(ValueError):
            await service.submit("cmpl-bad", "m", "nature-lora", [1], [70000])  # not a token of this vocabulary
        assert service.stats()["attribution_failures_total"] == 1
        ids = tokenize(TEXTS[0])
        for i in range(3):
            await service.submit(f"cmpl-{i}", "m", None, ids[:4], ids[4:])
        assert await service.get("cmpl-0") is None and await service.get("cmpl-2") is not None
        assert service.stats()["traces_kept"] == 2
    finally:
        service.close()


async def test_trace_files_let_another_process_answer_and_stay_bounded(ledger, tokenize, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, _ = ledger
    traces = tmp_path / "traces"
    writer = AttributionService(LedgerLineages(url), trace_dir=traces, traces_max=2)
    reader = AttributionService(LedgerLineages(url), trace_dir=traces)  # another replica on the node
    try:
        ids = tokenize(TEXTS[0])
        written = [await writer.submit(f"cmpl-{i}", "m", None, ids[:4], ids[4:]) for i in range(3)]
        assert await reader.get("cmpl-2") == written[2]
        assert await reader.get("cmpl-0") is None, "the writer keeps only its newest traces_max files"
        assert sorted(p.name for p in traces.iterdir()) == ["cmpl-1.json", "cmpl-2.json"]
        assert read_trace_file(traces, "../ledger") is None and read_trace_file(traces, "cmpl-9") is None
    finally:
        writer.close()
        reader.close()


async def test_a_queued_trace_is_written_once_and_published_by_a_hard_link(ledger, tokenize, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, adapters = ledger
    register(adapters, "nature-guide")
    outbox = Outbox(tmp_path / "outbox")
    service = AttributionService(LedgerLineages(url), trace_dir=tmp_path / "traces", outbox=outbox)
    try:
        ids = tokenize(TEXTS[0])
        trace = await service.submit("cmpl-1", "nature-guide", "nature-guide", ids[:8], ids[8:])
        [(trace_id, queued)] = outbox.pending(10)
        published = tmp_path / "traces" / "cmpl-1.json"
        assert trace_id == "cmpl-1" and outbox.read(queued) == trace
        assert published.stat().st_ino == queued.stat().st_ino, "one file, two names: no second write"
        outbox.remove("cmpl-1")  # the ledger acknowledged it
        assert read_trace_file(tmp_path / "traces", "cmpl-1") == trace, "look-ups keep working"
    finally:
        service.close()
