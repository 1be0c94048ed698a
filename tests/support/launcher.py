"""Start and stop a `gateway up` process, as a user would (used by the tests and the benchmarks).

Its output goes to a log file (owner-only, `<state>/gateway.log` by default). That is not a terminal,
so `gateway up` never prints the local admin key there: it names `<state>/local-api-key` instead.
Waiting for it to answer is `gateway.readiness`'s, as for the supervisor.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from gateway.ledger_process import open_private_log
from gateway.readiness import READY_TIMEOUT_SECONDS, wait_until_gateway_ready
from statedir.layout import StateLayout
from tests.support.ports import free_port

STOP_TIMEOUT_SECONDS = 60.0


def interrupt_and_wait(process: subprocess.Popen, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
    """SIGINT a server started with its own session; SIGKILL its group if it has not exited in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@dataclass
class GatewayProcess:
    state_dir: Path
    http_port: int
    grpc_port: int = 9000
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    extra_args: tuple[str, ...] = ()  # more options of `gateway up`
    process: subprocess.Popen | None = None
    portal_port: int = field(default_factory=free_port)  # its contributor portal (GATEWAY_PORTAL_PORT)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def portal_url(self) -> str:
        return f"http://127.0.0.1:{self.portal_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def api_key(self) -> str | None:
        """The local admin key `gateway up` wrote at its first start (None with auth off)."""
        path = StateLayout(self.state_dir).local_api_key
        return path.read_text().strip() if path.exists() else None

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers that authenticate as the local key."""
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def grpc_channel(self, key: str | None = None) -> Any:
        """A gRPC channel to the gateway whose calls carry `key` (default: the local key)."""
        key = key or self.api_key
        channel = grpc.insecure_channel(self.grpc_target)
        return grpc.intercept_channel(channel, BearerMetadata(key)) if key else channel

    def grpc_aio_channel(self, key: str | None = None) -> Any:
        key = key or self.api_key
        return grpc.aio.insecure_channel(self.grpc_target, interceptors=aio_bearer_interceptors(key) if key else None)

    def start(self, timeout: float = READY_TIMEOUT_SECONDS) -> "GatewayProcess":
        gateway = Path(sys.executable).with_name("gateway")
        log_path = self.log_path or StateLayout(self.state_dir).gateway_log
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._log = open_private_log(log_path)
        env = {**os.environ, "GATEWAY_PORTAL_PORT": str(self.portal_port), **self.env}
        self.process = subprocess.Popen(
            [str(gateway), "--state-dir", str(self.state_dir), "up", "--http-port", str(self.http_port),
             "--grpc-port", str(self.grpc_port), *self.extra_args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        process = self.process

        def alive() -> None:
            if process.poll() is not None:
                raise RuntimeError(f"gateway exited with {process.returncode}; see {log_path}")

        try:
            wait_until_gateway_ready(self.base_url, self.grpc_target, timeout, alive)
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self) -> int | None:
        """Ctrl-C the gateway and wait for its clean shutdown (kill the group if it hangs)."""
        if self.process is None:
            return None
        interrupt_and_wait(self.process)
        self._log.close()
        return self.process.returncode


def _with_bearer(details: Any, key: str) -> Any:
    return details._replace(metadata=[*(details.metadata or ()), ("authorization", f"Bearer {key}")])


class BearerMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <key>` to every unary and server-streaming call of a channel."""

    def __init__(self, key: str) -> None:
        self.key = key

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_with_bearer(details, self.key), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_with_bearer(details, self.key), request)


class _AioBearerUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, key: str) -> None:
        self.key = key

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_bearer(details, self.key), request)


class _AioBearerStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, key: str) -> None:
        self.key = key

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_bearer(details, self.key), request)


def aio_bearer_interceptors(key: str) -> list[Any]:
    """The same for a `grpc.aio` channel."""
    return [_AioBearerUnary(key), _AioBearerStream(key)]
