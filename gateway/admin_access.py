"""Administrative commands reach the ledger only through its Admin API, with an admin API key the ledger verifies.

`gateway keys …`, `gateway accounts create|list|credit|share`, `gateway adapter register` and
`gateway settle` change who may spend, what is sold or what is paid. They open no database: they
call the ledger service (`gateway up` or `gateway ledger serve`, at GATEWAY_LEDGER_ADDRESS or
host:port) with its token and present an admin key: `GATEWAY_ADMIN_KEY`, or else the local key in
`<state>/local-api-key`. Without one they are refused before anything is asked; the ledger refuses
a key that is not a live admin key of its own (ledger/admin_service.py), whatever its database
holds: a ledger with no live admin key refuses them too, and the message says how to get one.

The first admin key is tied to the state directory: `gateway up` (at its first start with auth on,
once its ledger answers) and `gateway keys bootstrap` ask the ledger for the local key
(`Admin.BootstrapLocalKey`); the ledger reserves `<state>/local-api-key` (O_EXCL, mode 0600: never
over an existing file), creates the account `local`, credits it once, creates an admin key and
writes it into that file: the key never travels on the wire. It is shown once, and only on a
terminal (`describe_new_local_key`); logs get the file's path. The last live admin key cannot be
revoked, so a working ledger never ends up without one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from gateway.cli_output import EXIT_FAILED, CommandError
from gateway.config import GatewayConfig
from gateway.ledger_process import ledger_answers
from ledger.client.admin import (AdminClient, AdminRefused, ApiKeyRefused, KeyView, LedgerCallError,
                                 LedgerTokenRefused, LedgerUnreachable, LocalKeyView, admin_client)
from ledger.client.config import LedgerClientConfig
from ledger.client.token import LedgerTokenInvalid, LedgerTokenMissing
from serving.config import AccessConfig

LOCAL_ACCOUNT = "local"
ADMIN_KEY_ENV = "GATEWAY_ADMIN_KEY"


def presented_admin_key(config: GatewayConfig) -> tuple[str, str]:
    """(key, where it came from): GATEWAY_ADMIN_KEY, else `<state>/local-api-key`; CommandError without one."""
    local = config.layout.local_api_key
    presented = os.environ.get(ADMIN_KEY_ENV, "").strip()
    if presented:
        return presented, ADMIN_KEY_ENV
    if local.exists():
        presented = local.read_text(encoding="ascii", errors="replace").strip()
        if presented:
            return presented, str(local)
    raise CommandError(f"this command needs an admin API key: set {ADMIN_KEY_ENV}, or create the local one "
                       f"in {local} with `gateway keys bootstrap` (`gateway up` does it at its first start)")


@contextmanager
def ledger_admin(config: GatewayConfig, *, admin: bool = True) -> Iterator[AdminClient]:
    """The ledger's Admin API; with `admin`, presenting the caller's admin key. Every refusal or failure of
    a call in the block becomes a one-line CommandError (exit 2 for a refusal, 1 when the ledger is away)."""
    key, source = presented_admin_key(config) if admin else (None, "")
    target = LedgerClientConfig().target
    try:
        with admin_client(config.state_dir, key, target) as client:
            yield client
    except (LedgerTokenMissing, LedgerTokenInvalid) as error:
        if not ledger_answers(target):
            raise CommandError(_not_answering(target), EXIT_FAILED) from None
        raise CommandError(f"{error} (asking the ledger at {target})") from None
    except LedgerUnreachable:
        raise CommandError(_not_answering(target), EXIT_FAILED) from None
    except LedgerTokenRefused as error:
        raise CommandError(f"the ledger at {target} refused the token ({error.message}): use the state directory "
                           "of that ledger, or set GATEWAY_LEDGER_TOKEN to its token") from None
    except ApiKeyRefused as error:
        raise CommandError(_key_refusal(config, error, source)) from None
    except AdminRefused as error:
        raise CommandError(error.message) from None
    except LedgerCallError as error:
        raise CommandError(f"the ledger at {target} failed: {error.message}", EXIT_FAILED) from None


def _not_answering(target: str) -> str:
    return (f"the ledger service at {target} is not answering: `gateway up` or `gateway ledger serve` must be "
            "running (GATEWAY_LEDGER_ADDRESS or GATEWAY_LEDGER_PORT name another one)")


def _key_refusal(config: GatewayConfig, error: ApiKeyRefused, source: str) -> str:
    local = config.layout.local_api_key
    if error.reason == "not_live":
        remedy = (f"remove {local} and run `gateway keys bootstrap`, or set {ADMIN_KEY_ENV}" if source == str(local)
                  else f"set {ADMIN_KEY_ENV} to a live admin key")
        return (f"this command needs an admin API key: the key in {source} is not a live key of this ledger "
                f"(revoked, mistyped, or made for another database); {remedy}")
    if error.reason == "missing":
        return f"this command needs an admin API key: set {ADMIN_KEY_ENV}, or run `gateway keys bootstrap`"
    return error.message  # not an admin key: the ledger names it


def require_admin_of(config: GatewayConfig) -> KeyView:
    """The live admin key the caller presents, as the ledger verified it; CommandError (exit 2) otherwise."""
    with ledger_admin(config) as client:
        return client.who_am_i()


def bootstrap_local_key(config: GatewayConfig) -> LocalKeyView:
    """Ask the ledger for the local admin key (created once, into its `<state>/local-api-key`)."""
    with ledger_admin(config, admin=False) as client:
        return client.bootstrap_local_key()


def describe_new_local_key(key: LocalKeyView, stream: TextIO | None = None) -> str:
    """Lines announcing a new local key: the key itself only when `stream` (stdout) is a terminal."""
    stream = stream if stream is not None else sys.stdout
    head = (f"created the local admin API key {key.key_id} (account '{key.account_id}', {key.credit} base units "
            "of credit)")
    if _is_terminal(stream):
        try:
            presented = key.path.read_text(encoding="ascii").strip()
        except OSError:  # a ledger on another machine: its state directory holds the file
            return f"{head}, saved to {key.path} on the ledger's machine (owner-only)"
        return f"{head}:\n  {presented}\n  saved to {key.path} (owner-only); it is not printed again"
    return f"{head}, saved to {key.path} (owner-only); not printed here because this output is not a terminal"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def ensure_local_key(config: GatewayConfig) -> None:
    """`gateway up`, once its ledger answers: with auth on, the local admin key at first start; later starts
    say where it is. A ledger that cannot be asked is reported, not fatal (traces wait in the outbox)."""
    if not AccessConfig().auth:
        print("[gateway] auth is OFF (--no-auth): any client on this machine may call the APIs unbilled", flush=True)
        return
    try:
        key = bootstrap_local_key(config)
    except CommandError as error:
        print(f"[gateway] warning: the local admin key was not checked ({error}); run `gateway keys bootstrap` "
              "once the ledger answers", flush=True)
        return
    if key.created:
        print(f"[gateway] {describe_new_local_key(key)}", flush=True)
        return
    print(f"[gateway] API keys required; the local admin key is in {key.path}", flush=True)
    if key.problem is not None:
        print(f"[gateway] warning: {key.problem}", flush=True)
