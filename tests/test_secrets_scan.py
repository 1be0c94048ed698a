"""Secrets reach no file they do not belong in.

After a real start (the session's `gateway up` stack with its ledger service) and some use of it —
an API key created, used, refused with a wrong secret and revoked; the ledger asked through the CLI —
every file of the state directory and of Ray's session directory is read as bytes (logs, the SQLite
database and its WAL, indexes, chain state, adapters, the outbox) and searched for every secret the
session holds: the local admin key, the key created here (and anything shaped like an API key), the
ledger token, the chain keys the chain configuration uses (the operator key: anvil's dev key 0 on the
local chain), anvil's other dev keys (the demo contributors and adapter owner sign with them) and
their mnemonic, and Ray's cluster token when Ray runs with token authentication. Public test keys
or not, none may be logged.

Each secret may be in exactly the files listed in `HOMES` and nowhere else. The database holds only
SHA-256 hashes of API key secrets.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from gateway.cli import main
from gateway.ledger_process import LedgerProcess
from ledger.chain.anvil import ANVIL_DEV_KEYS, ANVIL_DEV_MNEMONIC
from ledger.chain.config import ChainConfig
from statedir.layout import StateLayout
from tests.support.cli import cli
from tests.support.launcher import GatewayProcess

pytestmark = pytest.mark.stack

ANY_API_KEY = re.compile(rb"dgk-[0-9a-f]{12}-[A-Za-z0-9_-]{43}")
RAY_LOGS_LINE = re.compile(r"\[gateway\] replica and engine logs: (\S+)")
MODEL = "demo-adapter-001"


def homes(state: Path) -> dict[str, set[Path]]:
    """The only files allowed to hold each kind of secret (every other kind: no file at all).

    - the local admin key: `<state>/local-api-key`, written once, owner-only, by `gateway up`;
    - the ledger token: `<state>/ledger-token`, written once, owner-only, by `gateway ledger serve`;
    - chain keys: none. The local chain's operator is anvil's public dev key 0, taken from the code
      (ledger/chain/anvil.py), never written; a remote chain's operator key would live in the
      operator's own GATEWAY_CHAIN_OPERATOR_KEY_FILE (listed when configured).
    """
    operator_file = ChainConfig().operator_key_file
    return {
        "local admin key": {state / "local-api-key"},
        "ledger token": {StateLayout(state).ledger_token},
        "chain key": {operator_file.resolve()} if operator_file else set(),
    }


def ray_cluster_token() -> str | None:
    """Ray's token (its own convention: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token), if any."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return (path.read_text().strip() or None) if path.is_file() else None


def ray_session_dir(gateway: GatewayProcess) -> Path:
    """Ray's session directory of this gateway, from the log line naming its logs (else the latest session)."""
    found = RAY_LOGS_LINE.findall((gateway.state_dir / "gateway.log").read_text(errors="replace"))
    session = Path(found[-1]).parent if found else Path("/tmp/ray/session_latest").resolve()
    assert session.is_dir() and session.name.startswith("session_"), session
    return session


def files_under(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():  # sockets and pipes are not files; links are read at home
            yield path


def variants(secret: str) -> list[bytes]:
    """How a secret could be written: as given, and for hex keys also without 0x, in capitals, as raw bytes."""
    forms = {secret.encode()}
    body = secret.removeprefix("0x")
    if re.fullmatch(r"[0-9a-fA-F]{64}", body):
        forms |= {body.lower().encode(), body.upper().encode(), bytes.fromhex(body)}
    return sorted(forms)


def test_no_secret_is_in_any_file_but_its_own(capsys: pytest.CaptureFixture[str], gateway: GatewayProcess,
                                              ledger_service: LedgerProcess, demo_state: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_ADMIN_KEY", raising=False)  # the operator's local key administers
    monkeypatch.setenv("GATEWAY_LEDGER_PORT", str(ledger_service.port))
    local_key = gateway.api_key
    assert local_key, "the session runs with auth on"
    created = cli(capsys, demo_state, "keys", "create", "--account", "local", "--name", "secrets-scan")
    users = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=created["key"], max_retries=0, timeout=120)
    reply = users.completions.with_raw_response.create(model=MODEL, prompt="The river", max_tokens=4,
                                                       extra_body={"attribution": True})
    trace_id = reply.headers["x-attribution-trace-id"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=created["key"][:-1] + "x", max_retries=0,
                      timeout=60).completions.create(model=MODEL, prompt="x", max_tokens=2)
    deadline = time.monotonic() + 60
    while True:  # the CLI reads the ledger token from the state directory
        capsys.readouterr()
        if main(["--state-dir", str(demo_state), "ledger", "trace", trace_id, "--json"]) == 0:
            break
        assert time.monotonic() < deadline, f"trace {trace_id} never reached the ledger"
        time.sleep(0.5)
    assert cli(capsys, demo_state, "keys", "revoke", created["id"])["revoked_at"]
    time.sleep(2)  # log lines of the requests above reach their files

    ledger_token = ledger_service.token
    chain = ChainConfig()
    secrets: dict[str, tuple[str, list[bytes]]] = {
        "local admin key": ("local admin key", variants(local_key)),
        "local admin key's secret": ("local admin key", variants(local_key.split("-", 2)[2])),
        "key created by this test": ("api key", variants(created["key"])),
        "its secret": ("api key", variants(created["key"].split("-", 2)[2])),
        "ledger token": ("ledger token", variants(ledger_token)),
        "operator key (chain config)": ("chain key", variants(chain.private_key(local=chain.uses_local_node))),
        "anvil dev mnemonic": ("chain key", variants(ANVIL_DEV_MNEMONIC)),
        **{f"anvil dev key {i}": ("chain key", variants(key)) for i, key in enumerate(ANVIL_DEV_KEYS)},
    }
    if (ray_token := ray_cluster_token()) is not None:  # its file is outside both directories
        secrets["Ray's cluster token"] = ("ray token", variants(ray_token))
    allowed = homes(demo_state)
    roots = [demo_state, ray_session_dir(gateway)]
    scanned, found = 0, []
    for root in roots:
        for path in files_under(root):
            try:
                data = path.read_bytes()
            except (FileNotFoundError, PermissionError):  # removed while we looked (outbox, sockets' peers)
                continue
            scanned += 1
            for name, (kind, forms) in secrets.items():
                if path not in allowed.get(kind, set()) and any(form in data for form in forms):
                    found.append(f"{name} in {path}")
            if path not in allowed["local admin key"]:
                found += [f"something shaped like an API key ({m.group()[:16]}…) in {path}"
                          for m in ANY_API_KEY.finditer(data)]
    assert scanned > 100, f"only {scanned} files under {roots}"
    assert not found, "secrets outside their files:\n" + "\n".join(found)

    # Each secret's own file holds it, readable by its owner only.
    layout = StateLayout(demo_state)
    for path, secret in ((layout.local_api_key, local_key), (layout.ledger_token, ledger_token)):
        assert path.read_text().strip() == secret and path.stat().st_mode & 0o077 == 0, path
    assert str(demo_state / "local-api-key") in (demo_state / "gateway.log").read_text(), \
        "the log says where the local key is (instead of the key)"

    # The database holds the hashes of API key secrets, never the secrets.
    database = b"".join(p.read_bytes() for p in sorted(demo_state.glob("ledger.db*")) if p.is_file())
    assert database, "the session's ledger is SQLite in the state directory"
    for key in (local_key, created["key"]):
        secret = key.split("-", 2)[2]
        assert secret.encode() not in database
        assert hashlib.sha256(secret.encode()).hexdigest().encode() in database
