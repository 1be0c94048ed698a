"""The shared database of the registry and the ledger: engines, exact money columns, locks and migrations."""
