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


def test_a_saved_tree_is_read_back_by_a_restarted_portal_and_a_damaged_one_is_rebuilt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = rivers_ledger(f"sqlite:///{tmp_path / 'ledger.db'}", tmp_path)
    trees = tmp_path / "merkle"
    alice = next(c for c in RegistryView(engine).contributions_of(ALICE.address))
    first = RegistryView(engine, tree_dir=trees).proof(alice)
    assert first is not None
    [saved] = list(trees.iterdir())
    assert saved.name == first.root.removeprefix("0x") + ".bin"

    builds: list[int] = []
    real_from_ids = MerkleTree.from_ids
    monkeypatch.setattr(MerkleTree, "from_ids", classmethod(lambda cls, ids: builds.append(1) or real_from_ids(ids)))
    again = RegistryView(engine, tree_dir=trees).proof(alice)  # a new process: reads the file, hashes nothing
    assert again == first and builds == []

    saved.write_bytes(saved.read_bytes()[:-32])  # cut short: not a tree; rebuilt, and the file mended
    assert RegistryView(engine, tree_dir=trees).proof(alice) == first and builds == [1]
    other = bytearray(saved.read_bytes())
    other[0] ^= 1  # a wrong root: not this version's tree; rebuilt
    saved.write_bytes(bytes(other))
    assert RegistryView(engine, tree_dir=trees).proof(alice) == first and builds == [1, 1]
    assert MerkleTree.from_bytes(saved.read_bytes()).root.hex() == first.root.removeprefix("0x")
    assert verify_proof(bytes.fromhex(first.root[2:]), bytes.fromhex(alice.id),
                        [bytes.fromhex(p[2:]) for p in first.proof])
