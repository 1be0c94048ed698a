"""Durable usage records: what a response bills, on disk before its last byte leaves the gateway.

A `UsageRecord` names the trace id, the API key id, the model and adapter, the prompt's token count
and every choice's completion token ids, plus the prompt tail attribution reads. It is everything
needed to bill the response and to attribute it again, so a response is billed even when its
attribution fails or its replica dies before the trace reaches the outbox.

`UsageLog` is one process's writer. Records are group-committed: a writer thread takes every record
waiting, writes them as one `<writer>-<seq>.jsonl` file (staged, fsync'd, renamed, directory
fsync'd), then resolves their futures; the response path awaits that future before its final byte.
When every trace of a batch file is durably in the outbox (`settle`), the file is deleted.

Who is alive is told by file locks, not pids: each writer holds an exclusive `flock` on its
`<writer>.lock` for its whole life (the kernel drops it when the process dies, SIGKILL included).
The lock file is locked before it appears under its name, so a live writer's lock is never seen
unlocked. `recover` takes every lock it can get: those writers are dead, and their remaining
records are handed to a callback (which attributes them again and writes their traces) before their
files are deleted. A record whose trace reached the ledger before the crash comes back as a
`recovered` trace, which the ledger answers as a duplicate.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from statedir.durable_files import fsync_path, write_durably

log = logging.getLogger("attribution.usage_log")

BATCH_SUFFIX = ".jsonl"
LOCK_SUFFIX = ".lock"


@dataclass(frozen=True)
class UsageRecord:
    """One response as billed: its tokens per choice and who asked."""

    trace_id: str
    model: str
    adapter: str | None
    requester: str | None
    prompt_tokens: int
    prompt_tail: tuple[int, ...]  # the prompt's last tokens, as many as attribution reads
    choices: tuple[tuple[int, ...], ...]  # completion token ids, one tuple per choice

    @property
    def completion_tokens(self) -> int:
        return sum(len(choice) for choice in self.choices)

    def to_dict(self) -> dict[str, Any]:
        return {"trace_id": self.trace_id, "model": self.model, "adapter": self.adapter,
                "requester": self.requester, "prompt_tokens": self.prompt_tokens,
                "prompt_tail": list(self.prompt_tail), "choices": [list(choice) for choice in self.choices]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UsageRecord:
        return cls(trace_id=str(data["trace_id"]), model=str(data["model"]), adapter=data["adapter"],
                   requester=data["requester"], prompt_tokens=int(data["prompt_tokens"]),
                   prompt_tail=tuple(int(t) for t in data["prompt_tail"]),
                   choices=tuple(tuple(int(t) for t in choice) for choice in data["choices"]))


class UsageLog:
    """This process's durable usage records in `directory` (shared by the processes of one node)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.writer_id = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._lock_fd = _take_new_lock(self.directory, self.writer_id)
        self._cond = threading.Condition()
        self._waiting: list[tuple[UsageRecord, concurrent.futures.Future[None]]] = []
        self._queued: set[str] = set()  # appended, not yet in a batch file
        self._settled_early: set[str] = set()  # settled while still queued
        self._unsettled: dict[Path, set[str]] = {}  # batch file → its traces not yet in the outbox
        self._batch_of: dict[str, Path] = {}
        self._sequence = 0
        self._closing = False
        self.batches_written = 0
        self._thread = threading.Thread(target=self._write_batches, name="usage-log", daemon=True)
        self._thread.start()

    # ---- the response path ----------------------------------------------------------------
    def append(self, record: UsageRecord) -> concurrent.futures.Future[None]:
        """Queue `record`; the future resolves once it is durable (or fails with the write's error)."""
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._cond:
            if self._closing:
                done.set_exception(RuntimeError("the usage log is closed"))
                return done
            self._waiting.append((record, done))
            self._queued.add(record.trace_id)
            self._cond.notify()
        return done

    def settle(self, trace_id: str) -> None:
        """The trace of `trace_id` is durably in the outbox: its record is no longer needed."""
        with self._cond:
            if trace_id in self._queued:
                self._settled_early.add(trace_id)
                return
            batch = self._batch_of.pop(trace_id, None)
            if batch is None:
                return
            left = self._unsettled[batch]
            left.discard(trace_id)
            if left:
                return
            del self._unsettled[batch]
        batch.unlink(missing_ok=True)

    def is_written(self, trace_id: str) -> bool:
        """True when the record of `trace_id` is durably in a batch file and its trace not yet settled."""
        with self._cond:
            return trace_id in self._batch_of

    def read_written(self, trace_ids: Sequence[str]) -> dict[str, UsageRecord]:
        """The records of `trace_ids` that are written and unsettled, read back from their batch files."""
        with self._cond:
            paths = {trace_id: self._batch_of.get(trace_id) for trace_id in trace_ids}
        wanted: dict[Path, set[str]] = {}
        for trace_id, path in paths.items():
            if path is not None:
                wanted.setdefault(path, set()).add(trace_id)
        found: dict[str, UsageRecord] = {}
        for path, ids in wanted.items():
            try:
                records = read_batch(path)
            except FileNotFoundError:  # settled meanwhile: nothing left to read
                continue
            found.update((record.trace_id, record) for record in records if record.trace_id in ids)
        return found

    def unsettled(self) -> int:
        """Records written whose traces are not yet in the outbox (for stats and tests)."""
        with self._cond:
            return len(self._batch_of) + len(self._queued)

    def close(self) -> None:
        """Write what is queued, stop the writer and release the lock (unsettled files stay for `recover`)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=10.0)
        os.close(self._lock_fd)

    # ---- the writer thread ----------------------------------------------------------------
    def _write_batches(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closing:
                    self._cond.wait()
                if not self._waiting:
                    return
                batch, self._waiting = self._waiting, []
                self._sequence += 1
                sequence = self._sequence
            path = self.directory / f"{self.writer_id}-{sequence:09d}{BATCH_SUFFIX}"
            try:
                _write_batch(path, [record for record, _ in batch])
            except OSError as error:
                log.error("usage records of %d responses could not be written to %s: %s", len(batch), path, error)
                with self._cond:
                    for record, _ in batch:
                        self._queued.discard(record.trace_id)
                        self._settled_early.discard(record.trace_id)
                for _, done in batch:
                    _resolve(done, error)
                continue
            self.batches_written += 1
            with self._cond:
                ids = set()
                for record, _ in batch:
                    self._queued.discard(record.trace_id)
                    if record.trace_id in self._settled_early:
                        self._settled_early.discard(record.trace_id)
                    else:
                        ids.add(record.trace_id)
                        self._batch_of[record.trace_id] = path
                if ids:
                    self._unsettled[path] = ids
            if not ids:
                path.unlink(missing_ok=True)
            for _, done in batch:
                _resolve(done)


def _resolve(done: concurrent.futures.Future[None], error: BaseException | None = None) -> None:
    """Settle a waiter's future (one its waiter cancelled is left as it is)."""
    if done.set_running_or_notify_cancel():
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)


