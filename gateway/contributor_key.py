"""The private key a contributor signs with (`gateway datanet contribute`) or an adapter owner is named by."""

from __future__ import annotations

import os
from pathlib import Path

from gateway.cli_output import CommandError

KEY_ENV = "GATEWAY_CONTRIBUTOR_KEY"


def load_private_key(key_file: Path | None) -> str:
    """The contributor's key from `--key-file` or GATEWAY_CONTRIBUTOR_KEY; never echoed."""
    if key_file is not None:
        try:
            raw = key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CommandError(f"cannot read key file {key_file}: {exc.strerror or 'error'}") from None
        except UnicodeDecodeError:
            raise CommandError(f"key file {key_file} is not text (expected 64 hex digits)") from None
        where = f"key file {key_file}"
    else:
        raw = os.environ.get(KEY_ENV, "").strip()
        if not raw:
            raise CommandError(f"no contributor key: pass --key-file PATH or set {KEY_ENV}")
        where = KEY_ENV
    digits = raw.removeprefix("0x")
    if len(digits) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digits):
        raise CommandError(f"{where} does not hold a private key (64 hex digits, optionally 0x-prefixed)")
    return "0x" + digits
