"""Every response a client received completely is billed exactly once, though the engine replica and
the ledger service are SIGKILLed under load.

A real stack (`gateway up`: Ray Serve, vLLM, the ledger service it supervises, anvil) serves a
priced adapter to streaming and non-streaming clients (the `openai` SDK over HTTP, a gRPC stream)
while the test kills the engine replica, waits for Serve to restart it, then kills the ledger
service, which `gateway up` restarts. Afterwards it reconciles what the *clients* received with
what the ledger holds.

What counts as received completely: a unary body (HTTP 200 or a gRPC reply), a stream's usage
chunk (the SDK's `include_usage`: it follows the finishing chunk, which the gateway sends only once
the response's usage record is durable), a gRPC stream's final message (it carries the usage).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import psutil
import pytest
from sqlmodel import Session, func, select

from gateway.readiness import wait_until_healthy
from ledger.journal.journal import Journal
from ledger.models import JournalEntry
from storage.database import database_url, open_database
from tests.conftest import free_port
from tests.support.launcher import GatewayProcess
from wire.inference.v1 import inference_pb2 as pb
from wire.inference.v1 import inference_pb2_grpc as pb_grpc

ADAPTER = "demo-adapter-000"
OWNER = "0x" + "0b" * 20
PRICE = 10**15
MAX_TOKENS = 12
COMPLETE_PER_PHASE = 8
PHASE_TIMEOUT_SECONDS = 240.0
RECONCILE_TIMEOUT_SECONDS = 180.0
ATTRIBUTION_DELAY_SECONDS = 0.5


@dataclass(frozen=True)
class Received:
    trace_id: str
    prompt_tokens: int
    completion_tokens: int
    kind: str


class Load:
    """Client threads that keep sending requests and record every response they received completely."""

    def __init__(self, gateway: GatewayProcess) -> None:
        self.gateway = gateway
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
        body = sdk.completions.create(model=ADAPTER, prompt=f"Unary request {n}:", max_tokens=MAX_TOKENS)
        return Received(body.id, body.usage.prompt_tokens, body.usage.completion_tokens, "unary")

    def _unary_chat(self, sdk: openai.OpenAI, n: int) -> Received:
        body = sdk.chat.completions.create(model=ADAPTER, messages=[{"role": "user", "content": f"Chat {n}"}],
                                           max_tokens=MAX_TOKENS, n=2)
        return Received(body.id, body.usage.prompt_tokens, body.usage.completion_tokens, "unary-chat-n2")

    def _stream(self, sdk: openai.OpenAI, n: int) -> Received | None:
        stream = sdk.completions.create(model=ADAPTER, prompt=f"Streamed request {n}:", max_tokens=MAX_TOKENS,
                                        stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.usage is not None:
                return Received(chunk.id, chunk.usage.prompt_tokens, chunk.usage.completion_tokens, "stream")
        return None  # the stream ended without its usage chunk: not received completely

    def _stream_chat(self, sdk: openai.OpenAI, n: int) -> Received | None:
        stream = sdk.chat.completions.create(model=ADAPTER, messages=[{"role": "user", "content": f"Stream {n}"}],
                                             max_tokens=MAX_TOKENS, stream=True,
                                             stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.usage is not None:
                return Received(chunk.id, chunk.usage.prompt_tokens, chunk.usage.completion_tokens, "stream-chat")
        return None

    def _grpc_stream(self, _: openai.OpenAI, n: int) -> Received | None:
        with self.gateway.grpc_channel() as channel:
            request = pb.GenerateRequest(model=ADAPTER, prompt=f"gRPC stream {n}:", max_tokens=MAX_TOKENS)
            for message in pb_grpc.InferenceStub(channel).GenerateStream(request, timeout=60):
                if message.HasField("usage"):
                    return Received(message.attribution_trace_id, message.usage.prompt_tokens,
                                    message.usage.completion_tokens, "grpc-stream")
        return None

    def _grpc_unary(self, _: openai.OpenAI, n: int) -> Received:
        with self.gateway.grpc_channel() as channel:
            reply = pb_grpc.InferenceStub(channel).Generate(
                pb.GenerateRequest(model=ADAPTER, prompt=f"gRPC unary {n}:", max_tokens=MAX_TOKENS), timeout=60)
        return Received(reply.attribution_trace_id, reply.usage.prompt_tokens, reply.usage.completion_tokens,
                        "grpc-unary")


@pytest.fixture(scope="module")
def stack(demo_state: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A stack of its own (the faults would disturb the shared one), with a priced adapter."""
    from registry.adapters import AdapterRegistry
    from registry.config import DatanetConfig
    from registry.datanets import DatanetRegistry

    state = tmp_path_factory.mktemp("faults")
    env = {"GATEWAY_BASE_MODEL_PATH": str(demo_state / "models" / "datanet-tiny-llama"),
           "GATEWAY_ADAPTER_STORE": str(demo_state / "adapters"), "GATEWAY_CHAIN_PORT": str(free_port()),
           "GATEWAY_LEDGER_PORT": str(free_port()), "GATEWAY_SETTLE_PERIODIC": "false",
           "GATEWAY_DEPOSITS_WATCH": "false",
           # Each attribution waits this long first, so the kill lands while some responses are
           # delivered but not yet attributed: their bills come back from the usage records.
           "GATEWAY_ATTRIBUTION_DELAY_SECONDS": str(ATTRIBUTION_DELAY_SECONDS)}
    process = GatewayProcess(state, free_port(), free_port(), env=env).start()
    engine = open_database(database_url(state))
    try:
        adapters = AdapterRegistry(engine, DatanetRegistry(engine, DatanetConfig()))
        adapters.register(ADAPTER, uri=f"file://{demo_state / 'adapters' / ADAPTER}", base_model="tiny",
                          owner=OWNER, price_per_1k_tokens=PRICE, lineage=[], source="registered")
    finally:
        engine.dispose()
    time.sleep(6)  # replicas and the ledger re-read adapter terms every 5 s
    yield process
    assert process.stop() == 0


