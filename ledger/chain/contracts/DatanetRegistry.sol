// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";

import {IDatanetRegistry} from "./IDatanetRegistry.sol";

/// @title DatanetRegistry
/// @notice Owner-operated registry of datanet version roots; see {IDatanetRegistry}.
/// @dev Re-anchoring reverts instead of succeeding quietly: the gateway handles idempotency
/// off-chain by reading {rootOf} before it sends {anchor}.
contract DatanetRegistry is IDatanetRegistry, Ownable {
    mapping(bytes32 datanetId => mapping(uint64 version => AnchoredVersion)) private _versions;

    /// @param initialOwner The operator account allowed to anchor.
    constructor(address initialOwner) Ownable(initialOwner) {}

    /// @inheritdoc IDatanetRegistry
    function anchor(bytes32 datanetId, uint64 version, bytes32 merkleRoot, uint64 contributionCount)
        external
        onlyOwner
    {
        if (version == 0) revert VersionIsZero();
        if (merkleRoot == bytes32(0)) revert MerkleRootIsZero();
        if (contributionCount == 0) revert NoContributions();
        bytes32 existing = _versions[datanetId][version].merkleRoot;
        if (existing != bytes32(0)) revert VersionAlreadyAnchored(datanetId, version, existing);

        _versions[datanetId][version] = AnchoredVersion({
            merkleRoot: merkleRoot,
            contributionCount: contributionCount,
            anchoredAt: uint64(block.timestamp)
        });
        emit VersionAnchored(datanetId, version, merkleRoot, contributionCount);
    }

    /// @inheritdoc IDatanetRegistry
    function rootOf(bytes32 datanetId, uint64 version) external view returns (bytes32) {
        return _versions[datanetId][version].merkleRoot;
    }

    /// @inheritdoc IDatanetRegistry
    function anchoredVersion(bytes32 datanetId, uint64 version) external view returns (AnchoredVersion memory) {
        return _versions[datanetId][version];
    }

    /// @inheritdoc IDatanetRegistry
    function verify(bytes32 datanetId, uint64 version, bytes32 contributionId, bytes32[] calldata proof)
        external
        view
        returns (bool)
    {
        bytes32 root = _versions[datanetId][version].merkleRoot;
        if (root == bytes32(0)) return false;
        bytes32 leaf = keccak256(bytes.concat(keccak256(abi.encode(contributionId))));
        return MerkleProof.verifyCalldata(proof, root, leaf);
    }
}
