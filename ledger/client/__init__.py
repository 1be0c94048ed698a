"""What other packages may use of the ledger: the trace contract (the trace, its wire and canonical forms),
the client's settings and the API's bearer token. Nothing here imports the rest of the ledger."""
