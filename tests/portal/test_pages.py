"""The portal's pages over a real registry database and a real ledger service (gRPC, its own token).

Driven through HTTP as a browser would (Starlette's test client: cookies, forms, redirects); the
browser's own checks (proofs, payouts, colours, the playground) are in test_portal_in_browser.py.
Token text comes from a stand-in decoder here; the browser test decodes with the real tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from eth_account import Account
from sqlalchemy import text
from eth_account.messages import encode_defunct
from fastapi.testclient import TestClient

from ledger.client.access import LedgerAccessClient
from ledger.client.reads import LedgerReads
from ledger.client.trace import AttributionTrace, TokenAttribution
from ledger.journal.fee_split import FeeSplitPolicy
from ledger.journal.journal import Journal
from portal.app import ChainView, PortalServices, build_portal
from portal.config import PortalConfig
from portal.playground import Playground
from portal.registry_view import RegistryView
from portal.sessions import SessionStore
from portal.sign_in import SignInDesk
from registry.config import DatanetConfig
from registry.datanets import DatanetRegistry
from registry.merkle import verify_proof
from tests.ledger.conftest import CIDS, OWNER, rivers_ledger
from tests.registry.test_datanet_registry import ALICE, BOB, TEXTS, signed
from tests.support.ledger_server import ServedLedger, served_ledger

DOMAIN = "testserver"
CHAIN = ChainView(rpc_url="http://127.0.0.1:1", chain_id=31337, registry="0x" + "11" * 20, settler=None, token=None)


@dataclass
class Portal:
    http: TestClient
    ledger: ServedLedger
    journal: Journal
    own_key: str  # a key of account "reader", which made trace t-own
    other_key: str  # a key of account "other"
    admin_key: str
    own_key_id: str
    services: PortalServices


def trace(trace_id: str, requester: str | None, tokens: list[TokenAttribution]) -> AttributionTrace:
    return AttributionTrace(trace_id=trace_id, model="river-guide", adapter="river-guide", requester=requester,
                            prompt_tokens=7, completion_tokens=len(tokens), tokens=tuple(tokens),
                            method="verbatim-span-v1")


def tok(token_id: int, weights: dict[str, float]) -> TokenAttribution:
    return TokenAttribution(token_id=token_id, weights=tuple(weights.items()),
                            unattributed=max(0.0, 1.0 - sum(weights.values())))


def decode(ids: list[int]) -> str:
    return "".join(f"w{i} " for i in ids)


@pytest.fixture()
def portal(tmp_path: Path) -> Iterator[Portal]:
    state = tmp_path / "state"
    state.mkdir()
    engine = rivers_ledger(f"sqlite:///{state / 'ledger.db'}", tmp_path)
    datanets = DatanetRegistry(engine, DatanetConfig())
    rivers = datanets.get("rivers")
    with engine.begin() as connection:  # the datanet's owner, who may see every recorded refusal
        connection.execute(text("UPDATE datanet SET owner = :owner WHERE id = :id"), {"owner": OWNER.address,
                                                                                      "id": rivers.id})
    refused = datanets.contribute("rivers", [signed(BOB, rivers.id, TEXTS[0], "bob/copy.txt")])
    assert [r.source for r in refused.rejected] == ["bob/copy.txt"]
    engine.dispose()
    with served_ledger(state) as ledger:
        admin_key = ledger.bootstrap()
        with ledger.admin(admin_key) as admin:
            admin.create_account("reader")
            admin.create_account("other")
            own = admin.create_key("reader", name="reader")
            other = admin.create_key("other", name="other")
        journal = Journal(ledger.engine, FeeSplitPolicy(contributors_bps=7000, owner_bps=2000))
        acks = journal.ingest([
            trace("t-own", own.key.id, [tok(1, {CIDS[0]: 1.0}), tok(2, {CIDS[0]: 0.5, CIDS[2]: 0.5}), tok(3, {})]),
            trace("t-bob", other.key.id, [tok(4, {CIDS[2]: 1.0})]),
        ])
        assert [a.status for a in acks] == ["accepted", "accepted"]
        access = LedgerAccessClient(ledger.target, ledger.token)
        reads = LedgerReads(ledger.target, ledger.token)
        config = PortalConfig()
        services = PortalServices(
            config=config, registry=RegistryView(ledger.engine, page_size=2), ledger=reads,
            authenticate=access.authenticate, key_account=access.key_account, decode=decode, chain=lambda: CHAIN,
            sessions=SessionStore(), sign_in=SignInDesk(domain=DOMAIN, uri=f"http://{DOMAIN}", chain_id=31337),
            playground=Playground("http://127.0.0.1:1"),
        )
        with TestClient(build_portal(services), raise_server_exceptions=False) as http:
            yield Portal(http, ledger, journal, own.presented, other.presented, admin_key, own.key.id, services)
        access.close()
        reads.close()


def csrf(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]


def sign_in_with_key(http: TestClient, key: str) -> None:
    token = csrf(http.get("/sign-in").text)
    reply = http.post("/sign-in/key", data={"key": key, "csrf": token}, follow_redirects=False)
    assert reply.status_code == 303, reply.text


def sign_in_as(http: TestClient, account) -> None:  # type: ignore[no-untyped-def]
    """Sign in as a contributor the way the page asks: get the message, sign it with the account's key."""
    import html

    token = csrf(http.get("/sign-in").text)
    challenge = http.post("/sign-in/challenge", data={"address": account.address, "csrf": token})
    message = html.unescape(re.search(r'id="sign-in-message">([^<]+)</textarea>',
                                      challenge.text).group(1))  # type: ignore[union-attr]
    signature = Account.sign_message(encode_defunct(text=message), account.key).signature.hex()
    done = http.post("/sign-in/contributor", data={"message": message, "signature": "0x" + signature, "csrf": token},
                     follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == f"/contributors/{account.address}", done.text


def assert_error_page(reply, status: int, says: str) -> None:  # type: ignore[no-untyped-def]
    assert reply.status_code == status
    assert says in reply.text
    assert "Traceback" not in reply.text and 'data-status="%d"' % status in reply.text


def test_datanet_pages_list_versions_roots_contributors_lineage_and_usage(portal: Portal) -> None:
    listing = portal.http.get("/datanets")
    assert listing.status_code == 200 and 'data-datanet="rivers"' in listing.text
    page = portal.http.get("/datanets/rivers")
    assert page.status_code == 200
    versions = re.findall(r'<code class="root">(0x[0-9a-f]{64})</code>', page.text)
    assert len(versions) == 1
    assert 'class="adapter">river-guide<' in page.text
    # contributors, most contributions first, two per page here: Alice (2) then Bob (1)
    assert page.text.index(ALICE.address) < page.text.index(BOB.address)
    # usage: the two answers of river-guide today
    assert re.search(r'data-adapter="river-guide">.*?<td class="answers">2</td>', page.text, re.S)
    second = portal.http.get("/datanets/rivers?contributions=2")
    assert second.status_code == 200 and "page 2 of 2" in second.text


def test_bad_inputs_get_a_clear_page_never_a_stack_trace(portal: Portal) -> None:
    assert_error_page(portal.http.get("/datanets/no-such-datanet"), 404, "No datanet is named")
    assert_error_page(portal.http.get("/datanets/Not%20A%20Name"), 400, "is not a datanet name")
    assert_error_page(portal.http.get("/contributors/0x1234"), 400, "is not an Ethereum address")
    assert_error_page(portal.http.get("/contributors/" + "0x" + "ab" * 20), 404, "No contribution and no earnings")
    assert_error_page(portal.http.get("/contributions/xyz"), 400, "64 hexadecimal digits")
    assert_error_page(portal.http.get("/nowhere"), 404, "There is no page at this address")
    assert_error_page(portal.http.get("/datanets/rivers?contributions=abc"), 400, "not valid here: contributions")
    assert_error_page(portal.http.get("/contributions/" + "ab" * 32), 404, "No contribution has the id")
    assert_error_page(portal.http.get("/tx/0x12"), 400, "A transaction hash is")
    tx = "/tx/0x" + "cd" * 32
    assert_error_page(portal.http.get(tx + "?amount=12e3"), 400, "whole number of base units")
    assert_error_page(portal.http.get(tx + "?batch=0x12"), 400, "A payout batch id is")
    assert_error_page(portal.http.get(tx + "?payee=bob"), 400, "is not an Ethereum address")
    payouts = f"/contributors/{ALICE.address}/payouts/"
    assert_error_page(portal.http.get(payouts + "0x12"), 400, "A payout batch id is")
    assert_error_page(portal.http.get(payouts + "0x" + "ef" * 32), 404, "has no payout in batch")
    sign_in_with_key(portal.http, portal.own_key)
    assert_error_page(portal.http.get("/traces/bad$id"), 400, "Not a trace id")
    assert_error_page(portal.http.get("/traces/" + "x" * 129), 400, "Not a trace id")


def test_contributor_page_shows_balances_payout_lines_adapters_and_proofs_that_verify(portal: Portal) -> None:
    page = portal.http.get(f"/contributors/{ALICE.address.lower()}")
    assert page.status_code == 200
    with LedgerReads(portal.ledger.target, portal.ledger.token) as reads:
        expected = reads.balance(ALICE.address)
    assert expected.payable > 0
    payable = re.search(r'data-balance="payable">([^<]+)<', page.text).group(1)  # type: ignore[union-attr]
    whole, _, frac = payable.partition(".")
    assert int(whole) * 10**18 + int(frac.ljust(18, "0") or 0) == expected.payable, payable
    assert 'data-adapter="river-guide"' in page.text
    # each contribution carries a proof the page's script checks; it verifies against the version's root here
    args = re.findall(r'data-verify="inclusion" data-contribution="([0-9a-f]{64})" data-args="([^"]+)"', page.text)
    assert sorted(cid for cid, _ in args) == sorted(CIDS[:2])
    import html
    import json
    root = re.search(r'<code class="root">(0x[0-9a-f]{64})</code>',
                     portal.http.get("/datanets/rivers").text).group(1)  # type: ignore[union-attr]
    for cid, raw in args:
        proof = json.loads(html.unescape(raw))
        assert proof["contributionId"] == "0x" + cid and proof["rpcUrl"] == CHAIN.rpc_url
        assert verify_proof(bytes.fromhex(root[2:]), bytes.fromhex(cid), [bytes.fromhex(p[2:]) for p in proof["proof"]])
    # public page: the private detail is locked
    assert 'id="private-locked"' in page.text and 'id="private"' not in page.text


def test_a_trace_is_shown_to_its_account_and_admins_and_refused_like_an_unknown_one_to_others(portal: Portal) -> None:
    assert_error_page(portal.http.get("/traces/t-own"), 401, "Sign in to read traces")
    sign_in_with_key(portal.http, portal.other_key)
    refused = portal.http.get("/traces/t-own")
    unknown = portal.http.get("/traces/t-nothing")
    assert_error_page(refused, 404, "No trace t-own that your key may read")
    assert refused.text.replace("t-own", "X") == unknown.text.replace("t-nothing", "X")  # nothing told
    assert portal.http.get("/api/traces/t-own").status_code == 404

    for key in (portal.own_key, portal.admin_key):
        portal.http.cookies.clear()
        sign_in_with_key(portal.http, key)
        page = portal.http.get("/traces/t-own")
        assert page.status_code == 200
        tokens = re.findall(r'<span class="tok" data-index="(\d)" data-token-id="(\d)" data-contributor="([^"]*)" '
                            r'data-weight="([^"]+)"', page.text)
        assert tokens == [("0", "1", ALICE.address, "1.0"), ("1", "2", BOB.address, "0.5"), ("2", "3", "", "0.0")] \
            or tokens == [("0", "1", ALICE.address, "1.0"), ("1", "2", ALICE.address, "0.5"), ("2", "3", "", "0.0")]
        # the fee split and the journal entry: postings sum to zero, shares add up to the fee
        fee = int(re.search(r'<th>fee</th><td data-amount="(\d+)"', page.text).group(1))  # type: ignore[union-attr]
        shares = [int(v) for v in re.findall(r'data-role="\w+" data-amount="(\d+)"', page.text)]
        assert fee > 0 and sum(shares) == fee
        postings = [int(v) for v in re.findall(r'<td class="amount">(-?\d+)</td>', page.text)]
        assert sum(postings) == 0 and -fee in postings
        api = portal.http.get("/api/traces/t-own").json()
        assert [t["weight"] for t in api["tokens"]] == [1.0, 0.5, 0.0]
        assert api["tokens"][0]["contributor"] == ALICE.address and api["tokens"][2]["contributor"] is None
    assert OWNER.address in page.text  # the adapter owner is named


def test_a_contributor_signs_in_with_their_key_and_sees_only_their_own_contributions_in_traces(portal: Portal) -> None:
    http = portal.http
    token = csrf(http.get("/sign-in").text)
    challenge = http.post("/sign-in/challenge", data={"address": ALICE.address, "csrf": token})
    message = re.search(r'id="sign-in-message">([^<]+)</textarea>', challenge.text).group(1)  # type: ignore[union-attr]
    import html
    message = html.unescape(message)
    assert message.startswith(f"{DOMAIN} wants you to sign in with your Ethereum account:\n{ALICE.address}")

    # Bob's key over Alice's message: refused, not signed in
    bob_signature = Account.sign_message(encode_defunct(text=message), BOB.key).signature.hex()
    refused = http.post("/sign-in/contributor", data={"message": message, "signature": "0x" + bob_signature,
                                                      "csrf": token})
    assert refused.status_code == 401 and 'id="signature-error"' in refused.text
    assert 'id="private"' not in http.get(f"/contributors/{ALICE.address}").text
    # the nonce was spent by that attempt: Alice's own signature over the same message is refused too
    alice_signature = Account.sign_message(encode_defunct(text=message), ALICE.key).signature.hex()
    replay = http.post("/sign-in/contributor", data={"message": message, "signature": "0x" + alice_signature,
                                                     "csrf": token})
    assert replay.status_code == 401

    sign_in_as(http, ALICE)
    page = http.get(f"/contributors/{ALICE.address}")
    private = page.text[page.text.index('id="private"'):]
    assert 'data-trace="t-own"' in private
    assert CIDS[0] in private and CIDS[2] not in private  # Bob's contribution in the same trace is not shown
    assert 'data-trace="t-bob"' not in private  # a trace that credited only Bob
    # Alice's session does not open Bob's page's private detail
    assert 'id="private-locked"' in http.get(f"/contributors/{BOB.address}").text


def test_sign_in_refusals_store_no_session(portal: Portal) -> None:
    http = portal.http
    token = csrf(http.get("/sign-in").text)
    wrong = http.post("/sign-in/key", data={"key": "sk-not-a-key", "csrf": token})
    assert wrong.status_code == 401 and "not a live API key" in wrong.text
    assert_error_page(http.get("/playground"), 401, "Sign in to use the playground")
    forged = http.post("/sign-in/key", data={"key": portal.own_key, "csrf": "forged"})
    assert_error_page(forged, 403, "Session expired")
    assert_error_page(http.get("/playground"), 401, "Sign in to use the playground")
    bad_address = http.post("/sign-in/challenge", data={"address": "alice", "csrf": token})
    assert bad_address.status_code == 400 and "not an address" in bad_address.text


def test_pages_say_when_the_ledger_is_away(portal: Portal) -> None:
    portal.services.ledger = LedgerReads("127.0.0.1:1", portal.ledger.token, timeout=1)  # nothing listens there
    assert_error_page(portal.http.get(f"/contributors/{ALICE.address}"), 503, "The ledger is not answering")
    page = portal.http.get("/datanets/rivers")
    assert page.status_code == 200 and "The ledger did not answer" in page.text


def test_refused_submissions_are_shown_to_the_datanet_owner_and_to_their_submitter_only(portal: Portal) -> None:
    http = portal.http
    assert 'id="rejections-locked"' in http.get("/datanets/rivers").text
    sign_in_as(http, ALICE)  # a contributor with no refusal sees none, and nobody else's
    page = http.get("/datanets/rivers").text
    assert 'id="rejections"' in page and "bob/copy.txt" not in page and "None recorded for you" in page
    for account in (BOB, OWNER):
        http.cookies.clear()
        sign_in_as(http, account)
        page = http.get("/datanets/rivers").text
        row = page[page.index('id="rejections"'):]
        assert "bob/copy.txt" in row and "exact duplicate of contribution" in row


def test_a_key_revoked_after_sign_in_reads_no_more_traces(portal: Portal) -> None:
    sign_in_with_key(portal.http, portal.own_key)
    assert portal.http.get("/traces/t-own").status_code == 200
    with portal.ledger.admin(portal.admin_key) as admin:
        admin.revoke_key(portal.own_key_id)
    assert_error_page(portal.http.get("/traces/t-own"), 401, "was revoked")
    assert_error_page(portal.http.get("/traces/t-own"), 401, "Sign in to read traces")  # and the session ended


def test_the_playground_refuses_bad_requests_and_forwards_nothing_for_them(portal: Portal) -> None:
    http = portal.http
    assert http.post("/playground/chat", json={"model": "river-guide", "prompt": "hi"}).status_code == 401
    sign_in_with_key(http, portal.own_key)
    page = http.get("/playground")
    assert page.status_code == 200
    token = re.search(r'data-csrf="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    refused = http.post("/playground/chat", json={"model": "river-guide", "prompt": "hi"},
                        headers={"x-csrf-token": "forged"})
    assert refused.status_code == 403 and "CSRF" in refused.json()["error"]["message"]
    for body, says in (({"prompt": "hi"}, "pick a model"), ({"model": "river-guide", "prompt": " "}, "type a prompt"),
                       ({"model": "river-guide", "prompt": "hi", "max_tokens": 0}, "max_tokens must be"),
                       ({"model": "river-guide", "prompt": "hi", "mode": "poem"}, "mode must be"),
                       ([], "must be a JSON object")):
        reply = http.post("/playground/chat", json=body, headers={"x-csrf-token": token})
        assert reply.status_code == 400 and says in reply.json()["error"]["message"], (body, reply.text)
    # a well-formed request to an API that does not answer (this test's portal points at port 1): a clear 503
    away = http.post("/playground/chat", json={"model": "river-guide", "prompt": "hi"}, headers={"x-csrf-token": token})
    assert away.status_code == 503 and "did not answer" in away.json()["error"]["message"]
    assert portal.journal.totals().traces == 2  # the fixture's two traces: nothing billed by the refused requests
