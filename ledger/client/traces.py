"""Stored traces read back from the ledger (`gateway.ledger.v1.Ledger.GetTrace`), behind the ledger token.

The ledger ends up holding every trace the gateway served, whichever node served it: engine replicas
answer `GET /v1/attributions/{id}` from here when their node has no copy of the trace. A thin view of
`LedgerReads.trace_record` that keeps only the trace.
"""

from __future__ import annotations

from ledger.client.access import RPC_TIMEOUT_SECONDS
from ledger.client.reads import LedgerReads
from ledger.client.trace import AttributionTrace


class LedgerTraces:
    """Traces by id from the ledger at `target` (one channel, thread-safe)."""

    def __init__(self, target: str, token: str, *, timeout: float = RPC_TIMEOUT_SECONDS) -> None:
        self.target = target
        self._reads = LedgerReads(target, token, timeout=timeout)

    def get(self, trace_id: str) -> AttributionTrace | None:
        """The stored trace, or None when the ledger holds none by that id; LedgerUnavailable when it did not answer."""
        record = self._reads.trace_record(trace_id)
        return record.trace if record is not None else None

    def close(self) -> None:
        self._reads.close()
