"""A trace made ready for the journal in one pass: its canonical JSON and content hash, and its
weights summed exactly per contribution, without the trace's objects.

`prepare` takes an `AttributionTrace`; `prepare_message` takes the wire form and never builds one:
it reads each token once, checks the trace's invariants (ledger/client/trace.py), writes the
canonical JSON (ledger/client/trace_wire.py, byte for byte) and sums the weights. It accepts only
what it can check that way; any other message goes to the reference path (`trace_from_pb`, then
`prepare`), which raises the reference ValueError for a broken trace. So both paths accept the same
traces and give the same result (tests/ledger/test_prepared.py compares them).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from ledger.client.trace import SUM_TOLERANCE, AttributionTrace
from ledger.client.trace_wire import canonical_json, trace_from_pb
from ledger.journal.fee_split import FLOAT_EXPONENT_FLOOR, float_units
from wire.ledger.v1 import ledger_pb2

NO_TOKENS_UNATTRIBUTED = 1 << FLOAT_EXPONENT_FLOOR  # an empty completion is wholly unattributed (1.0)
_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode  # canonical_json's encoder, keys pre-sorted


@dataclass(frozen=True, slots=True)
class PreparedTrace:
    """What the journal needs of a trace. Weights are exact integers on one scale per trace (units
    of 2**-1074, divided by the largest power of two that divides them all: only ratios count)."""

    trace_id: str
    model: str
    adapter: str | None
    requester: str | None
    prompt_tokens: int
    completion_tokens: int
    recovered: bool
    sha: str  # SHA-256 of `body`: the trace's content hash
    body: str  # canonical JSON
    weights: dict[str, int]  # contribution id → summed weight (every id the trace names, zero weights too)
    unattributed: int  # summed unattributed share, on the weights' scale
    attributed_tokens: float  # AttributionTrace.attributed_fraction × completion_tokens


def prepare(trace: AttributionTrace) -> PreparedTrace:
    """The reference path: from a checked `AttributionTrace`."""
    body = canonical_json(trace)
    weights: dict[str, int] = {}
    for token in trace.tokens:
        for contribution_id, weight in token.weights:
            weights[contribution_id] = weights.get(contribution_id, 0) + float_units(weight)
    unattributed = (sum(float_units(token.unattributed) for token in trace.tokens) if trace.tokens
                    else NO_TOKENS_UNATTRIBUTED)
    weights, unattributed = _reduced(weights, unattributed)
    return PreparedTrace(trace.trace_id, trace.model, trace.adapter, trace.requester, trace.prompt_tokens,
                         trace.completion_tokens, trace.recovered, hashlib.sha256(body).hexdigest(), body.decode(),
                         weights, unattributed, trace.attributed_fraction * trace.completion_tokens)


def prepare_message(message: ledger_pb2.AttributionTrace) -> PreparedTrace:
    """From the wire form; ValueError when it is not a valid trace (the reference path's error)."""
    prepared = _prepare_checked(message)
    return prepared if prepared is not None else prepare(trace_from_pb(message))


def _prepare_checked(message: ledger_pb2.AttributionTrace) -> PreparedTrace | None:
    """One pass over the message; None when a check fails (the reference path then decides)."""
    completion_tokens = message.completion_tokens
    if not message.trace_id or len(message.tokens) != completion_tokens:
        return None
    choices = list(message.choice_tokens)
    if choices and sum(choices) != completion_tokens:
        return None
    inf, units = math.inf, float_units
    tokens: list[dict[str, object]] = []
    weights: dict[str, int] = {}
    unattributed_shares: list[float] = []
    for token in message.tokens:
        pairs = []
        total = 0.0
        for weight in token.weights:
            contribution_id, share = weight.contribution_id, weight.weight
            if not contribution_id or not 0.0 <= share < inf:
                return None
            total += share
            pairs.append((contribution_id, share))
            weights[contribution_id] = weights.get(contribution_id, 0) + units(share)
        if len(pairs) > 1 and len({contribution_id for contribution_id, _ in pairs}) != len(pairs):
            return None
        unattributed = token.unattributed
        if not 0.0 <= unattributed < inf or abs(total + unattributed - 1.0) > SUM_TOLERANCE:
            return None
        unattributed_shares.append(unattributed)
        tokens.append({"token_id": token.token_id, "unattributed": unattributed, "weights": pairs})
    adapter = message.adapter if message.HasField("adapter") else None
    requester = message.requester if message.HasField("requester") else None
    document: dict[str, object] = {"adapter": adapter}  # canonical_json's keys, in sorted order
    if len(choices) > 1:
        document["choice_tokens"] = choices
    document.update(completion_tokens=completion_tokens, method=message.method, model=message.model,
                    prompt_tokens=message.prompt_tokens)
    if message.recovered:
        document["recovered"] = True
    document.update(requester=requester, tokens=tokens, trace_id=message.trace_id)
    body = _encode(document)
    if completion_tokens:
        unattributed_total = sum(map(units, unattributed_shares))
        attributed_tokens = (1.0 - math.fsum(unattributed_shares) / completion_tokens) * completion_tokens
    else:
        unattributed_total, attributed_tokens = NO_TOKENS_UNATTRIBUTED, 0.0
    weights, unattributed_total = _reduced(weights, unattributed_total)
    return PreparedTrace(message.trace_id, message.model, adapter, requester, message.prompt_tokens, completion_tokens,
                         message.recovered, hashlib.sha256(body.encode()).hexdigest(), body, weights,
                         unattributed_total, attributed_tokens)


def _reduced(weights: dict[str, int], unattributed: int) -> tuple[dict[str, int], int]:
    """The same ratios with small integers: every value divided by the largest power of two dividing all."""
    common = unattributed
    for units in weights.values():
        common |= units
    shift = (common & -common).bit_length() - 1  # trailing zero bits shared by every value (-1 when all are 0)
    if shift <= 0:
        return weights, unattributed
    return {cid: units >> shift for cid, units in weights.items()}, unattributed >> shift
