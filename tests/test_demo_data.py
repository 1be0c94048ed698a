"""Demo data on first start: resumable, and adapters already in the store are recorded, not retrained."""

from __future__ import annotations

import shutil
from pathlib import Path

from gateway.config import GatewayConfig
from gateway.demo_data import demo_adapter_name, demo_contributor_address, ensure_demo_datanets
from gateway.ledger_access import open_registries
from tests.support.memory_anchor import MemoryAnchor
from training.demo_passages import DEMO_DATANETS


def test_adapters_found_in_the_store_are_registered_with_lineage(demo_state: Path, tmp_path: Path,
                                                                  monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("DATABASE_URL", raising=False)
    (tmp_path / "models").symlink_to(demo_state / "models")
    for datanet in DEMO_DATANETS:  # the store survived, the ledger did not
        shutil.copytree(demo_state / "adapters" / "demo-adapter-000", tmp_path / "adapters" / demo_adapter_name(datanet))
    config = GatewayConfig(state_dir=tmp_path)
    anchor = MemoryAnchor()
    lines: list[str] = []
    ensure_demo_datanets(config, anchor, lines.append)
    ensure_demo_datanets(config, anchor, lines.append)  # the second start finds everything done

    registries = open_registries(config)
    for datanet in DEMO_DATANETS:
        record = registries.adapters.get(demo_adapter_name(datanet))
        assert [entry.spec() for entry in record.lineage] == [f"{datanet.name}@1"]
        contributors = {c.contributor for c in registries.datanets.contributions(datanet.name, 1)}
        assert contributors == {demo_contributor_address(p.contributor_index) for p in datanet.passages}
    assert len(anchor.roots) == len(DEMO_DATANETS), "each demo datanet anchored exactly once"
    assert not any("training" in line for line in lines)
    assert sum("found in the store" in line for line in lines) == len(DEMO_DATANETS)
