"""Compaction, rollups and block expiry on real SQLite and PostgreSQL: nothing lost, nothing twice.

Batches are committed as they came; compaction turns them into blocks and their keys into runs,
rollups summarise whole hours, and expiry drops whole blocks. Every step is checked through what
a user reads back: samples, stored seqs, the Welcome's last seq, and the series API's answer.
"""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from fleetwatch.collector.storage.compaction import compact, expire, roll_up
from fleetwatch.collector.storage.partitions import partitions
from fleetwatch.collector.storage.series import SeriesQuery, SeriesQueryError, read_series
from fleetwatch.collector.storage.store import IngestBatch, Store
from fleetwatch.records import GpuSample, HostSample

HOUR = 3600.0
T0 = 1_700_005_620.0  # 47 minutes into an hour: the first hour of data is not a whole one


def batch(
    seq: int, *, node: str = "n01", boot_id: str = "boot-a", t: float | None = None, gpus: int = 2
) -> IngestBatch:
    t = T0 + seq if t is None else t
    samples = [
        GpuSample(
            t=t,
            node=node,
            gpu=g,
            metrics={"sm_clock_mhz": 1980.0 if seq < 100 else 1200.0, "power_watts": 600.0 + seq % 7 + g / 1000},
            uuid=f"GPU-{g}",
            job="llm",
            rank=g,
        )
        for g in range(gpus)
    ]
    host = [HostSample(t=t, node=node, metrics={"cpu_percent": float(seq % 50), "mem_used_bytes": 10**9 + seq})]
    return IngestBatch(
        node=node, boot_id=boot_id, seq=seq, received_at=t + 0.25, gpu_samples=samples, host_samples=host
    )


def ingest_range(store: Store, first: int, last: int, **kwargs) -> None:
    items = [batch(seq, **kwargs) for seq in range(first, last + 1)]
    for i in range(0, len(items), 50):
        assert all(store.ingest(items[i : i + 50]))


def test_compaction_keeps_every_sample_and_key_exactly_once(store: Store) -> None:
    ingest_range(store, 1, 200)
    before = store.gpu_samples_since(0)
    host_before = store.host_samples_since(0)
    result = compact(store, now=T0 + 10 * HOUR)
    assert result.batches == 200 and result.blocks == 2  # one GPU and one host block for the node
    assert store.count_rows("batches") == 0
    assert store.gpu_samples_since(0) == before
    assert store.host_samples_since(0) == host_before
    assert store.stored_seqs("n01", "boot-a") == list(range(1, 201))
    assert store.count_rows("batch_ranges") == 1
    # A resend of a compacted batch is a duplicate; the Welcome still says how far the boot got.
    assert store.ingest([batch(5), batch(200), batch(201)]) == [False, False, True]
    assert store.last_seq("n01", "boot-a") == 201
    compact(store, now=T0 + 10 * HOUR)
    assert store.count_rows("batch_ranges") == 1  # 201 extended the run
    assert store.stored_seqs("n01", "boot-a") == list(range(1, 202))


def test_gaps_and_boots_are_separate_runs_and_a_gap_can_still_be_filled(store: Store) -> None:
    ingest_range(store, 1, 10)
    ingest_range(store, 20, 30)
    ingest_range(store, 1, 3, boot_id="boot-b", t=T0 + 500)
    compact(store, now=T0 + HOUR)
    assert store.count_rows("batch_ranges") == 3
    # Seq 15 was never stored (a spooled batch sent late): it is new, not a duplicate.
    assert store.ingest([batch(15), batch(25)]) == [True, False]
    assert store.stored_seqs("n01", "boot-a") == [*range(1, 11), 15, *range(20, 31)]
    assert store.last_seq("n01", "boot-b") == 3


def test_recent_batches_wait_for_compaction(store: Store) -> None:
    ingest_range(store, 1, 100)
    result = compact(store, now=T0 + 100, after_seconds=60)  # batches 1..39 are 60 s old
    assert result.batches == 39
    assert store.count_rows("batches") == 61
    assert len(store.gpu_samples_since(0)) == 200  # read from blocks and rows alike


