"""The ledger service as the gateway runs it: its Admin API and background work wired to the state
directory, and `gateway ledger serve` as a child process (started by `gateway up`, and by tests that stop it).

`ledger_answers` asks the standard gRPC health service (the one call the ledger answers without
its token), so a ledger someone else runs on the address (another `gateway up`, an operator's
service) is used as it is and left alone. Every other call needs the ledger's token: `token` is the
one this child requires (its GATEWAY_LEDGER_TOKEN, else its GATEWAY_LEDGER_TOKEN_FILE, else
`<state>/ledger-token`, which it writes at its first start).

The ledger process is the only writer of money state: besides its APIs it runs the periodic settler
(`periodic_settlement`, GATEWAY_SETTLE_*) and the deposit watcher (`deposit_watching`,
GATEWAY_DEPOSITS_*) on the chain of its settings (GATEWAY_CHAIN_*). Neither starts a local chain:
while the state directory's anvil does not answer they wait (`gateway up` starts it before the ledger).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import Engine

from gateway.cli_output import progress
from gateway.config import GatewayConfig
from gateway.ledger_access import rpc_answers, settlement_chain
from ledger.accounts.deposits import DepositWatcher
from ledger.admin_service import AdminServicer, Settlement, admin_servicer
from ledger.chain.config import ChainConfig
from ledger.chain.errors import ChainError
from ledger.client.config import LedgerClientConfig
from ledger.client.token import TOKEN_ENV, TOKEN_FILE_ENV, bearer_metadata, check_token, read_ledger_token
from ledger.config import DepositConfig, SettlementConfig
from serving.config import AccessConfig

START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0
ROUND_TIMEOUT_INTERVALS = 5  # a periodic round gives up (and is resumed by the next) after this many intervals
log = logging.getLogger(__name__)


def settlement(config: GatewayConfig, engine: Engine, settings: SettlementConfig) -> Settlement:
    """Settlement rounds on the ledger's database and the configured chain (`gateway.ledger_access`)."""
    return Settlement(engine, lambda: settlement_chain(config), settings, report=progress)


def admin_api(config: GatewayConfig, engine: Engine, rounds: Settlement) -> Callable[[grpc.Server], str]:
    """The Admin API for `ledger.service.start_server`: the local key in `<state>/local-api-key`, credited
    with GATEWAY_LOCAL_CREDIT."""
    return admin_servicer(AdminServicer(engine, local_key_path=config.layout.local_api_key,
                                        local_credit=AccessConfig().local_credit, settlement=rounds))


def chain_answers() -> bool:
    """True for a configured remote chain (its errors are retried), else when the local anvil answers."""
    chain = ChainConfig()
    return chain.rpc_url is not None or rpc_answers(f"http://127.0.0.1:{chain.port}")


@contextmanager
def periodic_settlement(rounds: Settlement) -> Iterator[None]:
    """A settlement round every GATEWAY_SETTLE_INTERVAL_SECONDS (payable balances >= the threshold are paid)."""
    settings = rounds.settings
    if not settings.periodic:
        yield
        return
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(settings.interval_seconds):
            if not chain_answers():
                log.info("settlement round skipped: the local chain does not answer")
                continue
            try:
                rounds.run_round(timeout_seconds=settings.interval_seconds * ROUND_TIMEOUT_INTERVALS)
            except (ChainError, OSError, ValueError) as error:
                log.warning("settlement round failed (%s); retrying in %.0f s", error, settings.interval_seconds)
            except Exception:
                log.exception("settlement round failed; retrying in %.0f s", settings.interval_seconds)

    threading.Thread(target=run, name="settler", daemon=True).start()
    progress(f"[ledger] settling payable balances >= {settings.threshold} base units every "
             f"{settings.interval_seconds:.0f} s ({settings.confirmations} confirmations)")
    try:
        yield
    finally:
        stop.set()


@contextmanager
def deposit_watching(config: GatewayConfig, engine: Engine, settings: DepositConfig) -> Iterator[None]:
    """Credit on-chain deposits (token transfers to the treasury) to their accounts, once each."""
    if not settings.watch or not AccessConfig().auth:
        yield
        return
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if not chain_answers():
                stop.wait(settings.interval_seconds)
                continue
            try:
                with settlement_chain(config) as chain:
                    watcher = DepositWatcher(engine, chain.client, chain.settler.token_address, chain.settler.address,
                                             settings.confirmations, start_block=settings.start_block, report=progress)
                    watcher.run(stop, settings.interval_seconds)
            except (ChainError, OSError, ValueError) as error:
                log.warning("deposit watching failed (%s); retrying in %.0f s", error, settings.interval_seconds)
                stop.wait(settings.interval_seconds)

    threading.Thread(target=watch, name="deposit-watcher", daemon=True).start()
    progress(f"[ledger] crediting deposits to the treasury after {settings.confirmations} confirmations")
    try:
        yield
    finally:
        stop.set()


def ledger_answers(target: str, timeout: float = 1.0) -> bool:
    """True when a ledger service reports SERVING on `target` (host:port)."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="gateway.ledger.v1.Ledger"), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


class LedgerProcess:
    """One `gateway ledger serve` child on host:port with the given state directory."""

    def __init__(self, state_dir: Path, host: str, port: int, *, env: dict[str, str] | None = None,
                 log_file: Path | None = None) -> None:
        self.state_dir = state_dir
        self.host = host
        self.port = port
        self.env = env or {}
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def token(self) -> str:
        """The token its calls need (LedgerTokenMissing before its first start)."""
        if self.env.get(TOKEN_ENV):
            return check_token(self.env[TOKEN_ENV], TOKEN_ENV)
        if self.env.get(TOKEN_FILE_ENV):
            return read_ledger_token(self.state_dir, LedgerClientConfig(token_file=Path(self.env[TOKEN_FILE_ENV])))
        return read_ledger_token(self.state_dir)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """gRPC call metadata with the token."""
        return bearer_metadata(self.token)

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> LedgerProcess:
        """Start it and wait until it answers; RuntimeError (with the log's tail) when it does not."""
        gateway = Path(sys.executable).with_name("gateway")
        output = open_private_log(self.log_file) if self.log_file else None
        try:
            self.process = subprocess.Popen(
                [str(gateway), "--state-dir", str(self.state_dir), "ledger", "serve", "--host", self.host,
                 "--port", str(self.port)],
                env={**os.environ, **self.env}, stdout=output, stderr=subprocess.STDOUT if output else None,
                start_new_session=True,
            )
        finally:
            if output:
                output.close()
        deadline = time.monotonic() + timeout
        while not ledger_answers(self.target):
            if self.process.poll() is not None:
                raise RuntimeError(f"the ledger service exited with {self.process.returncode}"
                                   + (f"; see {self.log_file}" if self.log_file else ""))
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the ledger service did not answer on {self.target} in {timeout:.0f} s")
            time.sleep(0.2)
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, *, kill: bool = False) -> int | None:
        """SIGTERM (or SIGKILL) it and wait; the exit code, None if it was never started."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def open_private_log(path: Path) -> Any:
    """`path` opened for appending, created readable by its owner only."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
