"""Credentials in tests: the local admin key of a state directory, and channels that carry the ledger token."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support.ledger_server import served_ledger


@contextmanager
def operator_ledger(state: Path) -> Iterator[str]:
    """The ledger of `state` served in the test's process with the CLI pointed at it
    (`GATEWAY_LEDGER_PORT`), and the local admin key bootstrapped through it, as `gateway up` has it
    done (its value is yielded). Administration goes through the ledger's Admin API."""
    with served_ledger(state) as ledger, pytest.MonkeyPatch.context() as patch:
        patch.setenv("GATEWAY_LEDGER_PORT", str(ledger.port))
        yield ledger.bootstrap()


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
              grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call of a channel, whatever its kind."""

    def __init__(self, token: str) -> None:
        self.token = token

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), ("authorization", f"Bearer {self.token}")])

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def ledger_channel(target: str, token: str) -> grpc.Channel:
    """A channel to the ledger at `target` whose every call carries `token`."""
    return grpc.intercept_channel(grpc.insecure_channel(target), _Bearer(token))
