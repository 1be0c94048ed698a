"""Free loopback ports for the servers the tests start.

Ports come from 20000-32767: below the kernel's ephemeral range (32768 and up by default), where
every `bind(port 0)` lands, Ray's own servers included, and above Ray's worker ports (10002-19999).
A port handed out by the kernel and closed again could be taken by a Ray server before the test's
server binds it; one from this range can only be taken by another test that drew the same number.
"""

from __future__ import annotations

import random
import socket

LOW, HIGH = 20000, 32767
_given: set[int] = set()


def free_port() -> int:
    """A port no listener uses now and this process has not handed out before."""
    for _ in range(1000):
        port = random.randint(LOW, HIGH)
        if port in _given:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port in {LOW}-{HIGH}")


# Environment for a `gateway ledger serve` the tests start without a chain: its settler and deposit
# watcher are pointed at a port where nothing answers (so they wait), never at the default
# 127.0.0.1:8545, where a developer's own `make up` chain may run.
NO_CHAIN: dict[str, str] = {"GATEWAY_CHAIN_PORT": str(free_port())}
