// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title Batch payout settler
/// @notice Pays rewards accrued in the ledger to contributors and adapter owners, one batch per
/// transaction, from the ERC-20 tokens the settler holds (the treasury: the operator funds it by
/// transferring tokens to the settler's address).
/// @dev Guarantees: a batch id settles at most once, and a batch pays either every payee exactly
/// its amount or nobody (any failure reverts the whole transaction); only the operator settles;
/// each settled batch emits exactly one {BatchSettled}, whose `total` is the sum of the amounts
/// paid. The token emits its own `Transfer` event per payee. A payee listed twice is paid twice:
/// the ledger aggregates per payee before it builds a batch.
interface IPayoutSettler {
    /// @notice Batch `batchId` paid `count` payees `total` base units; `manifestHash` commits to
    /// the off-chain manifest (payees, amounts and the ledger entries they settle).
    event BatchSettled(bytes32 indexed batchId, bytes32 manifestHash, uint256 count, uint256 total);

    /// @notice The token address given to the constructor is zero.
    error TokenIsZero();
    /// @notice Batch ids are caller-chosen and never zero.
    error BatchIdIsZero();
    /// @notice The batch is settled already; a batch id pays at most once.
    error BatchAlreadySettled(bytes32 batchId);
    /// @notice A batch pays at least one payee.
    error NoPayees();
    /// @notice `payees` and `amounts` have different lengths.
    error LengthMismatch(uint256 payees, uint256 amounts);
    /// @notice The payee at `index` is the zero address.
    error PayeeIsZero(uint256 index);
    /// @notice The amount at `index` is zero.
    error AmountIsZero(uint256 index);
    /// @notice The settler holds `available` base units, fewer than the batch's `required` total.
    error InsufficientTreasury(uint256 available, uint256 required);
    /// @notice The token refused the transfer to the payee at `index` by returning false (a token
    /// that reverts has its own error bubbled up instead).
    error TransferFailed(uint256 index);

    /// @notice Pays `amounts[i]` base units of {token} to `payees[i]` for every i. Operator only.
    /// @param batchId Caller-chosen idempotency key of the batch (never zero, settles once).
    /// @param manifestHash Hash of the off-chain manifest of the batch, recorded in the event.
    /// @param payees Recipients, none zero.
    /// @param amounts Base units per recipient, none zero, same length as `payees`.
    function settle(bytes32 batchId, bytes32 manifestHash, address[] calldata payees, uint256[] calldata amounts)
        external;

    /// @notice Whether `batchId` is settled.
    function settled(bytes32 batchId) external view returns (bool);

    /// @notice The ERC-20 the settler pays in.
    function token() external view returns (address);
}
