"""Indexes in a store: published to S3 (moto) with their digest, served by the real ledger's GetLineage,
copied into a replica's node cache and checked there; a tampered index is billed unattributed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
from eth_account import Account

from attribution.attributor import Attributor
from attribution.index_builder import build_index
from attribution.service import FALLBACK_METHOD, METHOD, AttributionService, IndexUnavailable, LedgerLineages, \
    usage_record
from ledger.client.access import LedgerAccessClient
from registry.adapters import AdapterRegistry
from registry.contribution_content import content_id, normalize, sign_contribution
from registry.datanets import DatanetRegistry, SignedText
from registry.errors import IndexStoreFailed, InvalidInput
from statedir.store_cache import StoreCache, directory_digest
from tests.support.ledger_server import ServedLedger, served_ledger
from tests.support.memory_anchor import MemoryAnchor
from tests.support.s3 import S3Server

ALICE = Account.from_key("0x" + "a1" * 32)
TEXTS = [
    "Bees visit thousands of flowers every day, carrying pollen from one plant to the next while the hive waits.",
    "Old maps drew sea monsters at the edges of the known world, where the sailors had not yet been to look.",
]


@pytest.fixture()
def ledger(tmp_path: Path) -> Iterator[ServedLedger]:
    with served_ledger(tmp_path / "state") as served:
        yield served


def contribute(datanets: DatanetRegistry, name: str = "nature") -> None:
    datanet = datanets.create(name)
    items = [SignedText(f"t{i}", text, ALICE.address, sign_contribution(ALICE.key, datanet.id,
                                                                        content_id(normalize(text))))
             for i, text in enumerate(TEXTS)]
    assert len(datanets.contribute(name, items).accepted) == 2


def publish(datanets: DatanetRegistry, tokenizer_dir: Path, index_root: Path, store: str):  # type: ignore[no-untyped-def]
    return datanets.publish("nature", lambda docs, out: build_index(docs, tokenizer_dir, out), MemoryAnchor(),
                            index_root, store)


def test_a_version_published_to_s3_reaches_a_replica_as_a_checked_local_index(
        tmp_path: Path, ledger: ServedLedger, s3: S3Server, tokenizer_dir: Path, tokenize,  # type: ignore[no-untyped-def]
        monkeypatch: pytest.MonkeyPatch) -> None:
    datanets = DatanetRegistry(ledger.engine)
    contribute(datanets)
    published = publish(datanets, tokenizer_dir, tmp_path / "indexes", s3.url("indexes"))
    datanet_id = datanets.get("nature").id
    assert published.index_path == s3.url("indexes", datanet_id, "v1")
    assert published.index_digest and published.index_digest.startswith("sha256:")
    assert datanets.version("nature").index_digest == published.index_digest
    assert not (tmp_path / "indexes" / datanet_id / "v1").exists(), "the store's copy is the index"
    adapters = AdapterRegistry(datanets.engine, datanets)
    adapters.register("nature-lora", uri="x", base_model="tiny", owner=ALICE.address, price_per_1k_tokens=1,
                      lineage=adapters.resolve_lineage(["nature"]), source="trained")

    client = LedgerAccessClient(ledger.target, ledger.token)
    record = client.lineage("nature-lora")
    assert record.index_dirs == (published.index_path,) and record.index_digests == (published.index_digest,)

    node_state = tmp_path / "replica-node"  # another node: nothing of the head's disk
    monkeypatch.setenv("GATEWAY_STATE_DIR", str(node_state))
    lineage = LedgerLineages(client).lineage("nature-lora")
    [local] = lineage.index_dirs
    assert Path(local) == (node_state / "cache" / "indexes" / published.index_digest.removeprefix("sha256:")).resolve()
    assert directory_digest(Path(local)) == published.index_digest
    ids = tokenize(TEXTS[0])
    tokens = Attributor([Path(local)]).attribute(ids[:6], ids[6:20])
    assert {c for t in tokens for c, _ in t.weights} == {content_id(normalize(TEXTS[0]))}
    client.close()


async def test_a_tampered_index_in_the_store_is_refused_and_the_response_billed_unattributed(
        tmp_path: Path, ledger: ServedLedger, s3: S3Server, tokenizer_dir: Path, tokenize) -> None:  # type: ignore[no-untyped-def]
    datanets = DatanetRegistry(ledger.engine)
    contribute(datanets)
    published = publish(datanets, tokenizer_dir, tmp_path / "indexes", s3.url("indexes"))
    adapters = AdapterRegistry(datanets.engine, datanets)
    adapters.register("nature-lora", uri="x", base_model="tiny", owner=ALICE.address, price_per_1k_tokens=1,
                      lineage=adapters.resolve_lineage(["nature"]), source="trained")
    fs, root = fsspec.core.url_to_fs(published.index_path)
    fs.pipe_file(f"{root}/contributions.json", b'["' + b"0" * 64 + b'", "' + b"1" * 64 + b'"]')

    cache_dir = tmp_path / "node-cache"
    client = LedgerAccessClient(ledger.target, ledger.token)
    lineages = LedgerLineages(client, store_cache=StoreCache(cache_dir))
    with pytest.raises(IndexUnavailable, match="expected " + published.index_digest):
        lineages.lineage("nature-lora")
    assert [p for p in cache_dir.rglob("*") if not p.is_dir()] == [], "nothing cached"
    with pytest.raises(IndexUnavailable):  # remembered: no download per trace
        lineages.lineage("nature-lora")
    assert lineages.cached("nature-lora").index_dirs == ()  # the event loop's look-up fetches nothing

    service = AttributionService(lineages, processes=False)
    try:
        ids = tokenize(TEXTS[0])
        trace = await service.submit(usage_record("cmpl-t", "nature-lora", "nature-lora", "key_1", ids[:6], [ids[6:12]]))
        assert trace.method == FALLBACK_METHOD and trace.attributed_fraction == 0 and trace.completion_tokens == 6
        assert trace.method != METHOD and service.stats()["attribution_failures_total"] == 1
    finally:
        service.close()
        client.close()


def test_a_store_that_refuses_the_index_publishes_nothing(tmp_path: Path, ledger: ServedLedger, s3: S3Server,
                                                          tokenizer_dir: Path) -> None:
    datanets = DatanetRegistry(ledger.engine)
    contribute(datanets)
    with pytest.raises(InvalidInput, match="no filesystem for 'nope://'"):
        publish(datanets, tokenizer_dir, tmp_path / "indexes", "nope://x")
    with pytest.raises(IndexStoreFailed, match="nothing was published"):
        publish(datanets, tokenizer_dir, tmp_path / "indexes", "s3://no-such-bucket-anywhere/indexes")
    assert datanets.versions("nature") == []
    assert {c.status for c in datanets.contributions("nature")} == {"pending"}
    local = publish(datanets, tokenizer_dir, tmp_path / "indexes", "")  # no store: the local build, with its digest
    assert Path(local.index_path) == tmp_path / "indexes" / datanets.get("nature").id / "v1"
    assert local.index_digest == directory_digest(Path(local.index_path))
