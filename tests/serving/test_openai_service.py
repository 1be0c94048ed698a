"""OpenAIService logic above the engine boundary, with a scripted engine (the real engine path is
covered by test_openai_api.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from serving.engine import Delta, StepOutput
from serving.errors import AccountingBacklog, EngineUnavailable, Overloaded
from serving.openai_protocol import CompletionRequest
from serving.openai_service import OpenAIService


class ScriptedEngine:
    """Answers every prompt with the words of `script`, one per step; can be told to fail."""

    base_model = "base"
    max_model_len = 64

    def __init__(self, script: str = "one two three", fail_after: int | None = None) -> None:
        self.words = script.split()
        self.fail_after = fail_after
        self.release = asyncio.Event()
        self.release.set()

    def is_known(self, model: str) -> bool:
        return model == "base"

    async def lora_request(self, model: str) -> None:
        return None

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        return [1, 2, 3]

    def check_length(self, prompt_ids: list[int], max_tokens: int | None, prompt_param: str) -> int:
        return max_tokens or 8

    async def generate(self, prompt_ids: list[int], params: Any, lora: Any, request_id: str) -> AsyncIterator[StepOutput]:
        for step, word in enumerate(self.words):
            await self.release.wait()
            if self.fail_after is not None and step >= self.fail_after:
                raise EngineUnavailable("the engine stopped")
            last = step == len(self.words) - 1
            yield StepOutput([Delta(0, " " + word, [step], "length" if last else None, None)], 3, last)


def request(**extra: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "base", "prompt": "x", **extra})


async def test_non_streaming_joins_deltas_and_counts_usage() -> None:
    service = OpenAIService(ScriptedEngine())  # type: ignore[arg-type]
    body = await service.run(await service.prepare_completion(request()), chat=False)
    assert body["choices"][0]["text"] == " one two three"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert service.ongoing == 0


async def test_replica_at_its_limit_answers_overloaded() -> None:
    engine = ScriptedEngine()
    engine.release.clear()
    service = OpenAIService(engine, max_ongoing_requests=1)  # type: ignore[arg-type]
    job = await service.prepare_completion(request())
    running = asyncio.create_task(service.run(job, chat=False))
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded) as error:
        await service.prepare_completion(request())
    assert error.value.status == 429
    engine.release.set()
    await running
    assert (await service.prepare_completion(request())).model == "base", "admitted again once a slot frees"


async def test_engine_failure_mid_stream_ends_with_an_error_event() -> None:
    service = OpenAIService(ScriptedEngine(fail_after=2))  # type: ignore[arg-type]
    job = await service.prepare_completion(request(stream=True))
    chunks = [chunk async for chunk in service.stream(job, chat=False)]
    assert chunks[-1] == b"data: [DONE]\n\n"
    error = json.loads(chunks[-2][6:])
    assert error["error"]["code"] == "engine_unavailable"
    assert len(chunks) == 4  # two deltas, the error, [DONE]
    assert service.ongoing == 0


async def test_a_full_outbox_refuses_new_requests_until_it_drains(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from attribution import outbox as outbox_module
    from attribution import service as attribution_service
    from attribution.outbox import Outbox
    from attribution.service import AttributionService, LedgerLineages
    from ledger.client.access import LedgerAccessClient

    monkeypatch.setattr(attribution_service, "OUTBOX_CHECK_SECONDS", 0.02)  # the admission flag's refresh
    monkeypatch.setattr(outbox_module, "COUNT_REFRESH_SECONDS", 0.02)  # the outbox's directory scans
    outbox = Outbox(tmp_path / "outbox", max_traces=2)
    attribution = AttributionService(LedgerLineages(LedgerAccessClient("127.0.0.1:1", "t" * 16)), outbox=outbox)
    service = OpenAIService(ScriptedEngine(), attribution=attribution)  # type: ignore[arg-type]
    try:
        served = []
        for _ in range(2):
            body = await service.run(await service.prepare_completion(request()), chat=False)
            served.append(body["id"])
            assert await attribution.get(body["id"]) is not None
        assert sorted(trace_id for trace_id, _ in outbox.pending(10)) == sorted(served), "served requests are queued"
        await asyncio.sleep(0.2)
        with pytest.raises(AccountingBacklog) as refused:
            await service.prepare_completion(request())
        assert (refused.value.status, refused.value.code) == (503, "outbox_full")
        for trace_id in served:  # the ledger acknowledged them
            outbox.remove(trace_id)
        await asyncio.sleep(0.2)
        assert (await service.prepare_completion(request())).model == "base", "admitted again once it drains"
    finally:
        attribution.close()
