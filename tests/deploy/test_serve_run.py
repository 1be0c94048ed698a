"""The Serve config round trip with Ray's own tooling: `serve run` of deploy/serve-config.yaml builds the
application through `serving.serve_app:app_builder`, the engine replica answers GET /health and checks a
key with the ledger the args name, and stopping `serve run` leaves no process behind.

The file is run as shipped but for what names this sandbox: the state directory (the session's demo model),
free loopback ports, the tiny model, and the ledger's address and token file. The ledger is a real
`gateway ledger serve` whose token is a file it does not own (a mounted secret, GATEWAY_LEDGER_TOKEN_FILE).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from gateway.cli import main
from gateway.ledger_process import LedgerProcess, open_private_log
from gateway.ray_runtime import GLOO_INTERFACE_ENV, RAY_LOOPBACK_ENV, loopback_interface
from gateway.supervisor import RAY_ENV_DEFAULTS
from ledger.client.token import TOKEN_ENV
from serving.config import TINY_MODEL
from statedir.layout import StateLayout
from tests.deploy.manifests import ROOT, SERVE_CONFIG, documents
from tests.support.ports import NO_CHAIN, free_port

READY_SECONDS = 150.0
STOP_SECONDS = 60.0


@pytest.fixture()
def mounted_token(tmp_path: Path) -> Path:
    """The ledger token as a mounted secret would hold it: a read-only file nobody here generated."""
    path = tmp_path / "secrets" / "ledger-token"
    path.parent.mkdir(mode=0o700)
    path.write_text(secrets.token_urlsafe(32) + "\n")
    path.chmod(0o400)
    return path


@pytest.fixture()
def ledger(tmp_path: Path, mounted_token: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LedgerProcess]:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    process = LedgerProcess(tmp_path / "ledger-state", "127.0.0.1", free_port(), log_file=tmp_path / "ledger.log",
                            env={"DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
                                 "GATEWAY_LEDGER_TOKEN_FILE": str(mounted_token), **NO_CHAIN}).start()
    yield process
    assert process.stop() == 0


def sandboxed_config(path: Path, state: Path, ledger: LedgerProcess, token_file: Path) -> tuple[Path, int]:
    """deploy/serve-config.yaml with this sandbox's paths, ports and ledger; its HTTP port."""
    config = documents(SERVE_CONFIG)[0]
    args = config["applications"][0]["args"]
    http_port = free_port()
    args["serving"].update(state_dir=str(state), base_model=TINY_MODEL, http_port=http_port, grpc_port=free_port())
    args["ledger"].update(address=ledger.target, token_file=str(token_file))
    config["http_options"]["port"] = free_port()  # the proxy is off; nothing may take a shared port anyway
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, http_port


def serve_env(tmp_path: Path) -> dict[str, str]:
    """Ray on loopback with token auth and the supervisor's quiet settings; this checkout's code."""
    ray_token = tmp_path / "ray-token"
    ray_token.write_text(secrets.token_hex(32))
    ray_token.chmod(0o600)
    env = {**os.environ, **RAY_ENV_DEFAULTS, **RAY_LOOPBACK_ENV, "RAY_AUTH_TOKEN_PATH": str(ray_token),
           GLOO_INTERFACE_ENV: loopback_interface(),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}  # the log shows how far serve run got, even when it has to be killed
    env.pop("RAY_ADDRESS", None)
    for name in [name for name in env if name.startswith("GATEWAY_LEDGER_")]:
        env.pop(name)  # the replicas find the ledger through the file's args alone
    return env


def interruptible() -> None:
    """In the child: Ctrl-C back to its default. A test run started in the background of a shell without job
    control inherits SIGINT ignored, and Python then never turns it into the KeyboardInterrupt `serve run`
    stops on."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def tree(root: psutil.Process) -> dict[int, float]:
    """The pids (with start times) of `root`, its descendants and every process of its session."""
    found = {proc.pid: proc.create_time() for proc in [root, *root.children(recursive=True)]}
    for proc in psutil.process_iter(["pid", "create_time"]):
        try:
            if os.getsid(proc.pid) == root.pid:
                found[proc.pid] = proc.info["create_time"]
        except (ProcessLookupError, PermissionError):
            continue
    return found


def alive(processes: dict[int, float]) -> list[str]:
    left = []
    for pid, started in processes.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{pid} {' '.join(proc.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            continue
    return left


def local_admin_key(ledger: LedgerProcess, token_file: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The ledger's first admin key (`gateway keys bootstrap`, as `gateway up` does at its first start)."""
    monkeypatch.setenv("GATEWAY_LEDGER_PORT", str(ledger.port))
    monkeypatch.setenv("GATEWAY_LEDGER_TOKEN_FILE", str(token_file))
    assert main(["--state-dir", str(ledger.state_dir), "keys", "bootstrap"]) == 0
    return StateLayout(ledger.state_dir).local_api_key.read_text().strip()


def test_serve_run_of_the_config_file_builds_the_app_answers_health_and_leaves_nothing_running(
        demo_state: Path, ledger: LedgerProcess, mounted_token: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert not StateLayout(ledger.state_dir).ledger_token.exists(), "the ledger used the mounted token"
    assert ledger.token == mounted_token.read_text().strip()
    key = local_admin_key(ledger, mounted_token, monkeypatch)
    config, http_port = sandboxed_config(tmp_path / "serve-config.yaml", demo_state, ledger, mounted_token)
    serve = Path(sys.executable).with_name("serve")
    log = tmp_path / "serve-run.log"
    with open_private_log(log) as out:
        process = subprocess.Popen([str(serve), "run", "--address", "local", str(config)], cwd=tmp_path,
                                   env=serve_env(tmp_path), stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True, preexec_fn=interruptible)
    started = time.monotonic()
    processes: dict[int, float] = {}
    try:
        status = None
        while time.monotonic() - started < READY_SECONDS and process.poll() is None:
            try:
                status = httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=5).status_code
            except httpx.TransportError:
                status = None
            if status == 200:
                break
            time.sleep(1)
        assert status == 200, (f"no health answer (serve run exit {process.poll()}); see {log}:\n"
                               + log.read_text()[-3000:])
        # the replica asked the ledger of the args, with the token of the args' file, about this key
        models = httpx.get(f"http://127.0.0.1:{http_port}/v1/models", timeout=30,
                           headers={"authorization": f"Bearer {key}"})
        assert models.status_code == 200 and TINY_MODEL in [m["id"] for m in models.json()["data"]], models.text
        refused = httpx.get(f"http://127.0.0.1:{http_port}/v1/models", timeout=30,
                            headers={"authorization": "Bearer sk-not-a-key-0123456789"})
        assert refused.status_code == 401, refused.text
        processes = tree(psutil.Process(process.pid))
        commands = " ".join(" ".join(psutil.Process(pid).cmdline()) for pid in processes if psutil.pid_exists(pid))
        assert "ServeReplica:gateway:engine" in commands, commands[:2000]
    finally:
        if not processes and process.poll() is None:
            processes = tree(psutil.Process(process.pid))  # what to look for after a failed start
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = None
    print(f"health after {time.monotonic() - started:.0f} s (ready and stopped)")
    assert code == 0, f"serve run did not stop on SIGINT (exit {code}); see {log}"
    deadline = time.monotonic() + 15
    while alive(processes) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive(processes), alive(processes)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=2)
    assert not list(StateLayout(demo_state).monitoring_targets.glob("engine-*.json")), "the replica withdrew its target"
