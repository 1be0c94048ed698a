"""Where the per-token attribution work runs: in this process, or in worker processes (off the GIL).

`LocalAttributors` keeps one `Attributor` per lineage (its indexes opened once, memory-mapped) and
attributes in the calling thread. The span search and the weighting are numpy and Python: they hold
the GIL, so threads of one process do not add up.

`ProcessAttributors` runs `workers` processes (`python -m attribution.search_pool`), each with its own
`LocalAttributors`; the index files are memory-mapped by every worker, so the page cache holds them
once. A call takes a free worker (waiting while all are busy), sends it the query over a pipe and waits
for the token attributions, with the GIL released; `workers` callers in parallel use `workers` cores.
The reply is compact (`encode_tokens`: the token ids, then one (count, weights, unattributed) per run of
tokens sharing their weights), so the caller's process -- the gateway's, on the same cores -- spends
little on each reply.
Workers start on first use; a worker that dies fails the call in flight (`WorkerLost`, which the
service retries) and is started again on the next one.

Adapters attributed with "verbatim+influence-v1" send `Influence` (base model dir, adapter dir, lineage
contribution ids) with the query: the worker keeps an `InfluenceScorer` (base model + adapter, in torch)
open per adapter, `SCORERS_MAX` of them, least recently used closed first, and combines the verbatim
tokens with the influence tokens (`CombinedPolicy`). An adapter whose features cannot be used raises
`FeaturesUnavailable` (its own type, also from a worker process). Queries without it are as before.
"""

from __future__ import annotations

import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from attribution.attributor import Attributor
from attribution.influence import FeaturesUnavailable
from ledger.client.trace import TokenAttribution

ATTRIBUTORS_MAX = 32  # lineages kept open per process (least recently used closed first)
SCORERS_MAX = 2  # influence scorers (a torch model each) kept open per process
FRAME = struct.Struct("<Q")
STOP_WAIT_SECONDS = 5.0


class WorkerLost(RuntimeError):
    """The worker process ended while it held a query."""


class WorkerError(RuntimeError):
    """Attribution raised in the worker process (its type and message)."""


Influence = tuple[str, str, tuple[str, ...]]  # (base model dir, adapter dir, lineage contribution ids)


class TokenAttributor(Protocol):
    """What the attribution service calls to attribute one completion against a lineage's indexes
    (and, with `influence`, the adapter's influence features as well: "verbatim+influence-v1")."""

    def attribute(self, index_dirs: tuple[str, ...], context: Sequence[int],
                  completion: Sequence[int], influence: Influence | None = None) -> list[TokenAttribution]: ...

    def indexes_open(self) -> int: ...

    def close(self) -> None: ...


