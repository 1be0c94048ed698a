"""The EVM side of the ledger: local anvil node, chain client and contract wrappers."""
