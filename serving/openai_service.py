"""OpenAI completions and chat completions on top of an `Engine`: request → engine → response.

Everything that can be rejected is rejected before the first byte is sent, so a bad request gets a
proper status code; an engine failure mid-stream ends the stream with an error event.

A response that reaches its client is billed exactly once: its usage record (every choice's tokens)
is durable before its last byte leaves (`bill`): the unary body, the stream's finishing chunk (so
also its usage chunk and `[DONE]`), and on gRPC the final message. Attribution follows off the
response path. A generation cut short (client gone, engine error) is billed for what it produced,
without anyone waiting for its record.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from attribution.service import TRACE_ID, AttributionDeferred, usage_record
from ledger.client.access import LedgerUnavailable
from ledger.client.trace import AttributionTrace
from serving.engine import Engine, StepOutput
from serving.errors import (AccountingBacklog, ApiError, LedgerUnreachable, ModelNotFound, Overloaded, TraceNotFound,
                            UsageNotRecorded)
from serving.metrics import RequestMetrics, request_metrics
from serving.openai_protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

if TYPE_CHECKING:
    from attribution.service import AttributionService
    from serving.access import AccessControl, Admission, Caller

log = logging.getLogger(__name__)
DONE = b"data: [DONE]\n\n"
CLIENT_GONE = 499  # the consumer stopped reading before the last token (nginx's convention)


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class StoredTraces(Protocol):
    """Where traces that left this node are read back (the ledger: ledger/client/traces.py)."""

    def get(self, trace_id: str) -> AttributionTrace | None: ...


@dataclass
class Prepared:
    """A validated request, ready for the engine."""

    request_id: str
    model: str
    prompt_ids: list[int]
    params: Any
    lora: Any
    stream: bool
    include_usage: bool
    n: int
    created: int
    attribution: bool = False
    api: str = "completions"
    admitted_at: float = 0.0
    admission: Admission | None = None  # the key's reserved limits and credit (None: auth off)

    @property
    def requester(self) -> str | None:
        """The API key id the trace carries (never the key)."""
        return self.admission.caller.key_id if self.admission is not None else None

    @property
    def adapter(self) -> str | None:
        """The adapter serving this request (None for the base model)."""
        return self.model if self.lora is not None else None


class OpenAIService:
    """Validated requests → engine steps → OpenAI responses; shared by the HTTP and gRPC doors.

    Admission is checked when a request is prepared and counted while its steps run, so a burst that
    arrives at once can overshoot `max_ongoing_requests` by the requests still being prepared."""

    def __init__(self, engine: Engine, max_ongoing_requests: int = 256,
                 attribution: AttributionService | None = None, metrics: RequestMetrics | None = None,
                 access: AccessControl | None = None, stored_traces: StoredTraces | None = None) -> None:
        self.engine = engine
        self.stored_traces = stored_traces
        self.max_ongoing_requests = max_ongoing_requests
        self.attribution = attribution
        self.access = access
        self._metering = ThreadPoolExecutor(max_workers=2, thread_name_prefix="metering")
        self.metrics = metrics or request_metrics()
        self.ongoing = 0

    # ---- models -------------------------------------------------------------------------
    def authenticate(self, authorization: str | None) -> Caller | None:
        """The caller named by an `Authorization` value (None with auth off); Unauthenticated otherwise."""
        return self.access.authenticate(authorization) if self.access is not None else None

    def visible(self, caller: Caller | None, model: str) -> bool:
        return self.access is None or self.access.visible(caller, model)

    def list_models(self, caller: Caller | None = None) -> dict[str, Any]:
        created = int(time.time())
        data = [
            {"id": card.id, "object": "model", "created": created, "owned_by": "datanet-gateway",
             "root": card.id, "parent": card.parent}
            for card in self.engine.models() if self.visible(caller, card.id)
        ]
        return {"object": "list", "data": data}

    def stats(self, caller: Caller | None = None) -> dict[str, Any]:
        """Live counters for operators and tests: requests in flight, adapters held (private ones
        too), traces. An admin key's view: Forbidden for any other key (auth on)."""
        if self.access is not None:
            self.access.require_admin(caller)
        return {
            "ongoing_requests": self.ongoing,
            "engine_unfinished_requests": self.engine.unfinished_requests(),
            "adapters_loaded": self.engine.adapters.loaded(),
            "adapter_loads_total": self.engine.adapters.loads,
            "adapter_evictions_total": self.engine.adapters.evictions,
            **(self.attribution.stats() if self.attribution else {}),
        }

    # ---- billing and attribution -----------------------------------------------------------
    async def bill(self, job: Prepared, choices: list[list[int]]) -> asyncio.Future[Any] | None:
        """Make the usage record of a completed generation durable; its attribution starts at once too.

        Call it before the response's last byte; UsageNotRecorded when the record could not be written
        (the response must then not complete). Both are under way before the first await, so a client
        that leaves meanwhile cannot stop either."""
        started = self._start_billing(job, choices)
        if started is None:
            return None
        written, pending = started
        if written is not None:
            try:
                await asyncio.shield(asyncio.wrap_future(written))
            except Exception as error:
                log.error("usage record of %s could not be written: %s", job.request_id, error)
                raise UsageNotRecorded("the gateway could not record this response's usage durably; it is not "
                                       "completed (retry shortly)") from None
        return pending

    async def billed_steps(self, job: Prepared) -> AsyncIterator[tuple[StepOutput, asyncio.Future[Any] | None]]:
        """The engine steps of `job`, billed (every door sends its response from these).

        The finishing step comes out only once the usage record is durable, with its attribution's
        future; a generation that ends early (client gone, engine error) is billed for what it produced."""
        choice_ids: list[list[int]] = [[] for _ in range(job.n)]
        billed = False
        try:
            async with aclosing(self.steps(job)) as steps:
                async for step in steps:
                    for delta in step.deltas:
                        choice_ids[delta.index] += delta.token_ids
                    pending = None
                    if step.finished:
                        billed = True
                        pending = await self.bill(job, choice_ids)
                    yield step, pending
        finally:
            if not billed:
                self._start_billing(job, choice_ids)

    def _start_billing(self, job: Prepared, choices: list[list[int]]) -> tuple[Any, asyncio.Future[Any]] | None:
        if self.attribution is None:
            return None
        record = usage_record(job.request_id, job.model, job.adapter, job.requester, job.prompt_ids, choices)
        return self.attribution.record_usage(record), self.attribution.submit(record)

    async def attribution_summary(self, job: Prepared, pending: asyncio.Future[Any] | None) -> dict[str, Any] | None:
        """The response's `attribution` object (waits for the trace); None when attribution failed."""
        if pending is None:
            return None
        try:
            trace = await pending
        except AttributionDeferred:
            return None  # attribution is behind: the trace is written later, readable by its id then
        except Exception:
            log.exception("attribution of %s failed", job.request_id)
            return None
        return self.attribution.summary(trace, job.adapter)  # type: ignore[union-attr]

    async def trace(self, trace_id: str, caller: Caller | None = None) -> dict[str, Any]:
        """The whole per-token trace of a generation, for the keys of the account that made the request
        and admin keys; anyone else gets the unknown-trace 404. This node's copy first (its replicas
        write one per response), else the ledger's, which holds the traces of every node."""
        trace = await self.attribution.get(trace_id) if self.attribution else None
        if trace is None and self.stored_traces is not None and TRACE_ID.match(trace_id):
            try:
                trace = await asyncio.to_thread(self.stored_traces.get, trace_id)
            except LedgerUnavailable as away:
                raise LedgerUnreachable(f"The trace is not on this node and the ledger is not reachable ({away}); "
                                        "retry shortly.", headers={"retry-after": "1"}) from None
        if trace is None:
            raise TraceNotFound(trace_id)
        if self.access is not None:
            self.access.check_read(caller, trace_id, trace.requester)
        return trace.to_dict()

    # ---- preparing ----------------------------------------------------------------------
    def count_rejection(self, api: str, model: str | None, exc: ApiError) -> None:
        """Count a request refused before it reached the engine (the doors call this)."""
        adapter = model if model and model != self.engine.base_model and self.engine.is_known(model) else ""
        self.metrics.rejected(self.engine.base_model, adapter, api, exc.status)

    def _admit(self, model: str, caller: Caller | None) -> None:
        if not self.engine.is_known(model) or not self.visible(caller, model):
            raise ModelNotFound(model)
        if self.ongoing >= self.max_ongoing_requests:
            raise Overloaded(f"this replica is serving {self.ongoing} requests, its limit; retry shortly")
        if self.attribution is not None and self.attribution.outbox_full():
            raise AccountingBacklog("the gateway cannot reach its ledger and its trace outbox is full; "
                                    "requests are refused until the ledger catches up (retry later)")

    async def _prepare(
        self, request: SamplingFields, prompt_ids: list[int], max_tokens: int | None, prefix: str, prompt_param: str,
        api: str, admitted_at: float, caller: Caller | None,
    ) -> Prepared:
        request.reject_unsupported()
        lora = await self.engine.lora_request(request.model)
        limit = self.engine.check_length(prompt_ids, max_tokens, prompt_param)
        params = request.to_sampling_params(limit)
        job = Prepared(
            request_id=f"{prefix}-{uuid.uuid4().hex}",
            model=request.model,
            prompt_ids=prompt_ids,
            params=params,
            lora=lora,
            stream=request.stream,
            include_usage=request.include_usage,
            n=request.n,
            created=int(time.time()),
            attribution=request.attribution,
            api=api,
            admitted_at=admitted_at,
        )
        if self.access is not None:  # last: nothing after this can refuse the request
            job.admission = self.access.admit(caller, job.request_id, job.adapter, len(prompt_ids), limit * job.n)
        return job

    async def prepare_completion(self, request: CompletionRequest, api: str = "completions",
                                 caller: Caller | None = None) -> Prepared:
        admitted_at = time.perf_counter()
        prompt = request.single_prompt()
        self._admit(request.model, caller)
        prompt_ids = self.engine.encode_prompt(prompt)
        return await self._prepare(request, prompt_ids, request.max_tokens, "cmpl", "prompt", api, admitted_at,
                                   caller)

    async def prepare_chat(self, request: ChatCompletionRequest, api: str = "chat_completions",
                           caller: Caller | None = None) -> Prepared:
        admitted_at = time.perf_counter()
        self._admit(request.model, caller)
        prompt_ids = self.engine.encode_chat(request.rendered_messages())
        return await self._prepare(request, prompt_ids, request.output_limit, "chatcmpl", "messages", api,
                                   admitted_at, caller)

    # ---- running ------------------------------------------------------------------------
    async def steps(self, job: Prepared) -> AsyncIterator[StepOutput]:
        """The engine steps of a prepared request, counted as ongoing while they run and metered:
        status 200 when it completes, the error's status on an ApiError, 499 when the consumer left."""
        self.ongoing += 1
        tracker = self.metrics.tracker(self.engine.base_model, job.adapter, job.api, len(job.prompt_ids),
                                       job.admitted_at or None)
        status = CLIENT_GONE
        try:
            async for step in self.engine.generate(job.prompt_ids, job.params, job.lora, job.request_id):
                tracker.tokens(sum(len(delta.token_ids) for delta in step.deltas))
                yield step
            status = 200
        except ApiError as exc:
            status = exc.status
            raise
        except Exception:
            status = 500
            raise
        finally:
            self.ongoing -= 1
            tracker.finish(status)
            if job.admission is not None:
                self._settle(job, tracker.generated)

    def _settle(self, job: Prepared, generated: int) -> None:
        """Return the request's unused limits and credit, off the event loop (locks shared with admission)."""
        try:
            asyncio.get_running_loop().run_in_executor(self._metering, self._settle_now, job, generated)
        except RuntimeError:  # no loop (the generator was finalized outside one): do it here
            self._settle_now(job, generated)

    def _settle_now(self, job: Prepared, generated: int) -> None:
        billed = self.attribution is not None and self.attribution.outbox is not None
        try:
            self.access.finish(job.admission, len(job.prompt_ids), generated, billed=billed)  # type: ignore[union-attr]
        except Exception:
            log.exception("could not settle the hold of %s (the ledger releases stale holds)", job.request_id)

    @staticmethod
    def _usage(job: Prepared, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": len(job.prompt_ids),
            "completion_tokens": completion_tokens,
            "total_tokens": len(job.prompt_ids) + completion_tokens,
        }

    async def run(self, job: Prepared, chat: bool) -> dict[str, Any]:
        texts = [""] * job.n
        finish: list[str | None] = [None] * job.n
        tokens = 0
        pending: asyncio.Future[Any] | None = None
        async with aclosing(self.billed_steps(job)) as steps:
            async for step, billed in steps:
                pending = billed or pending
                for delta in step.deltas:
                    texts[delta.index] += delta.text
                    tokens += len(delta.token_ids)
                    if delta.finish_reason:
                        finish[delta.index] = delta.finish_reason
        if chat:
            choices = [
                {"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                 "finish_reason": finish[i]}
                for i in range(job.n)
            ]
            kind = "chat.completion"
        else:
            choices = [
                {"index": i, "text": texts[i], "logprobs": None, "finish_reason": finish[i]} for i in range(job.n)
            ]
            kind = "text_completion"
        body = {
            "id": job.request_id, "object": kind, "created": job.created, "model": job.model,
            "choices": choices, "usage": self._usage(job, tokens),
        }
        if job.attribution:
            body["attribution"] = await self.attribution_summary(job, pending)
        return body

    async def stream(self, job: Prepared, chat: bool) -> AsyncIterator[bytes]:
        """SSE chunks, one per engine step, then a final chunk with usage and/or attribution if asked, [DONE]."""
        kind = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": job.request_id, "object": kind, "created": job.created, "model": job.model}
        tokens = 0
        pending: asyncio.Future[Any] | None = None
        if chat:
            first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(job.n)]
            yield sse({**head, "choices": first})
        try:
            async with aclosing(self.billed_steps(job)) as steps:
                async for step, billed in steps:  # the finishing chunk waits for the usage record
                    pending = billed or pending
                    choices = []
                    for delta in step.deltas:
                        tokens += len(delta.token_ids)
                        if chat:
                            body = {"content": delta.text} if delta.text else {}
                            choices.append({"index": delta.index, "delta": body, "logprobs": None,
                                            "finish_reason": delta.finish_reason})
                        else:
                            choices.append({"index": delta.index, "text": delta.text, "logprobs": None,
                                            "finish_reason": delta.finish_reason})
                    yield sse({**head, "choices": choices})
        except ApiError as exc:
            yield sse(exc.to_body())
            yield DONE
            return
        final: dict[str, Any] = {}
        if job.include_usage:
            final["usage"] = self._usage(job, tokens)
        if job.attribution:
            final["attribution"] = await self.attribution_summary(job, pending)
        if final:  # one final chunk: usage and/or attribution
            yield sse({**head, "choices": [], **final})
        yield DONE
