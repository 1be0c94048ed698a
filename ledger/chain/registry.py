"""The DatanetRegistry contract: anchor a datanet version's Merkle root, read it back, verify proofs.

It is the `registry.anchor.RootAnchor` that publishing a datanet version is given. Keys: a datanet
is addressed on-chain by ``registry.anchor.datanet_key(id) = keccak256(utf8(id))`` (bytes32), a
contribution by its 32-byte id; leaves and proofs follow `registry.merkle`.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_utils import to_checksum_address

from ledger.chain.client import ChainClient
from ledger.chain.contracts.artifacts import ContractArtifact, load_artifact
from ledger.chain.errors import ChainConfigError

CONTRACT_NAME = "DatanetRegistry"
DEPLOYMENT_KEY = "registry"
UINT64_MAX = 2**64 - 1


@dataclass(frozen=True)
class AnchoredVersion:
    """What the contract records for an anchored version."""

    merkle_root: bytes
    contribution_count: int
    anchored_at: int  # unix seconds of the anchoring block


class DatanetRegistry:
    """A deployed DatanetRegistry, operated by `client`'s account (the contract's owner)."""

    def __init__(self, client: ChainClient, address: str) -> None:
        self.client = client
        self.address = to_checksum_address(address)
        self.artifact: ContractArtifact = load_artifact(CONTRACT_NAME)
        self._contract = client.contract(self.artifact, self.address)

    @classmethod
    def deploy(cls, client: ChainClient) -> DatanetRegistry:
        """Deploy a new registry owned by the client's account."""
        artifact = load_artifact(CONTRACT_NAME)
        return cls(client, client.deploy(artifact, client.address))

    @property
    def chain_id(self) -> int:
        return self.client.chain_id

    def __repr__(self) -> str:
        return f"DatanetRegistry({self.address} via {self.client!r})"

    def anchor(self, datanet_id: bytes, version: int, root: bytes, count: int) -> str:
        """Anchor `root` for `version` of `datanet_id`; returns the transaction hash (0x hex).

        Raises TransactionReverted (``error_name`` ``VersionAlreadyAnchored``, ``VersionIsZero``,
        ``MerkleRootIsZero``, ``NoContributions``, ``OwnableUnauthorizedAccount``) on refusal.
        """
        fn = self._contract.functions.anchor(
            _bytes32(datanet_id, "datanet_id"),
            _uint64(version, "version"),
            _bytes32(root, "root"),
            _uint64(count, "count"),
        )
        receipt = self.client.transact(fn, label=f"anchor(version {version})")
        return "0x" + bytes(receipt["transactionHash"]).hex()

    def root_of(self, datanet_id: bytes, version: int) -> bytes | None:
        """The anchored root of the version, None when it is not anchored."""
        fn = self._contract.functions.rootOf(_bytes32(datanet_id, "datanet_id"), _uint64(version, "version"))
        root = bytes(self.client.call(fn))
        return None if root == bytes(32) else root

    def anchored_version(self, datanet_id: bytes, version: int) -> AnchoredVersion | None:
        """Root, contribution count and anchoring time of the version, None when it is not anchored."""
        fn = self._contract.functions.anchoredVersion(_bytes32(datanet_id, "datanet_id"), _uint64(version, "version"))
        root, count, anchored_at = self.client.call(fn)
        return None if bytes(root) == bytes(32) else AnchoredVersion(bytes(root), count, anchored_at)

    def verify(self, datanet_id: bytes, version: int, contribution_id: bytes, proof: Sequence[bytes]) -> bool:
        """The contract's verdict on an inclusion proof (False when the version is not anchored)."""
        fn = self._contract.functions.verify(
            _bytes32(datanet_id, "datanet_id"),
            _uint64(version, "version"),
            _bytes32(contribution_id, "contribution_id"),
            [_bytes32(node, "proof element") for node in proof],
        )
        return bool(self.client.call(fn))

    def owner(self) -> str:
        return to_checksum_address(self.client.call(self._contract.functions.owner()))


def ensure_registry(client: ChainClient, deployment_file: Path) -> DatanetRegistry:
    """The registry recorded in `deployment_file` when it has code on this chain, else a new one (recorded).

    The file is JSON, e.g. ``{"chain_id": 31337, "registry": "0x…"}``; other keys (token, settler)
    are kept. A lock file beside it keeps two processes from deploying at once.
    """
    with _locked(deployment_file):
        record = read_deployment(deployment_file)
        address = record.get(DEPLOYMENT_KEY)
        if record.get("chain_id") == client.chain_id and isinstance(address, str) and client.has_code(address):
            return DatanetRegistry(client, address)
        registry = DatanetRegistry.deploy(client)
        record.update({"chain_id": client.chain_id, DEPLOYMENT_KEY: registry.address})
        write_deployment(deployment_file, record)
        return registry


def read_deployment(deployment_file: Path) -> dict[str, Any]:
    """The deployment record (empty when the file does not exist)."""
    try:
        text = deployment_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise ChainConfigError(f"{deployment_file} is not a JSON object; fix or remove it")
    return record


def write_deployment(deployment_file: Path, record: dict[str, Any]) -> None:
    """Replace the deployment record atomically (sorted keys, indent 2)."""
    deployment_file.parent.mkdir(parents=True, exist_ok=True)
    partial = deployment_file.with_name(deployment_file.name + ".partial")
    partial.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(partial, deployment_file)


@contextmanager
def _locked(deployment_file: Path) -> Iterator[None]:
    deployment_file.parent.mkdir(parents=True, exist_ok=True)
    with open(deployment_file.with_name(deployment_file.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _bytes32(value: bytes, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or len(value) != 32:
        raise ValueError(f"{what} must be 32 bytes")
    return bytes(value)


def _uint64(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= UINT64_MAX:
        raise ValueError(f"{what} must be an integer in [0, 2**64 - 1], got {value!r}")
    return value
