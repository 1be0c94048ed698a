"""The `gateway adapter` commands: what each bad input gets, and that the store is left intact."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli import main
from tests.support.credentials import operator_ledger


@pytest.fixture()
def state(demo_state: Path, tmp_path: Path) -> Iterator[Path]:
    """A state dir sharing the demo model, with an empty adapter store of its own, its ledger and its
    operator's admin key."""
    (tmp_path / "models").symlink_to(demo_state / "models")
    with operator_ledger(tmp_path):
        yield tmp_path


OWNER = "0x" + "ab" * 20


def run(state: Path, *args: str) -> int:
    return main(["--state-dir", str(state), "adapter", *args])


def register(state: Path, name: str, path: Path) -> int:
    return run(state, "register", name, "--path", str(path), "--owner", OWNER)


def test_register_then_list(state: Path, scratch_adapter: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert register(state, "mine", scratch_adapter) == 0
    capsys.readouterr()
    assert run(state, "list", "--json") == 0
    [listed] = json.loads(capsys.readouterr().out)["adapters"]
    assert (listed["adapter"], listed["registered"], listed["lineage"]) == ("mine", True, [])


@pytest.mark.parametrize(
    ("name", "source", "phrase"),
    [
        ("../escape", "adapter", "adapter names are"),
        ("ok-name", "missing-dir", "is not a directory"),
        ("ok-name", "not-lora", "not a LoRA adapter"),
    ],
)
def test_register_rejects_bad_input_with_exit_2(state: Path, scratch_adapter: Path, tmp_path: Path, name: str,
                                                source: str, phrase: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert register(state, "kept", scratch_adapter) == 0
    stored = sorted(p.name for p in (state / "adapters").iterdir())
    assert stored == [".kept.sha256", "kept"], "the adapter and its digest"
    paths = {"adapter": scratch_adapter, "missing-dir": tmp_path / "nowhere", "not-lora": tmp_path / "prefix"}
    if source == "not-lora":
        paths[source].mkdir()
        (paths[source] / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    capsys.readouterr()
    assert register(state, name, paths[source]) == 2
    assert phrase in capsys.readouterr().err
    assert sorted(p.name for p in (state / "adapters").iterdir()) == stored, "nothing stored is lost or added"


def test_list_shows_store_only_adapters_and_show_rejects_unknown(state: Path, scratch_adapter: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(scratch_adapter, state / "adapters" / "loadtest-only")
    assert run(state, "list", "--json") == 0
    [listed] = json.loads(capsys.readouterr().out)["adapters"]
    assert (listed["adapter"], listed["registered"], listed["owner"]) == ("loadtest-only", False, None)
    assert run(state, "show", "loadtest-only") == 2
    assert capsys.readouterr().err == "gateway: no registered adapter named 'loadtest-only'\n"


def test_no_auth_is_refused_off_loopback(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["--state-dir", str(tmp_path), "up", "--no-auth", "--host", "0.0.0.0"])
    err = capsys.readouterr().err
    assert code == 2 and "--no-auth is refused on 0.0.0.0" in err
    assert os.environ.get("GATEWAY_AUTH") is None, "nothing was switched off"
    assert not (tmp_path / "local-api-key").exists(), "nothing was started"
