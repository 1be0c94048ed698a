"""Start and stop a `gateway up` process, as a user would (used by the tests and the benchmarks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

READY_TIMEOUT_SECONDS = 600.0
STOP_TIMEOUT_SECONDS = 60.0


@dataclass
class GatewayProcess:
    state_dir: Path
    http_port: int
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = READY_TIMEOUT_SECONDS) -> "GatewayProcess":
        gateway = Path(sys.executable).with_name("gateway")
        log_path = self.log_path or self.state_dir / "gateway.log"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        env = {**os.environ, **self.env}
        self.process = subprocess.Popen(
            [str(gateway), "--state-dir", str(self.state_dir), "up", "--http-port", str(self.http_port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}; see {log_path}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"gateway not healthy after {timeout:.0f} s; see {log_path}")

    def stop(self) -> int | None:
        """Ctrl-C the gateway and wait for its clean shutdown (kill the group if it hangs)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
        return self.process.returncode
