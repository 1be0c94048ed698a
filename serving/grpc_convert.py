"""Conversions between the gRPC messages of `gateway.inference.v1` and the serving domain.

A GenerateRequest is turned into the same request model the HTTP API validates, so both front
doors accept and reject exactly the same inputs; parameter names in errors are the proto's.
"""

from __future__ import annotations

import json
from typing import Any

import grpc

from serving.engine import ModelCard, StepOutput
from serving.errors import ApiError, InvalidRequest
from serving.openai_protocol import ChatCompletionRequest, CompletionRequest, parse_request
from wire.inference.v1 import inference_pb2 as pb

OPTIONAL_FIELDS = (
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "min_tokens",
)
# HTTP parameter name -> proto field name, for error messages.
PROTO_PARAM = {"messages": "chat", "max_completion_tokens": "max_tokens"}
FINISH = {None: pb.FINISH_REASON_UNSPECIFIED, "length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP,
          "abort": pb.FINISH_REASON_ABORT}
STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
          402: grpc.StatusCode.FAILED_PRECONDITION, 403: grpc.StatusCode.PERMISSION_DENIED,
          404: grpc.StatusCode.NOT_FOUND, 422: grpc.StatusCode.FAILED_PRECONDITION,
          429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}


def from_pb(request: pb.GenerateRequest) -> tuple[CompletionRequest | ChatCompletionRequest, bool]:
    """The validated request model and whether it is a chat request; InvalidRequest otherwise."""
    body: dict[str, Any] = {"model": request.model, "ignore_eos": request.ignore_eos,
                            "attribution": request.attribution}
    for name in OPTIONAL_FIELDS:
        if request.HasField(name):
            body[name] = getattr(request, name)
    if request.stop:
        body["stop"] = list(request.stop)
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidRequest("set one of prompt, chat or prompt_token_ids", param="input")
    if kind == "chat":
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.chat.messages]
    else:
        body["prompt"] = request.prompt if kind == "prompt" else list(request.prompt_token_ids.ids)
    chat = kind == "chat"
    return parse_request(ChatCompletionRequest if chat else CompletionRequest, json.dumps(body).encode()), chat


def with_proto_param(error: ApiError, request: pb.GenerateRequest) -> ApiError:
    """`error` with the HTTP parameter name it carries replaced by the proto field's name."""
    param = PROTO_PARAM.get(error.param or "", error.param)
    if param == "prompt" and request.WhichOneof("input") != "prompt":
        param = request.WhichOneof("input")
    if param != error.param:
        error.message = error.message.replace(f"'{error.param}'", f"'{param}'")
        error.param = param
    return error


def step_to_pb(request_id: str, model: str, step: StepOutput) -> pb.GenerateResponse:
    delta = step.deltas[0]
    return pb.GenerateResponse(id=request_id, model=model, text=delta.text, token_ids=delta.token_ids,
                               finish_reason=FINISH.get(delta.finish_reason, pb.FINISH_REASON_STOP))


def attribution_to_pb(summary: dict[str, Any]) -> pb.Attribution:
    """The response's attribution summary (see OpenAIService.attribution_summary) as a message."""
    return pb.Attribution(
        trace_id=summary["trace_id"],
        attributed_fraction=summary["attributed_fraction"],
        contributors=[
            pb.ContributorShare(address=c["address"], weight=c["weight"], contributions=[
                pb.ContributionShare(id=x["id"], datanet=x["datanet"], weight=x["weight"]) for x in c["contributions"]
            ])
            for c in summary["contributors"]
        ],
    )


def usage_pb(prompt_tokens: int, completion_tokens: int) -> pb.Usage:
    return pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens)


def models_to_pb(cards: list[ModelCard]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(models=[pb.Model(id=c.id, parent=c.parent or "") for c in cards])


def status_of(error: ApiError) -> grpc.StatusCode:
    return STATUS.get(error.status, grpc.StatusCode.INTERNAL)


def error_details(error: ApiError) -> str:
    """The status message: the error text, with the offending field named first."""
    return f"{error.param}: {error.message}" if error.param and not error.message.startswith(f"'{error.param}'") \
        else error.message
