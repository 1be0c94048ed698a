"""Ray as `gateway up` starts it (gateway/ray_runtime.py): on loopback whatever the front doors do, with
token authentication that the environment cannot turn off, and its token file private."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import psutil
import pytest

from gateway.config import GatewayConfig
from gateway.ray_runtime import LOOPBACK, RAY_LOOPBACK_ENV, RayNodeOptions, is_loopback, keep_ray_token_private
from tests.test_listeners import codes_without_token, listeners_of, process_tree

REPO = Path(__file__).resolve().parents[1]

# `gateway up` imports Ray before it starts it; the engine's CPU process groups are torch gloo groups.
NODE_SCRIPT = textwrap.dedent("""
    import json, os, sys, tempfile
    import ray
    from gateway.config import GatewayConfig
    from gateway.ray_runtime import RayNodeOptions, start_ray, stop_ray

    node = start_ray(RayNodeOptions.for_gateway(GatewayConfig()))

    @ray.remote(num_cpus=0)
    class ProcessGroupOwner:
        def start(self):
            import torch.distributed as dist
            store = os.path.join(tempfile.mkdtemp(), "store")
            dist.init_process_group("gloo", init_method=f"file://{store}", world_size=1, rank=0)
            return os.getpid()

    owner = ProcessGroupOwner.remote()
    pid = ray.get(owner.start.remote())
    print(json.dumps({"node_ip": node.node_ip_address, "gloo_pid": pid}), flush=True)
    sys.stdin.read()
    stop_ray()
""")


def off_machine_address() -> str | None:
    """An IPv4 address of this machine that is not loopback (None when it has none)."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not is_loopback(address.address):
                return address.address
    return None


def host_name_resolving_off_loopback() -> list[str]:
    """A command prefix that runs a program with a host name resolving to this machine's non-loopback
    address (as on most servers, where gloo would then listen on it); [] when that is not possible."""
    address = off_machine_address()
    unshare = shutil.which("unshare")
    if address is None or unshare is None:
        return []
    probe = subprocess.run([unshare, "--uts", "true"], capture_output=True)
    if probe.returncode != 0:  # needs privileges
        return []
    return [unshare, "--uts", "sh", "-c", f'hostname {address} && exec "$@"', "sh"]


def test_opening_the_front_doors_leaves_ray_on_loopback() -> None:
    arguments = RayNodeOptions.for_gateway(GatewayConfig(host="0.0.0.0")).init_arguments()
    assert arguments["_node_ip_address"] == LOOPBACK
    assert arguments["dashboard_host"] == LOOPBACK
    assert arguments["include_dashboard"] is False
    assert arguments["address"] == "local"  # a new node-local cluster, never someone else's
    assert "0.0.0.0" not in json.dumps(arguments, default=str)
    assert RAY_LOOPBACK_ENV == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}


def test_a_node_started_with_the_network_settings_open_listens_on_loopback_only() -> None:
    """A real Ray node started by the module with GATEWAY_HOST=0.0.0.0 and an environment asking Ray
    for the opposite (cluster mode, auth off), under a host name that resolves off loopback."""
    env = {key: value for key, value in os.environ.items() if key != "GLOO_SOCKET_IFNAME"}
    env.update(GATEWAY_HOST="0.0.0.0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1", RAY_AUTH_MODE="disabled",
               PYTHONPATH=str(REPO))
    prefix = host_name_resolving_off_loopback()
    node = subprocess.Popen([*prefix, sys.executable, "-c", NODE_SCRIPT], cwd=REPO, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert node.stdout is not None and node.stdin is not None
        line = node.stdout.readline()
        assert line, f"the Ray node did not start (exit code {node.poll()})"
        started = json.loads(line)
        processes = process_tree(node.pid)  # `unshare` and `sh` exec the interpreter: same pid
        listeners = listeners_of(processes)
        names = {process.name() for process in processes}
        assert {"gcs_server", "raylet"} <= names, names
        gloo = [listener for listener in listeners if listener.pid == started["gloo_pid"]]
        assert gloo, "the process group opened no listener: the check would prove nothing"
        exposed = [str(listener) for listener in listeners if not is_loopback(listener.ip)]
        assert not exposed, "listening off loopback:\n" + "\n".join(exposed)
        assert started["node_ip"] == LOOPBACK
        assert psutil.Process(started["gloo_pid"]).nice() == 0, "Ray workers run at normal priority (Ray's is 15)"
        gcs = [listener for listener in listeners if "gcs_server" in listener.command]
        assert gcs and all(grpc.StatusCode.UNAUTHENTICATED in codes_without_token(listener.port)
                           for listener in gcs), "the GCS answers without the cluster's token"
    finally:
        if node.stdin:
            node.stdin.close()
        try:
            node.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, 9)
            node.wait()
    assert node.returncode == 0


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    return tmp_path


def test_a_missing_token_is_created_readable_by_its_owner_only(home: Path) -> None:
    keep_ray_token_private()
    token = home / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert len(bytes.fromhex(token.read_text())) == 32
    assert [path.name for path in token.parent.iterdir()] == ["auth_token"]  # no staging file left


def test_an_existing_token_loses_group_and_other_access_and_keeps_its_value(home: Path) -> None:
    token = home / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("ab" * 32)
    token.chmod(0o644)
    keep_ray_token_private()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert token.read_text() == "ab" * 32