def _write_batch(path: Path, records: Sequence[UsageRecord]) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    data = b"".join(json.dumps(record.to_dict(), separators=(",", ":")).encode() + b"\n" for record in records)
    try:
        write_durably(staging, data)
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def _take_new_lock(directory: Path, writer_id: str) -> int:
    """Create `<writer_id>.lock` already locked (locked under a staging name, then renamed)."""
    staging = directory / f".{writer_id}{LOCK_SUFFIX}.tmp"
    descriptor = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.replace(staging, directory / f"{writer_id}{LOCK_SUFFIX}")
    return descriptor


def _try_lock(path: Path) -> int | None:
    """An open, exclusively locked descriptor of `path`, or None when its writer holds it (or it is gone)."""
    try:
        descriptor = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    return descriptor


def read_batch(path: Path) -> list[UsageRecord]:
    """The records of one batch file (files are renamed into place whole; a line that does not parse
    is logged and skipped)."""
    records = []
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        try:
            records.append(UsageRecord.from_dict(json.loads(line)))
        except (ValueError, KeyError, TypeError) as error:
            log.error("%s line %d is not a usage record (%s); skipped", path, number, error)
    return records


def recover(directory: Path, handle: Callable[[UsageRecord], None]) -> int:
    """Hand every record left by dead writers in `directory` to `handle`, then delete their files.

    `handle` must make the record's trace durable (or raise: the file is then kept for the next
    try). Returns how many records were handed over.
    """
    if not directory.is_dir():
        return 0
    handled = 0
    for lock in sorted(directory.glob(f"*{LOCK_SUFFIX}")):
        descriptor = _try_lock(lock)
        if descriptor is None:
            continue  # alive (or another process is recovering it)
        writer_id = lock.name[: -len(LOCK_SUFFIX)]
        try:
            for batch in sorted(directory.glob(f"{writer_id}-*{BATCH_SUFFIX}")):
                try:
                    records = read_batch(batch)
                except FileNotFoundError:
                    continue
                for record in records:
                    handle(record)
                    handled += 1
                batch.unlink(missing_ok=True)
            for staging in directory.glob(f".{writer_id}-*{BATCH_SUFFIX}.tmp"):
                staging.unlink(missing_ok=True)  # never renamed: its responses never completed
            lock.unlink(missing_ok=True)
        finally:
            os.close(descriptor)
    if handled:
        fsync_path(directory)
    return handled
