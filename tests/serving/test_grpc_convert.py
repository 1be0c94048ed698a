"""GenerateRequest → the HTTP API's request models: same validation, proto field names in errors."""

from __future__ import annotations

import grpc
import pytest

from serving.engine import Delta, ModelCard, StepOutput
from serving.errors import AdapterUnavailable, InvalidRequest, ModelNotFound, Overloaded
from serving.grpc_convert import error_details, from_pb, models_to_pb, status_of, step_to_pb, with_proto_param
from serving.openai_protocol import ChatCompletionRequest, CompletionRequest
from wire.inference.v1 import inference_pb2 as pb


def test_prompt_request_keeps_only_set_fields() -> None:
    parsed, chat = from_pb(pb.GenerateRequest(model="m", prompt="hi", max_tokens=7, top_k=3, stop=["x"]))
    assert not chat and isinstance(parsed, CompletionRequest)
    assert (parsed.max_tokens, parsed.top_k, parsed.stop, parsed.temperature) == (7, 3, ["x"], None)


def test_unset_max_tokens_takes_the_http_default() -> None:
    parsed, _ = from_pb(pb.GenerateRequest(model="m", prompt="hi"))
    assert parsed.max_tokens == 16


def test_chat_and_token_ids() -> None:
    chat_request = pb.GenerateRequest(model="m", chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="a")]))
    parsed, chat = from_pb(chat_request)
    assert chat and isinstance(parsed, ChatCompletionRequest) and parsed.messages[0].content == "a"
    parsed, chat = from_pb(pb.GenerateRequest(model="m", prompt_token_ids=pb.TokenIds(ids=[4, 5])))
    assert not chat and parsed.prompt == [4, 5]


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (pb.GenerateRequest(model="m"), "input"),
        (pb.GenerateRequest(model="m", chat=pb.ChatMessages()), "chat"),
        (pb.GenerateRequest(model="m", prompt="x", temperature=3), "temperature"),
        (pb.GenerateRequest(model="", prompt="x"), "model"),
    ],
)
def test_errors_use_proto_names(request_: pb.GenerateRequest, param: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        from_pb(request_)
    renamed = with_proto_param(error.value, request_)
    assert renamed.param == param
    assert param in error_details(renamed)


def test_prompt_errors_name_the_input_that_was_sent() -> None:
    ids = pb.GenerateRequest(model="m", prompt_token_ids=pb.TokenIds(ids=[1]))
    assert with_proto_param(InvalidRequest("too long", param="prompt"), ids).param == "prompt_token_ids"
    chat = pb.GenerateRequest(model="m", chat=pb.ChatMessages())
    assert with_proto_param(InvalidRequest("'messages': bad", param="messages"), chat).message == "'chat': bad"


def test_status_mapping() -> None:
    assert status_of(ModelNotFound("x")) == grpc.StatusCode.NOT_FOUND
    assert status_of(InvalidRequest("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(Overloaded("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(AdapterUnavailable("x")) == grpc.StatusCode.FAILED_PRECONDITION


def test_responses() -> None:
    message = step_to_pb("id1", "m", StepOutput([Delta(0, "hi", [5, 6], "stop", None)], 3, True))
    assert (message.text, list(message.token_ids), message.finish_reason) == ("hi", [5, 6], pb.FINISH_REASON_STOP)
    listing = models_to_pb([ModelCard("base", None), ModelCard("a", "base")])
    assert [(m.id, m.parent) for m in listing.models] == [("base", ""), ("a", "base")]
