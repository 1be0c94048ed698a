"""Ray nodes as separate processes on one machine: `ray start --head` and `ray start --address=…`.

Each node is a `ray start --block` child of the test (its own process group), so it is stopped with
its processes and never with `ray stop`, which would stop every Ray node of the user (the session
gateway's too). Nodes take distinct loopback addresses (127.0.0.2, 127.0.0.3, …): `ray start`
replaces exactly 127.0.0.1 with the host's address when clusters are enabled, and it refuses to join
a second node with the single-machine mode `gateway up` uses. Ray still binds its GCS and raylet
ports on every interface in this mode; its token authentication (on here, with a token file of the
test's own) is what guards them. Each node's environment is its own: a Ray worker inherits the
environment of its node's `ray start`, which is how a node gets its state directory and settings.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.support.ports import free_port

START_SECONDS = 90.0
STOP_SECONDS = 30.0


def ray_binary() -> str:
    """The venv's `ray` (beside this interpreter)."""
    import sys

    return str(Path(sys.executable).with_name("ray"))


@dataclass
class RayNode:
    """One node: `ip` (a loopback address), logical `num_cpus`, custom `resources`, its own `env`."""

    ip: str
    num_cpus: int
    resources: Mapping[str, float]
    env: Mapping[str, str]
    log_path: Path
    head_address: str | None = None  # host:port of the head's GCS; None: this node is the head
    cores: frozenset[int] | None = None  # pin the node's processes to these cores (a machine of its own)
    port: int = field(default_factory=free_port)  # the GCS port (head only)
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    def start(self) -> RayNode:
        command = [ray_binary(), "start", "--block", "--node-ip-address", self.ip, "--num-cpus", str(self.num_cpus),
                   "--resources", json.dumps(dict(self.resources)), "--disable-usage-stats"]
        if self.head_address is None:
            command += ["--head", "--port", str(self.port), "--include-dashboard", "false"]
        else:
            command += ["--address", self.head_address]
        with open(self.log_path, "ab") as log:
            # A stopped test node drains for 2 s at most (Ray's default, 30 s, waits for Serve's actors on the head).
            env = {**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "2", **self.env}
            cores = self.cores
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True,
                                            preexec_fn=None if cores is None else lambda: os.sched_setaffinity(0, cores))
        return self

    def raylet(self) -> psutil.Process:
        """This node's raylet process."""
        found = [p for p in self.processes() if p.name() == "raylet"]
        assert len(found) == 1, f"raylets of node {self.ip}: {found}"
        return found[0]

    def processes(self) -> list[psutil.Process]:
        """The node's processes now (raylet, agents, workers and what they started)."""
        assert self.process is not None
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        """SIGTERM to `ray start --block` (it stops its node), then SIGKILL to whatever is left."""
        if self.process is None:
            return
        left = self.processes()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        _, alive = psutil.wait_procs([p for p in left if p.is_running()], timeout=10)
        for process in alive:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)


NODE_COUNT = """
import sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + float(sys.argv[3])
while len([n for n in ray.nodes() if n["Alive"]]) < int(sys.argv[2]) and time.monotonic() < deadline:
    time.sleep(0.5)
print(len([n for n in ray.nodes() if n["Alive"]]))
"""


def wait_for_nodes(head: RayNode, expected: int, timeout: float = START_SECONDS) -> None:
    """Until the cluster of `head` counts `expected` live nodes (asked by a driver connected to it)."""
    import sys

    done = subprocess.run([sys.executable, "-c", NODE_COUNT, head.address, str(expected), str(timeout)],
                          env={**os.environ, **head.env}, capture_output=True, text=True, timeout=timeout + 60)
    alive = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "?"
    assert done.returncode == 0 and alive == str(expected), \
        f"the cluster at {head.address} has {alive} live nodes, not {expected}: {done.stderr[-2000:]}"
