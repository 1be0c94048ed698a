"""DatanetRegistry on a real anvil node: deployment record, anchoring, proofs, state across restarts."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pytest
from web3 import Web3

from ledger.chain.anvil import ANVIL_DEV_KEYS, AnvilNode
from ledger.chain.client import ChainClient
from ledger.chain.errors import ChainNodeError, ChainUnavailable, TransactionReverted
from ledger.chain.registry import DatanetRegistry, ensure_registry, read_deployment
from registry.anchor import datanet_key
from registry.merkle import MerkleTree
from tests.ledger.conftest import free_local_port

IDS = [hashlib.sha256(f"anvil contribution {i}".encode()).digest() for i in range(5)]
TREE = MerkleTree.from_ids(IDS)


def test_ensure_registry_deploys_once_and_records_the_address(anvil_client: ChainClient, tmp_path: Path) -> None:
    deployment = tmp_path / "chain" / "deployment.json"
    registry = ensure_registry(anvil_client, deployment)
    assert read_deployment(deployment) == {"chain_id": 31337, "registry": registry.address}

    again = ensure_registry(anvil_client, deployment)
    assert again.address == registry.address


def test_ensure_registry_keeps_other_keys_and_replaces_a_stale_address(
    anvil_client: ChainClient, tmp_path: Path
) -> None:
    deployment = tmp_path / "deployment.json"
    no_code = "0x" + "12" * 20
    deployment.write_text(json.dumps({"chain_id": 31337, "registry": no_code, "token": "0x" + "34" * 20}))

    registry = ensure_registry(anvil_client, deployment)

    assert registry.address != Web3.to_checksum_address(no_code)
    assert read_deployment(deployment) == {"chain_id": 31337, "registry": registry.address, "token": "0x" + "34" * 20}
    other_chain = {"chain_id": 1, "registry": registry.address}
    deployment.write_text(json.dumps(other_chain))
    assert ensure_registry(anvil_client, deployment).address != registry.address  # recorded for another chain


def test_anchor_read_back_and_verify_on_anvil(anvil_client: ChainClient, tmp_path: Path) -> None:
    registry = ensure_registry(anvil_client, tmp_path / "deployment.json")
    key = datanet_key("7d1c0e52-anvil-datanet")

    tx_hash = registry.anchor(key, 1, TREE.root, len(TREE))

    receipt = anvil_client.w3.eth.get_transaction_receipt(tx_hash)
    assert receipt["status"] == 1 and receipt["to"] == registry.address
    assert registry.root_of(key, 1) == TREE.root
    for cid in IDS:
        assert registry.verify(key, 1, cid, TREE.proof(cid))
    assert not registry.verify(key, 1, hashlib.sha256(b"not in it").digest(), TREE.proof(IDS[0]))
    with pytest.raises(TransactionReverted) as caught:
        registry.anchor(key, 1, TREE.root, len(TREE))
    assert caught.value.error_name == "VersionAlreadyAnchored"


def test_only_the_owner_anchors_on_anvil(anvil_node: AnvilNode, anvil_client: ChainClient, tmp_path: Path) -> None:
    registry = ensure_registry(anvil_client, tmp_path / "deployment.json")
    stranger = DatanetRegistry(ChainClient(anvil_node.rpc_url, ANVIL_DEV_KEYS[1]), registry.address)
    with pytest.raises(TransactionReverted) as caught:
        stranger.anchor(datanet_key("rivers"), 1, TREE.root, len(TREE))
    assert caught.value.error_name == "OwnableUnauthorizedAccount"


def test_a_mined_but_reverted_anchor_is_explained(anvil_node: AnvilNode, anvil_client: ChainClient) -> None:
    """Two publishers race for the same version: both pass gas estimation, the second fails in the block."""
    registry = DatanetRegistry.deploy(anvil_client)
    key = datanet_key("raced")
    w3 = anvil_client.w3
    outcomes: list[object] = []

    def publish() -> None:
        try:
            outcomes.append(registry.anchor(key, 1, TREE.root, len(TREE)))
        except TransactionReverted as error:
            outcomes.append(error)

    w3.provider.make_request("evm_setAutomine", [False])  # type: ignore[arg-type]
    try:
        threads = [threading.Thread(target=publish) for _ in range(2)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while int(w3.provider.make_request("txpool_status", [])["result"]["pending"], 16) < 2:  # type: ignore[arg-type]
            assert time.monotonic() < deadline, "the two anchors never reached the pool"
            time.sleep(0.02)
        w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
        for thread in threads:
            thread.join(timeout=10)
    finally:
        w3.provider.make_request("evm_setAutomine", [True])  # type: ignore[arg-type]

    errors = [o for o in outcomes if isinstance(o, TransactionReverted)]
    assert len(outcomes) == 2 and len(errors) == 1, outcomes
    assert errors[0].error_name == "VersionAlreadyAnchored"
    assert "(tx 0x" in str(errors[0])
    assert registry.root_of(key, 1) == TREE.root


def test_chain_state_survives_a_restart(tmp_path: Path) -> None:
    deployment = tmp_path / "chain" / "deployment.json"
    key = datanet_key("persistent")
    node = AnvilNode(tmp_path, port=free_local_port())
    with node:
        client = ChainClient(node.rpc_url, ANVIL_DEV_KEYS[0])
        registry = ensure_registry(client, deployment)
        tx_hash = registry.anchor(key, 1, TREE.root, len(TREE))
        block = client.w3.eth.block_number
    assert node.state_file.is_file() and node.backup_file.is_file()

    with AnvilNode(tmp_path, port=free_local_port()) as restarted:
        client = ChainClient(restarted.rpc_url, ANVIL_DEV_KEYS[0])
        again = ensure_registry(client, deployment)
        assert again.address == registry.address  # reused, not redeployed
        assert client.w3.eth.block_number == block
        assert again.root_of(key, 1) == TREE.root
        assert again.verify(key, 1, IDS[3], TREE.proof(IDS[3]))
        assert client.w3.eth.get_transaction_receipt(tx_hash)["status"] == 1


def test_a_damaged_state_file_is_restored_from_the_last_clean_stop(tmp_path: Path) -> None:
    node = AnvilNode(tmp_path, port=free_local_port())
    with node:
        client = ChainClient(node.rpc_url, ANVIL_DEV_KEYS[0])
        registry = DatanetRegistry.deploy(client)
    node.state_file.write_text('{"block": {"num')  # as if killed while dumping

    with node:
        assert ChainClient(node.rpc_url, ANVIL_DEV_KEYS[0]).has_code(registry.address)
    assert list(node.chain_dir.glob("anvil-state.json.damaged-*"))


def test_anvil_that_dies_while_starting_reports_its_log(tmp_path: Path) -> None:
    node = AnvilNode(tmp_path, port=free_local_port())
    node.chain_dir.mkdir(parents=True)
    node.state_file.write_text("[]")  # JSON, but not a chain state: anvil refuses it
    with pytest.raises(ChainNodeError, match=r"anvil exited with code \d+ while starting(.|\n)*anvil-state.json"):
        node.start()
    assert not node.running


def test_a_busy_port_is_reported(anvil_node: AnvilNode, tmp_path: Path) -> None:
    with pytest.raises(ChainNodeError, match=f"127.0.0.1:{anvil_node.port} is already in use"):
        AnvilNode(tmp_path, port=anvil_node.port).start()


def test_an_unreachable_node_is_reported(tmp_path: Path) -> None:
    client = ChainClient(f"http://127.0.0.1:{free_local_port()}", ANVIL_DEV_KEYS[0])
    with pytest.raises(ChainUnavailable, match="does not answer"):
        ensure_registry(client, tmp_path / "deployment.json")
    assert not (tmp_path / "deployment.json").exists()
