"""The portal's pages: datanets, contributors, payouts, transactions, the attribution explorer, the playground.

Server-rendered (Jinja2 templates in portal/templates/), with one script of our own for the checks a
browser makes itself (portal/static/verify.js) and one for the playground. Reads only: registry rows
through `RegistryView`, money through the ledger's read API (`LedgerReads`), keys through the Access
API. What may be read follows the gateway's rules: a trace by the keys of the account that made it
(and admin keys; `may_read_trace`), a contributor's private detail by that contributor, signed in with
their own key (EIP-4361). Every error is a page that says what was wrong, never a stack trace.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Form, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from ledger.client.access import KeyGrant, LedgerUnavailable, may_read_trace
from ledger.client.reads import LedgerReads
from portal.config import PortalConfig
from portal.playground import Playground
from portal.registry_view import RegistryView
from portal.sessions import COOKIE_NAME, KeyViewer, Session, SessionStore, check_csrf, clear_cookie_settings
from portal.sign_in import SignInDesk, SignInRefused
from portal.trace_view import colour_of, explore

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
TRACE_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
BATCH_ID = re.compile(r"^0x[0-9a-fA-F]{64}$")
TX_HASH = BATCH_ID
CONTRIBUTION_ID = re.compile(r"^(0x)?[0-9a-fA-F]{64}$")
DATANET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
PRIVATE_TRACES = 20  # traces a signed-in contributor sees their contributions in


@dataclass(frozen=True)
class ChainView:
    """What the browser needs to check proofs and payouts on-chain by itself."""

    rpc_url: str
    chain_id: int
    registry: str | None
    settler: str | None
    token: str | None


@dataclass
class PortalServices:
    """Everything the pages read from, built by `portal/server.py` (or by a test)."""

    config: PortalConfig
    registry: RegistryView
    ledger: LedgerReads
    authenticate: Callable[[str], KeyGrant | None]
    key_account: Callable[[str], str | None]
    decode: Callable[[list[int]], str]
    chain: Callable[[], ChainView]  # read per page: the settler appears once the first payout deploys it
    sessions: SessionStore
    playground: Playground
    sign_in: SignInDesk | None = None  # EIP-4361 messages name the portal's host:port: set once it is bound

class PageError(Exception):
    """Ends a request with an error page: status, a title and what to do about it."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


def checksum(address: str) -> str:
    from eth_utils import to_checksum_address

    if not ADDRESS.match(address):
        raise PageError(400, "Not an address", f"'{address[:80]}' is not an Ethereum address: 0x followed by 40 "
                                               "hexadecimal digits.")
    return to_checksum_address(address)


