"""A headless browser for tests: Debian's chromium (/usr/bin/chromium) driven by Playwright's async API.

Why the async API: pytest-asyncio runs every async test on one session event loop. Playwright's sync API
marks its own event loop as the thread's running loop between calls, so a sync browser kept open for the
session makes every later async test fail ("Runner.run() cannot be called from a running event loop").
The async API simply runs on the session loop: the `browser` fixture (tests/conftest.py) is an async
session fixture, and tests that use it are `async def`.

Loopback only: Playwright talks to chromium over a pipe (``--remote-debugging-pipe``), so chromium opens
no debugging port; background networking (updates, metrics, sync, safe browsing lists) is off; host names
but ``localhost`` do not resolve and any other address goes to a dead proxy, so a page reaches loopback only.
Playwright's own browser download is never used (``executable_path`` is Debian's chromium).

`StaticSite` serves fixed files from a throwaway HTTP server on 127.0.0.1 (pages under test).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Self

from playwright.async_api import Browser, async_playwright

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = (
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-domain-reliability",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    # Names: only localhost and 127.0.0.1 resolve (the rules apply to IP literals too).
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
    # Addresses: everything but loopback (which chromium always sends direct) goes to a proxy on a port
    # where nothing listens, so an off-loopback IP literal fails too.
    "--proxy-server=http://127.0.0.1:9",
)


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """A launched headless chromium; closed (and its driver stopped) on exit."""
    if not CHROMIUM.is_file():
        raise RuntimeError(f"{CHROMIUM} is missing: run `make system-packages` (Debian's chromium package)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=list(LAUNCH_ARGS)
        )
        try:
            yield browser
        finally:
            await browser.close()


Files = Mapping[str, tuple[bytes, str]]
"""URL path ("/verify.js") -> (body, content type)."""


class StaticSite:
    """An HTTP server on 127.0.0.1 (a free port) serving `files`, which the test may change while it runs.

    Use it as a context manager, or call `start` and `stop`. Unknown paths get 404.
    """

    def __init__(self, files: Files) -> None:
        self.files: dict[str, tuple[bytes, str]] = dict(files)
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                found = site.files.get(self.path.split("?", 1)[0])
                body, content_type = found if found else (b"not found", "text/plain")
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="static-site", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
