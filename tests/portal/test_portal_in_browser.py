"""The portal in a real headless browser (Debian's chromium), against the running session gateway.

Driven as a contributor and an API user would: click from a datanet to a contributor, to a payout, to
its transaction (checked on-chain by the page's own script) and into a trace; compare what the explorer
colours with the trace the API returns; edit a contribution and see its proof fail; sign in with a
wallet (EIP-4361) and with an API key; watch the playground stream and colour an answer. The answer
billed here is settled on the session's chain first, so the payout is real.

With PORTAL_SCREENSHOTS=<dir> set, each page visited is saved there (docs/portal.md shows them).
"""

from __future__ import annotations

import json
import os
from contextlib import redirect_stdout
from io import StringIO
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from playwright.async_api import Browser, Page, expect

from gateway.cli import main
from gateway.demo_data import DEMO_CONTRIBUTOR_KEYS, demo_adapter_name, demo_contributor_address
from gateway.ledger_process import LedgerProcess
from portal.trace_view import colour_of
from registry.models import Contribution
from storage.database import database_url, open_database
from tests.support.launcher import GatewayProcess
from training.demo_passages import DEMO_DATANETS

pytestmark = pytest.mark.stack

DATANET = DEMO_DATANETS[0]
ADAPTER = demo_adapter_name(DATANET)
PASSAGE = DATANET.passages[0]
PROMPT = " ".join(PASSAGE.text.split()[:12])
CONTRIBUTOR = demo_contributor_address(PASSAGE.contributor_index)
CONTRIBUTOR_KEY = DEMO_CONTRIBUTOR_KEYS[PASSAGE.contributor_index]
WAIT_MS = 60_000


@dataclass(frozen=True)
class Scenario:
    portal: str
    api: str
    key: str  # the local admin key, whose account made the answer
    trace_id: str
    batch_id: str
    tx_hash: str
    state: Path


