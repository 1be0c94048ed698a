"""Output conventions of every `gateway` command.

With `--json` a command prints exactly one JSON object on stdout; without it, lines for people.
Progress goes to stderr. Every error is one line on stderr (``gateway: <reason>``) and a non-zero
exit: 2 for bad input or a refused request, 1 when something outside failed (chain, disk), 130
when interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


class CommandError(Exception):
    """A command's one-line failure reason and exit code."""

    def __init__(self, reason: str, exit_code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(reason)
        self.exit_code = exit_code


def json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def emit(args: argparse.Namespace, payload: dict[str, Any], human: Callable[[dict[str, Any]], str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(payload, sort_keys=False))
    else:
        print(human(payload))


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fail(reason: str, exit_code: int) -> int:
    print(f"gateway: {' '.join(str(reason).split())}", file=sys.stderr)
    return exit_code
