"""Readiness of a gateway means both front doors answer, not just HTTP."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway.readiness import wait_until_grpc_serving
from tests.conftest import free_port


def test_waits_until_grpc_health_reports_serving() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    server.start()
    try:
        serving_at: list[float] = []

        def become_serving() -> None:
            time.sleep(1.0)
            serving_at.append(time.monotonic())
            servicer.set("", health_pb2.HealthCheckResponse.SERVING)

        threading.Thread(target=become_serving).start()
        wait_until_grpc_serving(f"127.0.0.1:{port}", timeout=10)
        assert serving_at and time.monotonic() >= serving_at[0]
    finally:
        server.stop(None)


def test_a_port_nobody_listens_on_times_out_with_the_target_named() -> None:
    target = f"127.0.0.1:{free_port()}"
    with pytest.raises(TimeoutError, match=f"gRPC on {target} did not report SERVING"):
        wait_until_grpc_serving(target, timeout=1.5)


def test_giving_up_early_is_the_callers_choice() -> None:
    def process_died() -> None:
        raise RuntimeError("gateway exited with 1")

    with pytest.raises(RuntimeError, match="exited"):
        wait_until_grpc_serving(f"127.0.0.1:{free_port()}", timeout=30, still_waiting=process_died)
