"""Attribution traces on the wire (`gateway.ledger.v1.AttributionTrace`) and in canonical JSON.

The wire form is also how a trace is kept on a node's disk (the outbox and the trace files), so it
is converted once on its way: by the replica that stores it, and by the ledger that posts it.

The canonical JSON (sorted keys, no spaces, floats in Python's shortest round-trip form) is what a
trace's content hash is computed from, so the gateway's outbox, the wire and the ledger agree on
what "the same trace" means: doubles survive protobuf and JSON unchanged.
"""

from __future__ import annotations

import hashlib
import json

from google.protobuf.message import DecodeError

from ledger.client.trace import AttributionTrace, TokenAttribution
from wire.ledger.v1 import ledger_pb2


def canonical_json(trace: AttributionTrace) -> bytes:
    """The trace as canonical JSON bytes (shares as floats, so 1 and 1.0 hash alike)."""
    normalized = {
        **trace.to_dict(),
        "tokens": [{"token_id": t.token_id, "weights": [[cid, float(w)] for cid, w in t.weights],
                    "unattributed": float(t.unattributed)} for t in trace.tokens],
    }
    return json.dumps(normalized, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def content_sha256(trace: AttributionTrace, canonical: bytes | None = None) -> str:
    """SHA-256 (hex) of the canonical JSON (pass it when already computed)."""
    return hashlib.sha256(canonical if canonical is not None else canonical_json(trace)).hexdigest()


def trace_to_pb(trace: AttributionTrace) -> ledger_pb2.AttributionTrace:
    message = ledger_pb2.AttributionTrace(
        trace_id=trace.trace_id, model=trace.model, prompt_tokens=trace.prompt_tokens,
        completion_tokens=trace.completion_tokens, method=trace.method,
        tokens=[
            ledger_pb2.TokenAttribution(
                token_id=token.token_id, unattributed=token.unattributed,
                weights=[ledger_pb2.Weight(contribution_id=cid, weight=weight) for cid, weight in token.weights],
            )
            for token in trace.tokens
        ],
    )
    if trace.choice_tokens:
        message.choice_tokens.extend(trace.choice_tokens)
    if trace.recovered:
        message.recovered = True
    if trace.adapter is not None:
        message.adapter = trace.adapter
    if trace.requester is not None:
        message.requester = trace.requester
    return message


def trace_from_pb(message: ledger_pb2.AttributionTrace) -> AttributionTrace:
    """The trace a message carries; ValueError when it breaks a trace invariant (ledger/client/trace.py)."""
    return AttributionTrace(
        trace_id=message.trace_id, model=message.model,
        adapter=message.adapter if message.HasField("adapter") else None,
        requester=message.requester if message.HasField("requester") else None,
        prompt_tokens=message.prompt_tokens, completion_tokens=message.completion_tokens, method=message.method,
        tokens=tuple(
            TokenAttribution(token_id=token.token_id, unattributed=token.unattributed,
                             weights=tuple((w.contribution_id, w.weight) for w in token.weights))
            for token in message.tokens
        ),
        choice_tokens=tuple(message.choice_tokens), recovered=message.recovered,
    )


def trace_to_bytes(trace: AttributionTrace) -> bytes:
    """The wire form as bytes (deterministic), as the outbox and the trace files keep it."""
    return trace_to_pb(trace).SerializeToString(deterministic=True)


def trace_from_bytes(data: bytes) -> AttributionTrace:
    """The trace in `data` (ValueError when it is not a valid wire-form trace)."""
    try:
        message = ledger_pb2.AttributionTrace.FromString(data)
    except DecodeError as error:
        raise ValueError(f"not a wire-form trace: {error}") from None
    return trace_from_pb(message)
