"""Merkle trees over contribution ids, compatible with OpenZeppelin's `MerkleProof` and `StandardMerkleTree`.

Conventions (the ones `DatanetRegistry.verify` checks on-chain):

- a contribution id is 32 bytes (a bytes32 on-chain);
- leaf = keccak256(keccak256(abi.encode(bytes32 id))) -- hashed twice, so that no 64-byte inner node
  can pass for a leaf; ``abi.encode`` of one bytes32 is the 32 bytes themselves;
- an inner node is keccak256 of its two children concatenated in ascending byte order (sorted-pair
  hashing), so a proof is just the list of sibling hashes from the leaf up;
- leaves are sorted by hash, then laid out like OpenZeppelin's StandardMerkleTree (a complete binary
  tree stored in an array, leaves at the end in reverse order, no padding for odd counts). The
  same set of ids therefore gives the same root in any order, and the same root as
  ``StandardMerkleTree.of(ids.map(id => [id]), ["bytes32"])`` in JavaScript.

Guarantees: a tree has at least one leaf and no duplicate ids; every leaf's proof verifies against
the root; `verify_proof` never raises for a well-formed proof that does not verify, it returns False.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from eth_utils import keccak as _eth_keccak

HASH_BYTES = 32


def _select_keccak() -> Callable[[bytes], bytes]:
    """The fastest keccak-256 available: pysha3's C code (~1 µs) beats eth_utils' default backend
    (pycryptodome, ~14 µs per call here), which matters for trees of 100k leaves."""
    try:
        from sha3 import keccak_256  # safe-pysha3, installed with eth-hash[pysha3]
    except ImportError:
        return _eth_keccak

    def keccak_pysha3(data: bytes) -> bytes:
        return keccak_256(data).digest()

    return keccak_pysha3 if keccak_pysha3(b"") == _eth_keccak(b"") else _eth_keccak


_keccak = _select_keccak()


def _check_hash(value: bytes, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be {HASH_BYTES} bytes, not {type(value).__name__}")
    value = bytes(value)
    if len(value) != HASH_BYTES:
        raise ValueError(f"{what} must be {HASH_BYTES} bytes, got {len(value)}")
    return value


def leaf_hash(contribution_id: bytes) -> bytes:
    """keccak256(keccak256(abi.encode(bytes32 contribution_id))): the leaf of one contribution."""
    return _keccak(_keccak(_check_hash(contribution_id, "contribution id")))


def _hash_pair(a: bytes, b: bytes) -> bytes:
    return _keccak(a + b if a < b else b + a)


class MerkleTree:
    """An immutable tree over a set of contribution ids; build it with `MerkleTree.from_ids`."""

    __slots__ = ("_nodes", "_index_of_leaf")

    def __init__(self, nodes: list[bytes], index_of_leaf: dict[bytes, int]) -> None:
        self._nodes = nodes
        self._index_of_leaf = index_of_leaf

    @classmethod
    def from_ids(cls, ids: Sequence[bytes] | Iterable[bytes]) -> MerkleTree:
        """The tree over `ids` (32 bytes each, any order, no duplicates, at least one).

        Raises ValueError for an empty list, a duplicate id or an id that is not 32 bytes.
        """
        checked = [bytes(cid) if isinstance(cid, (bytearray, memoryview)) else cid for cid in ids]
        if not checked:
            raise ValueError("a Merkle tree needs at least one contribution id, got none")
        if not all(isinstance(cid, bytes) and len(cid) == HASH_BYTES for cid in checked):
            for n, cid in enumerate(checked):  # name the first bad one (the fast check above formats nothing)
                _check_hash(cid, f"contribution id #{n}")
        if len(set(checked)) != len(checked):
            seen: set[bytes] = set()
            for cid in checked:
                if cid in seen:
                    raise ValueError(f"duplicate contribution id 0x{cid.hex()} (ids must be unique)")
                seen.add(cid)

        leaves = sorted(_keccak(_keccak(cid)) for cid in checked)
        count = len(leaves)
        nodes: list[bytes] = [b""] * (count - 1) + leaves[::-1]  # leaf i at index 2*count - 2 - i
        keccak = _keccak
        for i in range(count - 2, -1, -1):
            left, right = nodes[2 * i + 1], nodes[2 * i + 2]
            nodes[i] = keccak(left + right if left < right else right + left)
        index_of_leaf = {leaf: 2 * count - 2 - i for i, leaf in enumerate(leaves)}
        return cls(nodes, index_of_leaf)

    def to_bytes(self) -> bytes:
        """Every node, concatenated (what `from_bytes` reads back): 32 × (2 × leaves − 1) bytes."""
        return b"".join(self._nodes)

    @classmethod
    def from_bytes(cls, blob: bytes) -> MerkleTree:
        """A tree saved by `to_bytes`, without hashing anything again. ValueError when `blob` cannot be one.

        Only its shape is checked: the caller compares `root` with the root it expects, and a proof from a
        damaged file fails verification against that root (`verify_proof`, or on-chain)."""
        if len(blob) % HASH_BYTES or (len(blob) // HASH_BYTES) % 2 == 0:
            raise ValueError(f"{len(blob)} bytes is not a saved Merkle tree (an odd number of 32-byte nodes)")
        nodes = [blob[i:i + HASH_BYTES] for i in range(0, len(blob), HASH_BYTES)]
        count = (len(nodes) + 1) // 2
        index_of_leaf = {nodes[i]: i for i in range(count - 1, len(nodes))}
        if len(index_of_leaf) != count:
            raise ValueError("a saved Merkle tree holds a leaf twice")
        return cls(nodes, index_of_leaf)

    @property
    def root(self) -> bytes:
        """The 32-byte root (for one id it is that id's leaf hash)."""
        return self._nodes[0]

    def __len__(self) -> int:
        """Number of leaves (contribution ids)."""
        return len(self._index_of_leaf)

    def __contains__(self, contribution_id: object) -> bool:
        if not isinstance(contribution_id, (bytes, bytearray)) or len(contribution_id) != HASH_BYTES:
            return False
        return leaf_hash(bytes(contribution_id)) in self._index_of_leaf

    def proof(self, contribution_id: bytes) -> list[bytes]:
        """Sibling hashes from the id's leaf up to the root (empty for a one-leaf tree).

        Raises ValueError when the id is not in the tree.
        """
        leaf = leaf_hash(contribution_id)
        index = self._index_of_leaf.get(leaf)
        if index is None:
            raise ValueError(f"contribution id 0x{bytes(contribution_id).hex()} is not in this Merkle tree")
        path: list[bytes] = []
        while index > 0:
            sibling = index + 1 if index % 2 == 1 else index - 1
            path.append(self._nodes[sibling])
            index = (index - 1) // 2
        return path

    def __repr__(self) -> str:
        return f"MerkleTree(leaves={len(self)}, root=0x{self.root.hex()})"


def verify_proof(root: bytes, contribution_id: bytes, proof: Sequence[bytes]) -> bool:
    """Whether `proof` leads from the id's leaf to `root` (what OpenZeppelin's MerkleProof.verify does).

    Raises ValueError only for malformed input (a root, id or proof element that is not 32 bytes).
    """
    node = leaf_hash(contribution_id)
    for n, sibling in enumerate(proof):
        node = _hash_pair(node, _check_hash(sibling, f"proof element #{n}"))
    return node == _check_hash(root, "root")
