"""Several engine replicas behind Ray Serve's proxy: requests for an adapter go to the replica
that already holds it, and errors keep their status codes through the forwarding hop."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest

from tests.conftest import free_port
from tests.support.cli import cli
from tests.support.launcher import GatewayProcess
from wire.inference.v1 import inference_pb2 as pb
from wire.inference.v1 import inference_pb2_grpc as pb_grpc

REPLICA_HEADER = "x-gateway-replica"


@pytest.fixture(scope="module")
def two_replicas(demo_state: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    state = tmp_path_factory.mktemp("replicas")
    (state / "models").symlink_to(demo_state / "models")
    (state / "adapters").symlink_to(demo_state / "adapters")
    process = GatewayProcess(
        state_dir=state,
        http_port=free_port(),
        grpc_port=free_port(),
        env={"GATEWAY_REPLICA_NUM_REPLICAS": "2", "GATEWAY_REPLICA_NUM_CPUS": "1",
             "GATEWAY_CHAIN_PORT": str(free_port()), "GATEWAY_DEMO_DATANETS": "false",
             "GATEWAY_LEDGER_PORT": str(free_port())},
    )
    process.start()
    yield process
    assert process.stop() == 0


def complete(gateway: GatewayProcess, model: str, **extra: object) -> httpx.Response:
    body = {"model": model, "prompt": "The value", "max_tokens": 3, "temperature": 0, **extra}
    return httpx.post(headers=gateway.headers, url=f"{gateway.base_url}/v1/completions", json=body, timeout=120)


@pytest.fixture(scope="module")
def adapter_homes(two_replicas: GatewayProcess) -> dict[str, str]:
    """Adapter -> the replica that loaded it, with both replicas holding some.

    A first wave of new adapters at once may land on one replica only: Serve's router picks a
    replica whose queue length it has cached over one it is still probing, and on two busy cores
    the probe can lose every race. What spreads new adapters for sure is Serve's rule for a model
    no replica holds: it goes to the replica holding the fewest. So after the wave, fresh adapters
    are sent one by one until the other replica has taken some.
    """
    homes: dict[str, str] = {}

    def record(name: str) -> None:
        response = complete(two_replicas, name, max_tokens=24, ignore_eos=True)
        assert response.status_code == 200, response.text
        homes[name] = response.headers[REPLICA_HEADER]

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(record, [f"demo-adapter-{i:03d}" for i in range(40, 56)]))
    for i in range(56, 62):
        if len(set(homes.values())) == 2:
            break
        time.sleep(1)  # replicas report the adapters they hold to Serve's routers (every 0.1 s, via the controller)
        record(f"demo-adapter-{i:03d}")
    return homes


def test_new_adapters_are_spread_over_both_replicas(adapter_homes: dict[str, str]) -> None:
    assert len(set(adapter_homes.values())) == 2, adapter_homes


def test_adapter_requests_stick_to_one_replica(two_replicas: GatewayProcess, adapter_homes: dict[str, str]) -> None:
    time.sleep(2)  # the last adapters' reports reach the routers
    for _ in range(2):
        for name, home in adapter_homes.items():
            response = complete(two_replicas, name)
            assert response.status_code == 200, response.text
            assert response.headers[REPLICA_HEADER] == home, f"{name} moved from {home}"


def test_same_answers_as_a_single_replica(two_replicas: GatewayProcess, gateway: GatewayProcess) -> None:
    for model in ("datanet-tiny-llama", "demo-adapter-041"):
        assert complete(two_replicas, model).json()["choices"][0]["text"] == \
            complete(gateway, model).json()["choices"][0]["text"]


def test_streaming_through_the_proxy(two_replicas: GatewayProcess) -> None:
    body = {"model": "demo-adapter-042", "prompt": "The value", "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", headers=two_replicas.headers, url=f"{two_replicas.base_url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["x-attribution-trace-id"].startswith("cmpl-")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize(
    ("model", "extra", "status"),
    [("no-such-adapter", {}, 404), ("demo-adapter-043", {"max_tokens": -1}, 400),
     ("datanet-tiny-llama", {"temperature": "hot"}, 400)],
)
def test_errors_keep_their_status_through_the_hop(two_replicas: GatewayProcess, model: str, extra: dict,
                                                  status: int) -> None:
    response = complete(two_replicas, model, **extra)
    assert response.status_code == status
    assert response.json()["error"]["message"]


def test_malformed_body_is_400_at_the_ingress(two_replicas: GatewayProcess) -> None:
    response = httpx.post(headers=two_replicas.headers, url=f"{two_replicas.base_url}/v1/completions", content=b"{nope")
    assert response.status_code == 400


def test_model_list_through_the_proxy(two_replicas: GatewayProcess) -> None:
    data = httpx.get(headers=two_replicas.headers, url=f"{two_replicas.base_url}/v1/models").json()["data"]
    assert len([m for m in data if m["parent"] == "datanet-tiny-llama"]) >= 50


def test_grpc_through_the_grpc_ingress(two_replicas: GatewayProcess, gateway: GatewayProcess) -> None:
    with two_replicas.grpc_channel() as channel:
        stub = pb_grpc.InferenceStub(channel)
        assert len(stub.ListModels(pb.ListModelsRequest()).models) >= 51
        request = pb.GenerateRequest(model="demo-adapter-044", prompt="The value", max_tokens=5, temperature=0)
        reply = stub.Generate(request)
        assert reply.usage.completion_tokens == 5
        assert reply.text == complete(gateway, "demo-adapter-044", max_tokens=5).json()["choices"][0]["text"]
        streamed = list(stub.GenerateStream(request))
        assert "".join(m.text for m in streamed) == reply.text
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(pb.GenerateRequest(model="no-such-adapter", prompt="x"))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(pb.GenerateRequest(model="demo-adapter-044", prompt="x", temperature=9.0))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_traces_of_every_replica_are_found_through_the_ingress(two_replicas: GatewayProcess,
                                                               adapter_homes: dict[str, str]) -> None:
    served: dict[str, str] = {}

    def record(name: str) -> None:
        response = complete(two_replicas, name)
        assert response.status_code == 200, response.text
        served[response.headers["x-attribution-trace-id"]] = response.headers[REPLICA_HEADER]

    with ThreadPoolExecutor(8) as pool:  # the adapters stick to the replicas that loaded them: both serve
        list(pool.map(record, list(adapter_homes)))
    assert len(set(served.values())) == 2, "both replicas served some of the requests"
    deadline = time.monotonic() + 30
    for trace_id in served:
        while (reply := httpx.get(headers=two_replicas.headers, url=f"{two_replicas.base_url}/v1/attributions/{trace_id}", timeout=30)).status_code == 404:
            assert time.monotonic() < deadline, f"trace {trace_id} never appeared"
            time.sleep(0.2)  # attribution finishes just after the response
        assert reply.status_code == 200 and reply.json()["trace_id"] == trace_id
        assert reply.json()["completion_tokens"] == len(reply.json()["tokens"]) == 3
    missing = httpx.get(headers=two_replicas.headers, url=f"{two_replicas.base_url}/v1/attributions/cmpl-missing", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "trace_not_found"


def test_each_replica_announces_its_own_scrape_endpoint(two_replicas: GatewayProcess) -> None:
    """Several replicas on one node: each serves its metrics on its own port, found through its target file."""
    import json

    from statedir.layout import StateLayout

    for name in ("demo-adapter-001", "demo-adapter-002", "demo-adapter-003", "demo-adapter-004"):
        assert complete(two_replicas, name).status_code == 200
    files = sorted(StateLayout(two_replicas.state_dir).monitoring_targets.glob("engine-*.json"))
    assert len(files) == 2
    served = 0.0
    for path in files:
        [group] = json.loads(path.read_text())
        text = httpx.get(f"http://{group['targets'][0]}/metrics", timeout=10).text
        assert "vllm:num_requests_running" in text
        served += sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith("gateway_requests_total{") and 'status="200"' in line)
        assert path.stem == f"engine-{group['labels']['replica']}"
    assert served >= 4, "the replicas' counters add up to the requests they served"


def account_key(capsys: pytest.CaptureFixture[str], state: Path, account: str) -> str:
    """A new account (empty) and a key of it without --admin."""
    cli(capsys, state, "accounts", "create", account)
    return cli(capsys, state, "keys", "create", "--account", account)["key"]


def as_key(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


def test_traces_through_the_ingress_are_read_by_their_account_and_admins_only(
        capsys: pytest.CaptureFixture[str], two_replicas: GatewayProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_LEDGER_PORT", two_replicas.env["GATEWAY_LEDGER_PORT"])  # its own ledger
    state = two_replicas.state_dir
    member = account_key(capsys, state, "reader")
    sibling = cli(capsys, state, "keys", "create", "--account", "reader")["key"]
    outsider = account_key(capsys, state, "stranger")
    made = httpx.post(f"{two_replicas.base_url}/v1/completions", headers=as_key(member), timeout=120,
                      json={"model": "demo-adapter-046", "prompt": "The value", "max_tokens": 3})
    assert made.status_code == 200, made.text
    trace_id = made.headers["x-attribution-trace-id"]
    url = f"{two_replicas.base_url}/v1/attributions/{trace_id}"
    deadline = time.monotonic() + 30
    while (mine := httpx.get(url, headers=as_key(member), timeout=30)).status_code == 404:
        assert time.monotonic() < deadline, f"trace {trace_id} never appeared"
        time.sleep(0.2)  # attribution finishes just after the response
    assert mine.status_code == 200 and mine.json()["requester"] == f"key_{member.split('-')[1]}"
    for reader in (sibling, two_replicas.api_key):  # the account's other key; the local admin key
        assert httpx.get(url, headers=as_key(reader), timeout=30).json() == mine.json()
    refused = httpx.get(url, headers=as_key(outsider), timeout=30)
    fake = trace_id[:-8] + "zz000000"
    unknown = httpx.get(url.replace(trace_id, fake), headers=as_key(outsider), timeout=30)
    assert refused.status_code == unknown.status_code == 404
    assert refused.content == unknown.content.replace(fake.encode(), trace_id.encode()), "as if it did not exist"
    assert httpx.get(url, timeout=30).status_code == 401
    stats = httpx.get(f"{two_replicas.base_url}/stats", headers=as_key(outsider), timeout=30)
    assert stats.status_code == 404 and "demo-adapter" not in stats.text, "the ingress serves no /stats"


def test_a_private_adapter_is_invisible_to_non_members_through_both_ingresses(
        capsys: pytest.CaptureFixture[str], two_replicas: GatewayProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_LEDGER_PORT", two_replicas.env["GATEWAY_LEDGER_PORT"])  # its own ledger
    from gateway.config import GatewayConfig
    from gateway.ledger_access import open_registries

    private, fake = "demo-adapter-030", "demo-adapter-999"  # the second exists nowhere
    state = two_replicas.state_dir
    config = GatewayConfig(state_dir=state)
    registries = open_registries(config)  # this stack registers no demo adapters: register one in the store
    registries.adapters.register(private, uri=f"{config.store_url}/{private}", base_model=config.served_model_name,
                                 owner="0x" + "ab" * 20, price_per_1k_tokens=0, lineage=[], source="registered")
    registries.engine.dispose()
    member = account_key(capsys, state, "insider")
    outsider = account_key(capsys, state, "outsider")
    cli(capsys, state, "accounts", "share", "insider", private)
    time.sleep(6)  # each replica re-reads private adapters every 5 s

    def listed(key: str) -> list[str]:
        return [m["id"] for m in httpx.get(f"{two_replicas.base_url}/v1/models", headers=as_key(key),
                                           timeout=30).json()["data"]]

    def ask(key: str, model: str) -> httpx.Response:
        return httpx.post(f"{two_replicas.base_url}/v1/completions", headers=as_key(key), timeout=120,
                          json={"model": model, "prompt": "The value", "max_tokens": 3})

    for _ in range(3):  # whichever replica answers
        assert private in listed(member) and private not in listed(outsider)
    served = ask(member, private)
    assert served.status_code == 200, served.text  # now a replica holds it
    for _ in range(2):
        refused, unknown = ask(outsider, private), ask(outsider, fake)
        assert refused.status_code == unknown.status_code == 404
        assert refused.content == unknown.content.replace(fake.encode(), private.encode())
    with two_replicas.grpc_channel(outsider) as channel:
        stub = pb_grpc.InferenceStub(channel)
        assert private not in [m.id for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models]
        errors = []
        for model in (private, fake):
            with pytest.raises(grpc.RpcError) as error:
                stub.Generate(pb.GenerateRequest(model=model, prompt="x", max_tokens=2), timeout=60)
            errors.append(error.value)
        assert errors[0].code() == errors[1].code() == grpc.StatusCode.NOT_FOUND
        assert errors[0].details() == errors[1].details().replace(fake, private)
    with two_replicas.grpc_channel(member) as channel:
        assert private in [m.id for m in pb_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest()).models]
    trace_url = f"{two_replicas.base_url}/v1/attributions/{served.headers['x-attribution-trace-id']}"
    deadline = time.monotonic() + 30
    while httpx.get(trace_url, headers=as_key(member), timeout=30).status_code == 404:
        assert time.monotonic() < deadline, "the member's trace never appeared"
        time.sleep(0.2)
    assert httpx.get(trace_url, headers=as_key(outsider), timeout=30).status_code == 404
