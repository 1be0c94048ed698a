"""Run `gateway ledger serve` as a child process: started by `gateway up`, and by tests that stop it.

`ledger_answers` asks the standard gRPC health service (the one call the ledger answers without
its token), so a ledger someone else runs on the address (another `gateway up`, an operator's
service) is used as it is and left alone. Every other call needs the ledger's token: `token` is the
one this child requires (its GATEWAY_LEDGER_TOKEN, else `<state>/ledger-token`, which it writes at
its first start).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ledger.client.token import TOKEN_ENV, bearer_metadata, check_token, read_ledger_token

START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0


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
