"""Administrative commands need an admin API key.

`gateway keys …`, `gateway accounts create|credit|share`, `gateway adapter register` and
`gateway settle` change who may spend, what is sold or what is paid. They ask for an admin key:
`GATEWAY_ADMIN_KEY`, or else the local key `gateway up` wrote to `<state>/local-api-key` (so the
operator of `make up` never types one). A ledger with no admin key yet (before the first
`gateway up`) is being set up and asks for none.
"""

from __future__ import annotations

import os

from sqlmodel import Session, select

from gateway.cli_output import CommandError
from gateway.config import GatewayConfig

LOCAL_KEY_FILE = "local-api-key"


def require_admin(config: GatewayConfig, engine: object) -> None:
    """Return when an admin key is presented (or none exists yet); CommandError (exit 2) otherwise."""
    from ledger.api_keys import ApiKeys
    from ledger.models import ApiKey

    with Session(engine) as session:  # type: ignore[arg-type]
        bootstrapping = session.exec(select(ApiKey.id).where(
            ApiKey.admin == True, ApiKey.revoked_at == None).limit(1)).first() is None  # noqa: E711, E712
    if bootstrapping:
        return
    presented = os.environ.get("GATEWAY_ADMIN_KEY", "").strip()
    local = config.state_dir / LOCAL_KEY_FILE
    if not presented and local.exists():
        presented = local.read_text().strip()
    key = ApiKeys(engine).verify(presented) if presented else None  # type: ignore[arg-type]
    if key is None or not key.admin:
        raise CommandError("this command needs an admin API key: set GATEWAY_ADMIN_KEY (`gateway up` keeps the "
                           f"local one in {local})" if key is None else
                           f"key {key.id} is not an admin key; use one created with `gateway keys create --admin`")


def require_admin_of(config: GatewayConfig) -> None:
    """`require_admin` on the state directory's ledger database."""
    from ledger.database import database_url, open_database

    engine = open_database(database_url(config.state_dir))
    try:
        require_admin(config, engine)
    finally:
        engine.dispose()
