"""Merkle trees over contribution ids: OpenZeppelin-compatible roots and proofs, and their failure modes."""

from __future__ import annotations

import hashlib
import time

import pytest
from eth_abi import encode as abi_encode
from eth_utils import keccak
from hypothesis import given, settings
from hypothesis import strategies as st

from registry.merkle import MerkleTree, leaf_hash, verify_proof


def sample_ids(count: int) -> list[bytes]:
    return [hashlib.sha256(f"id-{i}".encode()).digest() for i in range(count)]


# Produced by OpenZeppelin's JavaScript library for the same ids:
# StandardMerkleTree.of(sample_ids(n).map(id => [id]), ["bytes32"]).root
OPENZEPPELIN_ROOTS = {
    1: "41b6e0b8ef3fafd07cb54e8840323f947cc0b3864e34b59d446ef631467d9ea5",
    2: "c7d63ea6988ef1af6b5568c0ecf5c4bf3c506f360cf1e0528b9a30a6026fc514",
    3: "c4e949534144492be84773804a5107d31b320f0fbb8fc6be81690fa2592f5666",
    5: "638e33322923dc1177adf19de7f99fa51c490e9a74161e263daad7d8ab47dbcd",
    13: "8e07d1bca9764b2e48d22045de96005b7c2a0920edf19a9de9b1094c0b798bb2",
}
# ...and tree.getProof([sample_ids(5)[0]])
OPENZEPPELIN_PROOF_5_FIRST = [
    "41504b0bc92cf8bd48deba01a3ceb80aba0057741390829d7bb005b6d8989e54",
    "d86fce5c621227df5c5e5b1d48c76d36960034a51e9ecf3e88de03b5baa8fdcd",
    "e5f7787825f548d52145c1844098fb8687ae0b30af3d48480986f0f5f4ed6b33",
]


def test_leaf_is_the_double_keccak_of_the_abi_encoded_id() -> None:
    cid = sample_ids(1)[0]
    assert leaf_hash(cid) == keccak(keccak(abi_encode(["bytes32"], [cid])))


@pytest.mark.parametrize("count", sorted(OPENZEPPELIN_ROOTS))
def test_roots_match_openzeppelin_standard_merkle_tree(count: int) -> None:
    assert MerkleTree.from_ids(sample_ids(count)).root.hex() == OPENZEPPELIN_ROOTS[count]


def test_proofs_match_openzeppelin_standard_merkle_tree() -> None:
    tree = MerkleTree.from_ids(sample_ids(5))
    assert [node.hex() for node in tree.proof(sample_ids(5)[0])] == OPENZEPPELIN_PROOF_5_FIRST


def test_root_does_not_depend_on_the_order_of_ids() -> None:
    ids = sample_ids(9)
    assert MerkleTree.from_ids(ids).root == MerkleTree.from_ids(list(reversed(ids))).root


def test_a_single_leaf_is_its_own_root_with_an_empty_proof() -> None:
    (cid,) = sample_ids(1)
    tree = MerkleTree.from_ids([cid])
    assert tree.root == leaf_hash(cid)
    assert tree.proof(cid) == []
    assert verify_proof(tree.root, cid, [])
    assert len(tree) == 1 and cid in tree


@pytest.mark.parametrize("count", range(1, 18))
def test_every_proof_verifies_for_odd_and_even_counts(count: int) -> None:
    ids = sample_ids(count)
    tree = MerkleTree.from_ids(ids)
    for cid in ids:
        assert verify_proof(tree.root, cid, tree.proof(cid)), f"id {ids.index(cid)} of {count}"


def test_tampered_ids_proofs_and_roots_do_not_verify() -> None:
    ids = sample_ids(6)
    tree = MerkleTree.from_ids(ids)
    cid, proof = ids[2], tree.proof(ids[2])
    tampered_id = bytes([cid[0] ^ 1]) + cid[1:]
    tampered_node = [bytes([proof[0][0] ^ 1]) + proof[0][1:], *proof[1:]]
    assert verify_proof(tree.root, cid, proof)
    assert not verify_proof(tree.root, tampered_id, proof)
    assert not verify_proof(tree.root, cid, tampered_node)
    assert not verify_proof(tree.root, cid, proof[:-1])
    assert not verify_proof(tree.root, cid, [*proof, proof[-1]])
    assert not verify_proof(tree.root, ids[3], proof)  # someone else's proof
    assert not verify_proof(keccak(b"another root"), cid, proof)


def test_no_ids_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one contribution id"):
        MerkleTree.from_ids([])


def test_duplicate_ids_are_an_error() -> None:
    ids = sample_ids(3)
    with pytest.raises(ValueError, match=f"duplicate contribution id 0x{ids[1].hex()}"):
        MerkleTree.from_ids([*ids, ids[1]])


def test_ids_must_be_32_bytes() -> None:
    with pytest.raises(ValueError, match="contribution id #1 must be 32 bytes, got 31"):
        MerkleTree.from_ids([sample_ids(1)[0], b"\x01" * 31])
    with pytest.raises(ValueError, match="proof element #0 must be 32 bytes"):
        verify_proof(bytes(32), sample_ids(1)[0], [b"short"])


def test_a_proof_for_an_id_outside_the_tree_is_an_error() -> None:
    tree = MerkleTree.from_ids(sample_ids(4))
    outsider = sample_ids(5)[4]
    assert outsider not in tree
    with pytest.raises(ValueError, match="is not in this Merkle tree"):
        tree.proof(outsider)


def test_a_hundred_thousand_leaves_build_in_seconds() -> None:
    ids = sample_ids(100_000)
    started = time.perf_counter()
    tree = MerkleTree.from_ids(ids)
    elapsed = time.perf_counter() - started
    assert elapsed < 10, f"building took {elapsed:.1f} s"
    assert len(tree) == 100_000
    for cid in ids[::9973]:
        proof = tree.proof(cid)
        assert len(proof) in (16, 17)  # ceil(log2(100k)) levels, minus one for the shallower leaves
        assert verify_proof(tree.root, cid, proof)


ids_strategy = st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=80, unique=True)


@settings(max_examples=60, deadline=None)
@given(ids=ids_strategy, outsider=st.binary(min_size=32, max_size=32))
def test_property_every_member_verifies_and_an_outsider_does_not(ids: list[bytes], outsider: bytes) -> None:
    tree = MerkleTree.from_ids(ids)
    for cid in ids:
        assert verify_proof(tree.root, cid, tree.proof(cid))
    if outsider not in ids:
        assert not verify_proof(tree.root, outsider, tree.proof(ids[0]))


def test_a_tree_saved_as_bytes_reads_back_with_the_same_root_and_proofs() -> None:
    ids = [bytes([n]) * 32 for n in range(1, 8)]
    tree = MerkleTree.from_ids(ids)
    again = MerkleTree.from_bytes(tree.to_bytes())
    assert again.root == tree.root and len(again) == len(tree) == 7
    assert all(again.proof(cid) == tree.proof(cid) for cid in ids)
    for blob in (b"", tree.to_bytes()[:-32], tree.to_bytes() + b"x", tree.to_bytes()[:32 * 6]):
        with pytest.raises(ValueError, match="not a saved Merkle tree"):
            MerkleTree.from_bytes(blob)
