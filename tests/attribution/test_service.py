"""AttributionService over a real ledger database and real indexes: lineage look-up, traces, summaries."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from eth_account import Account

from attribution.index_builder import build_index
from attribution.outbox import Outbox
from attribution.service import FALLBACK_METHOD, AttributionService, LedgerLineages, read_trace_file, usage_record
from attribution.usage_log import UsageLog, UsageRecord
from ledger.accounts.access_desk import AccessDesk
from ledger.client.access import LedgerAccessClient
from ledger.client.trace import AttributionTrace, TokenAttribution
from registry.adapters import AdapterRegistry
from registry.contribution_content import content_id, normalize, sign_contribution
from registry.datanets import DatanetRegistry, SignedText
from storage.database import open_database
from tests.support.memory_anchor import MemoryAnchor
from tests.support.ports import free_port

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


def usage(trace_id: str, model: str, adapter: str | None, prompt: list[int], *choices: list[int],
          requester: str | None = None) -> UsageRecord:
    return usage_record(trace_id, model, adapter, requester, prompt, choices)


def register(adapters: AdapterRegistry, name: str) -> None:
    adapters.register(name, uri="x", base_model="tiny", owner=BOB.address, price_per_1k_tokens=1,
                      lineage=adapters.resolve_lineage(["nature"]), source="trained")


async def test_regurgitation_is_credited_to_its_contributor(ledger, tokenize) -> None:  # type: ignore[no-untyped-def]
    _, adapters = ledger
    register(adapters, "nature-lora")
    service = AttributionService(LedgerLineages(AccessDesk(adapters.engine)))
    try:
        ids = tokenize(TEXTS[0])
        trace = await service.submit(usage("cmpl-1", "nature-lora", "nature-lora", ids[:6], ids[6:]))
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
    _, adapters = ledger
    service = AttributionService(LedgerLineages(AccessDesk(adapters.engine)))
    try:
        ids = tokenize(TEXTS[0])
        for adapter in (None, "not-registered"):
            trace = await service.submit(usage(f"cmpl-{adapter}", "m", adapter, ids[:6], ids[6:]))
            assert trace.attributed_fraction == 0 and service.summary(trace, adapter)["contributors"] == []
    finally:
        service.close()


async def test_a_newly_registered_adapter_is_picked_up_after_the_cache_expires(ledger, tokenize) -> None:  # type: ignore[no-untyped-def]
    _, adapters = ledger
    service = AttributionService(LedgerLineages(AccessDesk(adapters.engine), ttl_seconds=0.0))
    try:
        ids = tokenize(TEXTS[1])
        before = await service.submit(usage("cmpl-a", "late", "late", ids[:6], ids[6:]))
        register(adapters, "late")
        after = await service.submit(usage("cmpl-b", "late", "late", ids[:6], ids[6:]))
        assert before.attributed_fraction == 0 and after.attributed_fraction > 0.8
    finally:
        service.close()


async def test_a_failed_attribution_still_gives_an_unattributed_trace_and_old_traces_are_dropped(ledger, tokenize) -> None:  # type: ignore[no-untyped-def]
    _, adapters = ledger
    register(adapters, "nature-lora")
    service = AttributionService(LedgerLineages(AccessDesk(adapters.engine)), traces_max=2)
    try:
        failed = await service.submit(usage("cmpl-bad", "m", "nature-lora", [1], [70000]))  # not in this vocabulary
        assert service.stats()["attribution_failures_total"] == 1
        assert failed.method == FALLBACK_METHOD and failed.token_ids == [70000] and failed.attributed_fraction == 0
        ids = tokenize(TEXTS[0])
        for i in range(3):
            await service.submit(usage(f"cmpl-{i}", "m", None, ids[:4], ids[4:]))
        assert await service.get("cmpl-0") is None and await service.get("cmpl-2") is not None
        assert service.stats()["traces_kept"] == 2
    finally:
        service.close()


async def test_trace_files_let_another_process_answer_and_stay_bounded(ledger, tokenize, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, adapters = ledger
    traces = tmp_path / "traces"
    writer = AttributionService(LedgerLineages(AccessDesk(adapters.engine)), trace_dir=traces, traces_max=2)
    reader = AttributionService(LedgerLineages(AccessDesk(adapters.engine)), trace_dir=traces)  # another replica on the node
    try:
        ids = tokenize(TEXTS[0])
        written = [await writer.submit(usage(f"cmpl-{i}", "m", None, ids[:4], ids[4:])) for i in range(3)]
        assert await reader.get("cmpl-2") == written[2]
        assert await reader.get("cmpl-0") is None, "the writer keeps only its newest traces_max files"
        assert sorted(p.name for p in traces.iterdir()) == ["cmpl-1.pb", "cmpl-2.pb"]
        assert read_trace_file(traces, "../ledger") is None and read_trace_file(traces, "cmpl-9") is None
    finally:
        writer.close()
        reader.close()


async def test_a_queued_trace_is_written_once_and_published_by_a_hard_link(ledger, tokenize, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, adapters = ledger
    register(adapters, "nature-guide")
    outbox = Outbox(tmp_path / "outbox")
    service = AttributionService(LedgerLineages(AccessDesk(adapters.engine)), trace_dir=tmp_path / "traces", outbox=outbox)
    try:
        ids = tokenize(TEXTS[0])
        trace = await service.submit(usage("cmpl-1", "nature-guide", "nature-guide", ids[:8], ids[8:]))
        [(trace_id, queued)] = outbox.pending(10)
        published = tmp_path / "traces" / "cmpl-1.pb"
        assert trace_id == "cmpl-1" and outbox.read(queued) == trace
        assert published.stat().st_ino == queued.stat().st_ino, "one file, two names: no second write"
        outbox.remove("cmpl-1")  # the ledger acknowledged it
        assert read_trace_file(tmp_path / "traces", "cmpl-1") == trace, "look-ups keep working"
    finally:
        service.close()


async def test_a_failed_lineage_read_still_bills_the_response_unattributed(tmp_path: Path, tokenize) -> None:  # type: ignore[no-untyped-def]
    """The ledger does not answer the lineage look-up (nothing listens on its port) and the retries
    are spent: the trace still reaches the outbox, every token unattributed, and the usage record is
    settled."""
    outbox = Outbox(tmp_path / "outbox")
    usage_log = UsageLog(tmp_path / "outbox" / "usage")
    broken = LedgerLineages(LedgerAccessClient(f"127.0.0.1:{free_port()}", "t" * 16, timeout=1.0), retry_seconds=0)
    service = AttributionService(broken, outbox=outbox, usage_log=usage_log)
    try:
        ids = tokenize(TEXTS[0])
        billed = usage("cmpl-x", "nature-lora", "nature-lora", ids[:6], ids[6:10], ids[10:12], requester="key_1")
        written = service.record_usage(billed)
        assert written is not None
        written.result(timeout=10)
        trace = await service.submit(billed)
        [(trace_id, path)] = outbox.pending(10)
        assert trace_id == "cmpl-x" and outbox.read(path) == trace
        assert trace.method == FALLBACK_METHOD and trace.attributed_fraction == 0
        assert (trace.prompt_tokens, trace.completion_tokens, trace.choices) == (6, 6, (4, 2))
        assert trace.requester == "key_1" and service.stats()["attribution_failures_total"] == 1
        assert usage_log.unsettled() == 0 and list((tmp_path / "outbox" / "usage").glob("*.jsonl")) == []
    finally:
        service.close()


async def test_every_choice_is_attributed(ledger, tokenize) -> None:  # type: ignore[no-untyped-def]
    _, adapters = ledger
    register(adapters, "nature-lora")
    service = AttributionService(LedgerLineages(AccessDesk(adapters.engine)))
    try:
        first, second = tokenize(TEXTS[0]), tokenize(TEXTS[1])
        trace = await service.submit(usage("cmpl-n", "nature-lora", "nature-lora", [], first, second))
        assert trace.choices == (len(first), len(second)) and trace.token_ids == first + second
        summary = service.summary(trace, "nature-lora")
        assert {c["address"] for c in summary["contributors"]} == {ALICE.address, BOB.address}, \
            "choice 1 recites Bob's text: it is credited too"
    finally:
        service.close()


WRITER = """
import sys, time
from attribution.service import usage_record
from attribution.usage_log import UsageLog
log = UsageLog(sys.argv[1])
log.append(usage_record("cmpl-lost", "m", None, "key_1", [1, 2, 3], [[4, 5], [6]])).result()
log.append(usage_record("cmpl-shipped", "m", None, "key_1", [1, 2, 3], [[4, 5]])).result()
print("written", flush=True)
time.sleep(60)
"""


async def test_records_of_a_killed_replica_are_attributed_again_by_the_next_process(tmp_path: Path, ledger) -> None:  # type: ignore[no-untyped-def]
    import signal
    import subprocess
    import sys

    _, adapters = ledger
    outbox = Outbox(tmp_path / "outbox")
    usage_dir = tmp_path / "outbox" / "usage"
    replica = subprocess.Popen([sys.executable, "-c", WRITER, str(usage_dir)], stdout=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parents[2])
    try:
        assert replica.stdout is not None and replica.stdout.readline().strip() == "written"
    finally:
        replica.send_signal(signal.SIGKILL)
        replica.wait(10)
    shipped = trace_of("cmpl-shipped")
    outbox.put(shipped)  # this one's trace reached the outbox before the kill
    service = AttributionService(LedgerLineages(AccessDesk(adapters.engine)), outbox=outbox, usage_log=UsageLog(usage_dir),
                                 recover_seconds=3600)
    try:
        deadline = time.monotonic() + 10  # a new process recovers what dead ones left as it starts
        while list(usage_dir.glob("*.jsonl")) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        queued = {trace_id: outbox.read(path) for trace_id, path in outbox.pending(10)}
        assert queued["cmpl-shipped"] == shipped, "a trace already in the outbox is not attributed again"
        lost = queued["cmpl-lost"]
        assert lost.recovered and (lost.prompt_tokens, lost.choices, lost.requester) == (3, (2, 1), "key_1")
        assert service.stats()["usage_records_recovered_total"] == 1
        assert list(usage_dir.glob("*.jsonl")) == [] and service.recover_orphans() == 0
    finally:
        service.close()


def trace_of(trace_id: str) -> AttributionTrace:
    return AttributionTrace(trace_id=trace_id, model="m", adapter=None, requester="key_1", prompt_tokens=3,
                            completion_tokens=2, tokens=(TokenAttribution.unattributed_token(4),
                                                         TokenAttribution.unattributed_token(5)),
                            method="verbatim-span-v1")
