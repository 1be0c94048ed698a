"""Ledger: datanet registry, adapter registry, journal, settlement and the chain client."""
