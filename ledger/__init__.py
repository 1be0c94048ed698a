"""Ledger: the gRPC service, journal and fee split, accounts and deposits, settlement and the chain client.

Other packages use only `ledger.client` (the trace contract, the client's settings and token)."""
