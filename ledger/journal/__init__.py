"""The double-entry journal: ingest of traces, the exact fee split, balances and statements."""
