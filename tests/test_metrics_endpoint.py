"""A process's scrape endpoint: serves its registry, announces itself to Prometheus, cleans up."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from serving.metrics_endpoint import serve_metrics
from statedir.layout import StateLayout


def registry_with_a_counter() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("demo_events_total", "Events.", registry=registry).inc(3)
    return registry


def test_serves_the_registry_and_announces_then_withdraws_the_target(tmp_path: Path) -> None:
    endpoint = serve_metrics("127.0.0.1", 0, state_dir=tmp_path, target_name="engine-r1", labels={"replica": "r1"},
                             registry=registry_with_a_counter())
    try:
        with urllib.request.urlopen(endpoint.url, timeout=5) as response:
            assert "demo_events_total 3.0" in response.read().decode()
        announced = json.loads((StateLayout(tmp_path).monitoring_targets / "engine-r1.json").read_text())
        assert announced == [{"targets": [f"127.0.0.1:{endpoint.port}"], "labels": {"replica": "r1"}}]
    finally:
        endpoint.close()
    assert not (StateLayout(tmp_path).monitoring_targets / "engine-r1.json").exists()
    assert list(StateLayout(tmp_path).monitoring_targets.iterdir()) == [], "no staging file is left behind"


def test_a_taken_port_falls_back_to_a_free_one_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        endpoint = serve_metrics("127.0.0.1", port, state_dir=tmp_path, target_name="gateway",
                                 registry=registry_with_a_counter())
    try:
        assert endpoint.port != port
        assert f"metrics port {port} on 127.0.0.1 is not available" in caplog.text
        announced = json.loads((StateLayout(tmp_path).monitoring_targets / "gateway.json").read_text())
        assert announced[0]["targets"] == [f"127.0.0.1:{endpoint.port}"]
    finally:
        endpoint.close()


def test_a_wildcard_bind_is_announced_on_loopback(tmp_path: Path) -> None:
    endpoint = serve_metrics("0.0.0.0", 0, state_dir=tmp_path, target_name="ledger-1", registry=CollectorRegistry())
    try:
        assert json.loads((StateLayout(tmp_path).monitoring_targets / "ledger-1.json").read_text())[0]["targets"] == [
            f"127.0.0.1:{endpoint.port}"]
    finally:
        endpoint.close()


def test_the_text_format_is_served_even_to_a_scraper_asking_for_openmetrics() -> None:
    """Prometheus asks for OpenMetrics first; vLLM's `vllm:*` names must reach it unchanged."""
    registry = CollectorRegistry()
    Counter("vllm:demo_tokens", "Tokens.", registry=registry).inc(2)
    endpoint = serve_metrics("127.0.0.1", 0, registry=registry)
    try:
        request = urllib.request.Request(endpoint.url, headers={
            "Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.headers["Content-Type"].startswith("text/plain;")
            assert "vllm:demo_tokens_total 2.0" in response.read().decode()
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}/other", timeout=5)
    finally:
        endpoint.close()
    assert endpoint.target_file is None
