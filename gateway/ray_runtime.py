"""Start and stop the node-local Ray runtime of `gateway up`, with every Ray listener on loopback.

Ray binds its servers (GCS, raylet and object manager, each worker's RPC server, the dashboard and
runtime-env agents, the metrics servers of the autoscaler monitor and of the dashboard process) to
the node's IP address. On Linux Ray takes the address of the interface that routes off the
machine; `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` selects its single-machine mode, in which the node's
IP is the loopback address. The dashboard is off unless asked for (`GATEWAY_RAY_DASHBOARD`, then on
loopback too): off, the API-server process Ray starts anyway and the autoscaler monitor (nothing of
the gateway or of Serve's Python API uses them) are stopped once the node is up, and Ray's
observability loops are slowed (`RAY_IDLE_ENV`, `RAY_NO_DASHBOARD_ENV`) so the idle node stays quiet.
Loopback still lets any local user connect, so Ray's token authentication is on as well
(`RAY_AUTH_MODE=token`) and its token file is kept readable by its owner only. The processes Ray
starts inherit the environment set here, which also keeps torch's gloo listeners (vLLM's CPU
process groups, in each engine process) on the loopback interface instead of on the address the
host name resolves to. What no setting confines is listed in `UNCONFINED_LISTENERS`.

The front doors (`GATEWAY_HOST`) are not Ray's: opening them to the network leaves Ray on loopback.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig

LOOPBACK = "127.0.0.1"
JOIN_PROBE_SECONDS = 5.0

# Set (not defaulted) in this process, so every process Ray starts inherits them too.
RAY_LOOPBACK_ENV: Mapping[str, str] = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # single-machine mode: the node's IP is loopback
    "RAY_AUTH_MODE": "token",  # every Ray RPC needs the cluster's token
}

# Ray starts its workers at nice 15; the engine replica is a worker, and the serving work must not
# yield the cores to every other process on the machine. An operator's own value wins.
RAY_WORKER_PRIORITY_ENV: Mapping[str, str] = {"RAY_worker_niceness": "0"}

# Periodic work of an idle node, made rarer (defaults apply, an operator's value wins). None of these
# periods bounds a request's latency on one node: resource reports and object-manager ticks matter
# across nodes, the fs monitor and the GC check guard a full object store, the others are bookkeeping.
RAY_IDLE_ENV: Mapping[str, str] = {
    "RAY_enable_pipe_based_agent_to_parent_health_check": "1",  # agents block on a pipe, not poll every 0.4 s
    "RAY_raylet_report_resources_period_milliseconds": "1000",  # default 100
    "RAY_object_manager_timer_freq_ms": "1000",  # default 100
    "RAY_local_fs_monitor_interval_ms": "1000",  # default 100
    "RAY_raylet_check_gc_period_milliseconds": "1000",  # default 100
    "RAY_kill_idle_workers_interval_ms": "1000",  # default 200
    "RAY_gcs_pull_resource_loads_period_milliseconds": "5000",  # default 1000; for the cluster autoscaler
    "RAY_io_context_monitor_probe_interval_ms": "10000",  # default 1000 (unhealthy after 30 s either way)
    "RAY_debug_dump_period_milliseconds": "60000",  # default 10000
}

# Without the dashboard nothing reads task events or the agents' node stats: stop recording the one,
# collect the other once a minute.
RAY_NO_DASHBOARD_ENV: Mapping[str, str] = {
    "RAY_task_events_report_interval_ms": "0",  # 0: task events are not recorded (observability only)
    "REPORTER_UPDATE_INTERVAL_MS": "60000",  # default 5000: the dashboard agent's psutil sweep
}

# torch's gloo binds the address the host name resolves to (often the host's own) unless told an
# interface: the one holding 127.0.0.1 (`GLOO_SOCKET_IFNAME` set by the operator wins).
GLOO_INTERFACE_ENV = "GLOO_SOCKET_IFNAME"


@dataclass(frozen=True)
class UnconfinedListener:
    """A listener of the stack that no setting keeps on loopback, and what guards it instead."""

    process: str  # a part of the command line (process title) of the processes that open it
    reason: str
    guard: str  # a gRPC method on it that Ray's token authentication refuses without the token


# The one list of them: docs/security.md ("What listens where") names each, and
# tests/test_listeners.py allows exactly these off loopback (one wildcard socket per process, which
# must refuse a caller without Ray's token).
UNCONFINED_LISTENERS: tuple[UnconfinedListener, ...] = (
    UnconfinedListener(
        process="ray::ServeReplica",
        reason="Ray Serve starts an inter-deployment gRPC server in every replica and binds it to [::]:0 in "
               "its code (ray/serve/_private/replica.py); Ray 2.60 has no setting for that address "
               "(ray-project/ray#64544). Ray's token authentication guards it.",
        guard="/ray.serve.ASGIService/HandleRequest",
    ),
)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1, or IPv4 loopback mapped into IPv6 (::ffff:127.0.0.1: how Ray's gRPC servers show)."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host == "localhost"
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


@dataclass(frozen=True)
class RayNodeOptions:
    """What `start_ray` needs; nothing here depends on where the front doors listen."""

    num_cpus: int
    log_to_driver: bool = False
    dashboard: bool = False
    logging_level: int = logging.WARNING

    @classmethod
    def for_gateway(cls, config: GatewayConfig) -> RayNodeOptions:
        return cls(num_cpus=config.ray_num_cpus, log_to_driver=config.stream_worker_logs,
                   dashboard=config.ray_dashboard)

    def environment(self) -> dict[str, str]:
        """The defaults `start_ray` puts into the environment (where not set) for the idle node."""
        return {**RAY_IDLE_ENV, **({} if self.dashboard else RAY_NO_DASHBOARD_ENV)}

    def init_arguments(self) -> dict[str, Any]:
        """Keyword arguments of `ray.init` for a new node-local cluster on loopback."""
        return {
            "address": "local",
            "num_cpus": self.num_cpus,
            "include_dashboard": self.dashboard,
            "dashboard_host": LOOPBACK,
            "_node_ip_address": LOOPBACK,
            "logging_level": self.logging_level,
            "log_to_driver": self.log_to_driver,
        }


def loopback_interface() -> str:
    """The name of the network interface that holds 127.0.0.1 ("lo" on Linux)."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == LOOPBACK for a in addresses):
            return name
    return "lo"