def engine_replica(gateway: GatewayProcess) -> psutil.Process:
    """The engine replica's Ray worker (a descendant of this gateway's Ray node, itself a child of `gateway up`)."""
    found = [p for p in psutil.Process(gateway.process.pid).children(recursive=True)  # type: ignore[union-attr]
             if p.name().startswith("ray::ServeReplica:gateway:engine")]
    assert len(found) == 1, [p.name() for p in found]
    return found[0]


def ledger_service(gateway: GatewayProcess) -> psutil.Process:
    found = [p for p in psutil.Process(gateway.process.pid).children(recursive=True)  # type: ignore[union-attr]
             if {"ledger", "serve"} <= set(p.cmdline())]
    assert len(found) == 1
    return found[0]


def test_every_response_received_is_billed_exactly_once_through_kills(stack: GatewayProcess) -> None:
    with Load(stack) as load:
        load.wait_for(COMPLETE_PER_PHASE)
        replica = engine_replica(stack)
        os.kill(replica.pid, signal.SIGKILL)
        psutil.wait_procs([replica], timeout=30)
        wait_until_healthy(f"{stack.base_url}/health", PHASE_TIMEOUT_SECONDS)  # Serve started a new replica
        assert engine_replica(stack).pid != replica.pid
        load.wait_for(COMPLETE_PER_PHASE)
        ledger = ledger_service(stack)
        ledger.send_signal(signal.SIGKILL)
        psutil.wait_procs([ledger], timeout=30)
        load.wait_for(COMPLETE_PER_PHASE)
        restarted = ledger_service(stack)
        assert restarted.pid != ledger.pid, "gateway up restarted its ledger service"
    received = load.received
    kinds = {r.kind for r in received}
    assert kinds == {"unary", "unary-chat-n2", "stream", "stream-chat", "grpc-stream", "grpc-unary"}, kinds
    assert len({r.trace_id for r in received}) == len(received)

    engine = open_database(database_url(stack.state_dir))
    journal = Journal(engine)
    try:
        deadline = time.monotonic() + RECONCILE_TIMEOUT_SECONDS
        missing = [r for r in received if journal.trace(r.trace_id) is None]
        while missing and time.monotonic() < deadline:
            time.sleep(1)
            missing = [r for r in missing if journal.trace(r.trace_id) is None]
        assert not missing, f"{len(missing)} of {len(received)} received responses never reached the ledger: " \
                            f"{missing[:5]}"
        fees, recovered = 0, 0
        for response in received:
            record = journal.trace(response.trace_id)
            assert record is not None
            seen = (response.prompt_tokens, response.completion_tokens)
            assert (record.trace.prompt_tokens, record.trace.completion_tokens) == seen, response
            assert record.fee == PRICE * sum(seen) // 1000 > 0
            assert len(record.trace.choices) == (2 if response.kind == "unary-chat-n2" else 1), \
                "every choice is billed and attributed"
            fees += record.fee
            recovered += record.trace.recovered
        with Session(engine) as session:
            refs = [r.trace_id for r in received]
            per_ref = dict(session.exec(select(JournalEntry.ref, func.count()).where(
                JournalEntry.ref.in_(refs)).group_by(JournalEntry.ref)).all())  # type: ignore[attr-defined]
        assert per_ref == {ref: 1 for ref in refs}, "one journal entry per response"
        totals = journal.totals()
        assert (totals.unbalanced_entries, totals.postings_sum, totals.conflicts) == (0, 0, 0)
        assert totals.fees >= fees
        assert recovered > 0, "the replica was killed with responses delivered but not attributed: their " \
                              "traces come from the usage records, attributed again by the new replica"
    finally:
        engine.dispose()
    assert not (stack.state_dir / "outbox" / "rejected").exists() or \
        not list((stack.state_dir / "outbox" / "rejected").iterdir())
    print(f"{len(received)} responses received completely ({load.failures} requests failed during the kills); "
          f"all billed once, {recovered} of them from usage records the killed replica left")
