"""Sleep until a trace may have arrived in the outbox, without polling it (inotify on Linux).

`OutboxWatch.wait(timeout)` returns True once a file was renamed into (or written in) the outbox
directory since the last `drain`, False after `timeout`, and early on `wake`. Where inotify is not
available (another OS, no watches left) it returns False after `timeout` (or at `wake`): the caller
then finds traces by scanning, so its timeout bounds the delay either way.

Use: `drain()`, scan the directory, then `wait(...)`: a trace written after the drain wakes the
wait, one written before it is found by the scan.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import select
import sys
from pathlib import Path

log = logging.getLogger("attribution.outbox_watch")

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
WATCH_MASK = IN_MOVED_TO | IN_CLOSE_WRITE  # `Outbox.put` renames each trace in; a plain write counts too
READ_BYTES = 64 * 1024


def _inotify_fd(directory: Path) -> int | None:
    """An inotify descriptor watching `directory`, or None when inotify is not available."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
    except (OSError, AttributeError):
        return None
    if fd < 0:
        log.info("inotify unavailable (%s): the outbox is polled", os.strerror(ctypes.get_errno()))
        return None
    if libc.inotify_add_watch(fd, os.fsencode(directory), WATCH_MASK) < 0:
        log.info("cannot watch %s (%s): the outbox is polled", directory, os.strerror(ctypes.get_errno()))
        os.close(fd)
        return None
    return fd


class OutboxWatch:
    """Wakes a waiting thread when the outbox directory gets a file; `close` when done."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._fd = _inotify_fd(directory)
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)

    @property
    def notifies(self) -> bool:
        """True when arrivals wake `wait` (inotify); False when only its timeout does."""
        return self._fd is not None

    def drain(self) -> None:
        """Forget the arrivals seen so far (scan the directory after this)."""
        for fd in (self._fd, self._wake_read):
            if fd is None:
                continue
            try:
                while os.read(fd, READ_BYTES):
                    pass
            except (BlockingIOError, OSError):
                pass

    def wait(self, timeout: float) -> bool:
        """Block until a file arrives (True), `wake` is called or `timeout` seconds pass (False)."""
        watched = [self._wake_read] if self._fd is None else [self._fd, self._wake_read]
        try:
            ready, _, _ = select.select(watched, [], [], max(0.0, timeout))
        except (OSError, ValueError):  # closed meanwhile
            return False
        return self._fd is not None and self._fd in ready

    def wake(self) -> None:
        """End a `wait` in progress (or the next one) at once; safe from any thread."""
        try:
            os.write(self._wake_write, b"x")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake is pending anyway) or closed

    def close(self) -> None:
        for fd in (self._fd, self._wake_read, self._wake_write):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._fd = None