class LocalAttributors:
    """Attribute in the calling thread, with one Attributor per lineage (LRU of `ATTRIBUTORS_MAX`) and one
    InfluenceScorer per adapter (LRU of `SCORERS_MAX`; scoring is serialized, the scorers are not thread-safe).
    `torch_threads` caps torch's threads when a scorer is first opened (worker processes: 1)."""

    def __init__(self, max_open: int = ATTRIBUTORS_MAX, max_scorers: int = SCORERS_MAX,
                 torch_threads: int | None = None) -> None:
        self.max_open = max_open
        self.max_scorers = max_scorers
        self.torch_threads = torch_threads
        self._open: OrderedDict[tuple[str, ...], Attributor] = OrderedDict()
        self._lock = threading.Lock()
        self._scorers: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._scoring = threading.Lock()

    def attribute(self, index_dirs: tuple[str, ...], context: Sequence[int],
                  completion: Sequence[int], influence: Influence | None = None) -> list[TokenAttribution]:
        if influence is None:
            return self._attributor(tuple(index_dirs)).attribute(context, completion)
        from attribution.policy import CombinedPolicy

        with self._scoring:
            influence_tokens = self._scorer(influence).token_weights(context, completion)
        if index_dirs:
            verbatim = self._attributor(tuple(index_dirs)).attribute(context, completion)
        else:
            verbatim = [TokenAttribution.unattributed_token(int(t)) for t in completion]
        return CombinedPolicy().token_weights(verbatim, influence_tokens)

    def scorers_open(self) -> int:
        return len(self._scorers)

    def _scorer(self, influence: Influence) -> Any:
        """The adapter's open scorer (call with _scoring held); reopened when its files changed."""
        from attribution.influence import InfluenceScorer

        base_model_dir, adapter_dir, contribution_ids = influence
        key = (base_model_dir, adapter_dir, _files_stamp(Path(adapter_dir)), frozenset(contribution_ids))
        scorer = self._scorers.get(key)
        if scorer is None:
            if self.torch_threads:
                import torch

                torch.set_num_threads(self.torch_threads)
            for stale in [k for k in self._scorers if k[:2] == key[:2]]:  # the adapter's files changed
                del self._scorers[stale]
            scorer = InfluenceScorer.open(Path(base_model_dir), Path(adapter_dir), contribution_ids)
            self._scorers[key] = scorer
            while len(self._scorers) > self.max_scorers:
                self._scorers.popitem(last=False)
        self._scorers.move_to_end(key)
        return scorer

    def indexes_open(self) -> int:
        return len(self._open)

    def close(self) -> None:
        with self._lock:
            for attributor in self._open.values():
                attributor.close()
            self._open.clear()
        with self._scoring:
            self._scorers.clear()

    def _attributor(self, index_dirs: tuple[str, ...]) -> Attributor:
        with self._lock:
            attributor = self._open.get(index_dirs)
            if attributor is None:
                attributor = Attributor([Path(d) for d in index_dirs])
                self._open[index_dirs] = attributor
                while len(self._open) > self.max_open:
                    self._open.popitem(last=False)[1].close()
            self._open.move_to_end(index_dirs)
            return attributor


def _files_stamp(adapter_dir: Path) -> tuple[tuple[int, int, int], ...]:
    """(inode, mtime, size) of the adapter's weights and features: a retrained or replaced adapter differs."""
    from attribution.influence import ADAPTER_WEIGHTS_FILE, FEATURES_FILE

    stamps = []
    for name in (ADAPTER_WEIGHTS_FILE, FEATURES_FILE):
        try:
            found = os.stat(adapter_dir / name)
            stamps.append((found.st_ino, found.st_mtime_ns, found.st_size))
        except OSError:
            stamps.append((0, 0, 0))
    return tuple(stamps)


Run = tuple[int, tuple[tuple[str, float], ...], float]  # tokens in the run, their weights, unattributed share


def encode_tokens(tokens: Sequence[TokenAttribution]) -> tuple[list[int], list[Run]]:
    """(token ids, runs): consecutive tokens with the same weights and unattributed share form one run."""
    runs: list[Run] = []
    weights: Any = None
    unattributed = -1.0
    count = 0
    for token in tokens:
        if token.weights is weights and token.unattributed == unattributed:
            count += 1
            continue
        if count:
            runs.append((count, weights, unattributed))
        weights, unattributed, count = token.weights, token.unattributed, 1
    if count:
        runs.append((count, weights, unattributed))
    return [token.token_id for token in tokens], runs


def decode_tokens(token_ids: Sequence[int], runs: Sequence[Run]) -> list[TokenAttribution]:
    """The TokenAttributions `encode_tokens` encoded. Not validated again: the worker built them validated
    (as unpickling them would not either)."""
    tokens: list[TokenAttribution] = []
    new = object.__new__
    start = 0
    for count, weights, unattributed in runs:
        for token_id in token_ids[start : start + count]:
            token = new(TokenAttribution)
            token.__dict__.update(token_id=token_id, weights=weights, unattributed=unattributed)
            tokens.append(token)
        start += count
    if start != len(token_ids):
        raise ValueError(f"runs cover {start} tokens of {len(token_ids)}")
    return tokens


