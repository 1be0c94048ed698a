"""Stand-ins for the registry's outside parts, for tests and benchmarks of the logic above them:
an in-memory DatanetRegistry contract and an index builder that only lists the documents.

The real contract is tested on eth-tester and anvil (tests/ledger/test_registry_*.py), the real
index builder in tests/attribution/test_index.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from registry.merkle import verify_proof


class MemoryAnchor:
    """Stands in for the DatanetRegistry contract: roots by (datanet key, version)."""

    address = "0x" + "00" * 19 + "01"
    chain_id = 31337

    def __init__(self) -> None:
        self.roots: dict[tuple[bytes, int], bytes] = {}
        self.fail = False

    def anchor(self, datanet_key: bytes, version: int, root: bytes, count: int) -> str:
        if self.fail:
            raise ConnectionError("node unreachable")
        assert (datanet_key, version) not in self.roots, "anchored twice"
        self.roots[(datanet_key, version)] = root
        return "0x" + f"{len(self.roots):064x}"

    def root_of(self, datanet_key: bytes, version: int) -> bytes | None:
        return self.roots.get((datanet_key, version))

    def verify(self, datanet_key: bytes, version: int, contribution_id: bytes, proof: Sequence[bytes]) -> bool:
        root = self.roots.get((datanet_key, version))
        return root is not None and verify_proof(root, contribution_id, proof)


def listing_index(documents: Iterable[tuple[str, str]], out_dir: Path) -> None:
    """An "index" that records the contribution ids only (what publishing needs from the builder)."""
    out_dir.mkdir(parents=True)
    (out_dir / "contributions.json").write_text(json.dumps([cid for cid, _ in documents]))
