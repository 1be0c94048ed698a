"""Errors the serving layer turns into OpenAI error bodies.

    ApiError                     (any status; carries type, param, code and response headers)
    ├── InvalidRequest           400 invalid_request_error
    ├── Unauthenticated          401 invalid_request_error / invalid_api_key   (gRPC: UNAUTHENTICATED)
    ├── InsufficientQuota        402 insufficient_quota / insufficient_quota  (gRPC: FAILED_PRECONDITION)
    ├── Forbidden                403 invalid_request_error / admin_key_required (gRPC: PERMISSION_DENIED)
    ├── ModelNotFound            404 invalid_request_error / model_not_found
    ├── AdapterUnavailable       422 invalid_request_error / adapter_unavailable
    ├── Overloaded               429 rate_limit_error / overloaded   (gRPC: RESOURCE_EXHAUSTED)
    ├── RateLimited              429 rate_limit_error / rate_limit_exceeded, with retry-after
    ├── EngineUnavailable        503 server_error / engine_unavailable
    ├── AccountingBacklog        503 server_error / outbox_full      (gRPC: UNAVAILABLE)
    └── UsageNotRecorded         503 server_error / usage_not_recorded (gRPC: UNAVAILABLE)
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error with an HTTP status and OpenAI's error fields."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}
        if code is not None:
            self.code = code

    def to_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class Unauthenticated(ApiError):
    """No API key, a malformed or unknown one, or a revoked one (the message never repeats the key)."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class InsufficientQuota(ApiError):
    """The request's worst-case cost exceeds what the key's account has available."""

    status = 402
    type = "insufficient_quota"
    code = "insufficient_quota"


class Forbidden(ApiError):
    status = 403
    type = "invalid_request_error"
    code = "admin_key_required"


class RateLimited(ApiError):
    """A per-key limit (requests/s or tokens/min) is exhausted; `retry-after` says when to come back."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ModelNotFound(ApiError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model '{model}' does not exist (see GET /v1/models).", param="model")


class TraceNotFound(ApiError):
    status = 404
    type = "invalid_request_error"
    code = "trace_not_found"

    def __init__(self, trace_id: str) -> None:
        super().__init__(f"No attribution trace '{trace_id}' on this gateway (traces are kept for recent requests).")


class AdapterUnavailable(ApiError):
    """The adapter is registered but its files cannot be served (missing, corrupt, incompatible)."""

    status = 422
    type = "invalid_request_error"
    code = "adapter_unavailable"


class Overloaded(ApiError):
    status = 429
    type = "rate_limit_error"
    code = "overloaded"


class EngineUnavailable(ApiError):
    status = 503
    type = "server_error"
    code = "engine_unavailable"


class LedgerUnreachable(ApiError):
    """The ledger did not answer a look-up or a lease this request needed."""

    status = 503
    type = "server_error"
    code = "ledger_unavailable"


class AccountingBacklog(ApiError):
    """The trace outbox is full (the ledger has been unreachable for long): serving would go unbilled."""

    status = 503
    type = "server_error"
    code = "outbox_full"


class UsageNotRecorded(ApiError):
    """The response's usage record could not be made durable, so the response is not completed."""

    status = 503
    type = "server_error"
    code = "usage_not_recorded"
