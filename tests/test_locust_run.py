"""A short Locust run of loadtests/ against the session gateway, as `make loadtest` runs it (headless, the
ramp shape, CSV and HTML reports): all four users run, nothing fails, every entry is measured.

Locust runs in a subprocess: it monkey-patches the standard library with gevent on import, which must
not happen inside pytest (so neither loadtests/locustfile.py nor ramp_shape.py is imported here).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.locust_report import ITL, REQUEST, TTFT, read_entries, render, summary
from tests.support.launcher import GatewayProcess

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parents[1]
LOCUST = Path(sys.executable).with_name("locust")
RUN_TIMEOUT_SECONDS = 300  # the run itself is ~20 s; cold adapters load on first use
RAMP = {  # 2, then 4 users (one of each kind) over 2 s, held 12 s
    "LOADTEST_PEAK_USERS": "4",
    "LOADTEST_RAMP_SECONDS": "2",
    "LOADTEST_RAMP_STEPS": "2",
    "LOADTEST_HOLD_SECONDS": "12",
    "LOADTEST_SPAWN_RATE": "4",
}
EXPECTED_ENTRIES = [
    ("openai-stream", REQUEST), ("openai-stream", TTFT), ("openai-stream", ITL),
    ("openai", REQUEST),
    ("openai-chat-stream", REQUEST), ("openai-chat-stream", TTFT), ("openai-chat-stream", ITL),
    ("grpc-stream", REQUEST), ("grpc-stream", TTFT), ("grpc-stream", ITL),
]


def test_a_short_ramp_of_every_user_has_no_failures(gateway: GatewayProcess, tmp_path: Path) -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("LOADTEST_")}
    env |= RAMP | {"LOADTEST_GRPC_TARGET": gateway.grpc_target, "LOADTEST_MAX_TOKENS": "16",
                   "LOADTEST_API_KEY": gateway.api_key or "unused"}
    run = subprocess.run(
        [str(LOCUST), "-f", "loadtests/locustfile.py,loadtests/ramp_shape.py", "--headless", "--only-summary",
         "--host", gateway.base_url, "--csv", str(tmp_path / "locust"), "--html", str(tmp_path / "report.html")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS,
    )
    assert run.returncode == 0, f"locust exited with {run.returncode}:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"

    entries = read_entries(tmp_path)
    failed = {key: entry.failures for key, entry in entries.items() if entry.failures}
    assert not failed, f"failures: {failed}\n{(tmp_path / 'locust_failures.csv').read_text()}"
    missing = [key for key in EXPECTED_ENTRIES if key not in entries or entries[key].requests == 0]
    assert not missing, f"entries without requests: {missing}\n{render(summary(tmp_path))}"
    for kind in ("openai-stream", "openai-chat-stream", "grpc-stream"):  # one TTFT per request (+1: a request cut short at the end)
        assert entries[(kind, TTFT)].requests <= entries[(kind, REQUEST)].requests + 1
    assert (tmp_path / "report.html").stat().st_size > 0
