"""Every dashboard panel's PromQL returns data from a real Prometheus scraping the running stack.

Grafana cannot be installed here, so this is the proof that the dashboards work: a Prometheus
server (Debian's package, on loopback) is given the generated configuration for the session's state
directory, scrapes the gateway's supervisor, its engine replica and the ledger service while a
little traffic of every kind goes through (HTTP and gRPC, streaming or not, several adapters, an
unknown model), and then each panel's query must return at least one series. A panel naming a
metric that no process exports returns nothing, and fails.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from gateway.ledger_process import LedgerProcess
from monitoring.build import prometheus_config, render_yaml
from monitoring.dashboards import JOBS, panel_queries
from serving.config import TINY_MODEL
from statedir.layout import StateLayout
from tests.conftest import free_port
from tests.support.launcher import GatewayProcess
from tests.support.prometheus import PrometheusServer
from wire.inference.v1 import inference_pb2 as pb
from wire.inference.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.stack
SCRAPE_INTERVAL_SECONDS = 1
WAIT_SECONDS = 60


@pytest.fixture(scope="module")
def prometheus(gateway: GatewayProcess, ledger_service: LedgerProcess, demo_state: Path) -> Iterator[PrometheusServer]:
    config = prometheus_config(str(StateLayout(demo_state).monitoring_targets),
                               scrape_interval=f"{SCRAPE_INTERVAL_SECONDS}s")
    server = PrometheusServer(render_yaml(config), free_port()).start()
    yield server
    server.stop()


def some_traffic(client: openai.OpenAI, gateway: GatewayProcess) -> None:
    """Requests of every kind the dashboards break down: both HTTP APIs, gRPC, streams, errors."""
    adapters = [m.id for m in client.models.list().data if m.id != TINY_MODEL][:3]
    for model in [TINY_MODEL, *adapters]:
        client.completions.create(model=model, prompt="The river", max_tokens=8, temperature=0)
        for _ in client.completions.create(model=model, prompt="A quiet", max_tokens=8, stream=True):
            pass
    client.chat.completions.create(model=adapters[0], messages=[{"role": "user", "content": "hi"}], max_tokens=6)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    with gateway.grpc_channel() as channel:
        stub = pb_grpc.InferenceStub(channel)
        for _ in stub.GenerateStream(pb.GenerateRequest(model=adapters[0], prompt="Once", max_tokens=6)):
            pass


def wait_for(prometheus: PrometheusServer, expr: str, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not prometheus.query(expr):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {WAIT_SECONDS} s ({expr} is empty)")
        time.sleep(SCRAPE_INTERVAL_SECONDS)


def test_every_process_is_a_target_that_prometheus_scrapes(prometheus: PrometheusServer, demo_state: Path) -> None:
    announced = sorted(p.name for p in StateLayout(demo_state).monitoring_targets.glob("*.json"))
    assert "gateway.json" in announced
    assert any(name.startswith("engine-") for name in announced)
    assert any(name.startswith("ledger-") for name in announced)
    for job in JOBS:
        wait_for(prometheus, f'up{{job="{job}"}} == 1', f"Prometheus did not scrape job {job}")
    for name in announced:  # each announcement is a valid file_sd group naming a loopback target
        [group] = json.loads((StateLayout(demo_state).monitoring_targets / name).read_text())
        assert [t.split(":")[0] for t in group["targets"]] == ["127.0.0.1"]


def test_every_panel_query_returns_data(prometheus: PrometheusServer, client: openai.OpenAI,
                                        gateway: GatewayProcess) -> None:
    for job in JOBS:
        wait_for(prometheus, f'up{{job="{job}"}} == 1', f"Prometheus did not scrape job {job}")
    some_traffic(client, gateway)
    # The traffic's last series are scraped, and every rate() window holds two samples of them.
    wait_for(prometheus, 'gateway_requests_total{status="404"}', "the 404 was not scraped")
    wait_for(prometheus, 'gateway_requests_total{api="grpc"}', "the gRPC request was not scraped")
    time.sleep(3 * SCRAPE_INTERVAL_SECONDS)

    queries = panel_queries()
    assert len({uid for uid, _, _ in queries}) == 4
    empty = []
    for uid, title, expr in queries:
        try:
            result = prometheus.query(expr)
        except ValueError as error:  # Prometheus refused the query: a PromQL error in the panel
            empty.append(f"{uid} / {title}: {expr} -> {error}")
            continue
        if not result:
            empty.append(f"{uid} / {title}: {expr} -> no data")
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_a_panel_whose_metric_does_not_exist_gets_no_data(prometheus: PrometheusServer) -> None:
    """The check above can fail: a misspelt metric returns nothing, and a broken query is refused."""
    wait_for(prometheus, "gateway_requests_total", "no request was scraped")
    assert prometheus.query("sum(rate(gateway_request_total[1m]))") == []
    with pytest.raises(ValueError, match="bad_data"):
        prometheus.query("sum(rate(gateway_requests_total[1m])")
