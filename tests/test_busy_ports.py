"""`gateway up` on a front-door port that is taken: a clear one-line error at once, nothing started or written."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.ports import free_port


@pytest.mark.parametrize("door", ["http", "grpc"])
def test_a_taken_front_door_port_is_refused_before_anything_starts(door: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    ports = {"http": free_port(), "grpc": free_port()}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[door]))
        taken.listen()
        result = subprocess.run(
            [str(Path(sys.executable).with_name("gateway")), "--state-dir", str(state), "up",
             "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"])],
            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    name = {"http": "HTTP", "grpc": "gRPC"}[door]
    assert f"the {name} port 127.0.0.1:{ports[door]} is not free" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not state.exists(), "nothing was built or started"
