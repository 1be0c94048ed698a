"""A local EVM node (Foundry's anvil, from npm) whose chain state lives in the gateway's state directory.

State persistence: anvil runs with ``--state <state_dir>/chain/anvil-state.json``, which loads the
file at start (when it exists) and dumps the whole chain to it when anvil exits on SIGINT or
SIGTERM. ``--state-interval`` also dumps it every few seconds, so a node killed with SIGKILL loses
at most that interval. anvil writes the file in place (truncate, then write) and refuses to start
on a truncated file, so after every clean stop a copy is kept beside it (``anvil-state.json.bak``)
and `AnvilNode.start` falls back to that copy when the file does not parse.

anvil runs in its own session, so a Ctrl-C in the terminal reaches only the gateway, which stops
anvil after everything that may still send transactions. If the gateway itself is killed with
SIGKILL, anvil keeps running (and dumping) until it is stopped; the next start finds the port taken.

The dev accounts are derived from the well-known test mnemonic; their keys (`ANVIL_DEV_KEYS`) are
public knowledge and for the local chain only: anything sent to them on a real chain is lost.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from ledger.chain.errors import ChainNodeError
from statedir.layout import StateLayout

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
ANVIL_NPM_PACKAGE = "@foundry-rs/anvil-linux-amd64"
HOST = "127.0.0.1"
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 15.0
STATE_INTERVAL_SECONDS = 5
LOG_TAIL_LINES = 20

ANVIL_DEV_MNEMONIC = "test test test test test test test test test test test junk"
"""anvil's default mnemonic (BIP-44 path m/44'/60'/0'/0/i); local chain only."""

ANVIL_DEV_KEYS: tuple[str, ...] = (
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
    "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
    "0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e",
    "0x4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356",
    "0xdbda1821b80551c9d65939329250298aa3472ba22feea921c0cf5d620ea67b97",
    "0x2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6",
)
"""Private keys of anvil's ten funded dev accounts (10,000 ETH each). PUBLIC, local chain only;
key 0 is the default operator of the local chain."""


def anvil_binary() -> Path:
    """The anvil executable from node_modules; ChainNodeError when it is not installed."""
    path = REPO_ROOT / "node_modules" / ANVIL_NPM_PACKAGE / "bin" / "anvil"
    if not path.is_file():
        raise ChainNodeError(f"anvil is not installed (expected {path}); run `make install`")
    if not os.access(path, os.X_OK):
        raise ChainNodeError(f"anvil at {path} is not executable; run `make install`")
    return path


class AnvilNode:
    """One anvil process on 127.0.0.1:`port`, its chain kept in ``<state_dir>/chain/``.

    Use it as a context manager, or call `start` and `stop`. `block_time` (seconds) mines blocks
    on an interval; by default every transaction is mined at once (automine).
    """

    def __init__(
        self,
        state_dir: Path,
        port: int = 8545,
        chain_id: int = 31337,
        block_time: float | None = None,
        *,
        state_interval_seconds: int = STATE_INTERVAL_SECONDS,
        start_timeout_seconds: float = START_TIMEOUT_SECONDS,
    ) -> None:
        layout = StateLayout(state_dir)
        self.chain_dir = layout.chain
        self.state_file = layout.anvil_state
        self.backup_file = layout.anvil_state_backup
        self.log_file = layout.anvil_log
        self.port = port
        self.chain_id = chain_id
        self.block_time = block_time
        self.state_interval_seconds = state_interval_seconds
        self.start_timeout_seconds = start_timeout_seconds
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def rpc_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __repr__(self) -> str:
        state = f"pid {self._process.pid}" if self.running and self._process else "stopped"
        return f"AnvilNode({self.rpc_url}, chain_id={self.chain_id}, {state}, state={self.state_file})"

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> AnvilNode:
        """Spawn anvil and wait until it answers ``eth_chainId`` with our chain id."""
        if self.running:
            raise ChainNodeError(f"anvil is already running at {self.rpc_url}")
        binary = anvil_binary()
        self.chain_dir.mkdir(parents=True, exist_ok=True)  # anvil does not create it, and then saves nothing
        self._recover_state_file()
        if not _port_is_free(self.port):
            raise ChainNodeError(f"cannot start anvil: {HOST}:{self.port} is already in use (set GATEWAY_CHAIN_PORT)")
        command = [
            str(binary),
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--chain-id",
            str(self.chain_id),
            "--state",
            str(self.state_file),
            "--state-interval",
            str(self.state_interval_seconds),
            "--quiet",  # no banner: it lists the dev accounts' private keys, and the log is a file (errors still show)
        ]
        if self.block_time is not None:
            command += ["--block-time", _format_seconds(self.block_time)]
        with self.log_file.open("wb") as log_stream:  # the child keeps its own descriptor
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_stream,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C reaches us, and we stop anvil last
            )
        try:
            self._wait_until_ready()
        except BaseException:
            self._terminate_quietly()
            raise
        log.info("anvil %s (pid %d), state %s", self.rpc_url, self._process.pid, self.state_file)
        return self

    def stop(self, timeout_seconds: float = STOP_TIMEOUT_SECONDS) -> int:
        """Ask anvil to exit (SIGINT: it dumps its state first) and wait; returns its exit code.

        Raises ChainNodeError when it had to be killed, because then the last changes are lost.
        """
        process, self._process = self._process, None
        if process is None:
            return 0
        if not _interrupt_and_wait(process, timeout_seconds):
            raise ChainNodeError(
                f"anvil did not exit within {timeout_seconds:g} s and was killed; state since the last "
                f"periodic dump is lost ({self.state_file})"
            )
        if process.returncode == 0 and _is_json_file(self.state_file):
            _copy_atomically(self.state_file, self.backup_file)
        return process.returncode

    def __enter__(self) -> AnvilNode:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.stop()
        except ChainNodeError:
            if exc is None:
                raise
            log.exception("stopping anvil after an error failed")

    # -- helpers ---------------------------------------------------------------------------------

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.start_timeout_seconds
        while True:
            if self._process.poll() is not None:
                raise ChainNodeError(
                    f"anvil exited with code {self._process.returncode} while starting; "
                    f"last lines of {self.log_file}:\n{self._log_tail()}"
                )
            chain_id = _rpc_chain_id(self.rpc_url)
            if chain_id is not None:
                if chain_id != self.chain_id:
                    raise ChainNodeError(f"{self.rpc_url} answers chain id {chain_id}, expected {self.chain_id}")
                return
            if time.monotonic() > deadline:
                raise ChainNodeError(
                    f"anvil did not answer on {self.rpc_url} within {self.start_timeout_seconds:g} s; "
                    f"last lines of {self.log_file}:\n{self._log_tail()}"
                )
            time.sleep(0.05)

    def _terminate_quietly(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            _interrupt_and_wait(process, STOP_TIMEOUT_SECONDS)

    def _recover_state_file(self) -> None:
        """Replace a truncated state file (anvil killed while dumping) by the copy of the last clean stop."""
        if not self.state_file.exists() or _is_json_file(self.state_file):
            return
        damaged = self.state_file.with_name(f"{self.state_file.name}.damaged-{int(time.time())}")
        if not _is_json_file(self.backup_file):
            raise ChainNodeError(
                f"the chain state {self.state_file} is damaged (not JSON) and there is no usable backup; "
                f"move it away to start a fresh chain"
            )
        self.state_file.rename(damaged)
        _copy_atomically(self.backup_file, self.state_file)
        log.warning(
            "chain state %s was damaged (kept as %s); restored the copy of the last clean stop",
            self.state_file,
            damaged.name,
        )

    def _log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-LOG_TAIL_LINES:]) or "(empty log)"


def _format_seconds(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def _rpc_chain_id(url: str) -> int | None:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=1.0) as reply:
            return int(json.loads(reply.read())["result"], 16)
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
        return None


def _is_json_file(path: Path) -> bool:
    try:
        with path.open("rb") as stream:
            json.load(stream)
    except (OSError, ValueError):
        return False
    return True


def _copy_atomically(source: Path, target: Path) -> None:
    partial = target.with_name(target.name + ".partial")
    shutil.copyfile(source, partial)
    os.replace(partial, target)


def _interrupt_and_wait(process: subprocess.Popen, timeout_seconds: float) -> bool:
    """SIGINT (anvil dumps its state), wait; kill after the timeout. False when it had to be killed."""
    if process.poll() is not None:
        return True
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=timeout_seconds)
        return True
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return False
