"""Tests for the agent spool: durability across restarts, acks, seq allocation, the bounds, quarantine, the lock."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fleetwatch.agent.spool import Spool, SpoolBusyError, SpoolLock


def _spool(directory: Path, max_bytes: int = 1 << 20) -> Spool:
    # fsync on: the tests are small, and it exercises the same path production takes.
    return Spool(directory, max_bytes)


def _fill(spool: Spool, payloads: list[bytes]) -> list[int]:
    seqs = []
    for payload in payloads:
        seq = spool.next_seq()
        spool.append(seq, payload)
        seqs.append(seq)
    return seqs


def test_new_spool_creates_private_directory_and_starts_at_seq_1(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "spool"
    spool = _spool(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert (spool.count, spool.bytes, spool.oldest_seq) == (0, 0, None)
    assert spool.pending() == []
    assert [spool.next_seq() for _ in range(3)] == [1, 2, 3]


def test_payload_bytes_round_trip_exactly(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    payloads = [b"", bytes(range(256)), b"\x00\n\r\xff" * 1000, os.urandom(4096)]
    seqs = _fill(spool, payloads)
    assert spool.pending() == list(zip(seqs, payloads))
    assert spool.bytes == sum(len(p) for p in payloads)
    assert spool.count == len(payloads)
    # One file per batch, named so that name order is seq order.
    assert sorted(p.name for p in tmp_path.glob("*.batch")) == [f"{s:020d}.batch" for s in seqs]
    assert (tmp_path / f"{seqs[1]:020d}.batch").read_bytes() == payloads[1]


def test_ack_removes_only_the_batch_it_names(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    seqs = _fill(spool, [b"a" * 10, b"b" * 20, b"c" * 30, b"d" * 40])
    assert spool.ack(seqs[1]) is True
    # seqs[0] stays: an ack of a higher seq says nothing about a lower one.
    assert spool.pending() == [(seqs[0], b"a" * 10), (seqs[2], b"c" * 30), (seqs[3], b"d" * 40)]
    assert (spool.count, spool.bytes, spool.oldest_seq) == (3, 80, seqs[0])
    assert not (tmp_path / f"{seqs[1]:020d}.batch").exists()
    assert spool.ack(seqs[1]) is False  # acking again is harmless
    assert spool.ack(1000) is False  # so is acking a seq never allocated
    for seq in (seqs[3], seqs[0], seqs[2]):
        assert spool.ack(seq) is True
    assert (spool.count, spool.bytes, spool.oldest_seq) == (0, 0, None)
    assert list(tmp_path.glob("*.batch")) == []


def test_pending_after_seq_and_max_batches(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    seqs = _fill(spool, [b"1", b"2", b"3", b"4"])
    assert [s for s, _ in spool.pending(after_seq=seqs[1])] == seqs[2:]
    assert [s for s, _ in spool.pending(max_batches=2)] == seqs[:2]
    assert [s for s, _ in spool.pending(after_seq=seqs[0], max_batches=2)] == seqs[1:3]
    assert spool.pending(after_seq=seqs[-1]) == []


def test_unacked_batches_survive_restart_in_order(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    seqs = _fill(spool, [b"first", b"second", b"third"])
    spool.ack(seqs[0])

    restarted = _spool(tmp_path)
    assert restarted.pending() == [(seqs[1], b"second"), (seqs[2], b"third")]
    assert (restarted.count, restarted.bytes, restarted.oldest_seq) == (2, 11, seqs[1])
    assert restarted.next_seq() == seqs[-1] + 1
    assert restarted.ack(seqs[2]) is True


def test_seq_never_repeats_across_restarts_even_when_empty(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    seqs = _fill(spool, [b"x", b"y"])
    for seq in seqs:
        spool.ack(seq)
    allocated_not_appended = spool.next_seq()  # e.g. the agent died before writing the batch
    assert spool.count == 0

    restarted = _spool(tmp_path)
    assert restarted.count == 0
    assert restarted.next_seq() == allocated_not_appended + 1
    assert _spool(tmp_path).next_seq() == allocated_not_appended + 2


def test_ensure_seq_above_moves_the_allocator_and_removes_nothing(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    seqs = _fill(spool, [b"one", b"two"])
    assert spool.ensure_seq_above(1000) is True
    assert spool.pending() == [(seqs[0], b"one"), (seqs[1], b"two")]
    assert spool.next_seq() == 1001
    assert spool.ensure_seq_above(5) is False  # already past it: no effect, never moves backwards
    assert spool.next_seq() == 1002
    # Persisted, like any allocation.
    assert _spool(tmp_path).next_seq() == 1003


def test_ensure_seq_above_refuses_a_seq_that_would_exhaust_the_counter(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = _spool(tmp_path)
    with caplog.at_level(logging.ERROR, logger="fleetwatch.agent.spool"):
        assert spool.ensure_seq_above(2**64 - 2) is False
    assert "too close to the uint64 limit" in caplog.text
    assert spool.next_seq() == 1
    with pytest.raises(ValueError):
        spool.ensure_seq_above(2**64)


def test_append_rejects_unallocated_and_duplicate_seq(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    seq = spool.next_seq()
    with pytest.raises(ValueError):
        spool.append(seq + 1, b"never allocated")
    spool.append(seq, b"once")
    with pytest.raises(ValueError):
        spool.append(seq, b"twice")
    assert spool.pending() == [(seq, b"once")]


def test_byte_bound_drops_oldest_first_and_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = _spool(tmp_path, max_bytes=250)
    seqs = _fill(spool, [b"a" * 100, b"b" * 100])
    assert (spool.dropped_batches, spool.dropped_bytes) == (0, 0)

    with caplog.at_level(logging.WARNING, logger="fleetwatch.agent.spool"):
        seq = spool.next_seq()
        spool.append(seq, b"c" * 200)  # 400 bytes in all: the two oldest must go

    assert spool.pending() == [(seq, b"c" * 200)]
    assert (spool.count, spool.bytes) == (1, 200)
    assert (spool.dropped_batches, spool.dropped_bytes) == (2, 200)
    assert not any((tmp_path / f"{s:020d}.batch").exists() for s in seqs)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "dropped 2 oldest batches (200 bytes)" in warnings[0].getMessage()


def test_batch_larger_than_bound_is_dropped_not_written(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = _spool(tmp_path, max_bytes=100)
    kept = _fill(spool, [b"k" * 50])
    with caplog.at_level(logging.WARNING, logger="fleetwatch.agent.spool"):
        seq = spool.next_seq()
        spool.append(seq, b"x" * 101)
    assert spool.pending() == [(kept[0], b"k" * 50)]
    assert (spool.dropped_batches, spool.dropped_bytes) == (1, 101)
    assert not (tmp_path / f"{seq:020d}.batch").exists()
    assert "larger than the whole spool bound" in caplog.text


def test_lowered_bound_applies_on_restart(tmp_path: Path) -> None:
    seqs = _fill(_spool(tmp_path), [b"a" * 100, b"b" * 100, b"c" * 100])
    restarted = _spool(tmp_path, max_bytes=150)
    assert [s for s, _ in restarted.pending()] == [seqs[2]]
    assert (restarted.dropped_batches, restarted.dropped_bytes) == (2, 200)


def test_leftover_temp_files_from_a_crash_are_ignored_and_removed(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    seqs = _fill(spool, [b"complete"])
    # What a crash between write and rename leaves: a half-written batch and a state update.
    half_written = tmp_path / f"{seqs[0] + 1:020d}.batch.tmp"
    half_written.write_bytes(b"half")
    state_tmp = tmp_path / "seq.state.tmp"
    state_tmp.write_bytes(b"99")

    restarted = _spool(tmp_path)
    assert restarted.pending() == [(seqs[0], b"complete")]
    assert restarted.bytes == len(b"complete")
    assert not half_written.exists() and not state_tmp.exists()
    assert restarted.next_seq() == seqs[0] + 1


def test_corrupt_file_names_are_logged_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    seqs = _fill(_spool(tmp_path), [b"good"])
    (tmp_path / "not-a-seq.batch").write_bytes(b"junk")
    (tmp_path / "42.batch").write_bytes(b"wrong width")
    with caplog.at_level(logging.WARNING, logger="fleetwatch.agent.spool"):
        restarted = _spool(tmp_path)
    assert restarted.pending() == [(seqs[0], b"good")]
    assert restarted.bytes == 4
    assert "not-a-seq.batch" in caplog.text and "42.batch" in caplog.text
    # Left in place for a person to look at, not deleted.
    assert (tmp_path / "not-a-seq.batch").exists()


def test_corrupt_state_file_resumes_after_batches_on_disk(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    seqs = _fill(_spool(tmp_path), [b"a", b"b"])
    (tmp_path / "seq.state").write_text("garbage\n")
    with caplog.at_level(logging.ERROR, logger="fleetwatch.agent.spool"):
        restarted = _spool(tmp_path)
    assert "corrupt" in caplog.text
    assert restarted.next_seq() == seqs[-1] + 1


def test_batch_removed_behind_the_spools_back_is_forgotten(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    seqs = _fill(spool, [b"a" * 3, b"b" * 5])
    (tmp_path / f"{seqs[0]:020d}.batch").unlink()
    assert spool.pending() == [(seqs[1], b"b" * 5)]
    assert (spool.count, spool.bytes) == (1, 5)


def test_fsync_can_be_disabled(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1024, fsync=False)
    seqs = _fill(spool, [b"fast"])
    assert Spool(tmp_path, 1024, fsync=False).pending() == [(seqs[0], b"fast")]


def test_invalid_max_bytes(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Spool(tmp_path, 0)


# -- quarantine -----------------------------------------------------------------------------------


def test_quarantine_moves_the_file_aside_counts_it_and_logs_it_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = _spool(tmp_path)
    seqs = _fill(spool, [b"good", b"torn", b"also good"])
    with caplog.at_level(logging.WARNING, logger="fleetwatch.agent.spool"):
        assert spool.quarantine(seqs[1], "does not decode") is True
        assert spool.quarantine(seqs[1], "does not decode") is False  # once per file
    assert spool.pending() == [(seqs[0], b"good"), (seqs[2], b"also good")]
    assert (spool.count, spool.bytes, spool.quarantined_batches) == (2, 13, 1)
    kept = tmp_path / "quarantine" / f"{seqs[1]:020d}.batch"
    assert kept.read_bytes() == b"torn"
    assert stat.S_IMODE(kept.parent.stat().st_mode) == 0o700
    (line,) = [r.getMessage() for r in caplog.records]
    assert f"seq {seqs[1]}" in line and "does not decode" in line and str(kept) in line

    restarted = _spool(tmp_path)  # the quarantine directory is not taken for a batch, nor warned about
    assert restarted.pending() == [(seqs[0], b"good"), (seqs[2], b"also good")]


def test_quarantine_keeps_only_the_newest_files_within_its_bounds(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1 << 20, quarantine_max_files=3, quarantine_max_bytes=1 << 20)
    seqs = _fill(spool, [bytes([i]) * 10 for i in range(5)])
    for seq in seqs:
        spool.quarantine(seq, "test")
    names = sorted(p.name for p in (tmp_path / "quarantine").iterdir())
    assert names == [f"{s:020d}.batch" for s in seqs[2:]]
    assert spool.quarantined_batches == 5

    by_bytes = Spool(tmp_path / "b", 1 << 20, quarantine_max_files=100, quarantine_max_bytes=25)
    seqs = _fill(by_bytes, [b"x" * 10, b"y" * 10, b"z" * 10])
    for seq in seqs:
        by_bytes.quarantine(seq, "test")
    assert sorted(p.name for p in (tmp_path / "b" / "quarantine").iterdir()) == [f"{s:020d}.batch" for s in seqs[1:]]


def test_quarantine_never_overwrites_an_earlier_file_of_the_same_name(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    (seq,) = _fill(spool, [b"first"])
    spool.quarantine(seq, "test")
    (tmp_path / "seq.state").unlink()  # state lost: the same seq is handed out again
    again = _spool(tmp_path)
    assert _fill(again, [b"second"]) == [seq]
    again.quarantine(seq, "test")
    assert (tmp_path / "quarantine" / f"{seq:020d}.batch").read_bytes() == b"first"
    assert (tmp_path / "quarantine" / f"{seq:020d}.batch.1").read_bytes() == b"second"


# -- the directory lock ---------------------------------------------------------------------------


def test_spool_lock_is_exclusive_and_names_its_holder(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    with SpoolLock(directory) as lock:
        assert lock.held
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert (directory / "agent.lock").read_text().strip() == str(os.getpid())
        with pytest.raises(SpoolBusyError) as busy:
            SpoolLock(directory)  # a second open file description conflicts, even in this process
        assert busy.value.holder_pid == os.getpid()
        assert str(directory) in str(busy.value) and f"pid {os.getpid()}" in str(busy.value)
    assert not lock.held
    SpoolLock(directory).release()  # free again once released


def test_spool_lock_held_by_another_process_is_refused_and_dies_with_it(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import sys
                from fleetwatch.agent.spool import SpoolLock
                lock = SpoolLock(sys.argv[1])
                print("locked", flush=True)
                sys.stdin.read()
                """
            ),
            str(directory),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(SpoolBusyError) as busy:
            SpoolLock(directory)
        assert busy.value.holder_pid == holder.pid
    finally:
        holder.kill()  # killed, not released: the kernel drops the flock with the process
        holder.wait(10)
    SpoolLock(directory).release()
