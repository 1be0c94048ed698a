"""Worker processes attribute exactly as this process does; errors come back; a killed worker is replaced."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from attribution.index_builder import IndexManifest
from attribution.search_pool import (
    LocalAttributors,
    ProcessAttributors,
    WorkerError,
    WorkerLost,
    decode_tokens,
    encode_tokens,
)
from tests.attribution.passages import DOCUMENTS


def test_worker_processes_give_the_same_attributions(built: tuple[Path, IndexManifest], tokenize) -> None:  # type: ignore[no-untyped-def]
    lineage = (str(built[0]),)
    queries = [tokenize(text) for _, text in DOCUMENTS] * 4
    local = LocalAttributors()
    pool = ProcessAttributors(2)
    try:
        expected = [local.attribute(lineage, ids[:6], ids[6:]) for ids in queries]
        with ThreadPoolExecutor(max_workers=4) as threads:
            got = list(threads.map(lambda ids: pool.attribute(lineage, ids[:6], ids[6:]), queries))
        assert got == expected and any(token.weights for tokens in got for token in tokens)
        assert len(pool.pids()) == 2 and pool.indexes_open() == 1
        with pytest.raises(WorkerError, match="outside"):
            pool.attribute(lineage, [], [10**6])  # not a token of this vocabulary
        assert pool.attribute(lineage, [], queries[0]) == local.attribute(lineage, [], queries[0])
    finally:
        pool.close()
        local.close()


def test_a_killed_worker_is_started_again(built: tuple[Path, IndexManifest], tokenize) -> None:  # type: ignore[no-untyped-def]
    lineage = (str(built[0]),)
    ids = tokenize(DOCUMENTS[0][1])
    pool = ProcessAttributors(1)
    try:
        first = pool.attribute(lineage, ids[:6], ids[6:])
        [pid] = pool.pids()
        os.kill(pid, signal.SIGKILL)
        for _ in range(2):  # the call that finds it dead fails (WorkerLost) or starts a new one first
            try:
                again = pool.attribute(lineage, ids[:6], ids[6:])
                break
            except WorkerLost:
                continue
        assert again == first
        assert pool.pids() != [pid]
    finally:
        pool.close()
    assert pool.pids() == []


def test_replies_are_runs_of_tokens_sharing_their_weights(built: tuple[Path, IndexManifest], tokenize) -> None:  # type: ignore[no-untyped-def]
    ids = tokenize(DOCUMENTS[0][1]) + tokenize(" nothing like this was indexed anywhere at all")
    local = LocalAttributors()
    try:
        tokens = local.attribute((str(built[0]),), ids[:6], ids[6:])
    finally:
        local.close()
    token_ids, runs = encode_tokens(tokens)
    assert token_ids == ids[6:] and sum(count for count, _, _ in runs) == len(tokens)
    assert len(runs) < len(tokens) and any(weights for _, weights, _ in runs) and any(not w for _, w, _ in runs)
    assert decode_tokens(token_ids, runs) == tokens
    assert encode_tokens([]) == ([], []) and decode_tokens([], []) == []
    with pytest.raises(ValueError, match="cover"):
        decode_tokens(token_ids + [1], runs)
