"""Request metrics count what happened: outcomes by status, tokens, TTFT once, one gap per later token.

Above the engine boundary with the scripted engine of test_openai_service.py and the real HTTP app
(the real engine's metrics are checked on the running stack in tests/monitoring/).
"""

from __future__ import annotations

import httpx
from prometheus_client import CollectorRegistry

from serving.metrics import RequestMetrics
from serving.openai_router import build_app
from serving.openai_service import OpenAIService
from tests.serving.test_openai_service import ScriptedEngine, request


def metered(engine: ScriptedEngine) -> tuple[OpenAIService, CollectorRegistry]:
    registry = CollectorRegistry()
    return OpenAIService(engine, metrics=RequestMetrics(registry)), registry  # type: ignore[arg-type]


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_a_completed_request_counts_once_with_its_tokens_and_latencies() -> None:
    service, registry = metered(ScriptedEngine("one two three four"))
    await service.run(await service.prepare_completion(request()), chat=False)
    labels = {"model": "base", "adapter": ""}
    assert value(registry, "gateway_requests_total", **labels, api="completions", status="200") == 1
    assert value(registry, "gateway_prompt_tokens_total", **labels) == 3
    assert value(registry, "gateway_completion_tokens_total", **labels) == 4
    assert value(registry, "gateway_time_to_first_token_seconds_count", api="completions") == 1
    assert value(registry, "gateway_inter_token_latency_seconds_count", api="completions") == 3
    assert value(registry, "gateway_request_duration_seconds_count", api="completions") == 1
    assert value(registry, "gateway_requests_in_flight", api="completions") == 0


async def test_an_engine_failure_counts_with_its_status_and_a_client_that_leaves_as_499() -> None:
    service, registry = metered(ScriptedEngine(fail_after=1))
    chunks = [chunk async for chunk in service.stream(await service.prepare_completion(request(stream=True)), False)]
    assert b"error" in chunks[-2]
    assert value(registry, "gateway_requests_total", model="base", adapter="", api="completions", status="503") == 1

    service, registry = metered(ScriptedEngine("a b c d e f"))
    stream = service.stream(await service.prepare_completion(request(stream=True)), False)
    await anext(stream)
    await stream.aclose()  # the client went away after the first chunk
    assert value(registry, "gateway_requests_total", model="base", adapter="", api="completions", status="499") == 1
    assert value(registry, "gateway_completion_tokens_total", model="base", adapter="") == 1
    assert value(registry, "gateway_requests_in_flight", api="completions") == 0


async def test_requests_refused_at_the_door_count_by_status_without_client_made_labels() -> None:
    service, registry = metered(ScriptedEngine())
    app = build_app(service)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as http:
        unknown = await http.post("/v1/completions", json={"model": "made-up-name", "prompt": "x"})
        broken = await http.post("/v1/chat/completions", content=b"{nope")
        scrape = await http.get("/metrics")
    assert (unknown.status_code, broken.status_code) == (404, 400)
    assert value(registry, "gateway_requests_total", model="base", adapter="", api="completions", status="404") == 1
    assert value(registry, "gateway_requests_total", model="base", adapter="", api="chat_completions",
                 status="400") == 1
    assert scrape.status_code == 200 and scrape.headers["content-type"].startswith("text/plain")
    assert "made-up-name" not in registry_text(registry)


def registry_text(registry: CollectorRegistry) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()
