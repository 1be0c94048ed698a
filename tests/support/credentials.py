"""Credentials in tests: the local admin key of a state directory, and channels that carry the ledger token."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc


def bootstrap_admin(state: Path, credit: int = 0) -> str:
    """The local admin key of `state`, created as `gateway up` / `gateway keys bootstrap` do (returned)."""
    from gateway.admin_access import create_local_key
    from gateway.config import GatewayConfig

    return create_local_key(GatewayConfig(state_dir=state), credit).presented


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