def cli(*args: str) -> dict:
    out = StringIO()
    with redirect_stdout(out):
        code = main([*args, "--json"])
    assert code == 0, out.getvalue()
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def scenario(gateway: GatewayProcess, ledger_service: LedgerProcess, client: openai.OpenAI) -> Iterator[Scenario]:
    """One answer of the demo adapter reciting a passage, billed, then paid on-chain by a settlement round."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GATEWAY_LEDGER_PORT", gateway.env["GATEWAY_LEDGER_PORT"])
        env.setenv("GATEWAY_LEDGER_TOKEN", ledger_service.token)
        env.setenv("GATEWAY_CHAIN_PORT", gateway.env["GATEWAY_CHAIN_PORT"])
        reply = client.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=40, temperature=0)
        trace_id = reply.id
        deadline = time.monotonic() + 60
        while main(["ledger", "trace", trace_id, "--json"]) != 0:
            assert time.monotonic() < deadline, f"{trace_id} did not reach the ledger"
            time.sleep(0.3)
        settled = cli("--state-dir", str(gateway.state_dir), "settle", "--threshold", "1")
        assert {b["state"] for b in settled["batches"]} == {"paid"}
        statement = cli("ledger", "statement", CONTRIBUTOR, "--limit", "10000")
        [paid] = [line for line in statement["lines"] if line["kind"] == "payout_paid"
                  and line["account"] == f"paid:{CONTRIBUTOR}" and trace_id in line["traces"]]
        yield Scenario(gateway.portal_url, gateway.base_url, gateway.api_key or "", trace_id, paid["ref"],
                       paid["tx_hash"], gateway.state_dir)


async def shot(page: Page, name: str) -> None:
    folder = os.environ.get("PORTAL_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)


async def sign_in_with_key(page: Page, portal: str, key: str) -> None:
    await page.goto(f"{portal}/sign-in")
    await page.fill("#sign-in-key input[name=key]", key)
    await page.click("#sign-in-key button[type=submit]")
    await expect(page.locator("#signed-in-key")).to_be_visible()


def contributors_of(state: Path, ids: set[str]) -> dict[str, str]:
    from sqlmodel import Session, col, select

    engine = open_database(database_url(state), migrate=False)
    try:
        with Session(engine) as session:
            rows = session.exec(select(Contribution.id, Contribution.contributor)
                                .where(col(Contribution.id).in_(sorted(ids)))).all()
    finally:
        engine.dispose()
    return dict(rows)


async def test_click_from_a_datanet_to_a_contributor_payout_transaction_and_trace(browser: Browser,
                                                                                   scenario: Scenario) -> None:
    context = await browser.new_context()
    page = await context.new_page()
    await sign_in_with_key(page, scenario.portal, scenario.key)
    await page.goto(f"{scenario.portal}/datanets")
    await shot(page, "datanets")
    await page.click(f'#datanets a[href="/datanets/{DATANET.name}"]')
    await expect(page.locator("h1")).to_have_text(DATANET.name)
    await expect(page.locator("#versions tr[data-version='1'] .adapter")).to_contain_text(ADAPTER)
    await expect(page.locator(f'table.usage tr[data-adapter="{ADAPTER}"]').first).to_be_visible()
    await shot(page, "datanet")

    await page.click(f'#contributors a[href="/contributors/{CONTRIBUTOR}"]')
    await expect(page.locator("#address")).to_have_text(CONTRIBUTOR)
    await expect(page.locator(f'#adapters tr[data-adapter="{ADAPTER}"] .answers')).not_to_have_text("0")
    await shot(page, "contributor")

    await page.click(f'#payouts tr[data-batch="{scenario.batch_id}"] a.payout')
    await expect(page.locator("#payout-state")).to_have_text("paid")
    await expect(page.locator(f'#paid-traces a[href="/traces/{scenario.trace_id}"]')).to_be_visible()
    await shot(page, "payout")

    await page.click("#payout-tx")
    await expect(page.locator("h1")).to_contain_text("Transaction")
    await page.click("[data-verify=payout] .verify-run")
    verdict = page.locator("[data-verify=payout] .verify-verdict")
    await expect(verdict).to_have_attribute("data-state", "verified", timeout=WAIT_MS)
    assert scenario.tx_hash.lower() in (await page.locator("[data-verify=payout] .verify-steps").inner_text()).lower()
    await shot(page, "transaction")

    await page.go_back()
    await page.click(f'#paid-traces a[href="/traces/{scenario.trace_id}"]')
    await expect(page.locator("#trace-id")).to_have_text(scenario.trace_id)
    await shot(page, "trace")

    # what the explorer colours is what the API's trace says, token by token
    api = httpx.get(f"{scenario.api}/v1/attributions/{scenario.trace_id}",
                    headers={"authorization": f"Bearer {scenario.key}"}, timeout=30).json()
    owners = contributors_of(scenario.state, {cid for t in api["tokens"] for cid, _ in t["weights"]})
    shown = await page.eval_on_selector_all("#completion .tok", """spans => spans.map(s => ({
        id: Number(s.dataset.tokenId), contributor: s.dataset.contributor, weight: Number(s.dataset.weight),
        style: s.getAttribute('style') || '', background: getComputedStyle(s).backgroundColor}))""")
    assert [s["id"] for s in shown] == [t["token_id"] for t in api["tokens"]]
    attributed = 0
    for token, span in zip(api["tokens"], shown):
        by_address: dict[str, float] = {}
        for cid, weight in token["weights"]:
            by_address[owners[cid]] = by_address.get(owners[cid], 0.0) + weight
        if not by_address:
            assert span["contributor"] == "" and span["weight"] == 0 and span["background"] == "rgba(0, 0, 0, 0)"
            continue
        address, weight = max(by_address.items(), key=lambda item: (item[1], item[0]))
        assert span["contributor"] == address and span["weight"] == pytest.approx(weight, abs=1e-12)
        assert colour_of(address) in span["style"] and span["background"] != "rgba(0, 0, 0, 0)"
        attributed += 1
    assert attributed > len(shown) // 2, "a recited passage is mostly attributed"
    assert CONTRIBUTOR in [s["contributor"] for s in shown]
    # the span links to the contribution it matches, where the matching text is marked
    await page.click("#spans a.span-link >> nth=0")
    await expect(page.locator("#span-match")).to_be_visible()
    await context.close()


async def test_an_edited_contribution_fails_the_in_browser_proof(browser: Browser, scenario: Scenario) -> None:
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(f"{scenario.portal}/contributors/{CONTRIBUTOR}")
    proof = page.locator("#my-contributions [data-verify=inclusion]").first
    await proof.locator("summary").click()
    await proof.locator(".verify-run").click()
    await expect(proof.locator(".verify-verdict")).to_have_attribute("data-state", "verified", timeout=WAIT_MS)
    steps = await proof.locator(".verify-steps li").all_inner_texts()
    assert len(steps) >= 5 and all(await proof.locator(".verify-steps li").evaluate_all(
        "items => items.map(i => i.dataset.ok === 'true')"))
    await shot(page, "proof")
    text = proof.locator("textarea.verify-text")
    await text.fill((await text.input_value()).replace(" ", "  ", 1) + " And one more sentence.")
    await proof.locator(".verify-run").click()
    await expect(proof.locator(".verify-verdict")).to_have_attribute("data-state", "failed", timeout=WAIT_MS)
    first_failed = proof.locator('.verify-steps li[data-ok="false"]').first
    await expect(first_failed).to_be_visible()
    assert "id" in (await first_failed.inner_text()).lower()
    await context.close()


async def test_another_accounts_trace_is_refused(browser: Browser, scenario: Scenario,
                                                 gateway: GatewayProcess, ledger_service: LedgerProcess) -> None:
    from ledger.client.admin import admin_client

    with admin_client(gateway.state_dir, scenario.key, ledger_service.target) as admin:
        admin.create_account("portal-stranger")
        stranger = admin.create_key("portal-stranger", name="stranger").presented
    context = await browser.new_context()
    page = await context.new_page()
    await sign_in_with_key(page, scenario.portal, stranger)
    reply = await page.goto(f"{scenario.portal}/traces/{scenario.trace_id}")
    assert reply is not None and reply.status == 404
    await expect(page.locator("#error-message")).to_contain_text("that your key may read")
    await expect(page.locator("h1")).to_have_text("No such trace")
    assert await page.locator("#completion").count() == 0
    api = await page.evaluate(f"fetch('/api/traces/{scenario.trace_id}').then(r => r.status)")
    assert api == 404
    await context.close()


async def test_bad_inputs_get_clear_pages(browser: Browser, scenario: Scenario) -> None:
    context = await browser.new_context()
    page = await context.new_page()
    for path, status, says in (
        ("/contributors/0xnot-an-address", 400, "is not an Ethereum address"),
        ("/contributors/0x" + "ab" * 20, 404, "No contribution and no earnings"),
        ("/datanets/no-such-datanet", 404, "No datanet is named 'no-such-datanet'"),
        ("/traces/not%20a%20trace", 400, "A trace id is"),
    ):
        reply = await page.goto(scenario.portal + path)
        assert reply is not None and reply.status == status, path
        await expect(page.locator("#error-message")).to_contain_text(says)
        assert "Traceback" not in await page.content()
    await shot(page, "error")
    await context.close()


async def test_a_contributor_signs_in_with_their_wallet_and_sees_where_their_text_was_used(
        browser: Browser, scenario: Scenario) -> None:
    context = await browser.new_context()
    signed: list[str] = []

    def personal_sign(_source: object, message: str) -> str:  # the wallet: the contributor's own key
        signed.append(message)
        return "0x" + Account.sign_message(encode_defunct(text=message), CONTRIBUTOR_KEY).signature.hex()

    await context.expose_binding("walletSign", personal_sign)
    await context.add_init_script("""window.ethereum = {request: ({method, params}) =>
        method === 'personal_sign' ? window.walletSign(params[0]) : Promise.reject(new Error(method))};""")
    page = await context.new_page()
    await page.goto(f"{scenario.portal}/sign-in")
    await page.fill("#sign-in-contributor input[name=address]", CONTRIBUTOR)
    await page.click("#sign-in-contributor button[type=submit]")
    await shot(page, "sign-in")
    await page.click("#sign-with-wallet")
    await expect(page.locator("#address")).to_have_text(CONTRIBUTOR)
    assert len(signed) == 1 and signed[0].split("\n")[1] == CONTRIBUTOR
    private = page.locator(f'#private [data-trace="{scenario.trace_id}"]')
    await expect(private).to_be_visible()
    shown = await private.locator("li").evaluate_all("items => items.map(i => i.dataset.contribution)")
    owners = contributors_of(scenario.state, set(shown))
    assert shown and set(owners.values()) == {CONTRIBUTOR}, "only their own contributions are shown"
    await shot(page, "contributor-signed-in")
    await context.close()


async def test_the_playground_streams_an_answer_and_colours_it_by_contributor(browser: Browser,
                                                                              scenario: Scenario) -> None:
    context = await browser.new_context()
    page = await context.new_page()
    await sign_in_with_key(page, scenario.portal, scenario.key)
    await expect(page.locator("h1")).to_have_text("Playground")
    await page.select_option("#model", ADAPTER)
    await page.select_option("#mode", "complete")
    await page.fill("#prompt", PROMPT)
    await page.fill("#max-tokens", "40")
    await page.click("#send")
    status = page.locator("#playground-status")
    await expect(status).to_have_attribute("data-state", re.compile("attributing|done"), timeout=WAIT_MS)
    streamed = await page.locator("#answer").inner_text()
    assert streamed.strip(), "the answer streamed in"
    await expect(status).to_have_attribute("data-state", "done", timeout=WAIT_MS)
    tokens = page.locator("#answer .tok")
    assert await tokens.count() > 0
    assert (await page.locator("#answer").inner_text()) == streamed, "colouring keeps the streamed text"
    leaders = await tokens.evaluate_all("spans => spans.map(s => s.dataset.contributor)")
    assert CONTRIBUTOR in leaders
    await expect(page.locator(f'#answer-contributors tr[data-contributor="{CONTRIBUTOR}"]')).to_be_visible()
    await shot(page, "playground")
    # nothing of the key is kept in the browser: no storage, and the session cookie is HttpOnly
    stored = await page.evaluate("[localStorage.length, sessionStorage.length, document.cookie]")
    assert stored == [0, 0, ""]
    await context.close()
