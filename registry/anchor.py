"""What the registry needs of a chain: somewhere to anchor each version's Merkle root.

The registry imports no chain code. The caller passes a `RootAnchor`: on-chain the DatanetRegistry
contract (`ledger.chain.registry.DatanetRegistry`), in tests an in-memory stand-in. A datanet is
known to the anchor by `datanet_key(id) = keccak256(utf8(id))` (bytes32), a contribution by its
32-byte id; leaves and proofs follow `registry.merkle`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from eth_utils import keccak


def datanet_key(name_or_uuid: str) -> bytes:
    """The bytes32 key of a datanet in the contract: keccak256 of the UTF-8 string (its id or name)."""
    return keccak(text=name_or_uuid)


class RootAnchor(Protocol):
    """Where Merkle roots are anchored (the DatanetRegistry contract)."""

    address: str
    chain_id: int

    def anchor(self, datanet_key: bytes, version: int, root: bytes, count: int) -> str: ...

    def root_of(self, datanet_key: bytes, version: int) -> bytes | None: ...

    def verify(self, datanet_key: bytes, version: int, contribution_id: bytes, proof: Sequence[bytes]) -> bool: ...
