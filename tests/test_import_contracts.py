"""The declared layering of the packages holds: `lint-imports` checks the contracts in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept() -> None:
    result = subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache", "--no-logo"],
                            cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, f"lint-imports failed:\n{result.stdout}\n{result.stderr}"


def test_the_ledger_client_contract_forbids_every_other_part_of_the_ledger() -> None:
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    [client] = [contract for contract in contracts if contract["id"] == "ledger-client"]
    parts = {f"ledger.{path.stem}" for path in (REPO / "ledger").iterdir()
             if path.suffix == ".py" and path.stem != "__init__" or (path / "__init__.py").is_file()}
    assert set(client["forbidden_modules"]) == parts - {"ledger.client"}
