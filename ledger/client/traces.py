"""Stored traces read back from the ledger (`gateway.ledger.v1.Ledger.GetTrace`), behind the ledger token.

The ledger ends up holding every trace the gateway served, whichever node served it: engine replicas
answer `GET /v1/attributions/{id}` from here when their node has no copy of the trace.
"""

from __future__ import annotations

import grpc

from ledger.client.access import RPC_TIMEOUT_SECONDS, LedgerUnavailable
from ledger.client.token import bearer_metadata
from ledger.client.trace import AttributionTrace
from ledger.client.trace_wire import trace_from_pb
from wire.ledger.v1 import ledger_pb2, ledger_pb2_grpc


class LedgerTraces:
    """Traces by id from the ledger at `target` (one channel, thread-safe)."""

    def __init__(self, target: str, token: str, *, timeout: float = RPC_TIMEOUT_SECONDS) -> None:
        self.target = target
        self._metadata = bearer_metadata(token)
        self._timeout = timeout
        self._channel = grpc.insecure_channel(target)
        self._stub = ledger_pb2_grpc.LedgerStub(self._channel)

    def get(self, trace_id: str) -> AttributionTrace | None:
        """The stored trace, or None when the ledger holds none by that id; LedgerUnavailable when it did not answer."""
        try:
            record = self._stub.GetTrace(ledger_pb2.GetTraceRequest(trace_id=trace_id), metadata=self._metadata,
                                         timeout=self._timeout)
        except grpc.RpcError as error:
            code = error.code()  # type: ignore[attr-defined]
            if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                return None
            raise LedgerUnavailable(f"the ledger at {self.target} did not answer GetTrace: "
                                    f"{code.name}: {error.details()}") from None  # type: ignore[attr-defined]
        return trace_from_pb(record.trace)

    def close(self) -> None:
        self._channel.close()
