"""Payout batches from payable balances, and the crash-safe settler that pays them on-chain."""
