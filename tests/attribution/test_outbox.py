"""Outbox: durable put, oldest-first pending, remove/reject (never losing a file), the bound, corrupt files."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from attribution.outbox import CorruptTrace, Outbox, OutboxFull
from ledger.client.trace import AttributionTrace, TokenAttribution
from ledger.client.trace_wire import canonical_json, trace_to_pb

A = "aa" * 32


def make_trace(trace_id: str, unattributed: float = 0.75) -> AttributionTrace:
    token = TokenAttribution(3, ((A, 1.0 - unattributed),), unattributed)
    return AttributionTrace(trace_id=trace_id, model="tiny", adapter="ad-1", requester=None, prompt_tokens=4,
                            completion_tokens=1, tokens=(token,), method="verbatim-span-v1")


def set_mtime(path: Path, seconds_ago: int, now_ns: int | None = None) -> None:
    when_ns = (time.time_ns() if now_ns is None else now_ns) - seconds_ago * 10**9
    os.utime(path, ns=(when_ns, when_ns))


def wire(trace: AttributionTrace) -> bytes:
    return trace_to_pb(trace).SerializeToString(deterministic=True)


def test_put_writes_the_wire_form_under_the_trace_id(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    trace = make_trace("t-1")
    path = outbox.put(trace)
    assert path == tmp_path / "t-1.pb"
    assert path.read_bytes() == wire(trace), "converted once: what the shipper sends as it is"
    assert outbox.read_message(path) == trace_to_pb(trace)
    assert outbox.read(path) == trace
    assert [p.name for p in tmp_path.iterdir()] == ["t-1.pb"]  # no staging file left behind


def test_traces_an_older_gateway_left_as_json_are_still_read_shipped_and_removed(tmp_path: Path) -> None:
    legacy = tmp_path / "old-1.json"
    legacy.write_bytes(canonical_json(make_trace("old-1")))
    outbox = Outbox(tmp_path)
    outbox.put(make_trace("new-1"))
    assert sorted(trace_id for trace_id, _ in outbox.pending(10)) == ["new-1", "old-1"]
    assert outbox.read_message(legacy) == trace_to_pb(make_trace("old-1"))
    assert outbox.path_of("old-1") == legacy
    outbox.remove("old-1")
    assert not legacy.exists() and outbox.depth() == 1


def test_put_same_id_replaces_the_file(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    outbox.put(make_trace("t-1", 0.75))
    outbox.put(make_trace("t-1", 0.5))
    assert outbox.depth() == 1
    assert outbox.read(tmp_path / "t-1.pb") == make_trace("t-1", 0.5)


@pytest.mark.parametrize("trace_id", ["../x", "a b", "a.json", "x" * 129, "é", "a\n"])
def test_bad_trace_id_is_refused(tmp_path: Path, trace_id: str) -> None:
    with pytest.raises(ValueError, match="trace id"):
        Outbox(tmp_path).put(make_trace(trace_id))
    assert list(tmp_path.iterdir()) == []


def test_pending_is_oldest_first_and_skips_excluded_and_staging(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    now_ns = time.time_ns()
    for trace_id, age in [("c", 30), ("a", 10), ("b", 30), ("d", 5)]:
        set_mtime(outbox.put(make_trace(trace_id)), age, now_ns)
    (tmp_path / ".e.123.abcd.tmp").write_bytes(b"{partial")  # a writer mid-put
    (tmp_path / "rejected").mkdir()
    (tmp_path / "rejected" / "z.pb").write_bytes(wire(make_trace("z")))

    assert [trace_id for trace_id, _ in outbox.pending(10)] == ["b", "c", "a", "d"]  # same mtime: by name
    assert outbox.pending(2) == [("b", tmp_path / "b.pb"), ("c", tmp_path / "c.pb")]
    assert [trace_id for trace_id, _ in outbox.pending(10, exclude={"b", "a"})] == ["c", "d"]
    assert outbox.depth() == 4


def test_remove_is_idempotent(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    outbox.put(make_trace("t-1"))
    outbox.remove("t-1")
    outbox.remove("t-1")
    assert outbox.depth() == 0 and outbox.pending(10) == []


def test_reject_keeps_the_file_with_its_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    outbox = Outbox(tmp_path)
    trace = make_trace("t-1")
    outbox.put(trace)
    with caplog.at_level(logging.ERROR, logger="attribution.outbox"):
        target = outbox.reject("t-1", "ledger: conflict: different content")
    assert target == tmp_path / "rejected" / "t-1.pb"
    assert target.read_bytes() == wire(trace)
    assert (tmp_path / "rejected" / "t-1.reason.txt").read_text() == "ledger: conflict: different content\n"
    assert outbox.depth() == 0
    assert "t-1" in caplog.text and "different content" in caplog.text

    outbox.put(make_trace("t-1", 0.5))  # rejected again later: the first rejected file is kept
    assert outbox.reject("t-1", "again") == tmp_path / "rejected" / "t-1.1.pb"
    assert target.read_bytes() == wire(trace)
    assert (tmp_path / "rejected" / "t-1.1.reason.txt").read_text() == "again\n"
    assert outbox.reject("missing", "gone") is None


def test_bound_raises_outbox_full(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path, max_traces=3)
    for n in range(3):
        outbox.put(make_trace(f"t-{n}"))
    assert outbox.is_full()
    with pytest.raises(OutboxFull, match=rf"outbox {tmp_path} .*max_traces=3"):
        outbox.put(make_trace("t-3"))
    assert outbox.depth() == 3

    outbox.remove("t-0")
    assert outbox.depth() == 2  # a fresh scan also refreshes the cheap count
    assert not outbox.is_full()
    outbox.put(make_trace("t-3"))


def test_bound_counts_other_writers_after_a_rescan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer, reader = Outbox(tmp_path, max_traces=2), Outbox(tmp_path, max_traces=2)
    assert not reader.is_full()
    writer.put(make_trace("t-0"))
    writer.put(make_trace("t-1"))
    assert not reader.is_full()  # its count is at most a second old
    monkeypatch.setattr("attribution.outbox.COUNT_REFRESH_SECONDS", 0.0)
    assert reader.is_full()


def miscounted(trace_id: str) -> bytes:
    """The wire form of a trace that claims more completion tokens than it attributes."""
    message = trace_to_pb(make_trace(trace_id))
    message.completion_tokens = 7
    return message.SerializeToString()


def test_corrupt_file_raises_corrupt_trace(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    for name, data in [("bad-json.json", b"{not json"), ("bad-shape.json", b'{"trace_id": "bad-shape"}'),
                       ("bad-bytes.pb", b"\xff\xfe"), ("other-id.pb", wire(make_trace("t-9"))),
                       ("other-id.json", canonical_json(make_trace("t-9"))),
                       ("bad-count.pb", miscounted("bad-count"))]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CorruptTrace) as raised:
            outbox.read(path)
        assert raised.value.path == path
        assert str(path) in str(raised.value)


def test_stale_staging_files_are_removed_on_construction(tmp_path: Path) -> None:
    stale, fresh = tmp_path / ".t-1.11.aaaa.tmp", tmp_path / ".t-2.12.bbbb.tmp"
    stale.write_bytes(b"{")
    fresh.write_bytes(b"{")
    set_mtime(stale, 120)
    kept = tmp_path / "t-3.pb"
    kept.write_bytes(wire(make_trace("t-3")))
    set_mtime(kept, 120)

    Outbox(tmp_path)
    assert not stale.exists()
    assert fresh.exists()  # another writer may be mid-put
    assert kept.exists()


def test_depth_and_oldest_age(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    assert outbox.depth() == 0
    assert outbox.oldest_age_seconds() == 0.0
    set_mtime(outbox.put(make_trace("t-1")), 42)
    outbox.put(make_trace("t-2"))
    assert outbox.depth() == 2
    assert 41 < outbox.oldest_age_seconds() < 60
    depth, oldest = outbox.backlog()  # both from one scan, for the metrics
    assert depth == 2 and 41 < oldest < 60