class _Worker:
    """One worker process and the two pipes to it."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self._to: BinaryIO | None = None
        self._from: BinaryIO | None = None

    def call(self, request: tuple[Any, ...]) -> Any:
        if self.process is None or self.process.poll() is not None:
            self._start()
        try:
            _write_frame(self._to, request)  # type: ignore[arg-type]
            status, value = _read_frame(self._from)  # type: ignore[arg-type]
        except (OSError, EOFError, pickle.UnpicklingError) as error:
            self.stop()
            raise WorkerLost(f"attribution worker lost: {error}") from error
        if status == "error":
            raise value
        return value

    def _start(self) -> None:
        self.stop()
        to_child, from_parent = os.pipe()
        to_parent, from_child = os.pipe()
        root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "attribution.search_pool", str(to_child), str(from_child)],
            pass_fds=(to_child, from_child), env=env, stdin=subprocess.DEVNULL, close_fds=True,
        )
        os.close(to_child)
        os.close(from_child)
        self._to = os.fdopen(from_parent, "wb")
        self._from = os.fdopen(to_parent, "rb")

    def stop(self) -> None:
        for pipe in (self._to, self._from):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        self._to = self._from = None
        if self.process is not None:
            try:
                self.process.wait(STOP_WAIT_SECONDS)  # it exits at the end of its input
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


class ProcessAttributors:
    """Attribute in `workers` worker processes; `attribute` may be called from any thread."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._all = [_Worker() for _ in range(workers)]
        self._free: queue.LifoQueue[_Worker] = queue.LifoQueue()
        for worker in self._all:
            self._free.put(worker)
        self._lineages: OrderedDict[tuple[str, ...], None] = OrderedDict()
        self._lineages_lock = threading.Lock()
        self._closed = False

    def attribute(self, index_dirs: tuple[str, ...], context: Sequence[int],
                  completion: Sequence[int], influence: Influence | None = None) -> list[TokenAttribution]:
        if self._closed:
            raise RuntimeError("the attribution workers are closed")
        key = tuple(index_dirs)
        with self._lineages_lock:
            self._lineages[key] = None
            self._lineages.move_to_end(key)
            while len(self._lineages) > ATTRIBUTORS_MAX:
                self._lineages.popitem(last=False)
        worker = self._free.get()
        try:
            request: tuple[Any, ...] = (key, list(context), list(completion))
            if influence is not None:
                request += (tuple(influence),)
            return decode_tokens(*worker.call(request))
        finally:
            self._free.put(worker)

    def indexes_open(self) -> int:
        """Lineages open in each worker (every worker opens those it was asked about)."""
        return len(self._lineages)

    def pids(self) -> list[int]:
        return [w.process.pid for w in self._all if w.process is not None]

    def close(self) -> None:
        self._closed = True
        for worker in self._all:
            worker.stop()


def _write_frame(pipe: BinaryIO, value: Any) -> None:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    pipe.write(FRAME.pack(len(data)))
    pipe.write(data)
    pipe.flush()


def _read_frame(pipe: BinaryIO) -> Any:
    header = pipe.read(FRAME.size)
    if len(header) < FRAME.size:
        raise EOFError("the other end closed the pipe")
    (size,) = FRAME.unpack(header)
    data = pipe.read(size)
    if len(data) < size:
        raise EOFError("the other end closed the pipe mid-frame")
    return pickle.loads(data)


def serve(requests: BinaryIO, replies: BinaryIO) -> None:
    """A worker's loop: (index dirs, context, completion[, influence]) in, ("ok", encoded tokens) or ("error",
    exception) out. FeaturesUnavailable goes back as itself (the service handles it apart); others as WorkerError."""
    attributors = LocalAttributors(torch_threads=1)
    try:
        while True:
            try:
                index_dirs, context, completion, *influence = _read_frame(requests)
            except EOFError:
                return
            try:
                tokens = attributors.attribute(index_dirs, context, completion, *influence)
                reply: tuple[str, Any] = ("ok", encode_tokens(tokens))
            except FeaturesUnavailable as error:
                reply = ("error", error)
            except Exception as error:  # sent back and raised in the caller
                reply = ("error", WorkerError(f"{type(error).__name__}: {error}"))
            _write_frame(replies, reply)
    finally:
        attributors.close()


if __name__ == "__main__":  # a worker: run the module's own serve, so what it pickles names attribution.search_pool
    from attribution.search_pool import serve as _serve

    _serve(os.fdopen(int(sys.argv[1]), "rb"), os.fdopen(int(sys.argv[2]), "wb"))
