"""The ledger API's bearer token: one secret that every caller of `gateway.ledger.v1.Ledger` presents.

There is one owner: the ledger service (`gateway ledger serve`) calls `ensure_ledger_token`
(ledger/service.py) at start, which returns GATEWAY_LEDGER_TOKEN when it is set, else the token in
GATEWAY_LEDGER_TOKEN_FILE (a file someone else provides, e.g. a mounted secret; never written), and
otherwise the token in `<state>/ledger-token`, generating that file on first start (owner-only, mode
0600, created with O_EXCL). Every client —
the trace shipper of `gateway up`, the `gateway ledger …` commands, engine replicas, tests — calls
`read_ledger_token` with the same state directory (or gets the same environment variable) and never
creates the file. The token's value is never printed or logged: messages name the file or the
variable.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from ledger.client.config import LedgerClientConfig
from statedir.layout import StateLayout

TOKEN_ENV = "GATEWAY_LEDGER_TOKEN"
TOKEN_FILE_ENV = "GATEWAY_LEDGER_TOKEN_FILE"
TOKEN_RULE = re.compile(r"[\x21-\x7e]{16,512}")  # visible ASCII: a valid gRPC metadata value, no whitespace
TOKEN_RULE_TEXT = "16 to 512 visible ASCII characters (no spaces)"
_CONCURRENT_WRITE_SECONDS = 2.0  # another process created the file and is writing it


class LedgerTokenMissing(LookupError):
    """No token: GATEWAY_LEDGER_TOKEN is unset and `<state>/ledger-token` does not exist (yet)."""


class LedgerTokenInvalid(ValueError):
    """The configured or stored token breaks `TOKEN_RULE` (its value is never part of the message)."""


def check_token(token: str, source: str) -> str:
    """`token` if it is usable as a bearer token; LedgerTokenInvalid naming `source` otherwise."""
    if TOKEN_RULE.fullmatch(token) is None:
        raise LedgerTokenInvalid(f"the ledger token in {source} must be {TOKEN_RULE_TEXT}")
    return token


def configured_token(config: LedgerClientConfig | None = None) -> str | None:
    """GATEWAY_LEDGER_TOKEN, else the content of GATEWAY_LEDGER_TOKEN_FILE (of `config`, default: the
    environment's), checked; None when neither is set. LedgerTokenMissing when the file cannot be read."""
    config = config or LedgerClientConfig()
    token = config.token_value()
    if token is not None:
        return check_token(token, TOKEN_ENV)
    if config.token_file is None:
        return None
    try:
        stored = config.token_file.read_text(encoding="ascii", errors="replace").strip()
    except OSError as error:
        raise LedgerTokenMissing(f"cannot read the ledger token file {config.token_file}: {error.strerror}") from None
    return check_token(stored, str(config.token_file))


def read_ledger_token(state_dir: Path, config: LedgerClientConfig | None = None) -> str:
    """The token a client sends: GATEWAY_LEDGER_TOKEN, else GATEWAY_LEDGER_TOKEN_FILE's, else the one in
    `<state>/ledger-token` (settings from `config`, default: the environment).

    LedgerTokenMissing when none exists (the ledger of this state directory has not started yet,
    or the ledger runs elsewhere and neither setting is given); LedgerTokenInvalid for a damaged file.
    """
    configured = configured_token(config)
    if configured is not None:
        return configured
    path = StateLayout(state_dir).ledger_token
    deadline = time.monotonic() + _CONCURRENT_WRITE_SECONDS
    while True:
        try:
            stored = path.read_text(encoding="ascii", errors="replace").strip()
        except FileNotFoundError:
            raise LedgerTokenMissing(
                f"no ledger token: set {TOKEN_ENV}, or use the state directory of the ledger service "
                f"(`gateway ledger serve` writes {path} at its first start)") from None
        if stored or time.monotonic() > deadline:
            return check_token(stored, str(path))
        time.sleep(0.05)  # created with O_EXCL a moment ago and not written yet


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """gRPC call metadata carrying `token`."""
    return (("authorization", f"Bearer {token}"),)
