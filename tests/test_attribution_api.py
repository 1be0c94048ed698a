"""Per-token attribution on every inference, through the running gateway (HTTP with the `openai` SDK, gRPC).

The demo adapter `python-docs-notes-lora` regurgitates its datanet's passages, so its output must be
attributed to the passage's contribution and contributor; the base model has no lineage.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from attribution.outbox import Outbox
from attribution.shipper import TraceShipper
from gateway.demo_data import demo_adapter_name, demo_contributor_address
from gateway.ledger_process import LedgerProcess
from ledger.client.trace import AttributionTrace, TokenAttribution
from registry.contribution_content import content_id, normalize
from statedir.layout import StateLayout
from tests.support.launcher import GatewayProcess
from training.demo_passages import DEMO_DATANETS
from wire.inference.v1 import inference_pb2 as pb
from wire.inference.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.stack

DATANET = DEMO_DATANETS[0]
ADAPTER = demo_adapter_name(DATANET)
PASSAGE = DATANET.passages[0]
PROMPT = " ".join(PASSAGE.text.split()[:12])
BASE = "datanet-tiny-llama"


@pytest.fixture(scope="module")
def stub(gateway: GatewayProcess) -> Iterator[pb_grpc.InferenceStub]:
    with gateway.grpc_channel() as channel:
        yield pb_grpc.InferenceStub(channel)


def assert_true_contributor(attribution: dict) -> None:
    assert attribution["attributed_fraction"] > 0.8
    top = attribution["contributors"][0]
    assert top["address"] == demo_contributor_address(PASSAGE.contributor_index)
    assert top["weight"] >= 0.9 * attribution["attributed_fraction"]
    assert top["contributions"][0] == {**top["contributions"][0], "id": content_id(normalize(PASSAGE.text)),
                                       "datanet": DATANET.name}


def test_completion_with_attribution_names_the_contributor(client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(model=ADAPTER, prompt=PROMPT, max_tokens=64, temperature=0,
                                                      extra_body={"attribution": True})
    body = json.loads(raw.text)
    assert body["attribution"]["trace_id"] == raw.headers["x-attribution-trace-id"] == body["id"]
    assert_true_contributor(body["attribution"])


def test_whole_trace_by_id_sums_to_one_per_token(gateway: GatewayProcess, client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(model=ADAPTER, prompt=PROMPT, max_tokens=48, temperature=0)
    body = json.loads(raw.text)
    assert "attribution" not in body, "the summary comes only on request"
    trace = httpx.get(headers=gateway.headers, url=f"{gateway.base_url}/v1/attributions/{raw.headers['x-attribution-trace-id']}", timeout=30).json()
    assert trace["adapter"] == ADAPTER and trace["completion_tokens"] == body["usage"]["completion_tokens"]
    assert trace["method"] == "verbatim+influence-v1", "demo adapters are trained with the combined method"
    assert len(trace["tokens"]) == trace["completion_tokens"]
    for token in trace["tokens"]:
        assert abs(sum(w for _, w in token["weights"]) + token["unattributed"] - 1) < 1e-9
    passage_id = content_id(normalize(PASSAGE.text))
    assert sum(dict(t["weights"]).get(passage_id, 0) for t in trace["tokens"]) / len(trace["tokens"]) > 0.8


def test_unknown_trace_is_404(gateway: GatewayProcess) -> None:
    response = httpx.get(headers=gateway.headers, url=f"{gateway.base_url}/v1/attributions/cmpl-nope", timeout=30)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "trace_not_found"


def test_a_trace_only_the_ledger_holds_is_answered_from_it(gateway: GatewayProcess, ledger_service: LedgerProcess,
                                                          tmp_path: Path) -> None:
    """A trace served on another node (shipped from that node's outbox; none of it on this node) is
    read from the ledger, for an admin key; the read rules still apply to it."""
    trace = AttributionTrace(trace_id="cmpl-other-node-1", model=BASE, adapter=None, requester=None,
                             prompt_tokens=3, completion_tokens=1, tokens=(TokenAttribution(7, (), 1.0),),
                             method="verbatim-span-v1")
    other_node = Outbox(tmp_path / "other-node-outbox")
    other_node.put(trace)
    shipper = TraceShipper(other_node, f"127.0.0.1:{ledger_service.port}", token=ledger_service.token)
    shipper.start()
    try:
        assert shipper.wait_until_empty(30)
    finally:
        shipper.stop()
    assert shipper.stats()["shipped"] == 1, "the ledger accepted the other node's trace"
    assert not (StateLayout(gateway.state_dir).traces / f"{trace.trace_id}.pb").exists()
    url = f"{gateway.base_url}/v1/attributions/{trace.trace_id}"
    answer = httpx.get(url, headers=gateway.headers, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json() == trace.to_dict()
    refused = httpx.get(url, headers={"authorization": "Bearer sk-not-a-key"}, timeout=30)
    assert refused.status_code == 401


def test_base_model_output_is_unattributed(client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(model=BASE, prompt=PROMPT, max_tokens=16, temperature=0,
                                                      extra_body={"attribution": True})
    attribution = json.loads(raw.text)["attribution"]
    assert attribution["attributed_fraction"] == 0 and attribution["contributors"] == []


def test_streaming_sends_tokens_first_and_attribution_in_the_final_chunk(gateway: GatewayProcess) -> None:
    body = {"model": ADAPTER, "prompt": PROMPT, "max_tokens": 48, "temperature": 0, "stream": True,
            "attribution": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", headers=gateway.headers, url=f"{gateway.base_url}/v1/completions", json=body, timeout=60) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert events[0]["choices"][0]["text"], "the first event carries text, not attribution"
    with_attribution = [i for i, e in enumerate(events) if "attribution" in e]
    assert with_attribution == [len(events) - 1], "attribution comes once, in the final chunk"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] > 0
    assert_true_contributor(events[-1]["attribution"])
    body.pop("stream_options")
    with httpx.stream("POST", headers=gateway.headers, url=f"{gateway.base_url}/v1/completions", json=body, timeout=60) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert "attribution" in events[-1] and "usage" not in events[-1]


def test_chat_with_attribution(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=ADAPTER, messages=[{"role": "user", "content": PROMPT}], max_tokens=16, temperature=0,
        extra_body={"attribution": True})
    body = json.loads(raw.text)
    assert body["attribution"]["trace_id"] == raw.headers["x-attribution-trace-id"]
    assert 0 <= body["attribution"]["attributed_fraction"] <= 1


def test_grpc_generate_and_stream_carry_attribution_on_request(stub: pb_grpc.InferenceStub) -> None:
    request = pb.GenerateRequest(model=ADAPTER, prompt=PROMPT, max_tokens=48, temperature=0, attribution=True)
    reply = stub.Generate(request, timeout=60)
    assert reply.attribution.trace_id == reply.id == reply.attribution_trace_id
    assert reply.attribution.attributed_fraction > 0.8
    assert reply.attribution.contributors[0].address == demo_contributor_address(PASSAGE.contributor_index)
    messages = list(stub.GenerateStream(request, timeout=60))
    assert not any(m.HasField("attribution") for m in messages[:-1])
    assert messages[-1].attribution.contributors[0].contributions[0].id == content_id(normalize(PASSAGE.text))
    plain = stub.Generate(pb.GenerateRequest(model=ADAPTER, prompt=PROMPT, max_tokens=8, temperature=0), timeout=60)
    assert not plain.HasField("attribution") and plain.attribution_trace_id
