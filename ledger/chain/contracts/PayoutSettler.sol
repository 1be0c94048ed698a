// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";

import {IPayoutSettler} from "./IPayoutSettler.sol";

/// @title PayoutSettler
/// @notice Operator-run batch payouts from the settler's own token balance; see {IPayoutSettler}.
/// @dev Gas per payee is dominated by the token's storage write for the payee's balance (22.1k for
/// a new holder, 5k for an existing one) and its `Transfer` log (~1.8k). The settler adds one
/// validation pass over the calldata and one `transfer` call per payee; the settler's own balance
/// slot in the token is warm after the first transfer. Payments go out after the batch is marked
/// settled, so a re-entrant token cannot replay a batch.
contract PayoutSettler is IPayoutSettler, Ownable {
    IERC20 private immutable _token;
    mapping(bytes32 batchId => bool) private _settled;

    /// @param token_ The ERC-20 paid out.
    /// @param operator The account allowed to settle (the owner).
    constructor(address token_, address operator) Ownable(operator) {
        if (token_ == address(0)) revert TokenIsZero();
        _token = IERC20(token_);
    }

    /// @inheritdoc IPayoutSettler
    function settle(bytes32 batchId, bytes32 manifestHash, address[] calldata payees, uint256[] calldata amounts)
        external
        onlyOwner
    {
        uint256 count = payees.length;
        if (batchId == bytes32(0)) revert BatchIdIsZero();
        if (_settled[batchId]) revert BatchAlreadySettled(batchId);
        if (count == 0) revert NoPayees();
        if (count != amounts.length) revert LengthMismatch(count, amounts.length);
        uint256 total = _checkedTotal(payees, amounts);
        uint256 available = _token.balanceOf(address(this));
        if (available < total) revert InsufficientTreasury(available, total);

        _settled[batchId] = true;
        emit BatchSettled(batchId, manifestHash, count, total);

        _payAll(address(_token), payees, amounts);
    }

    /// @dev The sum of `amounts`, after checking every element: {PayeeIsZero}, {AmountIsZero}, an
    /// address with dirty upper bits reverts (as Solidity's ABI decoder would), an overflowing sum
    /// panics (0x11). Assembly saves Solidity's per-element bounds checks (the lengths are equal).
    function _checkedTotal(address[] calldata payees, uint256[] calldata amounts) private pure returns (uint256 total) {
        assembly ("memory-safe") {
            let end := shl(5, payees.length)
            for { let offset := 0 } lt(offset, end) { offset := add(offset, 0x20) } {
                let payee := calldataload(add(payees.offset, offset))
                if iszero(payee) {
                    mstore(0x00, 0x53c081b8) // PayeeIsZero(uint256)
                    mstore(0x20, shr(5, offset))
                    revert(0x1c, 0x24)
                }
                if shr(160, payee) { revert(0x00, 0x00) }
                let amount := calldataload(add(amounts.offset, offset))
                if iszero(amount) {
                    mstore(0x00, 0x1a385ce0) // AmountIsZero(uint256)
                    mstore(0x20, shr(5, offset))
                    revert(0x1c, 0x24)
                }
                let sum := add(total, amount)
                if lt(sum, total) {
                    mstore(0x00, 0x4e487b71) // Panic(uint256)
                    mstore(0x20, 0x11)
                    revert(0x1c, 0x24)
                }
                total := sum
            }
        }
    }

    /// @dev `token.transfer(payees[i], amounts[i])` for every i, accepted as OpenZeppelin's SafeERC20
    /// accepts it (the call succeeds and returns true, or returns nothing from a contract; a token
    /// that returns false raises {TransferFailed}), in one assembly loop:
    /// the call data is built in scratch space once per payee, with no memory growth and no
    /// re-validation of the calldata (the checks loop in {settle} decoded every element already).
    /// A failing transfer bubbles the token's revert data.
    function _payAll(address token_, address[] calldata payees, uint256[] calldata amounts) private {
        assembly ("memory-safe") {
            let fmp := mload(0x40)
            let end := shl(5, payees.length)
            for { let offset := 0 } lt(offset, end) { offset := add(offset, 0x20) } {
                mstore(0x00, 0xa9059cbb00000000000000000000000000000000000000000000000000000000) // transfer(address,uint256)
                mstore(0x04, calldataload(add(payees.offset, offset)))
                mstore(0x24, calldataload(add(amounts.offset, offset)))
                let success := call(gas(), token_, 0, 0x00, 0x44, 0x00, 0x20)
                if iszero(and(success, eq(mload(0x00), 1))) {
                    if iszero(success) {
                        returndatacopy(fmp, 0x00, returndatasize())
                        revert(fmp, returndatasize())
                    }
                    if iszero(and(iszero(returndatasize()), gt(extcodesize(token_), 0))) {
                        mstore(0x00, 0xc39ba1a9) // TransferFailed(uint256)
                        mstore(0x20, shr(5, offset))
                        revert(0x1c, 0x24)
                    }
                }
            }
            mstore(0x40, fmp)
        }
    }

    /// @inheritdoc IPayoutSettler
    function settled(bytes32 batchId) external view returns (bool) {
        return _settled[batchId];
    }

    /// @inheritdoc IPayoutSettler
    function token() external view returns (address) {
        return address(_token);
    }
}