def build_portal(services: PortalServices) -> FastAPI:
    """The portal's ASGI app."""
    app = FastAPI(title="Datanet Gateway portal", docs_url=None, redoc_url=None, openapi_url=None)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals.update(colour_of=colour_of, short=_short, units=_amount)
    templates.env.filters["json_attr"] = _json_attr
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    csp = _content_security_policy(services.chain().rpc_url)
    https = services.config.https

    def session_of(request: Request) -> Session | None:
        return services.sessions.get(request.cookies.get(COOKIE_NAME))

    def signed_in(session: Session | None, to: str) -> RedirectResponse:
        if session is None:
            raise PageError(403, "Session expired", "Your session ended while signing in. Open /sign-in again.")
        response = RedirectResponse(to, status_code=303)
        response.set_cookie(**services.sessions.cookie(session, https=https))
        return response

    def render(request: Request, template: str, code: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("session", session_of(request))
        context.setdefault("chain", services.chain())
        return templates.TemplateResponse(request, template, context, status_code=code)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        response.headers.setdefault("content-security-policy", csp)
        response.headers.setdefault("x-content-type-options", "nosniff")
        response.headers.setdefault("referrer-policy", "no-referrer")
        response.headers.setdefault("x-frame-options", "DENY")
        response.headers.setdefault("cache-control", "no-store")
        return response

    @app.exception_handler(PageError)
    async def page_error(request: Request, exc: PageError) -> HTMLResponse:
        return render(request, "error.html", exc.status, title=exc.title, message=exc.message, status=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> HTMLResponse:
        title = "Page not found" if exc.status_code == 404 else "Request refused"
        message = "There is no page at this address." if exc.status_code == 404 else str(exc.detail)
        return render(request, "error.html", exc.status_code, title=title, message=message, status=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, exc: RequestValidationError) -> HTMLResponse:
        names = sorted({str(error["loc"][-1]) for error in exc.errors() if error.get("loc")})
        return render(request, "error.html", 400, status=400, title="Bad request",
                      message=f"These parameters are not valid here: {', '.join(names) or 'the request body'} "
                              "(a page number is a whole number).")

    @app.exception_handler(LedgerUnavailable)
    async def ledger_away(request: Request, exc: LedgerUnavailable) -> HTMLResponse:
        log.warning("portal: %s", exc)
        return render(request, "error.html", 503, status=503, title="The ledger is not answering",
                      message="This page needs the ledger service, which did not answer. Try again in a moment.")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> HTMLResponse:
        log.exception("portal: %s %s failed", request.method, request.url.path)
        return render(request, "error.html", 500, status=500, title="Something went wrong",
                      message="The portal could not build this page. The operator's log has the details.")

    # ---- datanets ------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse("/datanets", status_code=303)

    @app.get("/datanets", response_class=HTMLResponse)
    def datanets(request: Request) -> HTMLResponse:
        return render(request, "datanets.html", datanets=services.registry.datanets())

    @app.get("/datanets/{name}", response_class=HTMLResponse)
    def datanet(request: Request, name: str, contributors: int = 1, contributions: int = 1) -> HTMLResponse:
        if not DATANET_NAME.match(name):
            raise PageError(400, "Not a datanet name", f"'{name[:80]}' is not a datanet name: lower-case letters, "
                                                       "digits, '.', '_' or '-'.")
        detail = services.registry.datanet(name, contributors_page=contributors, contributions_page=contributions)
        if detail is None:
            raise PageError(404, "Unknown datanet", f"No datanet is named '{name}'. The list of datanets is at "
                                                    "/datanets.")
        adapters = sorted({a for v in detail.summary.versions for a in v.adapters})
        usage, usage_error = _usage(services, adapters)
        session = session_of(request)
        viewer = session.contributor if session else None
        rejections = None  # refusals are shown to the datanet's owner (all) and to each submitter (their own)
        if viewer is not None:
            mine = None if viewer == detail.summary.owner else viewer
            rejections = services.registry.rejections(detail.summary.id, mine)
        return render(request, "datanet.html", detail=detail, usage=usage, usage_error=usage_error,
                      rejections=rejections)

    # ---- contributors and contributions ------------------------------------------------------------

    @app.get("/contributors/{address}", response_class=HTMLResponse)
    def contributor(request: Request, address: str) -> HTMLResponse:
        address = checksum(address)
        contributions = services.registry.contributions_of(address)
        statement = services.ledger.statement(address, limit=200)
        if not contributions and not statement.lines:
            raise PageError(404, "Unknown address", f"No contribution and no earnings are recorded for {address}.")
        adapters = services.registry.adapters_on(contributions)
        usage, usage_error = _usage(services, sorted(adapters))
        answered = {}
        for bucket in usage:
            answered[bucket.adapter] = answered.get(bucket.adapter, 0) + bucket.requests
        proofs = services.registry.proofs(contributions)
        payouts = payout_rows(statement.lines)
        earnings = [line for line in statement.lines if not line.kind.startswith("payout_")]
        session = session_of(request)
        private = None
        if session is not None and session.contributor == address:
            private = _private_detail(services, address, earnings)
        return render(request, "contributor.html", address=address, contributions=contributions, proofs=proofs,
                      adapters=adapters, answered=answered, usage_error=usage_error, statement=statement,
                      payouts=payouts, earnings=earnings, private=private)

    @app.get("/contributions/{contribution_id}", response_class=HTMLResponse)
    def contribution(request: Request, contribution_id: str, q: str = "") -> HTMLResponse:
        if not CONTRIBUTION_ID.match(contribution_id):
            raise PageError(400, "Not a contribution id", "A contribution id is the SHA-256 of its text: 64 "
                                                          "hexadecimal digits.")
        found = services.registry.contribution(contribution_id.lower().removeprefix("0x"))
        if found is None:
            raise PageError(404, "Unknown contribution", f"No contribution has the id {contribution_id.lower()}.")
        return render(request, "contribution.html", contribution=found, proof=services.registry.proof(found),
                      highlight=_highlight(found.text, q))

    # ---- payouts and transactions -----------------------------------------------------------------

    @app.get("/contributors/{address}/payouts/{batch_id}", response_class=HTMLResponse)
    def payout(request: Request, address: str, batch_id: str) -> HTMLResponse:
        address = checksum(address)
        if not BATCH_ID.match(batch_id):
            raise PageError(400, "Not a batch id", "A payout batch id is 0x followed by 64 hexadecimal digits.")
        lines = [line for line in services.ledger.statement(address, limit=10000).lines
                 if line.kind.startswith("payout_") and line.ref.lower() == batch_id.lower()]
        if not lines:
            raise PageError(404, "Unknown payout", f"{address} has no payout in batch {batch_id}.")
        [row] = payout_rows(lines)
        return render(request, "payout.html", address=address, row=row, lines=lines)

    @app.get("/tx/{tx_hash}", response_class=HTMLResponse)
    def transaction(request: Request, tx_hash: str, payee: str = "", batch: str = "", amount: str = "") -> HTMLResponse:
        if not TX_HASH.match(tx_hash):
            raise PageError(400, "Not a transaction hash", "A transaction hash is 0x followed by 64 hexadecimal "
                                                           "digits.")
        payee = checksum(payee) if payee else ""
        if batch and not BATCH_ID.match(batch):
            raise PageError(400, "Not a batch id", "A payout batch id is 0x followed by 64 hexadecimal digits.")
        if amount and not amount.isdigit():
            raise PageError(400, "Not an amount", "An amount is a whole number of base units.")
        return render(request, "transaction.html", tx_hash=tx_hash.lower(), payee=payee, batch=batch.lower(),
                      amount=amount)

    # ---- the attribution explorer -----------------------------------------------------------------

    def live_key(session: Session) -> KeyViewer:
        """The session's key, asked of the ledger again: a key revoked since sign-in reads nothing more."""
        assert session.api_key is not None
        if services.authenticate(session.api_key.secret) is None:
            services.sessions.sign_out(session.id)
            raise PageError(401, "Your key is no longer valid", "The API key you signed in with was revoked. "
                                                                "Sign in again at /sign-in.")
        return session.api_key

    def readable_trace(request: Request, trace_id: str):  # type: ignore[no-untyped-def]
        if not TRACE_ID.match(trace_id):
            raise PageError(400, "Not a trace id", "A trace id is the id of a response (chatcmpl-…, cmpl-…): "
                                                   "letters, digits, '-' and '_', at most 128.")
        session = session_of(request)
        if session is None or session.api_key is None:
            raise PageError(401, "Sign in to read traces", "A trace is read with an API key of the account that "
                                                           "made the request. Sign in with your key at /sign-in.")
        viewer = live_key(session)
        record = services.ledger.trace_record(trace_id)
        if record is None or not may_read_trace(viewer.key_id, viewer.account_id, viewer.admin,
                                                record.trace.requester, services.key_account):
            raise PageError(404, "No such trace", f"No trace {trace_id} that your key may read: a trace is readable "
                                                  "by the keys of the account that made the request.")
        ids = {cid for token in record.trace.tokens for cid, _ in token.weights}
        return record, explore(record.trace, services.registry.contributions(ids), services.decode)

    @app.get("/traces/{trace_id}", response_class=HTMLResponse)
    def trace(request: Request, trace_id: str) -> HTMLResponse:
        record, view = readable_trace(request, trace_id)
        split = _fee_split(record.entry.postings)
        owner = services.registry.adapter_owner(record.trace.adapter) if record.trace.adapter else None
        return render(request, "trace.html", record=record, view=view, split=split, adapter_owner=owner)

    @app.get("/api/traces/{trace_id}")
    def trace_json(request: Request, trace_id: str) -> JSONResponse:
        try:
            record, view = readable_trace(request, trace_id)
        except PageError as refused:
            return JSONResponse({"error": {"title": refused.title, "message": refused.message}},
                                status_code=refused.status)
        return JSONResponse({
            "trace_id": record.trace.trace_id, "method": record.trace.method, "fee": str(record.fee),
            "tokens": [{"index": t.index, "text": t.text, "contributor": t.contributor, "weight": t.weight,
                        "colour": t.colour, "contribution_id": t.contribution_id} for t in view.tokens],
            "contributors": [{"address": c.address, "share": c.share, "colour": c.colour} for c in view.contributors],
        })

    # ---- the playground ---------------------------------------------------------------------------

    @app.get("/playground", response_class=HTMLResponse)
    def playground(request: Request) -> HTMLResponse:
        session = session_of(request)
        if session is None or session.api_key is None:
            raise PageError(401, "Sign in to use the playground", "The playground answers with your own API key "
                                                                  "(billed to your account). Sign in at /sign-in.")
        models = services.playground.models(session.api_key)
        return render(request, "playground.html", models=models)

    @app.post("/playground/chat")
    async def playground_chat(request: Request) -> Response:
        session = session_of(request)
        if session is None or session.api_key is None:
            return JSONResponse({"error": {"message": "sign in with an API key first"}}, status_code=401)
        if not check_csrf(session, request.headers.get("x-csrf-token", "")):
            return JSONResponse({"error": {"message": "missing or wrong CSRF token; reload the page"}},
                                status_code=403)
        return await services.playground.chat(session.api_key, await request.body())

    # ---- signing in -------------------------------------------------------------------------------

    @app.get("/sign-in", response_class=HTMLResponse)
    def sign_in_page(request: Request) -> HTMLResponse:
        session = session_of(request)
        created = session is None
        if session is None:
            session = services.sessions.create()
        response = render(request, "sign_in.html", session=session)
        if created:
            response.set_cookie(**services.sessions.cookie(session, https=https))
        return response

    def form_session(request: Request, csrf: str) -> Session:
        session = session_of(request)
        if session is None or not check_csrf(session, csrf):
            raise PageError(403, "Session expired", "Your sign-in form was too old or not from this portal. "
                                                    "Open /sign-in and try again.")
        return session

    @app.post("/sign-in/key", response_class=HTMLResponse)
    def sign_in_key(request: Request, key: str = Form(""), csrf: str = Form("")) -> Response:
        session = form_session(request, csrf)
        try:
            grant = services.authenticate(key.strip()) if key.strip() else None
        except ValueError:  # the ledger refused it as malformed
            grant = None
        if grant is None:
            return render(request, "sign_in.html", 401, session=session,
                          key_error="This key is not a live API key of this gateway.")
        return signed_in(services.sessions.sign_in_key(session.id, KeyViewer.from_grant(grant, key.strip())),
                         "/playground")

    @app.post("/sign-in/challenge", response_class=HTMLResponse)
    def sign_in_challenge(request: Request, address: str = Form(""), csrf: str = Form("")) -> Response:
        session = form_session(request, csrf)
        if not ADDRESS.match(address.strip()):
            return render(request, "sign_in.html", 400, session=session,
                          address_error="That is not an address: 0x followed by 40 hexadecimal digits.")
        assert services.sign_in is not None, "serve_portal sets the sign-in desk"
        challenge = services.sign_in.challenge(checksum(address.strip()))
        return render(request, "sign_in.html", session=session, challenge=challenge.to_message())

    @app.post("/sign-in/contributor", response_class=HTMLResponse)
    def sign_in_contributor(request: Request, message: str = Form(""), signature: str = Form(""),
                            csrf: str = Form("")) -> Response:
        session = form_session(request, csrf)
        assert services.sign_in is not None, "serve_portal sets the sign-in desk"
        try:
            address = services.sign_in.verify(message.replace("\r\n", "\n"), signature.strip())
        except SignInRefused as refused:
            return render(request, "sign_in.html", 401, session=session, signature_error=str(refused))
        return signed_in(services.sessions.sign_in_contributor(session.id, address), f"/contributors/{address}")

    @app.post("/sign-out")
    def sign_out(request: Request, csrf: str = Form("")) -> Response:
        session = form_session(request, csrf)
        services.sessions.sign_out(session.id)
        response = RedirectResponse("/datanets", status_code=303)
        response.delete_cookie(**clear_cookie_settings(https=https))
        return response

    return app


# ---- helpers ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PayoutRow:
    """One payout batch as it concerns one address (its statement has two lines per step of the batch)."""

    batch_id: str
    state: str  # planned (in a batch, not yet paid), paid, voided
    amount: int
    tx_hash: str | None
    traces: tuple[str, ...]


def payout_rows(lines: Any) -> list[PayoutRow]:
    """The payout batches in statement `lines` (newest first), one row each."""
    rows: dict[str, dict[str, Any]] = {}
    for line in lines:
        if not line.kind.startswith("payout_"):
            continue
        row = rows.setdefault(line.ref, {"kinds": set(), "amount": 0, "tx_hash": None, "traces": ()})
        row["kinds"].add(line.kind)
        row["amount"] = max(row["amount"], abs(line.amount))
        row["tx_hash"] = row["tx_hash"] or line.tx_hash or None
        row["traces"] = row["traces"] or tuple(line.traces)
    return [PayoutRow(batch, "paid" if "payout_paid" in row["kinds"] else
                      "voided" if "payout_voided" in row["kinds"] else "planned",
                      row["amount"], row["tx_hash"], row["traces"]) for batch, row in rows.items()]


def _usage(services: PortalServices, adapters: list[str]) -> tuple[list[Any], str]:
    if not adapters:
        return [], ""
    try:
        return list(services.ledger.usage(tuple(adapters), bucket="day", buckets=30)), ""
    except LedgerUnavailable:
        return [], "The ledger did not answer: usage is not shown."


def _private_detail(services: PortalServices, address: str, earnings: list[Any]) -> list[dict[str, Any]]:
    """For the contributor signed in as `address`: the traces that credited them, each with only their own
    contributions (text) and the weights those got — not the prompt or completion of someone else."""
    seen: list[str] = []
    for line in earnings:
        if line.role == "contributor" and line.ref not in seen:
            seen.append(line.ref)
        if len(seen) >= PRIVATE_TRACES:
            break
    detail = []
    for trace_id in seen:
        record = services.ledger.trace_record(trace_id)
        if record is None:
            continue
        ids = {cid for token in record.trace.tokens for cid, _ in token.weights}
        own = {cid: c for cid, c in services.registry.contributions(ids).items() if c.contributor == address}
        if not own:
            continue
        totals = record.trace.contribution_totals()
        tokens = {cid: sum(1 for t in record.trace.tokens for c, w in t.weights if c == cid and w > 0) for cid in own}
        detail.append({"trace_id": trace_id, "adapter": record.trace.adapter, "received_at": record.received_at,
                       "completion_tokens": record.trace.completion_tokens,
                       "contributions": [{"contribution": own[cid], "share": totals.get(cid, 0.0),
                                          "tokens": tokens[cid]} for cid in sorted(own, key=lambda c: -totals[c])]})
    return detail


def _fee_split(postings: Any) -> dict[str, int]:
    split: dict[str, int] = {}
    for posting in postings:
        if posting.role != "payer":
            split[posting.role] = split.get(posting.role, 0) + posting.amount
    return split


def _highlight(text: str, query: str) -> tuple[str, str, str] | None:
    """(before, match, after) of the first occurrence of `query` in `text`, for the span a trace links from."""
    query = query.strip()
    if not query:
        return None
    at = text.find(query)
    if at < 0:
        return None
    return text[:at], text[at:at + len(query)], text[at + len(query):]


def _short(value: str | None, keep: int = 10) -> str:
    if not value:
        return ""
    return value if len(value) <= 2 * keep + 1 else f"{value[:keep]}…{value[-6:]}"


def _amount(base_units: int, decimals: int = 18) -> str:
    """Base units as a decimal token amount, exactly (no float)."""
    sign = "-" if base_units < 0 else ""
    whole, frac = divmod(abs(int(base_units)), 10**decimals)
    frac_text = f"{frac:0{decimals}d}".rstrip("0")
    return f"{sign}{whole}.{frac_text}" if frac_text else f"{sign}{whole}"


def _json_attr(value: Any) -> str:
    import json

    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _content_security_policy(rpc_url: str) -> str:
    parts = urlsplit(rpc_url)
    chain = f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else ""
    return ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            f"connect-src 'self' {chain}; frame-ancestors 'none'; base-uri 'none'; "
            "form-action 'self'").replace("  ", " ")
