// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

/// @title PayoutToken
/// @notice The ERC-20 that rewards are paid in on the local chain ("Datanet Payout Token", DPT,
/// 18 decimals). Production points the settler at an existing token instead.
/// @dev Plain OpenZeppelin ERC20: one `Transfer` event per transfer, no batch entry point, so the
/// settler's gas figures measured against it hold for any standard ERC-20.
contract PayoutToken is ERC20, Ownable {
    /// @param initialOwner The account allowed to mint (the local operator).
    constructor(address initialOwner) ERC20("Datanet Payout Token", "DPT") Ownable(initialOwner) {}

    /// @notice Creates `amount` base units for `to`. Owner only.
    function mint(address to, uint256 amount) external onlyOwner {
        _mint(to, amount);
    }
}
