"""What the running stack listens on: every socket of every process `gateway up` started (its process
tree, Ray's processes found by their session directory, the ledger service, anvil) is on loopback,
except those `gateway.ray_runtime.UNCONFINED_LISTENERS` names with a reason, which must refuse a
caller without Ray's token; and Ray's own RPC servers refuse such a caller too.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass

import grpc
import openai
import psutil
import pytest

from gateway.ledger_process import LedgerProcess
from gateway.ray_runtime import UNCONFINED_LISTENERS, UnconfinedListener, is_loopback
from serving.config import TINY_MODEL
from tests.support.launcher import GatewayProcess

pytestmark = pytest.mark.stack

WILDCARDS = {"0.0.0.0", "::"}

# A Ray session directory as it appears in the command lines of Ray's processes.
SESSION_DIR = re.compile(r"(/[^\s=,'\"]*/session_\d{4}-\d\d-\d\d_[^/\s,'\"]+)")

# Processes the listing must find (parts of their command lines): without them it proves nothing.
EXPECTED_PROCESSES = ("gcs_server", "raylet", "ServeController", "ServeReplica", "DashboardAgent",
                      "RuntimeEnvAgent", "anvil", "ledger serve")
# Started by Ray, stopped by the gateway once the node is up (unless GATEWAY_RAY_DASHBOARD=true).
STOPPED_PROCESSES = ("autoscaler/_private/monitor.py", "dashboard/dashboard.py")

# One method of each of Ray's gRPC services on the GCS and the raylet (node manager, object manager).
RAY_METHODS = ("/ray.rpc.NodeInfoGcsService/GetAllNodeInfo", "/ray.rpc.NodeManagerService/GetNodeStats",
               "/ray.rpc.ObjectManagerService/Pull")


@dataclass(frozen=True)
class Listener:
    pid: int
    command: str
    protocol: str
    ip: str
    port: int

    def __str__(self) -> str:
        return f"{self.protocol} {self.ip}:{self.port}  pid {self.pid}  {self.command[:120]}"


def command_of(process: psutil.Process) -> str:
    return " ".join(process.cmdline()) or process.name()


def listeners_of(processes: Iterable[psutil.Process]) -> list[Listener]:
    """TCP sockets in LISTEN and bound, unconnected UDP sockets of these processes (gone ones skipped)."""
    found = []
    for process in processes:
        try:
            command = command_of(process)
            sockets = process.net_connections("inet")
        except psutil.NoSuchProcess:
            continue
        for sock in sockets:
            if sock.type == socket.SOCK_STREAM and sock.status == psutil.CONN_LISTEN:
                protocol = "tcp"
            elif sock.type == socket.SOCK_DGRAM and not sock.raddr:
                protocol = "udp"
            else:
                continue
            found.append(Listener(process.pid, command, protocol, sock.laddr.ip, sock.laddr.port))
    return found


def process_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def stack_processes(root_pids: Iterable[int]) -> dict[int, psutil.Process]:
    """The process trees of `root_pids`, plus every process naming one of their Ray session directories
    (Ray's daemons would still be found if they left the tree)."""
    processes: dict[int, psutil.Process] = {}
    for pid in root_pids:
        processes.update((p.pid, p) for p in process_tree(pid))
    sessions = set()
    for process in processes.values():
        try:
            sessions.update(SESSION_DIR.findall(command_of(process)))
        except psutil.NoSuchProcess:
            pass
    assert sessions, "no Ray session directory in the command line of any process of the stack"
    for process in psutil.process_iter():
        try:
            command = command_of(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(session in command for session in sessions):
            processes.setdefault(process.pid, process)
    return processes


def codes_without_token(port: int, methods: Iterable[str] = RAY_METHODS) -> list[grpc.StatusCode]:
    """The status of one call of each method on 127.0.0.1:port with no token (an empty request)."""
    codes = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for method in methods:
            try:
                channel.unary_unary(method)(b"", timeout=10)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.append(error.code())
    return codes


def exemption_for(listener: Listener) -> UnconfinedListener | None:
    """The documented exception a wildcard listener falls under, if any."""
    if listener.ip not in WILDCARDS:
        return None
    return next((known for known in UNCONFINED_LISTENERS if known.process in listener.command), None)


@dataclass(frozen=True)
class StackListing:
    processes: dict[int, psutil.Process]
    listeners: list[Listener]

    def of(self, part: str) -> list[Listener]:
        return [listener for listener in self.listeners if part in listener.command]


@pytest.fixture(scope="module")
def listing(gateway: GatewayProcess, ledger_service: LedgerProcess, client: openai.OpenAI) -> StackListing:
    """The stack's processes and listeners, taken after one inference (so lazily opened sockets exist)."""
    client.completions.create(model=TINY_MODEL, prompt="Hello", max_tokens=4)
    assert gateway.process is not None and ledger_service.process is not None
    processes = stack_processes([gateway.process.pid, ledger_service.process.pid])
    listing = StackListing(processes, listeners_of(processes.values()))
    print("\n".join(["listeners of the stack:", *map(str, sorted(listing.listeners, key=str))]))
    return listing


def test_the_listing_covers_the_whole_stack(listing: StackListing, gateway: GatewayProcess,
                                            ledger_service: LedgerProcess) -> None:
    commands = [command_of(process) for process in listing.processes.values()]
    missing = [part for part in EXPECTED_PROCESSES if not any(part in command for command in commands)]
    assert not missing, f"processes of the stack not found: {missing}"
    running = [part for part in STOPPED_PROCESSES if any(part in command for command in commands)]
    assert not running, f"processes the gateway stops by default are running: {running}"
    for part in ("gcs_server", "raylet", "ServeReplica", "anvil", "ledger serve"):
        assert listing.of(part), f"no listening socket found for {part}"
    ports = {listener.port for listener in listing.listeners}
    assert {gateway.http_port, gateway.grpc_port, gateway.portal_port, ledger_service.port} <= ports


def test_nothing_listens_off_loopback_but_the_documented_exceptions(listing: StackListing) -> None:
    off_loopback = [listener for listener in listing.listeners if not is_loopback(listener.ip)]
    exposed = [listener for listener in off_loopback if exemption_for(listener) is None]
    assert not exposed, "listening off loopback:\n" + "\n".join(map(str, exposed))
    for known in UNCONFINED_LISTENERS:  # each still exists (else the docs name a listener that is gone) ...
        sockets = [listener for listener in off_loopback if exemption_for(listener) is known]
        assert sockets, f"no listener of {known.process} is off loopback any more: update UNCONFINED_LISTENERS"
        pids = [listener.pid for listener in sockets]
        assert len(pids) == len(set(pids)), f"more than one wildcard socket per process: {sockets}"
        for listener in sockets:  # ... and wants Ray's token
            assert codes_without_token(listener.port, [known.guard]) == [grpc.StatusCode.UNAUTHENTICATED], listener


def test_ray_rpc_refuses_a_caller_without_the_token(listing: StackListing) -> None:
    """Loopback lets every local user connect: the GCS's and the raylet's gRPC ports want the token."""
    ports = [listener for part in ("gcs_server", "raylet") for listener in listing.of(part) if listener.protocol == "tcp"]
    assert len(ports) >= 3, ports  # the GCS, the node manager, the object manager
    for listener in ports:
        codes = codes_without_token(listener.port)
        assert grpc.StatusCode.OK not in codes, f"{listener} answered a caller without a token: {codes}"
        assert grpc.StatusCode.UNAUTHENTICATED in codes, f"{listener}: {codes}"
