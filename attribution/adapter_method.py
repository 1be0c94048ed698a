"""Which attribution method an adapter's responses get, recorded beside the adapter as ``attribution.json``.

``{"method": "verbatim+influence-v1"}`` (verbatim spans where they exist, gradient influence elsewhere:
the adapter also carries ``influence.safetensors``) or ``{"method": "verbatim-span-v1"}``. An adapter
without the file (trained before methods were recorded, or registered from elsewhere) is verbatim.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

METHOD_FILE = "attribution.json"
VERBATIM = "verbatim-span-v1"
COMBINED = "verbatim+influence-v1"
METHODS = (VERBATIM, COMBINED)


def _check(method: object, where: str) -> str:
    if method not in METHODS:
        raise ValueError(f"{where}: unknown attribution method {method!r}; known: {', '.join(METHODS)}")
    return method  # type: ignore[return-value]


def write_method(adapter_dir: Path, method: str) -> Path:
    """Record `method` for the adapter in `adapter_dir` (atomically); return the file's path."""
    _check(method, f"adapter {adapter_dir}")
    target = Path(adapter_dir) / METHOD_FILE
    handle, staging = tempfile.mkstemp(prefix=f".{METHOD_FILE}.", dir=adapter_dir)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(json.dumps({"method": method}) + "\n")
        os.chmod(staging, 0o644)
        os.replace(staging, target)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return target


def read_method(adapter_dir: Path) -> str:
    """The adapter's recorded method; verbatim when it has no method file. ValueError for a malformed file."""
    path = Path(adapter_dir) / METHOD_FILE
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return VERBATIM
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} cannot be read: {exc}") from None
    try:
        recorded = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(recorded, dict) or "method" not in recorded:
        raise ValueError(f"{path} must be an object with a \"method\"")
    return _check(recorded["method"], str(path))
