"""Solidity contracts of the ledger, their compiler script and the compiled artifacts."""
