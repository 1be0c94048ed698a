"""The ledger service of a state directory, run in the test's process on a free loopback port.

Wired as `gateway ledger serve` wires it (the Ledger and Admin APIs on one port, behind the token of
`<state>/ledger-token`; gateway/ledger_process.py), without the periodic settler and the deposit
watcher. Point the CLI at it with `GATEWAY_LEDGER_PORT` (`ServedLedger.env`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from gateway.config import GatewayConfig
from gateway.ledger_process import admin_api, settlement
from ledger.client.admin import AdminClient, admin_client
from ledger.config import LedgerConfig, SettlementConfig
from ledger.journal.journal import Journal
from ledger.service import ensure_ledger_token, start_server
from storage.database import database_url, open_database
from tests.support.ports import free_port


@dataclass(frozen=True)
class ServedLedger:
    state: Path
    port: int
    token: str
    engine: Engine  # for tests that check what was stored

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What a client needs in its environment to ask this ledger (the token comes from the state directory)."""
        return {"GATEWAY_LEDGER_PORT": str(self.port)}

    @contextmanager
    def admin(self, api_key: str | None = None) -> Iterator[AdminClient]:
        """An Admin API client presenting `api_key`."""
        with admin_client(self.state, api_key, self.target) as client:
            yield client

    def bootstrap(self) -> str:
        """The local admin key, created by the ledger as `gateway keys bootstrap` has it created (its value)."""
        with self.admin() as client:
            key = client.bootstrap_local_key()
        return key.path.read_text().strip()


@contextmanager
def served_ledger(state: Path, url: str | None = None) -> Iterator[ServedLedger]:
    """The ledger of `state` (its token; its database, or the one at `url`) serving until the block ends."""
    config = GatewayConfig(state_dir=state)
    token = ensure_ledger_token(state)
    engine = open_database(url or database_url(state))
    journal = Journal(engine, LedgerConfig().fee_split())
    port = free_port()
    server = start_server(journal, "127.0.0.1", port, token=token,
                          servicers=[admin_api(config, engine, settlement(config, engine, SettlementConfig()))])
    try:
        yield ServedLedger(state, port, token, engine)
    finally:
        server.stop(0).wait()
        engine.dispose()
