"""Administrative commands need an admin API key, always; the first one comes from the state directory.

`gateway keys …`, `gateway accounts create|list|credit|share`, `gateway adapter register` and
`gateway settle` change who may spend, what is sold or what is paid. They ask for an admin key:
`GATEWAY_ADMIN_KEY`, or else the local key in `<state>/local-api-key`, and are refused without one.
No state of the ledger's database switches that check off: a ledger with no live admin key refuses
them too, and says how to get one.

The first admin key is tied to what only the operator holds, the state directory: `gateway up` (at
its first start with auth on) and `gateway keys bootstrap` both call `create_local_key`, which
creates the account `local`, credits it once, creates an admin key for it and writes the key to
`<state>/local-api-key` (created with O_EXCL, mode 0600: never over an existing file). The key is
shown once, and only on a terminal (`describe_new_local_key`); logs get the file's path. The last
live admin key cannot be revoked (`ledger.accounts.api_keys.ApiKeys.revoke`), so a working ledger never ends
up without one.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from gateway.cli_output import CommandError
from gateway.config import GatewayConfig
from ledger.accounts.accounts import Accounts, UnknownAccount
from ledger.accounts.api_keys import ApiKeys
from ledger.models import ApiKey
from serving.config import AccessConfig
from storage.database import database_url, open_database

LOCAL_ACCOUNT = "local"
LOCAL_CREDIT_REF = "local-first-start"
LOCAL_KEY_NAME = "local admin key"
ADMIN_KEY_ENV = "GATEWAY_ADMIN_KEY"


@dataclass(frozen=True)
class LocalKey:
    """The local admin key just created (the only object that holds its whole value, briefly)."""

    path: Path
    key_id: str
    credit: int
    presented: str = field(repr=False)


def create_local_key(config: GatewayConfig, credit: int) -> LocalKey:
    """Account `local` (credited `credit` once), an admin key for it, written to `<state>/local-api-key`.

    The file is reserved first (O_EXCL, 0600), so an existing one is never replaced and two starts
    never both create a key: FileExistsError then, with nothing created.
    """
    path = config.layout.local_api_key
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        out = os.fdopen(descriptor, "w", encoding="ascii")
    except BaseException:
        os.close(descriptor)
        path.unlink(missing_ok=True)
        raise
    try:
        with out:
            engine = open_database(database_url(config.state_dir))
            try:
                accounts = Accounts(engine)
                try:
                    accounts.get(LOCAL_ACCOUNT)
                except UnknownAccount:
                    accounts.create(LOCAL_ACCOUNT)
                if credit:
                    accounts.credit(LOCAL_ACCOUNT, credit, LOCAL_CREDIT_REF)
                new = ApiKeys(engine).create(LOCAL_ACCOUNT, name=LOCAL_KEY_NAME, admin=True)
            finally:
                engine.dispose()
            out.write(new.presented + "\n")
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return LocalKey(path, new.key.id, credit, new.presented)


def describe_new_local_key(key: LocalKey, stream: TextIO | None = None) -> str:
    """Lines announcing a new local key: the key itself only when `stream` (stdout) is a terminal."""
    stream = stream if stream is not None else sys.stdout
    head = (f"created the local admin API key {key.key_id} (account '{LOCAL_ACCOUNT}', {key.credit} base units "
            "of credit)")
    if _is_terminal(stream):
        return f"{head}:\n  {key.presented}\n  saved to {key.path} (owner-only); it is not printed again"
    return f"{head}, saved to {key.path} (owner-only); not printed here because this output is not a terminal"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def local_key_problem(config: GatewayConfig) -> str | None:
    """Why the key in `<state>/local-api-key` cannot administer this ledger, or None when it can."""
    path = config.layout.local_api_key
    presented = path.read_text(encoding="ascii", errors="replace").strip()
    engine = open_database(database_url(config.state_dir))
    try:
        key = ApiKeys(engine).verify(presented)
    finally:
        engine.dispose()
    if key is None:
        return (f"the key in {path} is not a live key of this ledger (revoked, or made for another database); "
                f"remove the file and run `gateway keys bootstrap` to create a new local admin key")
    if not key.admin:
        return f"the key in {path} ({key.id}) is not an admin key"
    return None


def ensure_local_key(config: GatewayConfig) -> None:
    """`gateway up`: with auth on, create the local admin key at first start; later starts say where it is."""
    access = AccessConfig()
    path = config.layout.local_api_key
    if not access.auth:
        print("[gateway] auth is OFF (--no-auth): any client on this machine may call the APIs unbilled", flush=True)
        return
    try:
        key = create_local_key(config, access.local_credit)
    except FileExistsError:
        print(f"[gateway] API keys required; the local admin key is in {path}", flush=True)
        if (problem := local_key_problem(config)) is not None:
            print(f"[gateway] warning: {problem}", flush=True)
        return
    print(f"[gateway] {describe_new_local_key(key)}", flush=True)


def require_admin(config: GatewayConfig, engine: object) -> ApiKey:
    """The live admin key presented (GATEWAY_ADMIN_KEY, else `<state>/local-api-key`); CommandError (exit 2)
    otherwise, whatever the database holds."""
    local = config.layout.local_api_key
    presented, source = os.environ.get(ADMIN_KEY_ENV, "").strip(), ADMIN_KEY_ENV
    if not presented and local.exists():
        presented, source = local.read_text(encoding="ascii", errors="replace").strip(), str(local)
    if not presented:
        raise CommandError(f"this command needs an admin API key: set {ADMIN_KEY_ENV}, or create the local one "
                           f"in {local} with `gateway keys bootstrap` (`gateway up` does it at its first start)")
    key = ApiKeys(engine).verify(presented)  # type: ignore[arg-type]
    if key is None:
        remedy = (f"remove {local} and run `gateway keys bootstrap`, or set {ADMIN_KEY_ENV}" if source == str(local)
                  else f"set {ADMIN_KEY_ENV} to a live admin key")
        raise CommandError(f"this command needs an admin API key: the key in {source} is not a live key of this "
                           f"ledger (revoked, mistyped, or made for another database); {remedy}")
    if not key.admin:
        raise CommandError(f"key {key.id} is not an admin key; use one created with `gateway keys create --admin`")
    return key


def require_admin_of(config: GatewayConfig) -> ApiKey:
    """`require_admin` on the state directory's ledger database."""
    engine = open_database(database_url(config.state_dir))
    try:
        return require_admin(config, engine)
    finally:
        engine.dispose()
