"""Traces from the running gateway into the ledger service, driven as users drive it (`openai` SDK, the
`gateway ledger` CLI): every inference is billed once, and a ledger outage loses nothing.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from gateway.cli import main
from gateway.demo_data import DEMO_ADAPTER_OWNER_KEY, demo_adapter_name, demo_contributor_address
from gateway.ledger_process import LedgerProcess
from registry.adapters import DEFAULT_PRICE_PER_1K_TOKENS
from registry.contribution_content import address_of_key
from tests.support.launcher import GatewayProcess
from training.demo_passages import DEMO_DATANETS

pytestmark = pytest.mark.stack

DATANET = DEMO_DATANETS[0]
ADAPTER = demo_adapter_name(DATANET)
PASSAGE = DATANET.passages[0]
PROMPT = " ".join(PASSAGE.text.split()[:12])
SHIPPED_WITHIN_SECONDS = 60.0


@pytest.fixture(autouse=True)
def same_ledger(gateway: GatewayProcess, ledger_service: LedgerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """CLI commands ask the running stack's ledger, like a user in another terminal (with its token: these
    commands run outside the ledger's state directory)."""
    monkeypatch.setenv("GATEWAY_LEDGER_PORT", gateway.env["GATEWAY_LEDGER_PORT"])
    monkeypatch.setenv("GATEWAY_LEDGER_TOKEN", ledger_service.token)


def cli(capsys: pytest.CaptureFixture[str], *args: str, expect: int = 0) -> dict:
    capsys.readouterr()
    code = main([*args, "--json"])
    out, err = capsys.readouterr()
    assert code == expect, err
    return json.loads(out) if expect == 0 else {"error": err}


def wait_for_trace(capsys: pytest.CaptureFixture[str], trace_id: str) -> dict:
    deadline = time.monotonic() + SHIPPED_WITHIN_SECONDS
    while True:
        capsys.readouterr()
        code = main(["ledger", "trace", trace_id, "--json"])
        out, err = capsys.readouterr()
        if code == 0:
            return json.loads(out)
        assert "no trace" in err, err
        assert time.monotonic() < deadline, f"trace {trace_id} did not reach the ledger"
        time.sleep(0.3)


def outbox_depth(gateway: GatewayProcess) -> int:
    return len(list((gateway.state_dir / "outbox").glob("*.pb")))


