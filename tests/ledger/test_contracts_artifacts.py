"""The committed contract artifacts are exactly what compiling the committed sources gives."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ledger.chain.contracts.artifacts import (
    ARTIFACTS_DIR,
    CONTRACTS_DIR,
    REPO_ROOT,
    ArtifactError,
    compile_contracts,
    load_artifact,
)

REGENERATE = ("regenerate them with `node ledger/chain/contracts/compile.mjs` (needs `make install`) and commit the "
              "result")


def test_committed_artifacts_are_up_to_date(tmp_path: Path) -> None:
    fresh = {path.name: path.read_bytes() for path in compile_contracts(tmp_path)}
    committed = {path.name: path.read_bytes() for path in sorted(ARTIFACTS_DIR.glob("*.json"))}
    assert sorted(fresh) == sorted(committed), (
        f"artifact files differ from the contracts (fresh {sorted(fresh)}, committed {sorted(committed)}); {REGENERATE}"
    )
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale artifacts in ledger/chain/contracts/artifacts: {stale}; {REGENERATE}"


def test_registry_artifact_records_its_source() -> None:
    artifact = load_artifact("DatanetRegistry")
    source = (CONTRACTS_DIR / "DatanetRegistry.sol").read_bytes()
    assert artifact.name == "DatanetRegistry"
    assert artifact.source_sha256 == hashlib.sha256(source).hexdigest()
    assert artifact.compiler.startswith("0.8.37")
    assert artifact.bytecode.startswith("0x") and len(artifact.bytecode) > 1000
    names = {entry.get("name") for entry in artifact.abi}
    assert {"anchor", "rootOf", "anchoredVersion", "verify", "VersionAnchored", "VersionAlreadyAnchored"} <= names


def test_unknown_artifact_names_how_to_regenerate() -> None:
    with pytest.raises(ArtifactError, match="compile.mjs"):
        load_artifact("NoSuchContract")


def test_compile_errors_are_reported(tmp_path: Path) -> None:
    """A broken source fails with solc's message and writes nothing (run on a copy of the script)."""
    contracts = tmp_path / "contracts"
    contracts.mkdir()
    (contracts / "compile.mjs").write_bytes((CONTRACTS_DIR / "compile.mjs").read_bytes())
    (contracts / "Broken.sol").write_text("pragma solidity ^0.8.24;\ncontract Broken { uint x = ; }\n")
    (tmp_path / "node_modules").symlink_to(REPO_ROOT / "node_modules")

    import subprocess

    result = subprocess.run(
        ["node", str(contracts / "compile.mjs"), str(tmp_path / "out")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert "ParserError" in result.stderr and "Broken.sol:2" in result.stderr
    assert "no artifacts written" in result.stderr
    assert not (tmp_path / "out").exists()
