"""portal/static/verify.js in real headless chromium against a real anvil with the real contracts.

The page under test is served by a throwaway loopback HTTP server (tests/support/browser.py) on another
port than anvil's, so every chain read also shows that the browser may call the node cross-origin.
"""

from __future__ import annotations

import hashlib
import html
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest
from eth_utils import keccak, to_checksum_address
from playwright.async_api import Browser, Page

from ledger.chain.anvil import ANVIL_DEV_KEYS, AnvilNode
from ledger.chain.client import ChainClient
from ledger.chain.registry import DatanetRegistry
from ledger.chain.settlement import ensure_settlement
from registry.anchor import datanet_key
from registry.contribution_content import content_id, normalize
from registry.merkle import MerkleTree
from tests.ledger.conftest import anvil_node  # noqa: F401 (the session's anvil, as the ledger tests use it)
from tests.support.browser import StaticSite
from tests.support.ports import free_port

VERIFY_JS = Path(__file__).resolve().parents[2] / "portal" / "static" / "verify.js"
PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>verify</title><script src="/static/verify.js"></script></head>
<body></body></html>"""

DATANET = "7f3b2c1e-portal-rivers"
TEXTS = [
    "The Danube flows through ten countries.",
    "Caf\u00e9 on the Seine\r\nopens at nine.  ",
    "The Rhine\n\nrises in the Alps.",
    "The Loire is France's longest river.",
    "The Tagus reaches the sea at Lisbon.",
]
CHOSEN = TEXTS[1]
FUND = 10**30
AMOUNT = 10**21 + 7  # far above 2**53: JavaScript numbers would round it
ALICE = to_checksum_address(keccak(text="portal payee alice")[:20])
BOB = to_checksum_address(keccak(text="portal payee bob")[:20])
BATCH = keccak(text="portal batch 1")
MANIFEST = keccak(text="portal manifest 1")

TRICKY_TEXTS = [
    "plain",
    "line one\r\nline two\r\n",
    "trailing spaces   \nand tabs\t\t\n",
    "Cafe\u0301 and re\u0301sume\u0301 (NFD accents)",
    "\n\n\n  leading blank lines and spaces",
    "old Mac\rline ends\r\r",
    "ideographic space\u3000\nno-break space\u00a0\nthin space\u2009",
    "\u00a0\u2003 both ends \u2028\u3000",
    "inner  spacing   kept\n\n\ninner blank lines kept",
    "emoji \U0001f30a and CJK \u6cb3\u5ddd",
    "",
    "   \r\n\t  \n",
]


# -- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site() -> Iterator[StaticSite]:
    with StaticSite({"/": (PAGE, "text/html; charset=utf-8"),
                     "/static/verify.js": (VERIFY_JS.read_bytes(), "text/javascript; charset=utf-8")}) as server:
        yield server


@pytest.fixture()
async def page(browser: Browser, site: StaticSite) -> AsyncIterator[Page]:
    """A fresh context and page on the site's blank page, verify.js loaded; no page error allowed."""
    context = await browser.new_context()
    errors: list[str] = []
    try:
        opened = await context.new_page()
        opened.on("pageerror", lambda error: errors.append(str(error)))
        await opened.goto(site.url + "/")
        assert await opened.evaluate("typeof window.PortalVerify") == "object"
        yield opened
    finally:
        await context.close()
    assert errors == [], errors


class Chain:
    """The registry with version 1 of DATANET anchored, and one settled payout batch (Alice and Bob)."""

    def __init__(self, node: AnvilNode, work: Path) -> None:
        self.rpc_url = node.rpc_url
        self.client = client = ChainClient(node.rpc_url, ANVIL_DEV_KEYS[0])
        self.registry = DatanetRegistry.deploy(client)
        self.ids = [content_id(normalize(text)) for text in TEXTS]
        self.tree = MerkleTree.from_ids([bytes.fromhex(i) for i in self.ids])
        self.registry.anchor(datanet_key(DATANET), 1, self.tree.root, len(self.tree))
        self.token, self.settler = ensure_settlement(client, work / "deployment.json", fund=FUND)
        receipt = self.settler.settle(BATCH, MANIFEST, [ALICE, BOB], [AMOUNT, 5])
        assert receipt["status"] == 1
        self.tx_hash = "0x" + bytes(receipt["transactionHash"]).hex()

    def rpc(self, method: str, *params: object) -> Any:
        reply = self.client.w3.provider.make_request(method, list(params))  # type: ignore[arg-type]
        assert "error" not in reply, reply
        return reply["result"]

    def inclusion_args(self, **changes: Any) -> dict[str, Any]:
        cid = content_id(normalize(CHOSEN))
        args = {
            "text": CHOSEN,
            "contributionId": cid,
            "proof": ["0x" + p.hex() for p in self.tree.proof(bytes.fromhex(cid))],
            "datanetId": DATANET,
            "version": 1,
            "registry": self.registry.address,
            "rpcUrl": self.rpc_url,
        }
        return args | changes

    def payout_args(self, **changes: Any) -> dict[str, Any]:
        args = {
            "rpcUrl": self.rpc_url,
            "txHash": self.tx_hash,
            "batchId": "0x" + BATCH.hex(),
            "settler": self.settler.address,
            "token": self.token.address,
            "payee": ALICE,
            "amount": str(AMOUNT),
        }
        return args | changes


