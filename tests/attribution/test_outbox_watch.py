"""OutboxWatch (attribution/outbox_watch.py) on a real directory: arrivals wake a wait, nothing else does."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from attribution.outbox import Outbox
from attribution.outbox_watch import OutboxWatch
from tests.attribution.test_shipper import make_trace


def test_a_trace_put_wakes_a_wait_at_once(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox")
    watch = OutboxWatch(outbox.directory)
    try:
        assert watch.notifies  # Linux: inotify
        watch.drain()
        threading.Timer(0.2, lambda: outbox.put(make_trace("t-1"))).start()
        started = time.monotonic()
        assert watch.wait(10.0) is True
        assert time.monotonic() - started < 2.0
    finally:
        watch.close()


def test_an_empty_outbox_waits_its_timeout_and_wake_ends_a_wait(tmp_path: Path) -> None:
    watch = OutboxWatch(tmp_path / "outbox")
    try:
        watch.drain()
        started = time.monotonic()
        assert watch.wait(0.3) is False
        assert time.monotonic() - started >= 0.29
        (tmp_path / "outbox" / "usage").mkdir()  # a subdirectory (usage records) is no arrival
        assert watch.wait(0.2) is False
        threading.Timer(0.1, watch.wake).start()
        started = time.monotonic()
        assert watch.wait(10.0) is False
        assert time.monotonic() - started < 2.0
    finally:
        watch.close()


def test_drain_forgets_earlier_arrivals(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox")
    watch = OutboxWatch(outbox.directory)
    try:
        outbox.put(make_trace("t-1"))
        watch.drain()
        assert watch.wait(0.2) is False
    finally:
        watch.close()
