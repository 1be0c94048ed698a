"""UsageLog: records durable before their future resolves, group commit, settling, and recovery of
the records a SIGKILLed writer left behind (a real process, killed for real)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from attribution.usage_log import BATCH_SUFFIX, LOCK_SUFFIX, UsageLog, UsageRecord, read_batch, recover


def record(n: int, choices: tuple[tuple[int, ...], ...] = ((5, 6, 7),)) -> UsageRecord:
    return UsageRecord(trace_id=f"cmpl-{n}", model="m", adapter="a", requester="key_1", prompt_tokens=4,
                       prompt_tail=(1, 2, 3, 4), choices=choices)


def batches(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*{BATCH_SUFFIX}"))


def test_a_record_is_on_disk_when_its_future_resolves_and_gone_once_settled(tmp_path: Path) -> None:
    log = UsageLog(tmp_path)
    try:
        log.append(record(1, ((5, 6), (7,)))).result(timeout=10)
        [batch] = batches(tmp_path)
        assert read_batch(batch) == [record(1, ((5, 6), (7,)))]
        assert read_batch(batch)[0].completion_tokens == 3
        assert log.unsettled() == 1
        log.settle("cmpl-1")
        assert batches(tmp_path) == [] and log.unsettled() == 0
        log.settle("cmpl-1")  # settling twice is harmless
    finally:
        log.close()


def test_records_are_group_committed_and_a_batch_file_goes_with_its_last_record(tmp_path: Path) -> None:
    log = UsageLog(tmp_path)
    try:
        futures = [log.append(record(n)) for n in range(200)]
        for future in futures:
            future.result(timeout=10)
        assert log.batches_written < 200, "records waiting together share one write"
        written = {r.trace_id for batch in batches(tmp_path) for r in read_batch(batch)}
        assert written == {f"cmpl-{n}" for n in range(200)}
        for n in range(199):
            log.settle(f"cmpl-{n}")
        [last] = batches(tmp_path)  # the file of the one record still waiting for its trace
        assert "cmpl-199" in {r.trace_id for r in read_batch(last)}
        log.settle("cmpl-199")
        assert batches(tmp_path) == []
    finally:
        log.close()


def test_a_record_settled_before_it_is_written_leaves_no_file(tmp_path: Path) -> None:
    log = UsageLog(tmp_path)
    try:
        future = log.append(record(1))
        log.settle("cmpl-1")  # its trace reached the outbox first (a cut-short response nobody waited for)
        future.result(timeout=10)
        assert batches(tmp_path) == [] and log.unsettled() == 0
    finally:
        log.close()


def test_a_live_writers_records_are_not_recovered(tmp_path: Path) -> None:
    log = UsageLog(tmp_path)
    try:
        log.append(record(1)).result(timeout=10)
        handed: list[UsageRecord] = []
        assert recover(tmp_path, handed.append) == 0 and handed == []
        assert len(batches(tmp_path)) == 1
    finally:
        log.close()


WRITER = textwrap.dedent("""
    import sys, time
    from attribution.usage_log import UsageLog, UsageRecord
    log = UsageLog(sys.argv[1])
    for n in range(3):
        log.append(UsageRecord(f"cmpl-{n}", "m", None, "key_1", 2, (1, 2), ((3, 4, 5),))).result()
    log.settle("cmpl-0")  # its trace reached the outbox
    print("written", flush=True)
    time.sleep(60)
""")


def test_records_of_a_killed_writer_are_recovered_once_then_deleted(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], cwd=root, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "written"
        assert recover(tmp_path, lambda r: pytest.fail("a live writer's records were recovered")) == 0
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
    finally:
        writer.kill()
    handed: list[UsageRecord] = []
    assert recover(tmp_path, handed.append) == 2
    assert [(r.trace_id, r.completion_tokens, r.requester) for r in handed] == [("cmpl-1", 3, "key_1"),
                                                                                 ("cmpl-2", 3, "key_1")]
    assert batches(tmp_path) == [] and list(tmp_path.glob(f"*{LOCK_SUFFIX}")) == []
    assert recover(tmp_path, handed.append) == 0, "recovered once"


def test_a_failing_handler_keeps_the_file_for_the_next_try(tmp_path: Path) -> None:
    log = UsageLog(tmp_path)
    log.append(record(1)).result(timeout=10)
    log.close()  # the writer stops with the record unsettled (as at shutdown)

    def broken(_: UsageRecord) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError):
        recover(tmp_path, broken)
    assert len(batches(tmp_path)) == 1
    handed: list[UsageRecord] = []
    assert recover(tmp_path, handed.append) == 1 and handed == [record(1)]
    assert batches(tmp_path) == []


def test_a_closed_log_refuses_records(tmp_path: Path) -> None:
    log = UsageLog(tmp_path)
    log.close()
    with pytest.raises(RuntimeError, match="closed"):
        log.append(record(1)).result(timeout=10)
    assert batches(tmp_path) == []
