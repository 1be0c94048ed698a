"""gRPC front door: the `Inference` servicer (thin: decode → backend → encode) and its server,
with the standard health service and server reflection on the same port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving.errors import ApiError
from serving.grpc_convert import (
    attribution_to_pb,
    error_details,
    from_pb,
    models_to_pb,
    status_of,
    step_to_pb,
    usage_pb,
    with_proto_param,
)
from serving.openai_service import OpenAIService
from wire.inference.v1 import inference_pb2 as pb
from wire.inference.v1 import inference_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name
API = "grpc"  # the `api` label of this door's requests in the metrics


class InferenceBackend(Protocol):
    """Where generation happens: this process's engine, or engine replicas behind a Serve handle."""

    def generate(self, request: pb.GenerateRequest, authorization: str | None) -> AsyncIterator[pb.GenerateResponse]:
        ...

    async def list_models(self, authorization: str | None) -> pb.ListModelsResponse: ...


class LocalBackend:
    """Generation on the engine of this process."""

    def __init__(self, service: OpenAIService) -> None:
        self.service = service

    async def generate(self, request: pb.GenerateRequest,
                       authorization: str | None = None) -> AsyncIterator[pb.GenerateResponse]:
        service = self.service
        try:
            caller = service.authenticate(authorization)
            parsed, chat = from_pb(request)
            job = await (service.prepare_chat(parsed, API, caller) if chat  # type: ignore[arg-type]
                         else service.prepare_completion(parsed, API, caller))  # type: ignore[arg-type]
        except ApiError as exc:
            service.count_rejection(API, request.model, exc)
            raise with_proto_param(exc, request) from None
        completion_tokens = 0
        async with aclosing(service.billed_steps(job)) as steps:
            async for step, pending in steps:  # the final message waits for the usage record
                completion_tokens += sum(len(delta.token_ids) for delta in step.deltas)
                message = step_to_pb(job.request_id, job.model, step)
                if step.finished:
                    message.usage.CopyFrom(usage_pb(len(job.prompt_ids), completion_tokens))
                    message.attribution_trace_id = job.request_id
                    if request.attribution:
                        summary = await service.attribution_summary(job, pending)
                        if summary is not None:
                            message.attribution.CopyFrom(attribution_to_pb(summary))
                yield message

    async def list_models(self, authorization: str | None = None) -> pb.ListModelsResponse:
        caller = self.service.authenticate(authorization)
        return models_to_pb([card for card in self.service.engine.models() if self.service.visible(caller, card.id)])


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, backend: InferenceBackend) -> None:
        self.backend = backend

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        text: list[str] = []
        token_ids: list[int] = []
        last = pb.GenerateResponse()
        try:
            async for message in self.backend.generate(request, authorization_of(context)):
                text.append(message.text)
                token_ids.extend(message.token_ids)
                last = message
        except ApiError as exc:
            await abort(context, exc)
        whole = pb.GenerateResponse()
        whole.CopyFrom(last)
        whole.text = "".join(text)
        whole.token_ids[:] = token_ids
        return whole

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            async for message in self.backend.generate(request, authorization_of(context)):
                yield message
        except ApiError as exc:
            await abort(context, exc)

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        try:
            return await self.backend.list_models(authorization_of(context))
        except ApiError as exc:
            await abort(context, exc)
            raise  # not reached: abort raises


def authorization_of(context: grpc.aio.ServicerContext) -> str | None:
    """The `authorization` metadata of a call (the gRPC spelling of the HTTP header)."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode()
    return None


async def abort(context: grpc.aio.ServicerContext, exc: ApiError) -> None:
    """End the call with the error's status; `retry-after` travels as trailing metadata."""
    if exc.headers:
        context.set_trailing_metadata(tuple(exc.headers.items()))
    await context.abort(status_of(exc), error_details(exc))


async def start_grpc_server(backend: InferenceBackend, host: str, port: int) -> grpc.aio.Server:
    """Serve `Inference`, `grpc.health.v1.Health` and reflection on host:port; raises if it cannot bind."""
    server = grpc.aio.server()
    pb_grpc.add_InferenceServicer_to_server(InferenceServicer(backend), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise RuntimeError(f"gRPC server could not listen on {host}:{port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server


def serialized_stream_error(exc: ApiError) -> dict[str, Any]:
    """An ApiError as a plain value that crosses a Serve handle (exceptions lose their type there)."""
    return {"error": {"status": exc.status, "message": exc.message, "param": exc.param, "code": exc.code},
            "headers": exc.headers}
