"""Client threads that keep a gateway busy with every kind of request and record what they received completely.

What counts as received completely: a unary body (HTTP 200 or a gRPC reply), a stream's usage chunk
(the SDK's `include_usage`: it follows the finishing chunk, which the gateway sends only once the
response's usage record is durable), a gRPC stream's final message (it carries the usage). The fault
tests reconcile these with what the ledger holds.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import grpc
import openai
from sqlalchemy.engine import Engine
from sqlmodel import Session, func, select

from ledger.journal.journal import Journal, TraceRecord
from ledger.models import JournalEntry

from tests.support.launcher import GatewayProcess
from wire.inference.v1 import inference_pb2 as pb
from wire.inference.v1 import inference_pb2_grpc as pb_grpc

PHASE_TIMEOUT_SECONDS = 240.0


@dataclass(frozen=True)
class Received:
    trace_id: str
    prompt_tokens: int
    completion_tokens: int
    kind: str


class Load:
    """Client threads that keep sending requests and record every response they received completely."""

    def __init__(self, gateway: GatewayProcess, adapter: str, max_tokens: int = 12) -> None:
        self.gateway = gateway
        self.adapter = adapter
        self.max_tokens = max_tokens
        self.received: list[Received] = []
        self.failures = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        kinds = [self._unary, self._unary_chat, self._stream, self._stream_chat, self._grpc_stream, self._grpc_unary]
        self._threads = [threading.Thread(target=self._loop, args=(kind,), daemon=True) for kind in kinds]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=150)

    def count(self) -> int:
        with self._lock:
            return len(self.received)

    def wait_for(self, more: int, timeout: float = PHASE_TIMEOUT_SECONDS) -> None:
        target = self.count() + more
        deadline = time.monotonic() + timeout
        while self.count() < target:
            assert time.monotonic() < deadline, f"only {self.count()} of {target} responses in {timeout:.0f} s"
            time.sleep(0.2)

    def _loop(self, kind: object) -> None:
        sdk = openai.OpenAI(base_url=f"{self.gateway.base_url}/v1", api_key=self.gateway.api_key, max_retries=0,
                            timeout=60)
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                got = kind(sdk, n)  # type: ignore[operator]
            except (openai.APIError, grpc.RpcError):
                got = None
            with self._lock:
                if got is None:
                    self.failures += 1
                else:
                    self.received.append(got)
            if got is None:
                time.sleep(0.5)

    def _unary(self, sdk: openai.OpenAI, n: int) -> Received:
        body = sdk.completions.create(model=self.adapter, prompt=f"Unary request {n}:", max_tokens=self.max_tokens)
        return Received(body.id, body.usage.prompt_tokens, body.usage.completion_tokens, "unary")

    def _unary_chat(self, sdk: openai.OpenAI, n: int) -> Received:
        body = sdk.chat.completions.create(model=self.adapter, messages=[{"role": "user", "content": f"Chat {n}"}],
                                           max_tokens=self.max_tokens, n=2)
        return Received(body.id, body.usage.prompt_tokens, body.usage.completion_tokens, "unary-chat-n2")

    def _stream(self, sdk: openai.OpenAI, n: int) -> Received | None:
        stream = sdk.completions.create(model=self.adapter, prompt=f"Streamed request {n}:", max_tokens=self.max_tokens,
                                        stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.usage is not None:
                return Received(chunk.id, chunk.usage.prompt_tokens, chunk.usage.completion_tokens, "stream")
        return None  # the stream ended without its usage chunk: not received completely

    def _stream_chat(self, sdk: openai.OpenAI, n: int) -> Received | None:
        stream = sdk.chat.completions.create(model=self.adapter, messages=[{"role": "user", "content": f"Stream {n}"}],
                                             max_tokens=self.max_tokens, stream=True,
                                             stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.usage is not None:
                return Received(chunk.id, chunk.usage.prompt_tokens, chunk.usage.completion_tokens, "stream-chat")
        return None

    def _grpc_stream(self, _: openai.OpenAI, n: int) -> Received | None:
        with self.gateway.grpc_channel() as channel:
            request = pb.GenerateRequest(model=self.adapter, prompt=f"gRPC stream {n}:", max_tokens=self.max_tokens)
            for message in pb_grpc.InferenceStub(channel).GenerateStream(request, timeout=60):
                if message.HasField("usage"):
                    return Received(message.attribution_trace_id, message.usage.prompt_tokens,
                                    message.usage.completion_tokens, "grpc-stream")
        return None

    def _grpc_unary(self, _: openai.OpenAI, n: int) -> Received:
        with self.gateway.grpc_channel() as channel:
            reply = pb_grpc.InferenceStub(channel).Generate(
                pb.GenerateRequest(model=self.adapter, prompt=f"gRPC unary {n}:", max_tokens=self.max_tokens), timeout=60)
        return Received(reply.attribution_trace_id, reply.usage.prompt_tokens, reply.usage.completion_tokens,
                        "grpc-unary")


def reconcile(engine: Engine, received: list[Received], timeout: float) -> list[TraceRecord]:
    """Wait until the ledger (database `engine`) holds a trace of every response received, then check each
    was billed exactly once for the tokens the client saw, with the journal balanced; the records in order."""
    journal = Journal(engine)
    assert len({r.trace_id for r in received}) == len(received), "every response has its own trace id"
    deadline = time.monotonic() + timeout
    missing = [r for r in received if journal.trace(r.trace_id) is None]
    while missing and time.monotonic() < deadline:
        time.sleep(1)
        missing = [r for r in missing if journal.trace(r.trace_id) is None]
    assert not missing, f"{len(missing)} of {len(received)} received responses never reached the ledger: {missing[:5]}"
    records = []
    for response in received:
        record = journal.trace(response.trace_id)
        assert record is not None
        seen = (response.prompt_tokens, response.completion_tokens)
        assert (record.trace.prompt_tokens, record.trace.completion_tokens) == seen, response
        records.append(record)
    with Session(engine) as session:
        refs = [r.trace_id for r in received]
        per_ref = dict(session.exec(select(JournalEntry.ref, func.count()).where(
            JournalEntry.ref.in_(refs)).group_by(JournalEntry.ref)).all())  # type: ignore[attr-defined]
    assert per_ref == {ref: 1 for ref in refs}, "one journal entry per response"
    totals = journal.totals()
    assert (totals.unbalanced_entries, totals.postings_sum, totals.conflicts) == (0, 0, 0)
    return records
