"""Waiting for a started gateway to answer: HTTP `/health` and gRPC health (the supervisor of `gateway up`,
and the tests and benchmarks that start one)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

READY_TIMEOUT_SECONDS = 600.0
POLL_SECONDS = 0.5


def wait_until_healthy(url: str, timeout: float, still_waiting: Callable[[], None] = lambda: None) -> None:
    """Poll `url` until it answers 200. `still_waiting` may raise to give up early (process died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        still_waiting()
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(POLL_SECONDS)
    raise TimeoutError(f"{url} did not become healthy in {timeout:.0f} s")


def wait_until_grpc_serving(target: str, timeout: float, still_waiting: Callable[[], None] = lambda: None) -> None:
    """Poll gRPC health on `target` until the server reports SERVING (`still_waiting` as above)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            still_waiting()
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(POLL_SECONDS)
    raise TimeoutError(f"gRPC on {target} did not report SERVING in {timeout:.0f} s")


def wait_until_gateway_ready(http_base: str, grpc_target: str, timeout: float,
                             still_waiting: Callable[[], None] = lambda: None) -> None:
    """Both front doors answer: HTTP `/health` is 200 and gRPC health is SERVING."""
    deadline = time.monotonic() + timeout
    wait_until_healthy(f"{http_base}/health", timeout, still_waiting)
    wait_until_grpc_serving(grpc_target, max(deadline - time.monotonic(), POLL_SECONDS), still_waiting)