@pytest.fixture(scope="module")
def chain(anvil_node: AnvilNode, tmp_path_factory: pytest.TempPathFactory) -> Chain:  # noqa: F811
    return Chain(anvil_node, tmp_path_factory.mktemp("portal-chain"))


# -- helpers --------------------------------------------------------------------------------------------

_SECTIONS = 0


async def run_check(page: Page, kind: str, args: dict[str, Any] | str, *, text: str | None = None) -> dict[str, Any]:
    """Render a check element as a template would, let the user type `text` (when given) and click Verify.

    Returns the verdict text, its data-state and the steps shown ([label, ok, detail], ok from data-ok).
    """
    global _SECTIONS
    _SECTIONS += 1
    section = f"check-{_SECTIONS}"
    data_args = args if isinstance(args, str) else json.dumps(args)
    textarea = '<textarea class="verify-text"></textarea>' if text is not None else ""
    markup = (f'<section id="{section}" data-verify="{html.escape(kind)}" data-args="{html.escape(data_args)}">'
              f'{textarea}<button class="verify-run">Verify</button><ol class="verify-steps"></ol>'
              f'<p class="verify-verdict"></p></section>')
    await page.evaluate("(markup) => { document.body.insertAdjacentHTML('beforeend', markup); "
                        "PortalVerify.bind(document.body); }", markup)
    if text is not None:
        await page.locator(f"#{section} textarea.verify-text").fill(text)
    await page.locator(f"#{section} .verify-run").click()
    verdict = page.locator(f"#{section} .verify-verdict")
    await page.wait_for_selector(f"#{section} .verify-verdict:is([data-state=verified], [data-state=failed])")
    steps = await page.evaluate(
        """(id) => [...document.querySelectorAll(`#${id} .verify-steps > li`)].map((li) => [
            li.querySelector('.verify-label').textContent, li.dataset.ok,
            li.querySelector('.verify-detail').textContent])""",
        section,
    )
    return {
        "verdict": await verdict.text_content(),
        "state": await verdict.get_attribute("data-state"),
        "steps": [(label, ok == "true", detail) for label, ok, detail in steps],
        "button_enabled": await page.locator(f"#{section} .verify-run").is_enabled(),
    }


def labels(result: dict[str, Any]) -> list[str]:
    return [label for label, _, _ in result["steps"]]


def failed_step(result: dict[str, Any]) -> tuple[str, str]:
    """The single failed step, which is the last one shown (a check stops at its first failure)."""
    assert result["verdict"] == result["state"] == "failed", result
    *passed, (label, ok, detail) = result["steps"]
    assert not ok and all(step[1] for step in passed), result
    return label, detail


INCLUSION_STEPS = ["Contribution id", "Merkle leaf", "Root computed from the proof", "Root anchored on-chain",
                   "Computed root equals the anchored root"]
PAYOUT_STEPS = ["Transaction receipt", "Sent to the settler", "BatchSettled event", "Token transfer to the payee",
                "Block on the chain"]


# -- hashing and text -----------------------------------------------------------------------------------


async def test_keccak256_equals_eth_utils(page: Page) -> None:
    inputs = [b"", b"abc", bytes(range(200)), bytes(135), bytes(136), bytes(137), b"\xff" * 272, b"x" * 1000]
    got = await page.evaluate(
        "(inputs) => inputs.map((a) => PortalVerify.bytesToHex(PortalVerify.keccak256(new Uint8Array(a))))",
        [list(data) for data in inputs],
    )
    assert got == [keccak(data).hex() for data in inputs]
    assert got[0] == "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
    assert got[1] == "4e03657aea45a94fc7d47ba826c8d667c0d1e6e33a64a036ec44f58fa12d6c45"


