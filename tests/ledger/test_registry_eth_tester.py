"""DatanetRegistry on the in-process eth-tester chain (py-evm): anchoring rules and on-chain verification."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pytest
from eth_tester import EthereumTester

from ledger.chain.client import ChainClient
from ledger.chain.errors import ChainConfigError, TransactionReverted, TransactionTimeout
from ledger.chain.registry import DatanetRegistry
from registry.anchor import datanet_key
from registry.merkle import MerkleTree, verify_proof
from tests.support.eth_tester_chain import in_process_chain

RIVERS = datanet_key("rivers")
IDS = [hashlib.sha256(f"contribution {i}".encode()).digest() for i in range(9)]
TREE = MerkleTree.from_ids(IDS)


@dataclass
class Chain:
    tester: EthereumTester
    owner: ChainClient
    stranger: ChainClient
    registry: DatanetRegistry


@pytest.fixture()
def chain() -> Chain:
    tester, (owner, stranger) = in_process_chain()
    return Chain(tester, owner, stranger, DatanetRegistry.deploy(owner))


def test_deployer_owns_the_registry(chain: Chain) -> None:
    assert chain.registry.owner() == chain.owner.address
    assert chain.registry.chain_id == chain.owner.w3.eth.chain_id


def test_anchor_records_root_count_time_and_emits_an_event(chain: Chain) -> None:
    assert chain.registry.root_of(RIVERS, 1) is None
    assert chain.registry.anchored_version(RIVERS, 1) is None

    tx_hash = chain.registry.anchor(RIVERS, 1, TREE.root, len(TREE))

    assert tx_hash.startswith("0x") and len(tx_hash) == 66
    assert chain.registry.root_of(RIVERS, 1) == TREE.root
    anchored = chain.registry.anchored_version(RIVERS, 1)
    assert anchored is not None
    assert (anchored.merkle_root, anchored.contribution_count) == (TREE.root, 9)
    receipt = chain.owner.w3.eth.get_transaction_receipt(tx_hash)
    assert anchored.anchored_at == chain.owner.w3.eth.get_block(receipt["blockNumber"])["timestamp"]
    contract = chain.owner.contract(chain.registry.artifact, chain.registry.address)
    (event,) = contract.events.VersionAnchored().process_receipt(receipt)
    assert event["args"] == {"datanetId": RIVERS, "version": 1, "merkleRoot": TREE.root, "contributionCount": 9}
    assert chain.registry.root_of(RIVERS, 2) is None
    assert chain.registry.root_of(datanet_key("lakes"), 1) is None


def test_anchoring_a_version_twice_reverts_and_keeps_the_first_root(chain: Chain) -> None:
    chain.registry.anchor(RIVERS, 1, TREE.root, len(TREE))
    other_root = MerkleTree.from_ids(IDS[:3]).root
    for root in (TREE.root, other_root):
        with pytest.raises(TransactionReverted) as caught:
            chain.registry.anchor(RIVERS, 1, root, 3)
        assert caught.value.error_name == "VersionAlreadyAnchored"
        assert caught.value.error_args == (RIVERS, 1, TREE.root)
        assert f"merkleRoot=0x{TREE.root.hex()}" in str(caught.value)
    assert chain.registry.root_of(RIVERS, 1) == TREE.root
    chain.registry.anchor(RIVERS, 2, other_root, 3)  # the next version is free
    assert chain.registry.root_of(RIVERS, 2) == other_root


@pytest.mark.parametrize(
    ("version", "root", "count", "error"),
    [
        (0, TREE.root, 9, "VersionIsZero"),
        (1, bytes(32), 9, "MerkleRootIsZero"),
        (1, TREE.root, 0, "NoContributions"),
    ],
)
def test_malformed_anchors_revert_with_their_error(
    chain: Chain, version: int, root: bytes, count: int, error: str
) -> None:
    with pytest.raises(TransactionReverted) as caught:
        chain.registry.anchor(RIVERS, version, root, count)
    assert caught.value.error_name == error


def test_only_the_owner_anchors(chain: Chain) -> None:
    as_stranger = DatanetRegistry(chain.stranger, chain.registry.address)
    with pytest.raises(TransactionReverted) as caught:
        as_stranger.anchor(RIVERS, 1, TREE.root, len(TREE))
    assert caught.value.error_name == "OwnableUnauthorizedAccount"
    assert caught.value.error_args[0].lower() == chain.stranger.address.lower()
    assert chain.registry.root_of(RIVERS, 1) is None
    assert as_stranger.root_of(RIVERS, 1) is None  # reading is open to anyone


def test_on_chain_verify_agrees_with_python(chain: Chain) -> None:
    chain.registry.anchor(RIVERS, 1, TREE.root, len(TREE))
    for cid in IDS:
        proof = TREE.proof(cid)
        assert verify_proof(TREE.root, cid, proof)
        assert chain.registry.verify(RIVERS, 1, cid, proof)


def test_on_chain_verify_rejects_tampering_and_unanchored_versions(chain: Chain) -> None:
    chain.registry.anchor(RIVERS, 1, TREE.root, len(TREE))
    cid, proof = IDS[4], TREE.proof(IDS[4])
    tampered_id = bytes([cid[0] ^ 0xFF]) + cid[1:]
    tampered_proof = [*proof[:-1], bytes([proof[-1][0] ^ 1]) + proof[-1][1:]]
    cases = {
        "tampered id": (1, tampered_id, proof),
        "tampered proof": (1, cid, tampered_proof),
        "short proof": (1, cid, proof[:-1]),
        "another id's proof": (1, IDS[5], proof),
        "unanchored version": (2, cid, proof),
    }
    for what, (version, contribution, path) in cases.items():
        assert not verify_proof(TREE.root, contribution, path) or version != 1, what
        assert not chain.registry.verify(RIVERS, version, contribution, path), what
    assert not DatanetRegistry(chain.owner, chain.registry.address).verify(datanet_key("lakes"), 1, cid, proof)


def test_single_contribution_version_verifies_with_an_empty_proof(chain: Chain) -> None:
    tree = MerkleTree.from_ids(IDS[:1])
    chain.registry.anchor(RIVERS, 1, tree.root, 1)
    assert chain.registry.verify(RIVERS, 1, IDS[0], [])
    assert not chain.registry.verify(RIVERS, 1, IDS[1], [])


def test_arguments_are_checked_before_sending(chain: Chain) -> None:
    with pytest.raises(ValueError, match="datanet_id must be 32 bytes"):
        chain.registry.anchor(b"rivers", 1, TREE.root, 9)
    with pytest.raises(ValueError, match="version must be an integer"):
        chain.registry.root_of(RIVERS, 2**64)


def test_the_operator_key_never_shows(chain: Chain) -> None:
    key = chain.tester.backend.account_keys[0].to_hex()
    assert key.removeprefix("0x") not in repr(chain.owner)
    assert key.removeprefix("0x") not in repr(chain.registry)
    bad_key = "0x" + "zz" * 32
    with pytest.raises(ChainConfigError) as caught:
        ChainClient.from_web3(chain.owner.w3, bad_key)
    assert "zz" not in str(caught.value)
    assert caught.value.__suppress_context__


def test_a_transaction_that_is_never_mined_times_out(chain: Chain) -> None:
    impatient = ChainClient.from_web3(
        chain.owner.w3, chain.tester.backend.account_keys[0].to_hex(), receipt_timeout_seconds=0.3
    )
    chain.tester.disable_auto_mine_transactions()
    with pytest.raises(TransactionTimeout, match="no receipt for 0x[0-9a-f]{64} within 0.3 s") as caught:
        DatanetRegistry(impatient, chain.registry.address).anchor(RIVERS, 1, TREE.root, len(TREE))
    chain.tester.mine_blocks()
    assert chain.owner.w3.eth.get_transaction_receipt(caught.value.tx_hash)["status"] == 1
    assert chain.registry.root_of(RIVERS, 1) == TREE.root


def test_gas_budget_of_anchor_and_verify(chain: Chain) -> None:
    """Gas benchmark: anchoring writes two storage slots; verifying 17 levels stays a cheap view."""
    ids = [hashlib.sha256(str(i).encode()).digest() for i in range(100_000)]
    tree = MerkleTree.from_ids(ids)
    tx_hash = chain.registry.anchor(RIVERS, 1, tree.root, len(tree))
    assert chain.owner.w3.eth.get_transaction_receipt(tx_hash)["gasUsed"] < 75_000  # 72,021 with solc 0.8.37
    contract = chain.owner.contract(chain.registry.artifact, chain.registry.address)
    proof = tree.proof(ids[5])
    assert contract.functions.verify(RIVERS, 1, ids[5], proof).estimate_gas() < 50_000  # 45,821 incl. 21k base
