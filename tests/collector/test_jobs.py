"""Energy per job: the ledger's accounting rules, and the jobs API over a real store."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fleetwatch.collector.jobs import RUNNING_WITHIN_SECONDS, JobLedger, LiveJobs, job_reports
from fleetwatch.collector.storage.compaction import compact
from fleetwatch.collector.storage.store import IngestBatch, Store
from fleetwatch.records import GpuSample


def _feed(ledger: JobLedger, node: str, gpu: int, rows: list[tuple[float, str | None, float | None]]) -> None:
    t = np.array([r[0] for r in rows], dtype=np.float64)
    energy = np.array([math.nan if r[2] is None else r[2] for r in rows], dtype=np.float64)
    ledger.add_series(
        node,
        gpu,
        t,
        [("GPU-x", r[1], 0 if r[1] else None) for r in rows],
        np.arange(len(rows)),
        {
            "energy_joules": energy,
            "power_watts": np.full(len(rows), 300.0),
            "gpu_util_percent": np.full(len(rows), 90.0),
        },
    )


def test_energy_counts_only_intervals_whose_both_ends_name_the_job() -> None:
    ledger = JobLedger()
    # Idle until t=2, job A from t=2 to t=4, job B from t=5.
    _feed(
        ledger,
        "n1",
        0,
        [
            (0, None, 100.0),
            (1, None, 150.0),
            (2, "A", 200.0),
            (3, "A", 500.0),
            (4, "A", 800.0),
            (5, "B", 1000.0),
            (6, "B", 1100.0),
        ],
    )
    assert ledger.energy_joules("A") == pytest.approx(600.0)  # 200 -> 800: the idle and handover gaps are nobody's
    assert ledger.energy_joules("B") == pytest.approx(100.0)
    share = ledger.shares["A"][("n1", 0)]
    assert (share.first_seen, share.last_seen, share.ranks, share.uuid) == (2, 4, {0}, "GPU-x")
    assert share.power_sum / share.power_count == pytest.approx(300.0)


def test_a_counter_reset_adds_nothing_and_counting_resumes_after_it() -> None:
    ledger = JobLedger()
    # The driver reloads between t=2 and t=3: the counter starts again near zero.
    _feed(ledger, "n1", 0, [(0, "A", 5000.0), (1, "A", 5100.0), (2, "A", 5200.0), (3, "A", 40.0), (4, "A", 140.0)])
    assert ledger.energy_joules("A") == pytest.approx(300.0)


def test_missing_readings_bridge_to_the_next_one_within_the_job() -> None:
    ledger = JobLedger()
    _feed(ledger, "n1", 0, [(0, "A", 100.0), (1, "A", None), (2, "A", 300.0)])
    assert ledger.energy_joules("A") == pytest.approx(200.0)


def test_batches_fed_in_pieces_count_across_the_join_and_repeats_count_once() -> None:
    whole, pieces = JobLedger(), JobLedger()
    rows = [(float(i), "A", 100.0 * i) for i in range(10)]
    _feed(whole, "n1", 0, rows)
    _feed(pieces, "n1", 0, rows[:4])
    _feed(pieces, "n1", 0, rows[2:7])  # overlaps the first piece: a resent batch
    _feed(pieces, "n1", 0, rows[7:])
    assert pieces.energy_joules("A") == whole.energy_joules("A") == pytest.approx(900.0)


def test_live_jobs_forget_a_job_once_it_stops_reporting() -> None:
    live = LiveJobs()
    samples = [GpuSample(t=t, node="n1", gpu=0, metrics={"energy_joules": 10.0 * t}, job="A", rank=0) for t in range(5)]
    live.add_samples("n1", samples)
    assert live.running(now=5.0) == {"A": pytest.approx(40.0)}
    assert live.running(now=4.0 + RUNNING_WITHIN_SECONDS + 1) == {}


@pytest.mark.parametrize("compacted", [False, True], ids=["raw-batches", "compacted-blocks"])
def test_job_reports_read_stored_batches(tmp_path, compacted: bool) -> None:
    store = Store(f"sqlite:///{tmp_path / 'c.db'}")
    store.migrate()
    try:
        for seq in range(2):  # two batches of 5 s: the increase across their join counts too
            samples = [
                GpuSample(
                    t=1000.0 + t,
                    node="n1",
                    gpu=gpu,
                    metrics={
                        "energy_joules": 5000.0 * (gpu + 1) + 50.0 * t,
                        "power_watts": 250.0,
                        "gpu_util_percent": 80.0,
                    },
                    uuid=f"GPU-{gpu}",
                    job="J7",
                    rank=gpu,
                )
                for t in range(seq * 5, seq * 5 + 5)
                for gpu in range(2)
            ]
            store.ingest(
                [
                    IngestBatch(
                        node="n1", boot_id="b", seq=seq + 1, received_at=1000.0 + 5 * seq + 5, gpu_samples=samples
                    )
                ]
            )
        if compacted:
            result = compact(store, now=2000.0)
            assert result.batches == 2
        reports = job_reports(store, since=0.0, now=1010.0)
    finally:
        store.close()
    (report,) = reports
    assert report["job"] == "J7" and report["gpu_count"] == 2 and report["nodes"] == ["n1"]
    assert report["energy_joules"] == pytest.approx(2 * 9 * 50.0)
    assert report["energy_kwh"] == pytest.approx(report["energy_joules"] / 3.6e6)
    assert report["state"] == "running" and report["duration_seconds"] == pytest.approx(9.0)
    assert [g["ranks"] for g in report["gpus"]] == [[0], [1]]
    assert report["mean_power_watts"] == pytest.approx(250.0)
    assert report["mean_utilization_percent"] == pytest.approx(80.0)
    assert report["steps"] is None and report["joules_per_step"] is None


def test_a_jobs_steps_stragglers_and_alerts(tmp_path) -> None:
    from fleetwatch.records import Finding, Step

    store = Store(f"sqlite:///{tmp_path / 'c.db'}")
    store.migrate()
    try:
        samples = [
            GpuSample(t=1000.0 + t, node="n1", gpu=gpu, metrics={"energy_joules": 700.0 * t}, job="J8", rank=gpu)
            for t in range(11)
            for gpu in range(2)
        ]
        # Both ranks report steps 1-5 (one step is one step, however many ranks report it).
        steps = [
            Step(t=1000.0 + 2 * s, job="J8", rank=r, node="n1", step=s, seconds=1.9)
            for s in range(1, 6)
            for r in (0, 1)
        ]
        store.ingest([IngestBatch(node="n1", boot_id="b", seq=1, received_at=1011.0, gpu_samples=samples, steps=steps)])
        slow = Finding(
            "straggler.steps", "warning", "check_app", "rank 1 slow", 1004.0, node="n1", gpu=1, job="J8", rank=1
        )
        on_its_gpu = Finding("xid", "critical", "reboot", "XID 79", 1005.0, node="n1", gpu=0, key="79")
        elsewhere = Finding("xid", "critical", "reboot", "XID 79", 1005.0, node="n2", gpu=0, key="79")
        later = Finding("thermal", "warning", "inspect_hardware", "hot", 5000.0, node="n1", gpu=1)
        for finding in (slow, on_its_gpu, elsewhere, later):
            store.open_alert(finding, now=finding.start, targets=[])
        (report,) = job_reports(store, since=0.0, now=1012.0, job="J8")
    finally:
        store.close()
    assert report["energy_joules"] == pytest.approx(2 * 10 * 700.0)
    assert report["steps"] == 5 and report["joules_per_step"] == pytest.approx(2 * 10 * 700.0 / 5)
    assert report["stragglers"] == [{"node": "n1", "gpu": 1, "rank": 1, "detector": "straggler.steps"}]
    # Its own alert and the one on a GPU it held while it held it; not another node's, not a later one.
    assert sorted(a["detector"] for a in report["alerts"]) == ["straggler.steps", "xid"]
    assert all(a["node"] == "n1" for a in report["alerts"])


def test_the_live_count_and_the_stored_accounting_agree() -> None:
    """/metrics counts per batch across GPUs, the API per GPU over stored blocks: one rule, one answer."""
    from fleetwatch.collector.storage.store import GpuRows
    from fleetwatch.wire import GPU_FIELDS

    rng = np.random.default_rng(7)
    energy_column = GPU_FIELDS.index("energy_joules")
    live, ledger = LiveJobs(), JobLedger()
    counters = np.full(4, 1000.0)
    labels = [("GPU-0", "A", 0), ("GPU-1", "A", 1), ("GPU-2", "B", 0), ("GPU-3", None, None), ("GPU-1", "B", 1)]
    for batch in range(30):
        t = np.repeat(np.arange(5.0) + 5 * batch, 4)
        gpu = np.tile(np.arange(4), 5)
        counters_rows = []
        for _ in range(5):
            counters += rng.uniform(100, 400, size=4)
            if rng.random() < 0.05:
                counters[rng.integers(4)] = 10.0  # a driver reload
            counters_rows.append(counters.copy())
        values = np.full((20, len(GPU_FIELDS)), np.nan)
        values[:, energy_column] = np.concatenate(counters_rows)
        values[rng.random(20) < 0.1, energy_column] = np.nan  # readings missing now and then
        label = np.array([0, 1, 2, 3] * 5)
        if batch >= 15:
            label[label == 1] = 4  # GPU 1 moves from job A to job B
        rows = GpuRows(t=t, gpu=gpu, values=values, label=label, labels=labels)
        live.add_rows("n1", rows)
        for g in range(4):
            mine = gpu == g
            ledger.add_series("n1", g, t[mine], labels, label[mine], {"energy_joules": values[mine, energy_column]})
    counted = live.running(now=150.0)
    assert set(counted) == {"A", "B"}
    for job in ("A", "B"):
        assert counted[job] == pytest.approx(ledger.energy_joules(job))
