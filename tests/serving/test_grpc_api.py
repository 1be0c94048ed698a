"""The gRPC inference API on the real stack, driven by gRPC clients (generated stubs, and a client
that knows the service only through server reflection)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.support.launcher import GatewayProcess
from wire.inference.v1 import inference_pb2 as pb
from wire.inference.v1 import inference_pb2_grpc as pb_grpc

BASE = "datanet-tiny-llama"
PROMPT = "The function returns a value when"


@pytest.fixture(scope="module")
def channel(gateway: GatewayProcess) -> Iterator[grpc.Channel]:
    with gateway.grpc_channel() as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.InferenceStub:
    return pb_grpc.InferenceStub(channel)


def request(model: str = BASE, **fields: object) -> pb.GenerateRequest:
    fields.setdefault("prompt", PROMPT)
    return pb.GenerateRequest(model=model, **fields)


def unfinished(gateway: GatewayProcess) -> int:
    counters = httpx.get(headers=gateway.headers, url=f"{gateway.base_url}/stats").json()
    return counters["engine_unfinished_requests"] + counters["ongoing_requests"]


def wait_until_idle(gateway: GatewayProcess, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while unfinished(gateway):
        assert time.monotonic() < deadline, "the engine slot was not freed"
        time.sleep(0.2)


def test_list_models_matches_http(stub: pb_grpc.InferenceStub, gateway: GatewayProcess) -> None:
    models = stub.ListModels(pb.ListModelsRequest()).models
    assert models[0].id == BASE and models[0].parent == ""
    adapters = [m for m in models if m.parent == BASE]
    assert len(adapters) >= 50
    http_ids = [m["id"] for m in httpx.get(headers=gateway.headers, url=f"{gateway.base_url}/v1/models").json()["data"]]
    assert [m.id for m in models] == http_ids


def test_unary_generation_base_and_adapter(stub: pb_grpc.InferenceStub, gateway: GatewayProcess) -> None:
    base = stub.Generate(request(max_tokens=10, temperature=0))
    adapted = stub.Generate(request("demo-adapter-001", max_tokens=10, temperature=0))
    assert base.text != adapted.text
    assert len(base.token_ids) == 10 and base.usage.completion_tokens == 10
    assert base.finish_reason == pb.FINISH_REASON_LENGTH
    assert base.attribution_trace_id == base.id
    http = httpx.post(headers=gateway.headers, url=f"{gateway.base_url}/v1/completions", json={
        "model": "demo-adapter-001", "prompt": PROMPT, "max_tokens": 10, "temperature": 0}).json()
    assert http["choices"][0]["text"] == adapted.text, "one engine behind both front doors"


def test_streaming_deltas_add_up_to_the_unary_answer(stub: pb_grpc.InferenceStub) -> None:
    whole = stub.Generate(request("demo-adapter-002", max_tokens=12, temperature=0))
    messages = list(stub.GenerateStream(request("demo-adapter-002", max_tokens=12, temperature=0)))
    assert "".join(m.text for m in messages) == whole.text
    assert [t for m in messages for t in m.token_ids] == list(whole.token_ids)
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    last = messages[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == 12 and last.usage.total_tokens == last.usage.prompt_tokens + 12
    assert last.attribution_trace_id == last.id
    assert all(not m.HasField("usage") for m in messages[:-1])


def test_chat_and_token_id_prompts(stub: pb_grpc.InferenceStub) -> None:
    chat = stub.Generate(request(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")]),
                                 prompt=None, max_tokens=4))
    assert chat.usage.completion_tokens == 4 and chat.usage.prompt_tokens > 2
    by_text = stub.Generate(request(max_tokens=6, temperature=0))
    by_ids = stub.Generate(pb.GenerateRequest(model=BASE, prompt_token_ids=pb.TokenIds(ids=[1, 300, 400]),
                                              max_tokens=6, temperature=0))
    assert by_ids.usage.prompt_tokens == 3 and len(by_ids.token_ids) == 6
    assert by_text.text


def test_sampling_parameters(stub: pb_grpc.InferenceStub) -> None:
    first = stub.Generate(request(max_tokens=12, temperature=1.0, seed=5, top_p=0.9))
    again = stub.Generate(request(max_tokens=12, temperature=1.0, seed=5, top_p=0.9))
    assert first.text == again.text
    long = stub.Generate(request(max_tokens=30, ignore_eos=True, min_tokens=30, top_k=4, repetition_penalty=1.2))
    assert long.usage.completion_tokens == 30
    greedy = stub.Generate(request(max_tokens=20, temperature=0)).text
    word = greedy.split()[1]
    stopped = stub.Generate(request(max_tokens=20, temperature=0, stop=[word]))
    assert stopped.finish_reason == pb.FINISH_REASON_STOP and word not in stopped.text


async def test_concurrent_streams(gateway: GatewayProcess) -> None:
    async with gateway.grpc_aio_channel() as channel:
        stub = pb_grpc.InferenceStub(channel)

        async def one(i: int) -> int:
            model = BASE if i % 4 == 0 else f"demo-adapter-{i:03d}"
            call = stub.GenerateStream(request(model, max_tokens=16, ignore_eos=True))
            return sum([len(m.token_ids) async for m in call])

        assert await asyncio.gather(*(one(i) for i in range(20))) == [16] * 20


def test_unknown_model_is_not_found(stub: pb_grpc.InferenceStub) -> None:
    for call in (stub.Generate, lambda r: list(stub.GenerateStream(r))):
        with pytest.raises(grpc.RpcError) as error:
            call(request("no-such-adapter"))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no-such-adapter" in error.value.details()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 5000}, "max_tokens"),
        ({"temperature": 7.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -3}, "top_k"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"min_tokens": 40, "max_tokens": 4}, "min_tokens"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "word " * 1100}, "prompt"),
        ({"prompt": None, "prompt_token_ids": pb.TokenIds(ids=[1, 10**7])}, "prompt_token_ids"),
        ({"prompt": None, "chat": pb.ChatMessages()}, "chat"),
        ({"prompt": None, "chat": pb.ChatMessages(messages=[pb.ChatMessage(role="robot", content="x")])}, "chat"),
        ({"prompt": None}, "input"),
    ],
)
def test_invalid_arguments_name_the_field(stub: pb_grpc.InferenceStub, fields: dict, field: str) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(request(**fields))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(f"'{field}'") or error.value.details().startswith(f"{field}:")


def test_empty_model_is_invalid(stub: pb_grpc.InferenceStub) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(pb.GenerateRequest(prompt=PROMPT))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model" in error.value.details()


def test_deadline_is_honoured_and_frees_the_slot(stub: pb_grpc.InferenceStub, gateway: GatewayProcess) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(request(max_tokens=900, ignore_eos=True), timeout=0.5)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5
    wait_until_idle(gateway)


def test_cancelled_stream_frees_the_slot(stub: pb_grpc.InferenceStub, gateway: GatewayProcess) -> None:
    for _ in range(3):
        call = stub.GenerateStream(request("demo-adapter-003", max_tokens=900, ignore_eos=True))
        received = [next(call) for _ in range(3)]
        assert all(m.token_ids for m in received)
        running = unfinished(gateway)
        call.cancel()
        if running >= 1:
            break
        # A client descheduled long enough (a loaded machine) reads its first messages after the
        # whole request ran: nothing was left to cancel, so try again.
    else:
        pytest.fail("three 900-token requests each finished before the client had read 3 messages")
    wait_until_idle(gateway)


async def test_overload_is_resource_exhausted(gateway: GatewayProcess) -> None:
    """The session gateway admits 40 requests at once (conftest); the rest are turned away."""
    async with gateway.grpc_aio_channel() as channel:
        stub = pb_grpc.InferenceStub(channel)

        async def one() -> grpc.StatusCode:
            try:
                await stub.Generate(request(max_tokens=200, ignore_eos=True))
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                return exc.code()

        codes = await asyncio.gather(*(one() for _ in range(60)))
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1
    assert codes.count(grpc.StatusCode.OK) >= 40
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_health_service(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "gateway.inference.v1.Inference"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as error:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_client_using_reflection_only(channel: grpc.Channel) -> None:
    """No generated stubs: discover the service, build the request type, call Generate."""
    database = ProtoReflectionDescriptorDatabase(channel)
    assert "gateway.inference.v1.Inference" in database.get_services()
    pool = descriptor_pool.DescriptorPool(database)
    service = pool.FindServiceByName("gateway.inference.v1.Inference")
    method = service.methods_by_name["Generate"]
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    generate = channel.unary_unary(
        f"/{service.full_name}/{method.name}",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    reply = generate(request_class(model="demo-adapter-004", prompt=PROMPT, max_tokens=5, temperature=0))
    assert reply.usage.completion_tokens == 5 and reply.text
