"""Demo data on first start: resumable, and adapters already in the store are recorded, not retrained."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.config import PRETRAINED_MODEL, GatewayConfig
from gateway.demo_data import demo_adapter_name, demo_contributor_address, demo_datanets, ensure_demo_datanets
from gateway.ledger_access import open_registries
from tests.support.memory_anchor import MemoryAnchor
from training.demo_facts import DEMO_FACT_DATANETS
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


def test_a_demo_datanet_count_builds_only_the_first_ones(tmp_path: Path) -> None:
    assert demo_datanets(GatewayConfig(state_dir=tmp_path)) == DEMO_DATANETS
    assert demo_datanets(GatewayConfig(state_dir=tmp_path, demo_datanet_count=1)) == DEMO_DATANETS[:1]
    pretrained = GatewayConfig(state_dir=tmp_path, base_model=PRETRAINED_MODEL, demo_datanet_count=1)
    assert demo_datanets(pretrained) == (DEMO_FACT_DATANETS[0].datanet,)
    for bad in (0, -1, "two"):
        with pytest.raises(ValidationError, match="demo_datanet_count"):
            GatewayConfig(state_dir=tmp_path, demo_datanet_count=bad)  # type: ignore[arg-type]
