"""Fleet detection's read-back of other collectors' batches: each read once, late commits too."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import insert

from fleetwatch.collector.fleet import FLEET_DETECTOR_IDS, FleetDetection, split_detectors
from fleetwatch.collector.storage import schema
from fleetwatch.collector.storage.chunks import compress_body
from fleetwatch.collector.storage.store import Store
from fleetwatch.collector.validate import ClockWindow
from fleetwatch.detectors import default_detectors
from fleetwatch.v1 import telemetry_pb2 as pb

T0 = 1_700_000_000.0


def _body(seq: int) -> bytes:
    batch = pb.Batch(seq=seq, t=T0 + seq, boot_id="b")
    host = batch.hosts.add(t=T0 + seq)
    host.metrics.cpu_percent = 10.0
    return compress_body(batch.SerializeToString())


def _store_batch(store: Store, row_id: int, node: str, seq: int) -> None:
    with store.writing("test batch") as conn:
        conn.execute(
            insert(schema.batches).values(
                id=row_id, node=node, boot_id="b", seq=seq, received_at=T0 + seq, body=_body(seq)
            )
        )


def test_the_split_puts_job_level_and_clock_detectors_on_the_fleet_side() -> None:
    local, fleet = split_detectors(default_detectors())
    assert {d.id for d in fleet} == FLEET_DETECTOR_IDS
    assert {"xid", "node_silent", "ecc", "gpu_lost"} <= {d.id for d in local}
    assert not {d.id for d in local} & FLEET_DETECTOR_IDS


def test_poll_reads_each_batch_once_including_one_that_commits_after_a_higher_id(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'c.db'}")
    store.migrate()
    fed: list[list[str]] = []
    try:
        _, detectors = split_detectors(default_detectors())
        fleet = FleetDetection(
            store,
            detectors,
            targets=[],
            interval_seconds=1.0,
            on_alerts_changed=lambda: None,
            active=lambda: True,
            local_nodes=lambda: ["here"],
            window=ClockWindow(max_skew_seconds=1e12, max_age_seconds=1e12),
            clock=lambda: T0 + 100,
        )

        def record(change: object) -> None:  # what poll hands to the detection thread: the nodes
            items = getattr(change, "keywords", {}).get("items")
            if items is not None:
                fed.append([i.node for i in items])

        fleet.loop.feed = record  # type: ignore[method-assign]
        _store_batch(store, 1, "before", 1)
        fleet.lease_changed(True)  # from here on: batch 1 came before the lease
        fed.clear()
        _store_batch(store, 2, "n1", 2)
        _store_batch(store, 5, "n2", 5)
        _store_batch(store, 6, "here", 6)  # streamed to this collector: fed as it was stored
        assert fleet.poll() == 3
        _store_batch(store, 3, "n3", 3)  # an insert with a lower id that committed late
        assert fleet.poll() == 1
        assert fleet.poll() == 0  # nothing twice
        assert fed == [["n1", "n2"], ["n3"]]
    finally:
        store.close()


def test_the_status_snapshot_counts_the_fleet_detectors_findings_too() -> None:
    """With PostgreSQL, thermal and straggler findings live in fleet detection's tracker: a GPU's
    health in /api/v1/status must still show them."""
    from types import SimpleNamespace

    from fleetwatch.collector.web import DetectionSnapshot
    from fleetwatch.detectors.engine import Tracker
    from fleetwatch.records import Finding

    local, fleet = split_detectors(default_detectors())
    node_tracker, fleet_tracker = Tracker(local), Tracker(fleet)
    fleet_tracker.restore([Finding("thermal", "warning", "inspect_hardware", "hot", T0, node="n1", gpu=2)])
    node_tracker.restore([Finding("xid", "critical", "reboot", "XID 79", T0, node="n1", gpu=5, key="79")])
    app = SimpleNamespace(trackers=(node_tracker, fleet_tracker), stats=SimpleNamespace(links={}), latest_gpu={})
    snapshot = DetectionSnapshot.take(app)  # type: ignore[arg-type]
    assert sorted((a.gpu, a.detector) for a in snapshot.alerts) == [(2, "thermal"), (5, "xid")]
