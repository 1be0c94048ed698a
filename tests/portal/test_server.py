"""The portal started as `gateway portal` and `gateway up` start it: `start_portal` over a state directory.

test_pages.py builds the portal's services by hand; this starts it through gateway/portal_pages.py
(the chain view, the ledger clients of the state directory, the tokenizer, a real port) and asks it
for pages over HTTP.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from gateway.config import GatewayConfig
from gateway.portal_pages import start_portal
from portal.config import PortalConfig
from storage.database import database_url
from tests.ledger.conftest import rivers_ledger
from tests.registry.test_datanet_registry import ALICE
from tests.support.ledger_server import served_ledger


def test_start_portal_serves_the_pages_of_a_state_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from training.demo_assets import build_tokenizer

    state = tmp_path / "state"
    state.mkdir()
    rivers_ledger(database_url(state), tmp_path).dispose()
    config = GatewayConfig(state_dir=state)
    build_tokenizer(config.model_path)
    with served_ledger(state) as ledger:
        for name, value in ledger.env.items():
            monkeypatch.setenv(name, value)
        server = start_portal(config, PortalConfig(port=0))
        try:
            assert server.port > 0
            listing = httpx.get(f"{server.url}/datanets", timeout=30)
            assert listing.status_code == 200 and 'data-datanet="rivers"' in listing.text
            contributor = httpx.get(f"{server.url}/contributors/{ALICE.address}", timeout=30)
            assert contributor.status_code == 200 and 'data-verify="inclusion"' in contributor.text
            sign_in = httpx.get(f"{server.url}/sign-in", timeout=30)
            assert sign_in.status_code == 200
        finally:
            server.stop()
