// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title Datanet version registry
/// @notice Anchors, for every published version of a datanet, the Merkle root over the ids of the
/// contributions it holds, so that any contributor can prove inclusion against a root on-chain.
/// @dev Guarantees: a (datanetId, version) pair is anchored at most once and never changes after;
/// only the owner anchors; anchored roots are never zero. Leaves follow OpenZeppelin's
/// StandardMerkleTree convention: leaf = keccak256(bytes.concat(keccak256(abi.encode(contributionId)))),
/// inner nodes hash their two children in sorted order.
interface IDatanetRegistry {
    /// @notice What is recorded for an anchored version.
    /// @param merkleRoot Root over the version's contribution ids (zero when not anchored).
    /// @param contributionCount Number of leaves under the root.
    /// @param anchoredAt Timestamp of the block that anchored the version.
    struct AnchoredVersion {
        bytes32 merkleRoot;
        uint64 contributionCount;
        uint64 anchoredAt;
    }

    /// @notice A datanet version was anchored.
    event VersionAnchored(
        bytes32 indexed datanetId, uint64 indexed version, bytes32 merkleRoot, uint64 contributionCount
    );

    /// @notice Versions are numbered from 1.
    error VersionIsZero();
    /// @notice A zero root anchors nothing.
    error MerkleRootIsZero();
    /// @notice A version without contributions has no Merkle root.
    error NoContributions();
    /// @notice The version is anchored already (with `merkleRoot`); anchors never change.
    error VersionAlreadyAnchored(bytes32 datanetId, uint64 version, bytes32 merkleRoot);

    /// @notice Records the Merkle root of `version` of `datanetId`. Owner only.
    /// @param datanetId keccak256 of the datanet's id (UTF-8).
    /// @param version Version number, from 1.
    /// @param merkleRoot Root over the version's contribution ids.
    /// @param contributionCount Number of contributions under the root.
    function anchor(bytes32 datanetId, uint64 version, bytes32 merkleRoot, uint64 contributionCount) external;

    /// @notice The anchored root of a version, zero when the version is not anchored.
    function rootOf(bytes32 datanetId, uint64 version) external view returns (bytes32);

    /// @notice Root, contribution count and anchoring time of a version (all zero when not anchored).
    function anchoredVersion(bytes32 datanetId, uint64 version) external view returns (AnchoredVersion memory);

    /// @notice Whether `proof` shows that `contributionId` is in the anchored version.
    /// @return False when the version is not anchored or the proof does not lead to its root.
    function verify(bytes32 datanetId, uint64 version, bytes32 contributionId, bytes32[] calldata proof)
        external
        view
        returns (bool);
}
