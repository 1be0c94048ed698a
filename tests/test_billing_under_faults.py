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
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from gateway.readiness import wait_until_healthy
from ledger.journal.journal import Journal
from storage.database import database_url, open_database
from tests.conftest import free_port
from tests.support.client_load import PHASE_TIMEOUT_SECONDS, Load, reconcile
from tests.support.launcher import GatewayProcess

ADAPTER = "demo-adapter-000"
OWNER = "0x" + "0b" * 20
PRICE = 10**15
MAX_TOKENS = 12
COMPLETE_PER_PHASE = 8
RECONCILE_TIMEOUT_SECONDS = 180.0
ATTRIBUTION_DELAY_SECONDS = 0.5


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
    with Load(stack, ADAPTER, MAX_TOKENS) as load:
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
    try:
        records = reconcile(engine, received, RECONCILE_TIMEOUT_SECONDS)
        fees, recovered = 0, 0
        for response, record in zip(received, records, strict=True):
            assert record.fee == PRICE * (response.prompt_tokens + response.completion_tokens) // 1000 > 0
            assert len(record.trace.choices) == (2 if response.kind == "unary-chat-n2" else 1), \
                "every choice is billed and attributed"
            fees += record.fee
            recovered += record.trace.recovered
        assert Journal(engine).totals().fees >= fees
        assert recovered > 0, "the replica was killed with responses delivered but not attributed: their " \
                              "traces come from the usage records, attributed again by the new replica"
    finally:
        engine.dispose()
    assert not (stack.state_dir / "outbox" / "rejected").exists() or \
        not list((stack.state_dir / "outbox" / "rejected").iterdir())
    print(f"{len(received)} responses received completely ({load.failures} requests failed during the kills); "
          f"all billed once, {recovered} of them from usage records the killed replica left")
