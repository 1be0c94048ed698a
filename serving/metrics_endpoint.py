"""Scrape endpoints: every process serves its Prometheus registry over HTTP and announces itself.

A process binds its configured port (or any free one when that is taken, or when it asks for 0)
and writes a file_sd target file into `<state>/monitoring/targets/`, which the generated
`prometheus.yml` watches: engine replicas come and go on ports nobody chose, and Prometheus still
finds them. The file is removed when the endpoint closes; a killed process leaves it behind and
Prometheus reports the target down (`up == 0`), which is what an operator should see.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.registry import CollectorRegistry

from statedir.layout import StateLayout

log = logging.getLogger(__name__)

WILDCARD_HOSTS = {"0.0.0.0", "::", ""}


def write_target_file(path: Path, address: str, labels: dict[str, str]) -> None:
    """One file_sd target group, written whole (rename) so Prometheus never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.write_text(json.dumps([{"targets": [address], "labels": labels}], indent=1) + "\n")
    os.replace(staging, path)


@dataclass
class MetricsEndpoint:
    """A running scrape endpoint and the target file that announces it."""

    host: str
    port: int
    target_file: Path | None
    _server: Any = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self.target_file is not None:
            self.target_file.unlink(missing_ok=True)


class _PlainTextHandler(BaseHTTPRequestHandler):
    """GET /metrics in Prometheus's text format, always. (prometheus-client's own server answers a
    scraper that asks for OpenMetrics with `vllm_*` sample names for vLLM's `vllm:*` metrics.)"""

    registry: CollectorRegistry = REGISTRY

    def do_GET(self) -> None:  # noqa: N802
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404, "only /metrics is served here")
            return
        body = generate_latest(self.registry)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        return None  # one line per scrape would drown the logs


def _start_server(host: str, port: int, registry: CollectorRegistry) -> ThreadingHTTPServer:
    handler = type("MetricsHandler", (_PlainTextHandler,), {"registry": registry})
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = type("MetricsServer", (ThreadingHTTPServer,), {"address_family": family})((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-endpoint", daemon=True).start()
    return server


def serve_metrics(host: str, port: int, *, state_dir: Path | None = None, target_name: str | None = None,
                  labels: dict[str, str] | None = None, registry: CollectorRegistry = REGISTRY) -> MetricsEndpoint:
    """Serve `registry` on host:port (a free port if that one is taken) and announce it as
    `<state>/monitoring/targets/<target_name>.json` when a state directory is given."""
    try:
        server = _start_server(host, port, registry)
    except OSError as exc:
        if port == 0:
            raise
        server = _start_server(host, 0, registry)
        log.warning("metrics port %d on %s is not available (%s); serving metrics on port %d instead",
                    port, host, exc.strerror or exc, server.server_address[1])
    actual = server.server_address[1]
    scrape_host = "127.0.0.1" if host in WILDCARD_HOSTS else host
    target_file = None
    if state_dir is not None and target_name is not None:
        target_file = StateLayout(state_dir).monitoring_targets / f"{target_name}.json"
        write_target_file(target_file, f"{scrape_host}:{actual}", labels or {})
    return MetricsEndpoint(scrape_host, actual, target_file, server)