def test_a_token_given_in_the_environment_writes_no_file(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN", "cd" * 32)
    keep_ray_token_private()
    assert not (home / ".ray").exists()


# A node as `gateway up` starts it; prints what the test checks, then waits for stdin to close.
DASHBOARD_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from gateway.config import GatewayConfig
    from gateway.ray_runtime import RayNodeOptions, start_ray, stop_ray

    node = start_ray(RayNodeOptions.for_gateway(GatewayConfig()))
    keys = ("RAY_task_events_report_interval_ms", "REPORTER_UPDATE_INTERVAL_MS", "RAY_object_manager_timer_freq_ms")
    print(json.dumps({"webui": node.webui_url, "env": {key: os.environ.get(key) for key in keys}}), flush=True)
    sys.stdin.read()
    stop_ray()
""")


def started_node(extra_env: dict[str, str]) -> tuple[subprocess.Popen[str], dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **extra_env}
    node = subprocess.Popen([sys.executable, "-c", DASHBOARD_SCRIPT], cwd=REPO, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    assert node.stdout is not None
    line = node.stdout.readline()
    assert line, f"the Ray node did not start (exit code {node.poll()})"
    return node, json.loads(line)


def stopped(node: subprocess.Popen[str]) -> int:
    if node.stdin:
        node.stdin.close()
    try:
        return node.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(node.pid, 9)
        return node.wait()


def command_lines(pid: int) -> list[str]:
    lines = []
    for process in process_tree(pid):
        try:
            lines.append(" ".join(process.cmdline()))
        except psutil.Error:
            continue
    return lines


def test_the_dashboard_setting_defaults_off_and_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    off = RayNodeOptions.for_gateway(GatewayConfig())
    assert off.dashboard is False and off.init_arguments()["include_dashboard"] is False
    assert off.environment()["RAY_task_events_report_interval_ms"] == "0"
    monkeypatch.setenv("GATEWAY_RAY_DASHBOARD", "true")
    on = RayNodeOptions.for_gateway(GatewayConfig())
    assert on.dashboard is True and on.init_arguments()["include_dashboard"] is True
    assert on.init_arguments()["dashboard_host"] == LOOPBACK
    assert "RAY_task_events_report_interval_ms" not in on.environment()  # the dashboard shows task events
    assert on.environment()["RAY_enable_pipe_based_agent_to_parent_health_check"] == "1"


def test_by_default_the_node_runs_no_dashboard_process_and_is_quieted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_RAY_DASHBOARD", raising=False)
    monkeypatch.delenv("RAY_task_events_report_interval_ms", raising=False)
    node, started = started_node({"REPORTER_UPDATE_INTERVAL_MS": "7000"})  # an operator's value wins
    try:
        lines = command_lines(node.pid)
        assert any("raylet" in line for line in lines), lines
        assert any("ray::DashboardAgent" in line or "dashboard/agent.py" in line for line in lines), lines
        assert not [line for line in lines if "dashboard/dashboard.py" in line]
        assert not [line for line in lines if "autoscaler/_private/monitor.py" in line]
        assert started["env"] == {"RAY_task_events_report_interval_ms": "0", "REPORTER_UPDATE_INTERVAL_MS": "7000",
                                  "RAY_object_manager_timer_freq_ms": "1000"}
    finally:
        assert stopped(node) == 0


def test_the_setting_turns_the_dashboard_on_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error
    import urllib.request

    monkeypatch.delenv("RAY_task_events_report_interval_ms", raising=False)
    node, started = started_node({"GATEWAY_RAY_DASHBOARD": "true"})
    try:
        lines = command_lines(node.pid)
        dashboards = [line for line in lines if "dashboard/dashboard.py" in line]
        assert dashboards and "--modules-to-load" not in dashboards[0]  # all of it, not the bare API server
        host, _, port = started["webui"].rpartition(":")
        assert host == LOOPBACK, started["webui"]
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/api/version", timeout=10) as response:
                status = response.status
        except urllib.error.HTTPError as refused:  # Ray's token authentication asks for the token
            status = refused.code
        assert status in (200, 401)
        assert started["env"]["RAY_task_events_report_interval_ms"] is None
    finally:
        assert stopped(node) == 0


def test_the_cluster_to_join_comes_from_the_option_the_setting_or_ray_address(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.cli import _config, parser

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("GATEWAY_RAY_ADDRESS", raising=False)
    assert GatewayConfig().cluster_address is None, "by default gateway up starts a node-local cluster"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert GatewayConfig().cluster_address == "10.0.0.5:6379"
    monkeypatch.setenv("GATEWAY_RAY_ADDRESS", "10.0.0.6:6379")
    assert GatewayConfig().cluster_address == "10.0.0.6:6379", "the gateway's own setting wins"
    args = parser().parse_args(["up", "--ray-address", "10.0.0.7:6379"])
    assert _config(args).cluster_address == "10.0.0.7:6379", "and the option wins over both"


@pytest.mark.parametrize("address", ["ray://10.0.0.5:10001", "10.0.0.5", "head:port", ":6379"])
def test_an_address_that_is_not_a_clusters_head_is_refused_clearly(address: str) -> None:
    from gateway.ray_runtime import join_ray

    with pytest.raises(RuntimeError, match="is not host:port of a cluster's head"):
        join_ray(address, RayNodeOptions(num_cpus=1))


def test_joining_where_no_cluster_answers_fails_at_once() -> None:
    from gateway.ray_runtime import join_ray

    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        port = taken.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(RuntimeError, match=f"no Ray cluster answers at 127.0.0.1:{port}.*ray start --head"):
            join_ray(f"127.0.0.1:{port}", RayNodeOptions(num_cpus=1))


def test_gateway_up_given_a_cluster_that_does_not_answer_starts_nothing(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main
    from tests.support.ports import free_port

    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        code = main(["--state-dir", str(tmp_path / "state"), "up", "--ray-address", address,
                     "--http-port", str(free_port()), "--grpc-port", str(free_port())])
    out, err = capsys.readouterr()
    assert code == 1 and f"no Ray cluster answers at {address}" in err
    assert not (tmp_path / "state").exists(), "no state directory, chain or ledger was started"
