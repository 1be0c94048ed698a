"""Who pays, on the running stack: API keys, credit and holds, rate limits, private adapters.

Driven as users do: the `openai` SDK and a gRPC client against the session gateway, the `gateway`
CLI for keys and accounts (on the same state directory), the ledger's CLI for what was charged.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from gateway.cli import main
from gateway.ledger_process import LedgerProcess
from registry.adapters import DEFAULT_PRICE_PER_1K_TOKENS
from tests.support.cli import cli
from tests.support.launcher import GatewayProcess
from wire.inference.v1 import inference_pb2 as pb
from wire.inference.v1 import inference_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.stack, pytest.mark.usefixtures("session_ledger_env")]
PRICED = "python-docs-notes-lora"  # a demo datanet adapter: priced, registered with lineage
FREE = "demo-adapter-005"  # a load-test adapter: not registered, costs nothing
CACHE_SECONDS = 1.0  # GATEWAY_KEY_CACHE_SECONDS default: how long a revocation may take to bite


def new_key(capsys: pytest.CaptureFixture[str], state: Path, account: str, credit: int = 0, **limits: str) -> str:
    cli(capsys, state, "accounts", "create", account)
    if credit:
        cli(capsys, state, "accounts", "credit", account, str(credit), "--ref", f"test-{account}")
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in limits.items()]
    return cli(capsys, state, "keys", "create", "--account", account, *flags)["key"]


def sdk(gateway: GatewayProcess, key: str | None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=key or "", max_retries=0, timeout=120)


def worst_case(prompt_tokens: int, max_tokens: int) -> int:
    return DEFAULT_PRICE_PER_1K_TOKENS * (prompt_tokens + max_tokens) // 1000


def test_missing_invalid_and_revoked_keys_are_401_on_http_and_unauthenticated_on_grpc(
        capsys: pytest.CaptureFixture[str], gateway: GatewayProcess, demo_state: Path) -> None:
    no_key = httpx.post(f"{gateway.base_url}/v1/completions", json={"model": FREE, "prompt": "x", "max_tokens": 2})
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{gateway.base_url}/health").status_code == 200, "health needs no key"
    assert httpx.get(f"{gateway.base_url}/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError) as refused:
        sdk(gateway, "dgk-000000000000-" + "A" * 43).completions.create(model=FREE, prompt="x", max_tokens=2)
    assert refused.value.code == "invalid_api_key"

    key = new_key(capsys, demo_state, "revoked-soon")
    assert sdk(gateway, key).completions.create(model=FREE, prompt="x", max_tokens=2).choices
    key_id = cli(capsys, demo_state, "keys", "list", "--account", "revoked-soon")["keys"][0]["id"]
    cli(capsys, demo_state, "keys", "revoke", key_id)
    deadline = time.monotonic() + CACHE_SECONDS + 5
    while True:
        try:
            sdk(gateway, key).completions.create(model=FREE, prompt="x", max_tokens=2)
        except openai.AuthenticationError:
            break
        assert time.monotonic() < deadline, "a revoked key must stop working within the key cache time"
        time.sleep(0.2)

    for channel in (gateway.grpc_channel("not-a-key"), grpc.insecure_channel(gateway.grpc_target)):
        with channel:
            stub = pb_grpc.InferenceStub(channel)
            with pytest.raises(grpc.RpcError) as error:
                stub.Generate(pb.GenerateRequest(model=FREE, prompt="x", max_tokens=2))
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as error:
                stub.ListModels(pb.ListModelsRequest())
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_request_that_may_cost_more_than_the_credit_is_402_before_the_engine(
        capsys: pytest.CaptureFixture[str], gateway: GatewayProcess, demo_state: Path) -> None:
    key = new_key(capsys, demo_state, "short", credit=worst_case(8, 4))
    users = sdk(gateway, key)
    with pytest.raises(openai.APIStatusError) as refused:
        users.completions.create(model=PRICED, prompt="The river", max_tokens=400)
    assert refused.value.status_code == 402 and refused.value.code == "insufficient_quota"
    with gateway.grpc_channel(key) as channel:
        with pytest.raises(grpc.RpcError) as error:
            pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(model=PRICED, prompt="The river",
                                                                        max_tokens=400))
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert cli(capsys, demo_state, "accounts", "balance", "short")["held"] == "0", "a refusal holds nothing"
    assert users.completions.create(model=FREE, prompt="x", max_tokens=4).choices, "free models still work"


def test_rate_limits_answer_429_with_retry_after(capsys: pytest.CaptureFixture[str], gateway: GatewayProcess,
                                                 demo_state: Path) -> None:
    key = new_key(capsys, demo_state, "slow", requests_per_second="0.2")
    http = httpx.Client(base_url=gateway.base_url, headers={"authorization": f"Bearer {key}"}, timeout=60)
    body = {"model": FREE, "prompt": "x", "max_tokens": 2}
    assert http.post("/v1/completions", json=body).status_code == 200
    limited = http.post("/v1/completions", json=body)
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(limited.headers["retry-after"]) <= 5
    with gateway.grpc_channel(key) as channel:
        with pytest.raises(grpc.RpcError) as error:
            pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(model=FREE, prompt="x", max_tokens=2))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(error.value.trailing_metadata())["retry-after"].isdigit()
    too_big = new_key(capsys, demo_state, "small-minute", tokens_per_minute="50")
    refused = httpx.post(f"{gateway.base_url}/v1/completions", headers={"authorization": f"Bearer {too_big}"},
                         json={"model": FREE, "prompt": "x", "max_tokens": 100})
    assert refused.status_code == 429 and "retry-after" not in refused.headers
    assert "tokens per minute" in refused.json()["error"]["message"]


def test_a_private_adapter_is_invisible_to_other_accounts(capsys: pytest.CaptureFixture[str],
                                                          gateway: GatewayProcess, demo_state: Path) -> None:
    insider = new_key(capsys, demo_state, "insider")
    outsider = new_key(capsys, demo_state, "outsider")
    capsys.readouterr()  # only registered adapters can be made private
    assert main(["--state-dir", str(demo_state), "accounts", "share", "insider", "no-such-adapter"]) == 2
    assert "no registered adapter 'no-such-adapter'" in capsys.readouterr().err
    shared = cli(capsys, demo_state, "accounts", "share", "insider", PRICED)
    assert shared == {"adapter": PRICED, "private": True, "accounts": ["insider"]}
    time.sleep(6)  # replicas re-read private adapters every 5 s
    try:
        assert PRICED in [m.id for m in sdk(gateway, insider).models.list().data]
        assert PRICED not in [m.id for m in sdk(gateway, outsider).models.list().data]
        with pytest.raises(openai.NotFoundError):
            sdk(gateway, outsider).completions.create(model=PRICED, prompt="x", max_tokens=2)
        with gateway.grpc_channel(outsider) as channel:
            stub = pb_grpc.InferenceStub(channel)
            assert PRICED not in [m.id for m in stub.ListModels(pb.ListModelsRequest()).models]
            with pytest.raises(grpc.RpcError) as error:
                stub.Generate(pb.GenerateRequest(model=PRICED, prompt="x", max_tokens=2))
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        cli(capsys, demo_state, "accounts", "share", "insider", PRICED, "--remove")
        time.sleep(6)


def test_concurrent_requests_on_one_account_never_overdraw_it_and_are_billed_exactly(
        capsys: pytest.CaptureFixture[str], gateway: GatewayProcess, ledger_service: LedgerProcess,
        demo_state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prompt, max_tokens = "The river", 16
    prompt_tokens = sdk(gateway, gateway.api_key).completions.create(
        model=FREE, prompt=prompt, max_tokens=1).usage.prompt_tokens  # type: ignore[union-attr]
    worst = worst_case(prompt_tokens, max_tokens)
    credit = 3 * worst + worst // 2  # room for three worst cases at once, not four
    key = new_key(capsys, demo_state, "busy", credit=credit)
    users = sdk(gateway, key)
    outcomes: list[object] = []

    def one() -> None:
        try:
            outcomes.append(users.completions.with_raw_response.create(
                model=PRICED, prompt=prompt, max_tokens=max_tokens, extra_body={"ignore_eos": True}))
        except openai.APIStatusError as refused:
            outcomes.append(refused.status_code)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    served = [o for o in outcomes if not isinstance(o, int)]
    assert len(served) == 3 and sorted(o for o in outcomes if isinstance(o, int)) == [402] * (8 - len(served))

    monkeypatch.setenv("GATEWAY_LEDGER_PORT", str(ledger_service.port))
    charged = 0
    for response in served:
        trace_id = response.headers["x-attribution-trace-id"]
        deadline = time.monotonic() + 60
        while True:
            capsys.readouterr()
            if main(["--state-dir", str(demo_state), "ledger", "trace", trace_id, "--json"]) == 0:
                record = json.loads(capsys.readouterr().out)
                break
            assert time.monotonic() < deadline, f"trace {trace_id} never reached the ledger"
            time.sleep(0.5)
        [payer] = [p for p in record["entry"]["postings"] if p["role"] == "payer"]
        assert payer["account"] == "requester:busy"
        charged += int(record["fee"])
    balance = cli(capsys, demo_state, "accounts", "balance", "busy")
    assert int(balance["balance"]) == credit - charged >= 0 and balance["held"] == "0"


def test_no_key_material_reaches_logs(capsys: pytest.CaptureFixture[str], gateway: GatewayProcess,
                                      ledger_service: LedgerProcess, demo_state: Path) -> None:
    key = new_key(capsys, demo_state, "secretive", credit=worst_case(10, 10) * 4)
    users = sdk(gateway, key)
    users.completions.create(model=PRICED, prompt="The river", max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        sdk(gateway, key + "x").completions.create(model=PRICED, prompt="x", max_tokens=2)
    secret = key.split("-", 2)[2]
    time.sleep(2)
    logs = [demo_state / "gateway.log", ledger_service.log_file, *Path("/tmp/ray").glob("session_latest/logs/*")]
    for path in logs:
        if path.is_file():
            text = path.read_text(errors="replace")
            assert secret not in text, f"the key's secret appears in {path}"
    metrics = "".join(httpx.get(f"http://{target}/metrics").text for target in targets(demo_state))
    assert secret not in metrics


def targets(state: Path) -> list[str]:
    from statedir.layout import StateLayout

    return [json.loads(p.read_text())[0]["targets"][0] for p in StateLayout(state).monitoring_targets.glob("*.json")]


def test_a_deposit_on_the_chain_is_credited_once_at_the_confirmation_depth(
        capsys: pytest.CaptureFixture[str], gateway: GatewayProcess, demo_state: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ledger.chain.anvil import ANVIL_DEV_KEYS
    from ledger.chain.client import ChainClient
    from ledger.chain.settlement import PayoutToken

    monkeypatch.setenv("GATEWAY_CHAIN_PORT", gateway.env["GATEWAY_CHAIN_PORT"])
    chain = cli(capsys, demo_state, "chain", "info")
    operator = ChainClient(chain["rpc_url"], ANVIL_DEV_KEYS[0])
    depositor = ChainClient(chain["rpc_url"], ANVIL_DEV_KEYS[7])
    cli(capsys, demo_state, "accounts", "create", "depositor", "--deposit-address", depositor.address)
    amount = 5 * 10**18
    PayoutToken(operator, chain["token"]).mint(depositor.address, amount)
    PayoutToken(depositor, chain["token"]).transfer(chain["settler"], amount)  # the deposit: to the treasury
    time.sleep(7)  # more than a scan interval with the transfer 1 block deep: not yet (2 needed)
    assert cli(capsys, demo_state, "accounts", "balance", "depositor")["balance"] == "0"
    operator.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
    deadline = time.monotonic() + 30
    while cli(capsys, demo_state, "accounts", "balance", "depositor")["balance"] == "0":
        assert time.monotonic() < deadline, "a deposit 2 blocks deep must be credited"
        time.sleep(0.5)
    for _ in range(3):
        operator.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
    time.sleep(7)  # later scans see it again: nothing is credited twice
    assert cli(capsys, demo_state, "accounts", "balance", "depositor")["balance"] == str(amount)


def test_the_engine_replica_holds_no_database_open(gateway: GatewayProcess, ledger_service: LedgerProcess,
                                                   demo_state: Path) -> None:
    """Keys, prices, lineage and credit come through the ledger's API: the engine replica's process
    (and the vLLM engine core it starts) has no database file and no database server connection
    open, while it does talk to the ledger. The ledger's own process is the control: it holds the file."""
    import psutil

    from statedir.layout import StateLayout

    assert sdk(gateway, gateway.api_key).completions.create(model=PRICED, prompt="The river", max_tokens=2).choices
    database = StateLayout(demo_state).database.name
    ledger = psutil.Process(ledger_service.process.pid)  # type: ignore[union-attr]
    assert any(Path(f.path).name.startswith(database) for f in ledger.open_files()), "the control: the ledger has it"
    replicas = [p for p in psutil.process_iter(["cmdline"])
                if " ".join(p.info["cmdline"] or []).startswith("ray::ServeReplica:gateway:engine")]
    assert replicas, "the engine replica's process is found by its Ray title"
    postgres_ports = {c.laddr.port for p in psutil.process_iter(["name"]) if p.info["name"] == "postgres"
                      for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    for replica in replicas:
        for process in [replica, *replica.children(recursive=True)]:
            files = [f.path for f in process.open_files()]
            assert not [f for f in files if Path(f).name.startswith(database) or f.endswith((".db", ".sqlite"))], \
                f"{process.pid} {process.name()} holds a database file: {files}"
            remote = {c.raddr.port for c in process.net_connections("inet") if c.raddr}
            assert not remote & postgres_ports, f"{process.pid} is connected to PostgreSQL"
        remote = {c.raddr.port for c in replica.net_connections("inet") if c.raddr}
        assert ledger_service.port in remote, "the replica reaches the ledger over its gRPC API"
