"""Ingest requests prepared in helper processes while the ledger writes the previous one.

Preparing a trace (prepared.py: reading every token, canonical JSON, hash, exact sums) is pure
Python and costs about as much as writing it, and one stream's batches are written one after the
other. `BatchPreparer.pipeline` reads a stream's requests ahead on a thread (at most `READ_AHEAD`)
and has a helper process prepare each while the caller writes the one before, so the two run on
two cores. A client that waits for its acks before sending more is served as before, and results
come back in request order.

A helper is `python -m ledger.journal.prepare_pool`: serialized `IngestRequest`s in on its stdin,
pickled outcomes out on its stdout, in order (it imports only what preparing needs). It exits at
the end of its stdin, so also when the ledger is gone, even SIGKILLed. Requests of fewer than
`MIN_POOLED` traces are prepared in place (not worth the hop). If a helper dies, its requests are
prepared in place (the same result, or the same error, as without a helper) and the next request
starts another. With `processes=0` nothing runs beside the caller. `groups` hands the caller, with a
request, the next ones already prepared, so it can write them in one transaction.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import BinaryIO

from ledger.journal.prepared import PreparedTrace, prepare_message
from wire.ledger.v1 import ledger_pb2

READ_AHEAD = 2
MIN_POOLED = 16
STOP_TIMEOUT_SECONDS = 5.0
_HEADER = struct.Struct("<Q")  # the length of the frame that follows
_ROOT = str(Path(__file__).resolve().parents[2])

Request = ledger_pb2.IngestRequest
Outcome = PreparedTrace | str  # a prepared trace, or why the message is not a valid trace


class HelperGone(RuntimeError):
    """The helper process exited or broke its pipe; what it had not answered is prepared in place."""


def prepare_all(messages: Iterable[ledger_pb2.AttributionTrace]) -> list[Outcome]:
    """Each message prepared, or the reason it is refused (the reference path's ValueError)."""
    outcomes: list[Outcome] = []
    for message in messages:
        try:
            outcomes.append(prepare_message(message))
        except ValueError as error:
            outcomes.append(str(error))
    return outcomes


def prepare_serialized(data: bytes) -> bytes:
    """What a helper answers to one request: its outcomes, pickled. The batch's traces share their
    contribution ids, so each id is pickled once."""
    ids: dict[str, str] = {}
    outcomes = [dataclasses.replace(outcome, weights={ids.setdefault(cid, cid): units
                                                      for cid, units in outcome.weights.items()})
                if isinstance(outcome, PreparedTrace) else outcome
                for outcome in prepare_all(Request.FromString(data).traces)]
    return pickle.dumps(outcomes, protocol=pickle.HIGHEST_PROTOCOL)


def _read_frame(stream: BinaryIO) -> bytes | None:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    return data if len(data) == size else None


def _write_frame(stream: BinaryIO, data: bytes) -> None:
    stream.write(_HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


def serve(requests: BinaryIO, answers: BinaryIO) -> None:
    """The helper's loop: one answer per request, in order, until the end of `requests`."""
    while (data := _read_frame(requests)) is not None:
        _write_frame(answers, prepare_serialized(data))


class _Helper:
    """One helper process and the requests it has not answered yet (answered in order)."""

    def __init__(self) -> None:
        path = os.environ.get("PYTHONPATH")
        self.process = subprocess.Popen(
            [sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": _ROOT + (os.pathsep + path if path else "")})
        self._waiting: collections.deque[Future[bytes]] = collections.deque()
        self._lock = threading.Lock()  # the waiting requests
        self._write_lock = threading.Lock()  # one request written at a time, in the order of `_waiting`
        self.gone = False
        threading.Thread(target=self._answers, name="ledger-prepare-answers", daemon=True).start()

    def submit(self, data: bytes) -> Future[bytes]:
        future: Future[bytes] = Future()
        with self._write_lock:
            with self._lock:
                if self.gone:
                    raise HelperGone()
                self._waiting.append(future)
            try:
                _write_frame(self.process.stdin, data)  # type: ignore[arg-type]
            except (OSError, ValueError):  # its stdin is broken or closed: `_answers` fails what waits
                self.gone = True
                raise HelperGone() from None
        return future

    def close(self) -> None:
        self.gone = True
        with self._write_lock:
            try:
                self.process.stdin.close()  # type: ignore[union-attr]  # the helper exits at its end
            except OSError:
                pass
        try:
            self.process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _answers(self) -> None:
        stdout = self.process.stdout
        try:
            while (data := _read_frame(stdout)) is not None:  # type: ignore[arg-type]
                with self._lock:
                    future = self._waiting.popleft()
                future.set_result(data)
        finally:
            with self._lock:
                self.gone = True
                unanswered, self._waiting = list(self._waiting), collections.deque()
            for future in unanswered:
                future.set_exception(HelperGone())


class BatchPreparer:
    """Prepares ingest requests, in `processes` helper processes of its own (started at the first large request)."""

    def __init__(self, processes: int = 1, *, min_pooled: int = MIN_POOLED) -> None:
        self.processes = processes
        self.min_pooled = min_pooled
        self._helpers: list[_Helper | None] = [None] * max(processes, 0)
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._closed = False

    def pipeline(self, requests: Iterable[Request]) -> Iterator[tuple[Request, list[Outcome]]]:
        """Each request with its outcomes, in order; the next ones are prepared while the caller works."""
        for group in self.groups(requests):
            yield from group

    def groups(self, requests: Iterable[Request], max_traces: int = 0) -> Iterator[list[tuple[Request, list[Outcome]]]]:
        """The requests with their outcomes, in order, in groups: a request, then those after it that
        were already read and prepared while the group holds at most `max_traces` traces (never waiting
        for one). With `max_traces` 0 (or no helper) each group is one request."""
        if self.processes <= 0:
            for request in requests:
                yield [(request, prepare_all(request.traces))]
            return
        Item = tuple[Request, Future[bytes] | None] | BaseException | None
        ahead: queue.Queue[Item] = queue.Queue(READ_AHEAD)
        stop = threading.Event()

        def put(item: Item) -> bool:
            while not stop.is_set():
                try:
                    ahead.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def read() -> None:
            try:
                for request in requests:
                    if not put((request, self._submit(request))):
                        return
            except BaseException as error:  # the stream broke (cancelled, deadline): raised to the caller
                put(error)
                return
            put(None)

        threading.Thread(target=read, name="ledger-ingest-read-ahead", daemon=True).start()
        held: list[Item] = []  # an item taken to grow a group that did not fit it
        try:
            while (item := held.pop() if held else ahead.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                group, size = [item], len(item[0].traces)
                while size < max_traces:
                    try:
                        more = ahead.get_nowait()
                    except queue.Empty:
                        break
                    if (more is None or isinstance(more, BaseException) or size + len(more[0].traces) > max_traces
                            or (more[1] is not None and not more[1].done())):
                        held.append(more)
                        break
                    group.append(more)
                    size += len(more[0].traces)
                yield [(request, self._result(request, future)) for request, future in group]
        finally:
            stop.set()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            helpers, self._helpers = self._helpers, [None] * len(self._helpers)
        for helper in helpers:
            if helper is not None:
                helper.close()

    def _submit(self, request: Request) -> Future[bytes] | None:
        if len(request.traces) < self.min_pooled:
            return None
        with self._lock:
            if self._closed:
                return None
            slot = next(self._turn) % len(self._helpers)
            helper = dead = self._helpers[slot]
            if helper is None or helper.gone:
                helper = self._helpers[slot] = _Helper()
        if dead is not None and dead is not helper:
            dead.close()
        try:
            return helper.submit(request.SerializeToString())
        except HelperGone:
            return None

    @staticmethod
    def _result(request: Request, future: Future[bytes] | None) -> list[Outcome]:
        if future is not None:
            try:
                return pickle.loads(future.result())  # noqa: S301  (our own helper's answer)
            except HelperGone:
                pass  # prepared in place: the same result, or the same error, as without a helper
        return prepare_all(request.traces)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the ledger, which closes our stdin
    serve(sys.stdin.buffer, sys.stdout.buffer)
