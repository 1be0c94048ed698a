"""The playground's door to the OpenAI API: the viewer's own key, streamed through, nothing kept.

The browser never holds the key: it stays in the viewer's server-side session (portal/sessions.py) and
goes to the API in the Authorization header of each forwarded request. The request is narrowed to what
the playground sends (a model, a prompt as a chat message or as text to continue, a token budget) and
always streams, greedily (temperature 0).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi.responses import JSONResponse, Response, StreamingResponse

from portal.sessions import KeyViewer

MAX_TOKENS = 512
MAX_PROMPT_CHARS = 8000
TIMEOUT_SECONDS = 120.0


class Playground:
    """Forwards the playground's chats to the API at `api_url` with the viewer's key."""

    def __init__(self, api_url: str) -> None:
        self.api_url = api_url.rstrip("/")

    def models(self, viewer: KeyViewer) -> list[str]:
        """The models the viewer's key may use (empty when the API does not answer)."""
        try:
            reply = httpx.get(f"{self.api_url}/v1/models", headers=_auth(viewer), timeout=10)
            reply.raise_for_status()
            return sorted(str(m["id"]) for m in reply.json().get("data", []))
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return []

    async def chat(self, viewer: KeyViewer, body: bytes) -> Response:
        """The API's streamed answer to `body` ({model, prompt, max_tokens, mode: "chat" | "complete"}), or a JSON
        error saying what was wrong with it."""
        try:
            path, request = _forwarded(json.loads(body or b"{}"))
        except (ValueError, TypeError) as bad:
            return JSONResponse({"error": {"message": str(bad)}}, status_code=400)
        client = httpx.AsyncClient(timeout=TIMEOUT_SECONDS)
        try:
            upstream = await client.send(
                client.build_request("POST", f"{self.api_url}{path}", json=request, headers=_auth(viewer)), stream=True)
        except httpx.HTTPError as away:
            await client.aclose()
            return JSONResponse({"error": {"message": f"the API at {self.api_url} did not answer ({away})"}},
                                status_code=503)
        if upstream.status_code != 200:
            text = await upstream.aread()
            await upstream.aclose()
            await client.aclose()
            return Response(text, status_code=upstream.status_code, media_type="application/json")

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()
                await client.aclose()

        trace_id = upstream.headers.get("x-attribution-trace-id", "")
        return StreamingResponse(relay(), media_type="text/event-stream", headers={"x-attribution-trace-id": trace_id})


def _auth(viewer: KeyViewer) -> dict[str, str]:
    return {"authorization": f"Bearer {viewer.secret}"}


def _forwarded(body: Any) -> tuple[str, dict[str, Any]]:
    """The API path and request of a playground request: a chat, or a plain completion of the prompt's text."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    model, prompt = body.get("model"), body.get("prompt")
    if not isinstance(model, str) or not model:
        raise ValueError("pick a model")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("type a prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt is longer than {MAX_PROMPT_CHARS} characters")
    max_tokens = body.get("max_tokens", 128)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= MAX_TOKENS:
        raise ValueError(f"max_tokens must be a whole number from 1 to {MAX_TOKENS}")
    mode = body.get("mode", "chat")
    common = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    if mode == "chat":
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": prompt}]}
    if mode == "complete":
        return "/v1/completions", {**common, "prompt": prompt}
    raise ValueError("mode must be 'chat' or 'complete'")
