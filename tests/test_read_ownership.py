"""Reads follow ownership, on the running stack: a trace is read by its account and by admin keys
only, `/stats` and the API port's `/metrics` by admin keys only, and a private adapter does not
exist for anyone outside the accounts it is shared with.

Driven as users do: the `openai` SDK, httpx and a gRPC client against the session gateway, the
`gateway` CLI for accounts, keys, adapters and sharing (on the same state directory). A refusal
must look exactly like "no such thing": the tests compare bytes with the answer for a made-up id
or name of the same length.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from tests.support.cli import cli
from tests.support.launcher import GatewayProcess
from wire.inference.v1 import inference_pb2 as pb
from wire.inference.v1 import inference_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.stack, pytest.mark.usefixtures("session_ledger_env")]
FREE = "demo-adapter-005"  # not registered: costs nothing, so empty accounts may use it
OWNER = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
KEY_CACHE_SECONDS = 1.0  # GATEWAY_KEY_CACHE_SECONDS default


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def new_account(capsys: pytest.CaptureFixture[str], state: Path, prefix: str) -> str:
    account = unique(prefix)
    cli(capsys, state, "accounts", "create", account)
    return account


def new_key(capsys: pytest.CaptureFixture[str], state: Path, account: str, *flags: str) -> str:
    return cli(capsys, state, "keys", "create", "--account", account, *flags)["key"]


def key_id(key: str) -> str:
    return f"key_{key.split('-')[1]}"


def auth(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


def get(gateway: GatewayProcess, path: str, key: str | None) -> httpx.Response:
    return httpx.get(f"{gateway.base_url}{path}", headers=auth(key), timeout=60)


def sdk(gateway: GatewayProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=key, max_retries=0, timeout=120)


def made_up(real: str) -> str:
    """An id or name of the same length that does not exist (its last 8 characters changed)."""
    fake = real[:-8] + "zz" + uuid.uuid4().hex[:6]
    assert fake != real
    return fake


def assert_unknown(gateway: GatewayProcess, path: str, real: str, refused: httpx.Response, key: str) -> None:
    """`refused` (for `real`) is byte for byte what the same key gets for a made-up id in its place."""
    fake = made_up(real)
    unknown = get(gateway, path.replace(real, fake), key)
    assert refused.status_code == unknown.status_code == 404
    assert refused.content == unknown.content.replace(fake.encode(), real.encode())
    assert refused.headers["content-type"] == unknown.headers["content-type"]


def generate(gateway: GatewayProcess, key: str, model: str = FREE) -> str:
    """One completion by `key`; its trace id."""
    raw = sdk(gateway, key).completions.with_raw_response.create(model=model, prompt="The river", max_tokens=4)
    return raw.headers["x-attribution-trace-id"]


def test_a_trace_is_read_by_its_account_and_admin_keys_and_unknown_to_every_other_key(
        capsys: pytest.CaptureFixture[str], gateway: GatewayProcess, demo_state: Path) -> None:
    alice = new_account(capsys, demo_state, "alice")
    alice_key, alice_other_key = new_key(capsys, demo_state, alice), new_key(capsys, demo_state, alice)
    bob_key = new_key(capsys, demo_state, new_account(capsys, demo_state, "bob"))  # a second, empty account
    admin_elsewhere = new_key(capsys, demo_state, new_account(capsys, demo_state, "ops"), "--admin")

    trace_id = generate(gateway, alice_key)
    path = f"/v1/attributions/{trace_id}"
    mine = get(gateway, path, alice_key)
    assert mine.status_code == 200, mine.text
    assert mine.json()["trace_id"] == trace_id and mine.json()["requester"] == key_id(alice_key)
    assert alice_key.split("-", 2)[2] not in mine.text, "a trace names the key's id, never the key"
    for reader in (alice_other_key, gateway.api_key, admin_elsewhere):  # same account; admin keys
        assert get(gateway, path, reader).json() == mine.json()

    refused = get(gateway, path, bob_key)
    assert refused.json()["error"]["code"] == "trace_not_found"
    assert_unknown(gateway, path, trace_id, refused, bob_key)
    assert get(gateway, path, None).status_code == 401

    local_trace = generate(gateway, gateway.api_key)  # the local (admin) account's own request
    local_path = f"/v1/attributions/{local_trace}"
    assert get(gateway, local_path, gateway.api_key).status_code == 200
    for outsider in (bob_key, alice_key):
        assert_unknown(gateway, local_path, local_trace, get(gateway, local_path, outsider), outsider)

    # A revoked key's traces stay its account's: the account's other keys still read them.
    cli(capsys, demo_state, "keys", "revoke", key_id(alice_key))
    time.sleep(KEY_CACHE_SECONDS + 0.5)
    assert get(gateway, path, alice_key).status_code == 401
    assert get(gateway, path, alice_other_key).status_code == 200
    assert get(gateway, path, bob_key).status_code == 404


def test_stats_and_the_api_port_metrics_need_an_admin_key(capsys: pytest.CaptureFixture[str],
                                                          gateway: GatewayProcess, demo_state: Path) -> None:
    user = new_key(capsys, demo_state, new_account(capsys, demo_state, "user"))
    admin = new_key(capsys, demo_state, new_account(capsys, demo_state, "admin"), "--admin")
    for path in ("/stats", "/metrics"):
        assert get(gateway, path, None).status_code == 401
        refused = get(gateway, path, user)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_key_required", refused.text
        assert "adapter" not in refused.text
    for key in (gateway.api_key, admin):
        counters = get(gateway, "/stats", key)
        assert counters.status_code == 200 and "adapters_loaded" in counters.json()
        scrape = get(gateway, "/metrics", key)
        assert scrape.status_code == 200 and "gateway_requests_total" in scrape.text
    assert get(gateway, "/health", None).status_code == 200, "health stays open"


def test_a_private_adapter_is_invisible_to_non_members_everywhere(
        capsys: pytest.CaptureFixture[str], gateway: GatewayProcess, demo_state: Path, scratch_adapter: Path) -> None:
    private = unique("private-notes")
    cli(capsys, demo_state, "adapter", "register", private, "--path", str(scratch_adapter), "--owner", OWNER,
        "--price-per-1k-tokens", "0")
    member_account = new_account(capsys, demo_state, "member")
    member = new_key(capsys, demo_state, member_account)
    outsider = new_key(capsys, demo_state, new_account(capsys, demo_state, "outsider"))
    assert cli(capsys, demo_state, "accounts", "share", member_account, private)["private"] is True

    def listed(key: str) -> bool:
        return private in [m.id for m in sdk(gateway, key).models.list().data]

    deadline = time.monotonic() + 15  # the store listing and the sharing are re-read every few seconds
    while not (listed(member) and not listed(outsider)):
        assert time.monotonic() < deadline, "the member never saw the adapter alone"
        time.sleep(0.5)

    trace_id = generate(gateway, member, private)  # the member uses it; its trace names it
    assert get(gateway, f"/v1/attributions/{trace_id}", member).json()["adapter"] == private

    # HTTP: absent from the list, and a request naming it is the 404 of a name that does not exist.
    assert not listed(outsider) and not listed(gateway.api_key), "admins see only what is shared with them"
    fake = made_up(private)
    for route, body in (("/v1/completions", {"prompt": "x", "max_tokens": 2}),
                        ("/v1/completions", {"prompt": "x", "max_tokens": 2, "stream": True}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        answers = [httpx.post(f"{gateway.base_url}{route}", headers=auth(outsider), timeout=60,
                              json={"model": model, **body}) for model in (private, fake)]
        assert answers[0].status_code == answers[1].status_code == 404
        assert answers[0].json()["error"]["code"] == "model_not_found"
        assert answers[0].content == answers[1].content.replace(fake.encode(), private.encode())
    with pytest.raises(openai.NotFoundError):
        sdk(gateway, outsider).completions.create(model=private, prompt="x", max_tokens=2)

    # gRPC: the same.
    with gateway.grpc_channel(outsider) as channel:
        stub = pb_grpc.InferenceStub(channel)
        assert private not in [m.id for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models]
        for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
            errors = []
            for model in (private, fake):
                with pytest.raises(grpc.RpcError) as error:
                    call(pb.GenerateRequest(model=model, prompt="x", max_tokens=2), timeout=30)
                errors.append(error.value)
            assert errors[0].code() == errors[1].code() == grpc.StatusCode.NOT_FOUND
            assert errors[0].details() == errors[1].details().replace(fake, private)
    with gateway.grpc_channel(member) as channel:
        assert private in [m.id for m in pb_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest()).models]

    # Its trace, the replica's counters and the API port's metrics (which name adapters): not for the outsider.
    path = f"/v1/attributions/{trace_id}"
    assert_unknown(gateway, path, trace_id, get(gateway, path, outsider), outsider)
    for operator_view in ("/stats", "/metrics"):
        refused = get(gateway, operator_view, outsider)
        assert refused.status_code == 403 and private not in refused.text
    assert private in get(gateway, "/stats", gateway.api_key).json()["adapters_loaded"], \
        "the operator's view does list it"