def test_rollups_cover_whole_hours_and_expiry_drops_only_what_they_cover(store: Store) -> None:
    # Two hours of 1 Hz samples from 47 minutes into an hour, compacted every 10 minutes as they come.
    for first in range(1, 7200, 600):
        ingest_range(store, first, first + 599, gpus=1)
        compact(store, now=T0 + first + 599 + 61)
    end_of_data = T0 + 7200
    blocks = store.count_rows("sample_blocks")
    # Only hours that are over roll up: the 13 minutes of the first and the whole second, GPU and host.
    assert roll_up(store, now=end_of_data) == 2 * 2
    # Past raw retention, only rolled-up blocks go; the current hour's wait for their rollup.
    dropped = expire(
        store, now=end_of_data + 80 * HOUR, raw_retention_seconds=72 * HOUR, rollup_retention_seconds=90 * 86400
    )
    assert 0 < dropped < blocks
    assert store.count_rows("sample_blocks") == blocks - dropped
    assert store.count_rows("rollup_blocks") == 4
    roll_up(store, now=end_of_data + 80 * HOUR)
    expire(store, now=end_of_data + 80 * HOUR, raw_retention_seconds=72 * HOUR, rollup_retention_seconds=90 * 86400)
    assert store.count_rows("sample_blocks") == 0
    # Rollups go after their own retention.
    expire(store, now=end_of_data + 91 * 86400, raw_retention_seconds=72 * HOUR, rollup_retention_seconds=90 * 86400)
    assert store.count_rows("rollup_blocks") == 0


def test_series_reads_raw_then_rollups_with_the_same_minutes(store: Store) -> None:
    ingest_range(store, 1, 600, gpus=1)  # the clock falls from 1980 to 1200 MHz at seq 100
    query = SeriesQuery(node="n01", gpu=0, fields=["sm_clock_mhz"], start=T0, end=T0 + 600, step=None)
    raw = read_series(store, query, now=T0 + 700, raw_retention_seconds=72 * HOUR)
    assert raw["source"] == "raw" and raw["step"] is None
    [clock] = raw["series"]
    values = [v for _, v in clock["points"]]
    assert len(values) == 600 and values[0] == 1980.0 and values[-1] == 1200.0
    assert values.index(1200.0) == 99  # the fall, at the sample it happened

    by_minute = read_series(store, SeriesQuery("n01", 0, ["sm_clock_mhz"], T0, T0 + 600, 60.0), T0 + 700, 72 * HOUR)
    compact(store, now=T0 + 700)
    roll_up(store, now=T0 + 100 * HOUR)
    expire(store, now=T0 + 100 * HOUR, raw_retention_seconds=72 * HOUR, rollup_retention_seconds=90 * 86400)
    assert store.count_rows("sample_blocks") == 0
    later = read_series(store, SeriesQuery("n01", 0, ["sm_clock_mhz"], T0, T0 + 600, None), T0 + 100 * HOUR, 72 * HOUR)
    assert later["source"] == "rollup" and later["step"] == 60.0
    assert later["series"] == by_minute["series"]
    minutes = later["series"][0]
    assert minutes["points"][0][1] == 1980.0 and minutes["points"][-1][1] == 1200.0
    assert min(minutes["min"]) == 1200.0 and max(minutes["max"]) == 1980.0


def test_series_query_errors_name_the_parameter(store: Store) -> None:
    with pytest.raises(SeriesQueryError, match=r"^field: bogus is not a gpu field"):
        read_series(store, SeriesQuery("n01", 0, ["bogus"], T0, T0 + 1, None), T0, HOUR)
    with pytest.raises(SeriesQueryError, match=r"^start:"):
        read_series(store, SeriesQuery("n01", 0, [], T0 + 1, T0, None), T0, HOUR)
    with pytest.raises(SeriesQueryError, match=r"^step: too fine"):
        read_series(store, SeriesQuery("n01", 0, [], T0, T0 + 90 * 86400, 1.0), T0, HOUR)


def test_two_collectors_compacting_at_once_store_each_batch_once(store: Store, database) -> None:
    for n in range(8):
        ingest_range(store, 1, 60, node=f"n{n:02d}")
    other = Store(database.url)
    errors: list[BaseException] = []

    def run(st: Store) -> None:
        try:
            compact(st, now=T0 + HOUR)
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=run, args=(st,)) for st in (store, other, store, other)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=60)
    finally:
        other.close()
    assert not errors
    assert store.count_rows("batches") == 0
    samples = store.gpu_samples_since(0)
    assert len(samples) == len({(s.node, s.gpu, s.t) for s in samples}) == 8 * 60 * 2
    for n in range(8):
        assert store.stored_seqs(f"n{n:02d}") == list(range(1, 61))