def test_an_inference_is_billed_once_and_split_exactly(client: openai.OpenAI,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    before = cli(capsys, "ledger", "totals")
    raw = client.completions.with_raw_response.create(model=ADAPTER, prompt=PROMPT, max_tokens=48, temperature=0)
    usage = raw.parse().usage
    trace_id = raw.headers["x-attribution-trace-id"]
    record = wait_for_trace(capsys, trace_id)
    assert record["trace"]["trace_id"] == trace_id and record["trace"]["adapter"] == ADAPTER
    assert record["trace"]["completion_tokens"] == usage.completion_tokens
    fee = DEFAULT_PRICE_PER_1K_TOKENS * usage.total_tokens // 1000
    assert int(record["fee"]) == fee and int(record["price_per_1k_tokens"]) == DEFAULT_PRICE_PER_1K_TOKENS
    postings = {(p["role"], p["account"]): int(p["amount"]) for p in record["entry"]["postings"]}
    assert sum(postings.values()) == 0
    contributor = demo_contributor_address(PASSAGE.contributor_index)
    owner = address_of_key(DEMO_ADAPTER_OWNER_KEY)
    assert postings[("payer", "requester:local")] == -fee, "the local key's account pays"
    assert postings[("adapter_owner", f"payable:{owner}")] == fee * 2000 // 10000
    credited = {account: amount for (role, account), amount in postings.items() if role == "contributor"}
    assert max(credited, key=credited.__getitem__) == f"payable:{contributor}", "the regurgitated passage's author"
    # The contributor can see what they were paid and why: balance, and a statement naming the trace.
    balance = cli(capsys, "ledger", "balance", contributor)
    assert balance["address"] == contributor and int(balance["payable"]) >= credited[f"payable:{contributor}"]
    assert balance["pending"] == "0", "no payout batch is in flight"  # earlier tests may have paid earlier credits
    statement = cli(capsys, "ledger", "statement", contributor)
    assert trace_id in {line["ref"] for line in statement["lines"]}
    after = cli(capsys, "ledger", "totals")
    assert after["traces"] >= before["traces"] + 1 and after["postings_sum"] == "0"
    assert after["unbalanced_entries"] == 0 and int(after["fees"]) >= int(before["fees"]) + fee


def test_every_choice_of_n_is_billed_and_attributed(client: openai.OpenAI, capsys: pytest.CaptureFixture[str]) -> None:
    """n = 3: `usage` counts every choice's tokens, and so do the trace, the fee and the attribution."""
    raw = client.completions.with_raw_response.create(model=ADAPTER, prompt=PROMPT, max_tokens=24, n=3,
                                                      temperature=0.1)  # vLLM refuses n > 1 with greedy sampling
    body = raw.parse()
    assert len(body.choices) == 3
    record = wait_for_trace(capsys, raw.headers["x-attribution-trace-id"])
    trace = record["trace"]
    assert (trace["prompt_tokens"], trace["completion_tokens"]) == (body.usage.prompt_tokens,
                                                                    body.usage.completion_tokens)
    assert len(trace["choice_tokens"]) == 3 and sum(trace["choice_tokens"]) == body.usage.completion_tokens
    assert int(record["fee"]) == DEFAULT_PRICE_PER_1K_TOKENS * body.usage.total_tokens // 1000
    start = 0
    for count in trace["choice_tokens"]:  # each choice (nearly greedy) recites the passage: each is attributed
        choice = trace["tokens"][start:start + count]
        start += count
        assert sum(1 - token["unattributed"] for token in choice) > 0.5 * count, trace["choice_tokens"]


def test_cli_errors_are_one_line_with_their_exit_code(capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    assert "no trace 'nope'" in cli(capsys, "ledger", "trace", "nope", expect=2)["error"]
    assert "not an Ethereum address" in cli(capsys, "ledger", "balance", "0x12", expect=2)["error"]
    from tests.conftest import free_port

    monkeypatch.setenv("GATEWAY_LEDGER_PORT", str(free_port()))
    assert "is not answering" in cli(capsys, "ledger", "totals", expect=1)["error"]


def test_a_ledger_outage_under_load_loses_nothing_and_bills_nothing_twice(
    gateway: GatewayProcess, ledger_service: LedgerProcess, client: openai.OpenAI,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = cli(capsys, "ledger", "totals")
    requests = 48

    def one(i: int) -> str:
        raw = client.completions.with_raw_response.create(model=ADAPTER, prompt=f"{PROMPT} {i}", max_tokens=8,
                                                          temperature=0)
        return raw.headers["x-attribution-trace-id"]

    with ThreadPoolExecutor(4) as pool:
        first = list(pool.map(one, range(8)))
        ledger_service.stop(kill=True)  # mid-stream, without warning
        during = list(pool.map(one, range(8, requests)))  # inference goes on while the ledger is down
        deadline = time.monotonic() + 30
        while outbox_depth(gateway) < 8 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert outbox_depth(gateway) >= 8, "traces wait in the outbox while the ledger is down"
    ledger_service.start()
    trace_ids = first + during
    assert len(set(trace_ids)) == requests
    for trace_id in trace_ids:
        wait_for_trace(capsys, trace_id)
    after = cli(capsys, "ledger", "totals")
    assert after["traces"] == before["traces"] + requests, "each trace exactly once"
    assert after["conflicts"] == before["conflicts"]
    assert after["postings_sum"] == "0" and after["unbalanced_entries"] == 0
    paid_by = {kind: int(after["by_class"].get(kind, "0")) for kind in ("revenue", "requester", "deposits")}
    assert paid_by["revenue"] + paid_by["requester"] + paid_by["deposits"] == -int(after["fees"]), \
        "every fee was paid by a requester's credit (or by revenue without one)"
    deadline = time.monotonic() + SHIPPED_WITHIN_SECONDS
    while outbox_depth(gateway) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert outbox_depth(gateway) == 0, "acknowledged traces leave the outbox"


def test_settle_pays_balances_on_chain_and_chain_info_names_the_contracts(
    gateway: GatewayProcess, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ledger.chain.anvil import ANVIL_DEV_KEYS
    from ledger.chain.client import ChainClient
    from ledger.chain.settlement import PayoutToken

    monkeypatch.setenv("GATEWAY_CHAIN_PORT", gateway.env["GATEWAY_CHAIN_PORT"])  # for `chain info`
    state = ["--state-dir", str(gateway.state_dir)]  # the ledger settles: on its chain, with its settings
    contributor = demo_contributor_address(PASSAGE.contributor_index)
    owed = int(cli(capsys, "ledger", "balance", contributor)["payable"])
    assert owed > 0, "the earlier tests billed inferences"
    plan = cli(capsys, *state, "settle", "--dry-run", "--threshold", "1")
    planned = {line["address"]: int(line["amount"]) for batch in plan["batches"] for line in batch["lines"]}
    assert planned[contributor] == owed
    assert int(cli(capsys, "ledger", "balance", contributor)["payable"]) == owed, "a dry run changes nothing"
    result = cli(capsys, *state, "settle", "--threshold", "1")
    assert result["batches"] and {b["state"] for b in result["batches"]} == {"paid"}
    assert sum(b["payees"] for b in result["batches"]) == len(planned)
    balance = cli(capsys, "ledger", "balance", contributor)
    assert (balance["payable"], balance["pending"]) == ("0", "0") and int(balance["paid"]) >= owed
    info = cli(capsys, *state, "chain", "info")
    assert info["chain_id"] == 31337 and {"rpc_url", "token", "settler", "registry"} <= set(info)
    token = PayoutToken(ChainClient(info["rpc_url"], ANVIL_DEV_KEYS[0]), info["token"])
    assert token.balance_of(contributor) == int(balance["paid"]), "on-chain balance equals the ledger's paid"
    statement = cli(capsys, "ledger", "statement", contributor, "--limit", "10000")
    batches = {b["id"]: b["tx_hash"] for b in result["batches"]}
    [paid] = [line for line in statement["lines"]
              if line["kind"] == "payout_paid" and line["account"] == f"paid:{contributor}" and line["ref"] in batches]
    assert paid["tx_hash"] == batches[paid["ref"]], "the statement names the payout batch and its transaction"
    assert paid["traces"] and set(paid["traces"]) <= {
        line["ref"] for line in statement["lines"] if line["kind"] == "inference"}, "and the traces it pays"
    assert cli(capsys, *state, "settle", "--threshold", "1")["batches"] == [], "nothing is paid twice"


def test_traces_left_in_the_outbox_of_a_killed_gateway_are_shipped_after_restart(
    demo_state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os
    import signal

    import psutil

    from tests.conftest import free_port

    state = tmp_path / "killed"
    env = {"GATEWAY_BASE_MODEL_PATH": str(demo_state / "models" / "datanet-tiny-llama"),
           "GATEWAY_ADAPTER_STORE": str(demo_state / "adapters"), "GATEWAY_CHAIN_PORT": str(free_port()),
           "GATEWAY_LEDGER_PORT": str(free_port()), "GATEWAY_LEDGER_START": "false",
           "GATEWAY_LEDGER_OUTBOX_MAX_TRACES": "6",
           # Without a ledger there is no API key to present (the ledger creates and verifies them): the
           # subject here is the outbox, so this gateway serves without keys (traces bill `revenue`).
           "GATEWAY_AUTH": "false"}
    first = GatewayProcess(state, free_port(), free_port(), env=env).start()
    try:
        users = openai.OpenAI(base_url=f"{first.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        trace_ids = [users.completions.with_raw_response.create(model="demo-adapter-001", prompt=f"Count {i}",
                                                                max_tokens=4).headers["x-attribution-trace-id"]
                     for i in range(6)]
        deadline = time.monotonic() + 30
        while outbox_depth(first) < 6 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert outbox_depth(first) == 6, "no ledger: the traces wait in the outbox"
        deadline = time.monotonic() + 10  # the bound is checked from a count refreshed every second
        while True:
            try:
                users.completions.create(model="demo-adapter-001", prompt="one more", max_tokens=4)
            except openai.InternalServerError as refused:
                assert (refused.status_code, refused.code) == (503, "outbox_full")
                break
            assert time.monotonic() < deadline, "a full outbox must refuse new requests"
            time.sleep(0.5)
    finally:
        os.killpg(first.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
        first.process.wait()  # type: ignore[union-attr]
    # Restarted with its own ledger service (the `make up` default): the outbox drains into it.
    second = GatewayProcess(state, free_port(), free_port(), env={**env, "GATEWAY_LEDGER_START": "true"}).start()
    try:
        monkeypatch.setenv("GATEWAY_LEDGER_PORT", env["GATEWAY_LEDGER_PORT"])
        for trace_id in trace_ids:
            assert wait_for_trace(capsys, trace_id)["trace"]["trace_id"] == trace_id
        assert cli(capsys, "ledger", "totals")["traces"] >= 6
    finally:
        assert second.stop() == 0
        for process in psutil.process_iter(["cmdline"]):  # the killed run's anvil kept running in its session
            if str(state) in " ".join(process.info["cmdline"] or []):
                process.kill()
    assert outbox_depth(second) == 0