async def test_normalize_and_contribution_id_equal_python(page: Page) -> None:
    got = await page.evaluate(
        """async (texts) => Promise.all(texts.map(async (t) => [PortalVerify.normalize(t),
            await PortalVerify.contributionId(t),
            PortalVerify.bytesToHex(PortalVerify._sha256Fallback(PortalVerify.utf8(PortalVerify.normalize(t))))]))""",
        TRICKY_TEXTS,
    )
    expected = [[normalize(t), content_id(normalize(t)), content_id(normalize(t))] for t in TRICKY_TEXTS]
    assert got == expected
    # The built-in SHA-256 (for pages without crypto.subtle) crosses block boundaries correctly too.
    lengths = [0, 55, 56, 63, 64, 65, 119, 120, 1000]
    fallback = await page.evaluate(
        "(ns) => ns.map((n) => PortalVerify.bytesToHex(PortalVerify._sha256Fallback(new Uint8Array(n).fill(97))))",
        lengths,
    )
    assert fallback == [hashlib.sha256(b"a" * n).hexdigest() for n in lengths]


# -- inclusion ------------------------------------------------------------------------------------------


async def test_an_anchored_contribution_verifies(page: Page, chain: Chain) -> None:
    args = chain.inclusion_args()
    assert urlsplit(page.url).port != urlsplit(chain.rpc_url).port  # the node is called cross-origin (CORS)
    result = await run_check(page, "inclusion", args, text=CHOSEN)
    assert result["verdict"] == result["state"] == "verified", result
    assert labels(result) == INCLUSION_STEPS and all(ok for _, ok, _ in result["steps"])
    assert result["button_enabled"]
    details = "\n".join(detail for _, _, detail in result["steps"])
    # The values a sceptic repeats with another client.
    assert args["contributionId"] in details
    assert "0x" + keccak(keccak(bytes.fromhex(args["contributionId"]))).hex() in details
    assert "0x" + datanet_key(DATANET).hex() in details
    assert "0x" + chain.tree.root.hex() in details
    assert f'cast call {chain.registry.address.lower()} "rootOf(bytes32,uint64)(bytes32)"' in details
    assert "0x" + keccak(text="rootOf(bytes32,uint64)")[:4].hex() + datanet_key(DATANET).hex() in details

    # The same through the JavaScript API, for every contribution of the version.
    for text in TEXTS:
        cid = content_id(normalize(text))
        proof = ["0x" + p.hex() for p in chain.tree.proof(bytes.fromhex(cid))]
        outcome = await page.evaluate("(args) => PortalVerify.inclusion(args)",
                                      chain.inclusion_args(text=text, contributionId=cid, proof=proof, version="1"))
        assert outcome["ok"] is True and [s["label"] for s in outcome["steps"]] == INCLUSION_STEPS, outcome


async def test_a_template_rendered_check_is_bound_on_load(browser: Browser, site: StaticSite, chain: Chain) -> None:
    args = html.escape(json.dumps(chain.inclusion_args(text="")))
    payout = html.escape(json.dumps(chain.payout_args()))
    site.files["/contribution.html"] = (
        f"""<!doctype html><html><head><meta charset="utf-8"><script src="/static/verify.js" defer></script></head>
        <body><section data-verify="inclusion" data-args="{args}">
        <textarea class="verify-text">{html.escape(CHOSEN)}</textarea>
        <button class="verify-run">Verify</button><ol class="verify-steps"></ol><p class="verify-verdict"></p>
        </section>
        <div id="payout" data-verify="payout" data-args="{payout}"><ol class="verify-steps"></ol>
        <span class="verify-verdict"></span></div></body></html>""".encode(),
        "text/html; charset=utf-8",
    )
    context = await browser.new_context()
    try:
        page = await context.new_page()
        await page.goto(site.url + "/contribution.html")
        # A check without a button runs by itself once bound; the other waits for its button.
        await page.wait_for_selector("#payout .verify-verdict[data-state=verified]")
        assert await page.locator("section .verify-verdict").text_content() == ""
        await page.locator(".verify-run").click()
        await page.wait_for_selector("section .verify-verdict[data-state=verified]")
        assert await page.locator("section .verify-verdict").text_content() == "verified"
        assert await page.locator("section .verify-steps > li[data-ok=true]").count() == len(INCLUSION_STEPS)
        assert await page.locator("section[data-verify]").get_attribute("data-state") == "verified"
    finally:
        await context.close()