def ray_token_file() -> Path | None:
    """Where Ray reads its token (RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token); None when RAY_AUTH_TOKEN holds it."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    configured = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(configured) if configured else Path.home() / ".ray" / "auth_token"


def keep_ray_token_private() -> None:
    """Create Ray's token file owner-only when missing (Ray would create it world-readable) and take
    group/other access away from an existing one of ours."""
    path = ray_token_file()
    if path is None:
        return
    if not path.exists() and "RAY_AUTH_TOKEN_PATH" not in os.environ:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(secrets.token_hex(32))
        try:
            os.link(staging, path)  # whole or not at all, and never over a token someone made meanwhile
        except FileExistsError:
            pass
        finally:
            staging.unlink()
    if path.exists():
        info = path.stat()
        if info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) & 0o077:
            path.chmod(0o600)


def start_ray(options: RayNodeOptions) -> Any:
    """Start a new single-node Ray cluster on loopback with token auth; returns Ray's node object.

    Fails closed: RuntimeError (and no cluster left running) when Ray would not be on loopback.
    """
    os.environ.update(RAY_LOOPBACK_ENV)  # for this process and every process Ray starts
    os.environ.setdefault(GLOO_INTERFACE_ENV, loopback_interface())
    for key, value in {**RAY_WORKER_PRIORITY_ENV, **options.environment()}.items():
        os.environ.setdefault(key, value)
    keep_ray_token_private()
    import ray
    from ray._private import ray_constants
    from ray._raylet import AuthenticationMode, Config, get_authentication_mode

    # This process may have loaded Ray before the environment said so (`gateway up` imports it
    # first): Ray read the cluster flag at import and caches its config (the auth mode) when loaded.
    ray_constants.ENABLE_RAY_CLUSTER = False
    Config.initialize("")
    if get_authentication_mode() != AuthenticationMode.TOKEN:
        raise RuntimeError("Ray's token authentication did not turn on; not starting Ray")
    ray.init(**options.init_arguments())
    node = ray._private.worker._global_node
    if not is_loopback(node.node_ip_address):
        ray.shutdown()
        raise RuntimeError(f"Ray chose node address {node.node_ip_address}, not loopback; stopped it")
    if not options.dashboard:
        stop_dashboard_processes(node)
    return node


def probe_cluster(address: str) -> None:
    """RuntimeError at once when `address` is not host:port or nothing listens there."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        raise RuntimeError(f"the Ray address {address!r} is not host:port of a cluster's head (GCS), e.g. "
                           "10.0.0.5:6379; `gateway up` runs on a node of the cluster, not as a Ray client")
    try:  # Ray itself would retry an unreachable address for minutes
        socket.create_connection((host.strip("[]"), int(port)), timeout=JOIN_PROBE_SECONDS).close()
    except OSError as error:
        raise RuntimeError(f"no Ray cluster answers at {address} ({error.strerror or error}); start its head with "
                           "`ray start --head`, or leave GATEWAY_RAY_ADDRESS/RAY_ADDRESS unset for a node-local "
                           "one") from None


def join_ray(address: str, options: RayNodeOptions) -> None:
    """Connect to the running Ray cluster at `address` (this machine must be one of its nodes).

    The cluster is the operator's: its listeners, resources and dashboard stay as they are. This process
    presents Ray's token (RAY_AUTH_MODE=token unless the operator set another mode) and keeps torch's gloo
    listeners of the processes it starts on loopback. RuntimeError when nothing answers at `address`.
    """
    probe_cluster(address)
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault(GLOO_INTERFACE_ENV, loopback_interface())
    import ray

    ray.init(address=address, logging_level=options.logging_level, log_to_driver=options.log_to_driver)


def stop_dashboard_processes(node: Any) -> None:
    """Stop the API server (`dashboard.py`, which Ray starts even without the dashboard) and the
    autoscaler monitor (a one-node cluster does not autoscale): ~0.005 core idle, no use to Serve's
    Python API. Ray's dashboard agent stays: the raylet shares its fate."""
    node.kill_dashboard(check_alive=False)
    node.kill_monitor(check_alive=False)


def stop_ray() -> None:
    """Stop the node-local cluster (and every process Ray started); nothing happens when none runs."""
    import ray

    ray.shutdown()
