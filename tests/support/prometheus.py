"""A throw-away Prometheus server for the tests: loopback only, its own data directory, stopped after.

Debian's `prometheus` package provides the binary (`make test` installs it when missing); its
system service is not used.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.launcher import interrupt_and_wait

BINARY = "/usr/bin/prometheus"


class PrometheusServer:
    def __init__(self, config_text: str, port: int) -> None:
        if not Path(BINARY).exists():
            raise RuntimeError("Prometheus is not installed: run `make test` (it installs Debian's prometheus)")
        self.port = port
        self.base = Path(tempfile.mkdtemp(prefix="gateway-prometheus-"))
        self.config = self.base / "prometheus.yml"
        self.config.write_text(config_text)
        self.log_path = self.base / "prometheus.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> "PrometheusServer":
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [BINARY, f"--config.file={self.config}", f"--web.listen-address=127.0.0.1:{self.port}",
             f"--storage.tsdb.path={self.base / 'data'}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}: {self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus was not ready in {timeout:.0f} s; see {self.log_path}")
            time.sleep(0.2)

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the `data` of a successful answer (raises with Prometheus's error otherwise)."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:
            body = json.load(error)
        if body.get("status") != "success":
            raise ValueError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (or matrix/scalar rows)."""
        data = self.api("query", query=expr)
        result = data["result"]
        return result if data["resultType"] in ("vector", "matrix") else [{"value": result}]

    def stop(self) -> None:
        if self.process is not None:
            interrupt_and_wait(self.process)
            self._log.close()
        shutil.rmtree(self.base, ignore_errors=True)