async def test_an_edited_text_fails_at_the_id_step(page: Page, chain: Chain) -> None:
    result = await run_check(page, "inclusion", chain.inclusion_args(), text=CHOSEN.replace("nine", "ten"))
    label, detail = failed_step(result)
    assert label == "Contribution id" and len(result["steps"]) == 1
    assert content_id(normalize(CHOSEN.replace("nine", "ten"))) in detail and "DIFFERENT" in detail
    # Whitespace the normalization removes is no edit.
    reflowed = "\n\n" + CHOSEN.replace("\r\n", "\n") + "  \n"
    result = await run_check(page, "inclusion", chain.inclusion_args(), text=reflowed)
    assert result["verdict"] == "verified", result


async def test_a_wrong_proof_sibling_fails_at_the_root_step(page: Page, chain: Chain) -> None:
    args = chain.inclusion_args()
    args["proof"][0] = "0x" + hashlib.sha256(b"not a sibling").hexdigest()
    result = await run_check(page, "inclusion", args, text=CHOSEN)
    label, detail = failed_step(result)
    assert label == "Computed root equals the anchored root" and labels(result) == INCLUSION_STEPS
    assert "0x" + chain.tree.root.hex() in detail and "DIFFERENT" in detail


async def test_an_unanchored_version_fails_at_the_chain_step(page: Page, chain: Chain) -> None:
    result = await run_check(page, "inclusion", chain.inclusion_args(version=2), text=CHOSEN)
    label, detail = failed_step(result)
    assert label == "Root anchored on-chain" and "not anchored" in detail and "0x" + "0" * 64 in detail
    result = await run_check(page, "inclusion", chain.inclusion_args(datanetId="another-datanet"), text=CHOSEN)
    assert failed_step(result)[0] == "Root anchored on-chain"
    # An address without a contract is named as such.
    result = await run_check(page, "inclusion", chain.inclusion_args(registry="0x" + "12" * 20), text=CHOSEN)
    label, detail = failed_step(result)
    assert label == "Root anchored on-chain" and "no registry contract" in detail


# -- payout ---------------------------------------------------------------------------------------------


async def test_a_settled_payout_verifies_for_the_right_payee_and_amount(page: Page, chain: Chain) -> None:
    result = await run_check(page, "payout", chain.payout_args())
    assert result["verdict"] == result["state"] == "verified", result
    assert labels(result) == PAYOUT_STEPS
    details = {label: detail for label, _, detail in result["steps"]}
    assert f"{AMOUNT} base units to {ALICE.lower()}" in details["Token transfer to the payee"]
    assert "manifestHash 0x" + MANIFEST.hex() in details["BatchSettled event"]
    assert f"count 2, total {AMOUNT + 5}" in details["BatchSettled event"]
    assert "confirmation" in details["Block on the chain"]
    bob = await run_check(page, "payout", chain.payout_args(payee=BOB.lower(), amount="5"))
    assert bob["verdict"] == "verified", bob


async def test_a_payout_fails_for_another_payee_or_amount(page: Page, chain: Chain) -> None:
    stranger = to_checksum_address(keccak(text="portal stranger")[:20])
    result = await run_check(page, "payout", chain.payout_args(payee=stranger))
    label, detail = failed_step(result)
    assert label == "Token transfer to the payee" and f"no transfer to {stranger.lower()}" in detail

    result = await run_check(page, "payout", chain.payout_args(amount=str(AMOUNT + 1)))
    label, detail = failed_step(result)
    assert label == "Token transfer to the payee"
    assert f"paid to {ALICE.lower()}: {AMOUNT}; expected {AMOUNT + 1} (DIFFERENT)" in detail

    result = await run_check(page, "payout", chain.payout_args(batchId="0x" + keccak(text="other batch").hex()))
    assert failed_step(result)[0] == "BatchSettled event"
    result = await run_check(page, "payout", chain.payout_args(settler=chain.token.address))
    assert failed_step(result)[0] == "Sent to the settler"
    result = await run_check(page, "payout", chain.payout_args(txHash="0x" + "ab" * 32))
    label, detail = failed_step(result)
    assert label == "Transaction receipt" and "no receipt" in detail