_KILLED_COMPACTION = textwrap.dedent(
    """
    import os, sys, time
    from sqlalchemy import event
    from fleetwatch.collector.storage.compaction import compact
    from fleetwatch.collector.storage.store import Store

    store = Store(sys.argv[1])
    point = sys.argv[2]

    def pause(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith(point):
            print("PAUSED", flush=True)
            time.sleep(60)  # SIGKILL arrives here, inside the compaction's transaction

    event.listen(store._engine, "after_cursor_execute", pause)
    compact(store, now=float(sys.argv[3]))
    print("FINISHED", flush=True)
    """
)


@pytest.mark.parametrize("point", ["DELETE FROM BATCHES", "INSERT INTO SAMPLE_BLOCKS", "INSERT INTO BATCH_RANGES"])
def test_sigkill_during_compaction_loses_and_duplicates_nothing(
    store: Store, database, point: str, tmp_path: Path
) -> None:
    ingest_range(store, 1, 120)
    expected = store.gpu_samples_since(0)
    script = tmp_path / "compact.py"
    script.write_text(_KILLED_COMPACTION)
    child = subprocess.Popen(
        [sys.executable, str(script), database.url, point, str(T0 + HOUR)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "PAUSED"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    # The killed transaction left nothing half done: all still in batches, none in blocks.
    assert store.stored_seqs("n01") == list(range(1, 121))
    assert store.gpu_samples_since(0) == expected
    assert store.count_rows("sample_blocks") == 0 and store.count_rows("batch_ranges") == 0
    # The next compaction (a restarted collector) does the work once.
    assert compact(store, now=T0 + HOUR).batches == 120
    assert store.stored_seqs("n01") == list(range(1, 121))
    assert store.gpu_samples_since(0) == expected
    assert store.ingest([batch(7)]) == [False]


def test_postgresql_keeps_blocks_in_day_partitions_and_drops_them_whole(store: Store, database) -> None:
    if database.kind != "postgres":
        pytest.skip("partitions are PostgreSQL's; SQLite deletes whole block rows (tested above)")
    day = 86400.0
    first_day = math.floor(T0 / day) * day
    for d in range(3):  # a few minutes on each of three days
        items = [batch(d * 1000 + i, t=first_day + d * day + 600 + i) for i in range(1, 121)]
        assert all(store.ingest(items))
        compact(store, now=first_day + d * day + 2000)
    with store.reading("list partitions") as conn:
        names = [name for name, _, _ in partitions(conn, "sample_blocks")]
    assert names == [f"sample_blocks_p{int(first_day + d * day)}" for d in range(3)]
    roll_up(store, now=first_day + 3 * day)
    # Two days past retention: their partitions go whole; the third day's stays.
    dropped = expire(
        store, now=first_day + 2 * day + 3 * HOUR + 1, raw_retention_seconds=3 * HOUR, rollup_retention_seconds=90 * day
    )
    assert dropped == 4  # the GPU and host blocks of each dropped day
    with store.reading("list partitions") as conn:
        assert [name for name, _, _ in partitions(conn, "sample_blocks")] == names[2:]
        assert [name for name, _, _ in partitions(conn, "rollup_blocks")]
    assert len(store.gpu_samples_since(0)) == 120 * 2


def test_sqlite_gives_compacted_space_back_to_the_file_system(store: Store, database) -> None:
    if database.kind != "sqlite":
        pytest.skip("a SQLite file's size; PostgreSQL reuses the space of deleted rows")
    path = Path(database.url.removeprefix("sqlite:///"))
    ingest_range(store, 1, 3000, gpus=8)

    def size_after_checkpoint() -> int:
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return path.stat().st_size

    before = size_after_checkpoint()
    compact(store, now=T0 + HOUR)  # then gives the freed pages back (incremental auto-vacuum)
    after = size_after_checkpoint()
    assert after < before / 4, (before, after)  # blocks are a small part of the batches they replace
