"""The `gateway` CLI run in-process on one state directory, as a user in another terminal would run it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.cli import main


def cli(capsys: pytest.CaptureFixture[str], state: Path, *args: str) -> dict:
    """`gateway --state-dir STATE ARGS --json`: its JSON output (the command must succeed)."""
    capsys.readouterr()
    code = main(["--state-dir", str(state), *args, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)