async def test_confirmations_grow_and_a_reorganized_payout_fails(page: Page, chain: Chain) -> None:
    snapshot = chain.rpc("evm_snapshot")
    batch = keccak(text="portal batch reorganized")
    receipt = chain.settler.settle(batch, MANIFEST, [ALICE], [AMOUNT])
    args = chain.payout_args(txHash="0x" + bytes(receipt["transactionHash"]).hex(), batchId="0x" + batch.hex())
    chain.rpc("evm_mine")
    chain.rpc("evm_mine")
    result = await run_check(page, "payout", args)
    assert result["verdict"] == "verified", result
    assert result["steps"][-1][2].endswith(f"head is block {receipt['blockNumber'] + 2}: 3 confirmations")

    chain.rpc("evm_revert", snapshot)  # the batch's block leaves the chain; another block takes its height
    chain.rpc("evm_mine")
    label, detail = failed_step(await run_check(page, "payout", args))
    assert label == "Transaction receipt" and "no receipt" in detail


# -- errors ---------------------------------------------------------------------------------------------


async def test_an_unreachable_node_or_bad_arguments_end_failed_with_a_readable_step(page: Page, chain: Chain) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    result = await run_check(page, "inclusion", chain.inclusion_args(rpcUrl=nowhere), text=CHOSEN)
    label, detail = failed_step(result)
    assert label == "Root anchored on-chain" and f"could not reach the chain node at {nowhere}" in detail
    result = await run_check(page, "payout", chain.payout_args(rpcUrl=nowhere))
    label, detail = failed_step(result)
    assert label == "Transaction receipt" and "could not reach the chain node" in detail
    assert result["button_enabled"]

    result = await run_check(page, "payout", "{not json")
    assert failed_step(result) == ("Arguments", result["steps"][0][2]) and "not valid JSON" in result["steps"][0][2]
    result = await run_check(page, "payout", chain.payout_args(amount="1.5"))
    assert failed_step(result)[0] == "Arguments" and "amount must be a non-negative integer" in result["steps"][0][2]
    result = await run_check(page, "inclusion", chain.inclusion_args(proof=["0x1234"]), text=CHOSEN)
    assert "proof element #0 must be 32 bytes" in failed_step(result)[1]
    result = await run_check(page, "payout", chain.payout_args(txHash=None))
    assert "missing argument: txHash" in failed_step(result)[1]
    result = await run_check(page, "refund", chain.payout_args())
    assert failed_step(result) == ("Arguments", 'unknown check data-verify="refund"')


async def test_the_verdict_is_running_until_the_check_ends(page: Page, chain: Chain) -> None:
    states = await page.evaluate(
        """async (args) => {
            document.body.insertAdjacentHTML('beforeend', '<div id="plain" data-verify="payout">'
                + '<ol class="verify-steps"></ol><b class="verify-verdict"></b></div>');
            const element = document.getElementById('plain');
            element.dataset.args = JSON.stringify(args);
            const done = new Promise((resolve) => element.addEventListener('verify:done', (e) => resolve(e.detail.ok)));
            const running = PortalVerify.run(element);
            const during = [element.querySelector('.verify-verdict').dataset.state, element.dataset.state];
            await running;
            return [during, element.querySelector('.verify-verdict').dataset.state, await done];
        }""",
        chain.payout_args(),
    )
    assert states == [["running", "running"], "verified", True]


async def test_the_browser_listens_on_nothing_off_loopback(page: Page) -> None:
    processes = [p for p in psutil.Process().children(recursive=True) if "chrom" in p.name()]
    assert processes, "no chromium process found under this test process"
    listening = [conn.laddr for p in processes for conn in p.net_connections(kind="inet")
                 if conn.status == psutil.CONN_LISTEN]
    assert all(address.ip in ("127.0.0.1", "::1") for address in listening), listening
    # Nothing off loopback is reachable, by name or by address; loopback is (the page itself came from it).
    outcome = await page.evaluate("""async (urls) => Promise.all(urls.map(async (url) => {
        try { await fetch(url, {mode: 'no-cors'}); return 'fetched'; } catch (error) { return 'refused'; } }))""",
                                  ["http://example.com/", "http://93.184.215.14/", "http://10.0.0.1/", page.url])
    assert outcome == ["refused", "refused", "refused", "fetched"]
