"""HTTP transport of the OpenAI-compatible API: decode → OpenAIService → encode."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.errors import ApiError
from serving.openai_protocol import ChatCompletionRequest, CompletionRequest, parse_request
from serving.openai_service import OpenAIService

if TYPE_CHECKING:
    from serving.access import Caller

log = logging.getLogger(__name__)

TRACE_HEADER = "x-attribution-trace-id"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.to_body(), status_code=exc.status, headers=exc.headers or None)


def build_app(service: OpenAIService) -> FastAPI:
    """The OpenAI HTTP app over `service` (bound to this process's engine)."""
    app = FastAPI(title="Datanet Gateway", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    def caller(request: Request) -> Caller | None:
        return service.authenticate(request.headers.get("authorization"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = ApiError(str(exc.detail), code=str(exc.status_code))
        error.type = "invalid_request_error"
        return JSONResponse(error.to_body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse(ApiError(f"internal error: {type(exc).__name__}").to_body(), status_code=500)

    @app.get("/health")
    async def health() -> Response:
        await service.engine.check_health()
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        """This replica's Prometheus metrics (ours and vLLM's). On the API port they need an admin key
        (their labels name every adapter, private ones too); Prometheus scrapes the replica's own
        scrape port, which needs none."""
        if service.access is not None:
            service.access.require_admin(caller(request))
        return Response(await asyncio.to_thread(generate_latest), media_type=CONTENT_TYPE_LATEST)

    @app.get("/stats")
    async def stats(request: Request) -> JSONResponse:
        return JSONResponse(service.stats(caller(request)))

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        return JSONResponse(service.list_models(caller(request)))

    async def _generate(request: Request, chat: bool) -> Response:
        body = await request.body()
        parsed: ChatCompletionRequest | CompletionRequest | None = None
        try:
            who = caller(request)
            if chat:
                parsed = parse_request(ChatCompletionRequest, body)
                job = await service.prepare_chat(parsed, caller=who)
            else:
                parsed = parse_request(CompletionRequest, body)
                job = await service.prepare_completion(parsed, caller=who)
        except ApiError as exc:
            service.count_rejection("chat_completions" if chat else "completions",
                                    parsed.model if parsed else None, exc)
            raise
        headers = {TRACE_HEADER: job.request_id}
        if job.stream:
            return StreamingResponse(
                service.stream(job, chat), media_type="text/event-stream", headers={**SSE_HEADERS, **headers}
            )
        return JSONResponse(await service.run(job, chat), headers=headers)

    @app.get("/v1/attributions/{trace_id}")
    async def attribution(trace_id: str, request: Request) -> JSONResponse:
        return JSONResponse(await service.trace(trace_id, caller(request)))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(request, chat=True)

    return app
