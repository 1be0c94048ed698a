"""RegistryView's Merkle trees: built once per version, and a small datanet's proof never waits for a big one's tree."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import portal.registry_view as registry_view
from portal.registry_view import RegistryView
from registry.config import DatanetConfig
from registry.datanets import DatanetRegistry
from registry.merkle import MerkleTree, verify_proof
from tests.ledger.conftest import rivers_ledger
from tests.registry.test_datanet_registry import ALICE, signed
from tests.support.memory_anchor import MemoryAnchor, listing_index

LAKE_TEXT = "Lakes fed by glaciers stay cold and clear through the summer, their water the colour of pale jade."


def test_a_tree_being_built_holds_up_only_the_pages_of_its_own_version(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    engine = rivers_ledger(f"sqlite:///{tmp_path / 'ledger.db'}", tmp_path)
    registry = DatanetRegistry(engine, DatanetConfig())
    lakes = registry.create("lakes")
    registry.contribute("lakes", [signed(ALICE, lakes.id, LAKE_TEXT)])
    registry.publish("lakes", listing_index, MemoryAnchor(), tmp_path / "indexes")
    view = RegistryView(engine)
    lake = next(c for c in view.contributions_of(ALICE.address) if c.datanet == "lakes")
    river = next(c for c in view.contributions_of(ALICE.address) if c.datanet == "rivers")

    release, lake_build_started = threading.Event(), threading.Event()
    builds: list[int] = []
    real_from_ids = MerkleTree.from_ids

    def slow_for_lakes(ids):  # type: ignore[no-untyped-def]
        ids = list(ids)
        builds.append(len(ids))
        if bytes.fromhex(lake.id) in ids:  # stands in for a tree of 100k leaves
            lake_build_started.set()
            assert release.wait(10)
        return real_from_ids(ids)

    monkeypatch.setattr(registry_view.MerkleTree, "from_ids", staticmethod(slow_for_lakes))
    proofs: dict[str, object] = {}
    lake_pages = [threading.Thread(target=lambda n=n: proofs.__setitem__(f"lake{n}", view.proof(lake)))
                  for n in range(3)]
    for page in lake_pages:
        page.start()
    assert lake_build_started.wait(10)
    river_page = threading.Thread(target=lambda: proofs.__setitem__("river", view.proof(river)))
    river_page.start()
    river_page.join(5)
    assert not river_page.is_alive() and "river" in proofs  # served while the lakes tree is still being built
    release.set()
    for page in lake_pages:
        page.join(10)
    assert sorted(builds) == [1, 3]  # one build per version, however many pages asked at once
    for key, contribution in (("lake0", lake), ("lake2", lake), ("river", river)):
        proof = proofs[key]
        assert verify_proof(bytes.fromhex(proof.root[2:]), bytes.fromhex(contribution.id),  # type: ignore[attr-defined]
                            [bytes.fromhex(p[2:]) for p in proof.proof])  # type: ignore[attr-defined]
    engine.dispose()
