"""The collector store on real SQLite and PostgreSQL: idempotent ingest, NULL = absent, alerts
with their outbox, retention in bounded batches, and failures surfaced as StoreError."""

from __future__ import annotations

import math
import random
import threading

import pytest
from sqlalchemy import event, select, text
from sqlalchemy import exc as sa_exc

from fleetwatch.collector.storage import schema
from fleetwatch.collector.storage import store as store_module
from fleetwatch.collector.storage.compaction import compact
from fleetwatch.collector.storage.store import BatchRefused, IngestBatch, SchemaMigration, Store, StoreError
from fleetwatch.limits import integer_metric_max
from fleetwatch.records import Event, Finding, GpuSample, HostSample, Step
from fleetwatch.wire import GPU_FIELDS, HOST_FIELDS, IB_FIELDS, INTEGER_FIELDS

T0 = 1_700_000_000.0  # a realistic epoch, so float timestamps keep their sub-second part


def gpu_sample(t: float, gpu: int = 0, node: str = "n01", **metrics: float | int) -> GpuSample:
    return GpuSample(t=t, node=node, gpu=gpu, metrics=metrics or {"power_watts": 300.0})


def batch(seq: int, *, node: str = "n01", boot_id: str = "boot-a", t: float | None = None, **records) -> IngestBatch:
    # Each batch samples its own second: samples of one GPU at one time are one sample in the store.
    t = T0 + seq if t is None else t
    records.setdefault("gpu_samples", [gpu_sample(t, g, node) for g in range(2)])
    return IngestBatch(node=node, boot_id=boot_id, seq=seq, received_at=t + 0.5, **records)


def finding(**overrides) -> Finding:
    values = dict(
        detector="xid",
        severity="critical",
        action="reboot",
        summary="XID 79: GPU has fallen off the bus",
        start=T0,
        node="n01",
        gpu=3,
        evidence={"xid": 79, "count": 1},
        key="79",
    )
    values.update(overrides)
    return Finding(**values)


def big_int(name: str, i: int, bits: int = 40) -> int:
    """An integer for field `name` beyond 32 bits where the field can hold it (its wire type is 64-bit)."""
    return (2**bits + i) if (integer_metric_max(name) or 0) > 2**bits else i + 1


def every_gpu_metric() -> dict[str, float | int]:
    """A value for each canonical GPU field: ints beyond 32 bits where they fit, floats with a fraction."""
    return {name: big_int(name, i) if name in INTEGER_FIELDS else 100.25 + i for i, name in enumerate(GPU_FIELDS)}


# -- schema -----------------------------------------------------------------------------------


def test_migrate_again_keeps_data(store: Store) -> None:
    store.ingest([batch(1)])
    head = store.migrate().to_revision  # the fixture migrated already: nothing to do
    assert store.migrate() == SchemaMigration(from_revision=head, to_revision=head)
    assert len(store.gpu_samples_since(0)) == 2


def test_count_rows_rejects_unknown_table(store: Store) -> None:
    with pytest.raises(ValueError, match="unknown table"):
        store.count_rows("gpu_samples; DROP TABLE nodes")


# -- ingest -----------------------------------------------------------------------------------


def test_same_batch_twice_is_stored_once(store: Store) -> None:
    item = batch(
        1,
        host_samples=[HostSample(t=T0, node="n01", metrics={"cpu_percent": 12.5})],
        ib_ports=[{"t": T0, "device": "mlx5_0", "port": 1, "ib_state": "ACTIVE"}],
        events=[Event(t=T0, node="n01", kind="xid", gpu=1, xid=79)],
        steps=[Step(t=T0, job="j7", rank=0, node="n01", step=10, seconds=0.9)],
    )
    assert store.ingest([item]) == [True]
    assert store.ingest([item]) == [False]
    compact(store, now=T0 + 3600)
    assert store.ingest([item]) == [False]  # its key is in a compacted run now
    counts = {t: store.count_rows(t) for t in ("batch_ranges", "events", "steps")}
    counts["gpu_samples"] = len(store.gpu_samples_since(0))
    counts["host_samples"] = len(store.host_samples_since(0))
    counts["ib_samples"] = len(store.ib_samples_since(0))
    assert counts == {
        "batch_ranges": 1,
        "gpu_samples": 2,
        "host_samples": 1,
        "ib_samples": 1,
        "events": 1,
        "steps": 1,
    }


def test_duplicates_inside_one_list_are_stored_once(store: Store) -> None:
    assert store.ingest([batch(1), batch(2), batch(1), batch(1, boot_id="boot-b", t=T0 + 100)]) == [
        True,
        True,
        False,
        True,
    ]
    assert store.ingest([batch(2), batch(3)]) == [False, True]
    assert store.count_rows("batches") == 4
    assert len(store.gpu_samples_since(0)) == 8
    assert store.ingest([]) == []


def test_a_key_another_collector_stored_meanwhile_is_a_duplicate(store: Store, database) -> None:
    other = Store(database.url)  # a second collector on the same database
    try:
        assert other.ingest([batch(2)]) == [True]
        # The database settles the key (ON CONFLICT DO NOTHING): no error, no second copy.
        assert store.ingest([batch(1), batch(2), batch(3)]) == [True, False, True]
    finally:
        other.close()
    assert store.count_rows("batches") == 3
    assert len(store.gpu_samples_since(0)) == 6


def test_two_collectors_ingesting_the_same_batches_store_each_once(store: Store, database) -> None:
    # Two collectors behind a load balancer: an agent reconnects and resends to the other one.
    other = Store(database.url)
    items = [batch(seq, node=f"n{seq % 3:02d}") for seq in range(1, 61)]
    results: dict[str, list[tuple[tuple[str, str, int], bool]]] = {}

    def run(name: str, st: Store, chunks: list[list[IngestBatch]]) -> None:
        results[name] = [(b.key, ok) for chunk in chunks for b, ok in zip(chunk, st.ingest(chunk), strict=True)]

    forward = [items[i : i + 7] for i in range(0, len(items), 7)]
    backward = [list(reversed(items))[i : i + 5] for i in range(0, len(items), 5)]
    try:
        threads = [
            threading.Thread(target=run, args=("a", store, forward)),
            threading.Thread(target=run, args=("b", other, backward)),
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=60)
    finally:
        other.close()
    assert set(results) == {"a", "b"}
    stored_by = [key for name in results for key, ok in results[name] if ok]
    assert sorted(stored_by) == sorted(b.key for b in items)  # every key stored exactly once
    assert store.count_rows("batches") == 60
    assert len(store.gpu_samples_since(0)) == 120


def test_a_bad_record_is_not_acked_as_a_duplicate(store: Store) -> None:
    bad = batch(2, steps=[Step(t=T0, job=None, rank=0, node="n01", step=1, seconds=1.0)])
    with pytest.raises(BatchRefused) as refused:
        store.ingest([batch(1), bad])
    assert refused.value.key == bad.key
    assert "INSERT" not in str(refused.value)  # the database's reason, never the statement
    assert store.last_seq("n01", "boot-a") == 1  # the good batch went in on the fallback path
    assert store.count_rows("steps") == 0


def test_absent_fields_stay_null_and_come_back_absent(store: Store) -> None:
    sample = GpuSample(t=T0, node="n01", gpu=0, metrics={"power_watts": 312.5, "ecc_dbe_volatile_total": 0})
    host = HostSample(t=T0, node="n01", metrics={"load1": 0.0})
    store.ingest([batch(1, gpu_samples=[sample], host_samples=[host])])

    # Unsupported is absent, never 0; a real zero stays zero: before compaction and after it.
    for _ in ("raw batch", "compacted block"):
        [back] = store.gpu_samples_since(T0)
        assert dict(back.metrics) == {"power_watts": 312.5, "ecc_dbe_volatile_total": 0}
        assert back.uuid is None and back.job is None and back.rank is None
        [host_back] = store.host_samples_since(T0)
        assert dict(host_back.metrics) == {"load1": 0.0}
        compact(store, now=T0 + 3600)
    assert store.count_rows("batches") == 0 and store.count_rows("sample_blocks") == 2


def test_unrepresentable_values_are_stored_as_absent(store: Store) -> None:
    sample = gpu_sample(T0, clock_event_reasons=2**64 - 1, power_watts=math.nan, fan_percent=40.0)
    store.ingest([batch(1, gpu_samples=[sample])])
    [back] = store.gpu_samples_since(T0)
    assert dict(back.metrics) == {"fan_percent": 40.0}


def test_every_canonical_field_round_trips_with_its_type(store: Store) -> None:
    metrics = every_gpu_metric()
    sample = GpuSample(t=T0 + 0.125, node="n01", gpu=7, metrics=metrics, uuid="GPU-1234", job="j7", rank=6)
    host_metrics = {
        name: big_int(name, i, 41) if name in INTEGER_FIELDS else 1.5 + i for i, name in enumerate(HOST_FIELDS)
    }
    port = {"t": T0, "device": "mlx5_0", "port": 1, "ib_state": "ACTIVE"}
    port.update(
        {
            name: big_int(name, i, 42) if name in INTEGER_FIELDS else 400.5
            for i, name in enumerate(IB_FIELDS)
            if name != "ib_state"
        }
    )
    store.ingest(
        [
            batch(
                1,
                gpu_samples=[sample],
                host_samples=[HostSample(t=T0, node="n01", metrics=host_metrics)],
                ib_ports=[port],
            )
        ]
    )

    for _ in ("raw batch", "compacted block"):
        [back] = store.gpu_samples_since(T0)
        assert back == sample
        assert set(back.metrics) == set(GPU_FIELDS)
        for name, value in back.metrics.items():
            assert type(value) is (int if name in INTEGER_FIELDS else float), name

        [host_back] = store.host_samples_since(T0)
        assert dict(host_back.metrics) == host_metrics
        for name, value in host_back.metrics.items():
            assert type(value) is (int if name in INTEGER_FIELDS else float), name

        [port_back] = store.ib_samples_since(T0)
        assert port_back == {**port, "node": "n01"}
        assert type(port_back["ib_link_downed_total"]) is int
        assert type(port_back["ib_rate_gbps"]) is float
        compact(store, now=T0 + 3600)


def test_events_and_steps_round_trip_oldest_first(store: Store) -> None:
    events = [
        Event(t=T0 + 2, node="n01", kind="gpu_lost", gpu=2, uuid="GPU-2", source="nvml"),
        Event(
            t=T0 + 1,
            node="n01",
            kind="xid",
            gpu=3,
            xid=79,
            pci_bus_id="0000:9b:00",
            message="GPU has fallen off the bus.",
            source="kmsg",
        ),
    ]
    steps = [
        Step(t=T0 + 1.5, job="j7", rank=6, node="n01", step=1811, seconds=0.93, gpu=6),
        Step(t=T0 + 0.5, job="j7", rank=0, node="n01", step=1811, seconds=0.91),
        # A hybrid-parallel rank: its place in the job and the step's wall time come back too.
        Step(
            t=T0 + 1.0,
            job="j7",
            rank=13,
            node="n01",
            step=1811,
            seconds=0.9,
            gpu=5,
            dp_rank=1,
            pp_stage=3,
            tp_rank=0,
            wall_seconds=1.25,
        ),
    ]
    store.ingest([batch(1, events=events, steps=steps)])
    assert store.events_since(T0) == sorted(events, key=lambda e: e.t)
    assert store.steps_since(T0) == sorted(steps, key=lambda s: s.t)
    assert store.events_since(T0 + 1.5) == [events[0]]
    assert store.steps_since(T0 + 1.5) == [steps[0]]  # since is inclusive


def test_latest_gpu_samples_is_the_newest_row_per_gpu(store: Store) -> None:
    # The spooled batch 1 arrives after batch 2 but holds older samples.
    store.ingest(
        [
            batch(
                2,
                gpu_samples=[
                    gpu_sample(T0 + 10, 0, power_watts=2.0),
                    gpu_sample(T0 + 10, 1, power_watts=2.0),
                ],
            )
        ]
    )
    store.ingest(
        [
            batch(
                1,
                gpu_samples=[
                    gpu_sample(T0, 0, power_watts=1.0),
                    gpu_sample(T0 + 20, 1, power_watts=3.0),
                ],
            )
        ]
    )
    store.ingest([batch(1, node="n02", gpu_samples=[gpu_sample(T0, 0, node="n02", power_watts=9.0)])])
    latest = store.latest_gpu_samples()
    assert {key: s.metrics["power_watts"] for key, s in latest.items()} == {
        ("n01", 0): 2.0,
        ("n01", 1): 3.0,
        ("n02", 0): 9.0,
    }


def test_last_seq(store: Store) -> None:
    assert store.last_seq("n01", "boot-a") == 0
    store.ingest([batch(3), batch(1), batch(2)])
    store.ingest([batch(1, boot_id="boot-b")])
    assert store.last_seq("n01", "boot-a") == 3
    assert store.last_seq("n01", "boot-b") == 1
    assert store.last_seq("n02", "boot-a") == 0


# -- node inventory ---------------------------------------------------------------------------


def gpu_infos(count: int, driver: str = "550.54.15") -> list[dict]:
    return [
        {
            "index": i,
            "uuid": f"GPU-{i:04d}",
            "name": "NVIDIA H100 80GB HBM3",
            "pci_bus_id": f"00000000:{0x18 + i:02X}:00.0",
            "serial": "",  # the wire sends "" when unknown
            "memory_total_bytes": 85_520_809_984,
            "driver_version": driver,
            "cuda_version": "12.4",
            "power_limit_watts": 700.0,
            "sm_clock_max_mhz": 1980.0,
            "mem_clock_max_mhz": 2619.0,
        }
        for i in range(count)
    ]


def test_upsert_node_moves_boot_seen_at_only_on_a_new_boot(store: Store) -> None:
    store.upsert_node("n01", "boot-a", "0.1.0", True, 1.0, gpu_infos(8), seen_at=T0)
    store.upsert_node("n01", "boot-a", "0.1.0", True, 1.0, gpu_infos(8), seen_at=T0 + 60)
    [node] = store.nodes()
    assert node == {
        "node": "n01",
        "boot_id": "boot-a",
        "agent_version": "0.1.0",
        "nvml_available": True,
        "sampling_interval_seconds": 1.0,
        "first_seen": T0,
        "last_seen": T0 + 60,
        "boot_seen_at": T0,
        "collector": None,  # no collector has claimed it (collector/cluster.py)
    }

    # Rebooted with a GPU gone and a new driver: boot_seen_at moves, GPU rows are replaced.
    store.upsert_node("n01", "boot-b", "0.1.1", False, 5.0, gpu_infos(7, "560.28.03"), seen_at=T0 + 600)
    [node] = store.nodes()
    assert (node["boot_id"], node["boot_seen_at"], node["first_seen"], node["last_seen"]) == (
        "boot-b",
        T0 + 600,
        T0,
        T0 + 600,
    )
    assert node["nvml_available"] is False and node["agent_version"] == "0.1.1"
    gpus = store.gpus("n01")
    assert [g["gpu"] for g in gpus] == list(range(7))
    expected = {
        **gpu_infos(1, "560.28.03")[0],
        "serial": None,
        "node": "n01",
        "updated_at": T0 + 600,
    }
    expected["gpu"] = expected.pop("index")  # the row names the NVML index `gpu`, as everywhere
    assert gpus[0] == expected
    assert type(gpus[0]["memory_total_bytes"]) is int

    store.upsert_node("n02", "boot-z", "0.1.0", True, 1.0, gpu_infos(2), seen_at=T0)
    assert len(store.gpus()) == 9
    assert [n["node"] for n in store.nodes()] == ["n01", "n02"]


def test_touch_nodes_only_moves_last_seen_forward(store: Store) -> None:
    store.upsert_node("n01", "boot-a", "0.1.0", True, 1.0, [], seen_at=T0)
    store.touch_nodes({"n01": T0 + 30, "unknown": T0 + 30})
    store.touch_nodes({"n01": T0 + 10})  # late data from the spool must not move it back
    store.touch_nodes({})
    [node] = store.nodes()
    assert node["last_seen"] == T0 + 30
    assert store.count_rows("nodes") == 1


# -- alerts and outbox ------------------------------------------------------------------------


def test_open_alert_dedupes_on_fingerprint_and_queues_deliveries(store: Store) -> None:
    f = finding()
    alert_id = store.open_alert(f, now=T0 + 1, targets=["webhook:ops", "alertmanager", "webhook:ops"])
    assert store.open_alert(f, now=T0 + 2, targets=["webhook:ops", "alertmanager"]) == alert_id
    assert store.count_rows("alerts") == 1
    assert store.count_rows("deliveries") == 2  # one per distinct target, none for the repeat

    [alert] = store.firing_alerts()
    assert alert == {
        "id": alert_id,
        "fingerprint": f.fingerprint,
        "detector": "xid",
        "severity": "critical",
        "action": "reboot",
        "node": "n01",
        "gpu": 3,
        "job": None,
        "rank": None,
        "key": "79",
        "summary": f.summary,
        "evidence": {"xid": 79, "count": 1},
        "status": "firing",
        "starts_at": T0,
        "ends_at": None,
        "uuid": None,  # no GPU row for n01/3 in this database
        "pci_bus_id": None,
        "serial": None,
        "model": None,
    }
    other = store.open_alert(finding(gpu=4), now=T0 + 3, targets=[])
    assert other != alert_id and store.count_rows("deliveries") == 2


def test_resolve_alert_queues_resolved_deliveries(store: Store) -> None:
    f = finding()
    alert_id = store.open_alert(f, now=T0, targets=["a"])
    assert store.resolve_alert(f.fingerprint, end=T0 + 50, now=T0 + 51, targets=["a", "b"]) == alert_id
    assert store.resolve_alert(f.fingerprint, end=T0 + 60, now=T0 + 61, targets=["a"]) is None
    assert store.resolve_alert("no|such|alert", end=T0, now=T0, targets=["a"]) is None
    assert store.firing_alerts() == []
    [resolved] = store.alerts(status="resolved")
    assert (resolved["status"], resolved["ends_at"]) == ("resolved", T0 + 50)
    transitions = sorted((d["target"], d["transition"]) for d in store.due_deliveries(T0 + 100))
    # "a"'s resolved delivery waits behind its pending firing one.
    assert transitions == [("a", "firing"), ("b", "resolved")]
    assert store.count_rows("deliveries") == 3

    # The same condition again later is a new alert, not the resolved one.
    again = store.open_alert(finding(start=T0 + 500), now=T0 + 500, targets=["a"])
    assert again != alert_id
    assert [a["id"] for a in store.alerts()] == [again, alert_id]  # newest first
    assert [a["id"] for a in store.alerts(limit=1)] == [again]
    with pytest.raises(ValueError):
        store.alerts(status="bogus")


def test_alert_and_its_deliveries_commit_together(store: Store) -> None:
    # The second delivery cannot be written (target NOT NULL): the alert must not stay either.
    with pytest.raises(sa_exc.IntegrityError):
        store.open_alert(finding(), now=T0, targets=["a", None])
    assert store.count_rows("alerts") == 0
    assert store.count_rows("deliveries") == 0

    alert_id = store.open_alert(finding(), now=T0, targets=["a"])
    with pytest.raises(sa_exc.IntegrityError):
        store.resolve_alert(finding().fingerprint, end=T0 + 1, now=T0 + 1, targets=[None])
    [alert] = store.firing_alerts()
    assert alert["id"] == alert_id and store.count_rows("deliveries") == 1


def test_due_deliveries_retry_delivered_and_failed(store: Store) -> None:
    assert store.next_delivery_due() is None
    first = store.open_alert(finding(), now=T0, targets=["hook", "am"])
    second = store.open_alert(finding(gpu=5), now=T0 + 5, targets=["hook"])

    due = store.due_deliveries(T0)
    assert [(d["alert_id"], d["target"]) for d in due] == [(first, "hook"), (first, "am")]
    assert due[0]["transition"] == "firing" and due[0]["state"] == "pending"
    assert due[0]["severity"] == "critical" and due[0]["evidence"] == {"xid": 79, "count": 1}
    assert due[0]["status"] == "firing" and due[0]["attempts"] == 0
    assert len(store.due_deliveries(T0 + 5)) == 3
    assert len(store.due_deliveries(T0 + 5, limit=1)) == 1

    hook, am = due
    store.mark_retry(hook["id"], "HTTP 503 " + "x" * 10_000, next_attempt_at=T0 + 30)
    store.mark_delivered(am["id"], now=T0 + 1)
    [second_hook] = store.due_deliveries(T0 + 10)
    assert second_hook["alert_id"] == second
    assert store.next_delivery_due() == T0 + 5

    [retried] = [d for d in store.due_deliveries(T0 + 30) if d["id"] == hook["id"]]
    assert retried["attempts"] == 1 and retried["last_error"].startswith("HTTP 503")
    assert len(retried["last_error"]) == store_module.LAST_ERROR_MAX_CHARS

    store.mark_failed(hook["id"], "gave up after 1 attempt")
    store.mark_delivered(hook["id"], now=T0 + 40)  # already settled: stays failed
    for d in store.due_deliveries(T0 + 30):
        store.mark_delivered(d["id"], now=T0 + 31)
    assert store.due_deliveries(T0 + 1e6) == []
    assert store.next_delivery_due() is None
    with store._engine.connect() as conn:
        states = dict(conn.execute(select(schema.deliveries.c.id, schema.deliveries.c.state)).all())
    assert states == {hook["id"]: "failed", am["id"]: "sent", second_hook["id"]: "sent"}
    with pytest.raises(KeyError):
        store.mark_delivered(10_000, now=T0)


def test_resolved_delivery_waits_for_its_firing_retry(store: Store) -> None:
    f = finding()
    store.open_alert(f, now=T0, targets=["hook"])
    [firing] = store.due_deliveries(T0)
    store.mark_retry(firing["id"], "timeout", next_attempt_at=T0 + 100)
    store.resolve_alert(f.fingerprint, end=T0 + 10, now=T0 + 10, targets=["hook"])
    assert store.due_deliveries(T0 + 50) == []  # resolved is due but must not overtake
    assert store.next_delivery_due() == T0 + 100
    store.mark_delivered(firing["id"], now=T0 + 100)
    [resolved] = store.due_deliveries(T0 + 100)
    assert resolved["transition"] == "resolved" and resolved["status"] == "resolved"


def test_reopened_alert_waits_behind_its_previous_alerts_deliveries_per_target(store: Store) -> None:
    f = finding()
    first = store.open_alert(f, now=T0, targets=["hook", "log"])
    for d in store.due_deliveries(T0):  # the hook's firing fails; the log's goes out
        if d["target"] == "hook":
            store.mark_retry(d["id"], "timeout", next_attempt_at=T0 + 100)
        else:
            store.mark_delivered(d["id"], now=T0)
    store.resolve_alert(f.fingerprint, end=T0 + 10, now=T0 + 10, targets=["hook", "log"])
    second = store.open_alert(finding(start=T0 + 20), now=T0 + 20, targets=["hook", "log"])
    assert second != first  # a new alert row with the same fingerprint
    # The log proceeds on its own; the hook's re-opened firing waits behind the first alert's rows.
    due = store.due_deliveries(T0 + 50)
    assert [(d["alert_id"], d["target"], d["transition"]) for d in due] == [(first, "log", "resolved")]
    store.mark_delivered(due[0]["id"], now=T0 + 50)
    assert [(d["alert_id"], d["target"]) for d in store.due_deliveries(T0 + 50)] == [(second, "log")]
    assert store.next_delivery_due() == T0 + 20  # the log's second firing
    heard = []
    for now in (T0 + 100, T0 + 101, T0 + 102):
        for d in store.due_deliveries(now):
            if d["target"] == "hook":
                heard.append(d["transition"])
            store.mark_delivered(d["id"], now=now)
    assert heard == ["firing", "resolved", "firing"]  # the hook's last word: firing, as the alert is
    assert store.due_deliveries(T0 + 1e6) == []


def test_due_deliveries_skip_ids_and_targets(store: Store) -> None:
    store.open_alert(finding(), now=T0, targets=["a", "b"])
    store.open_alert(finding(gpu=5), now=T0 + 1, targets=["a", "b"])
    due = store.due_deliveries(T0 + 1)
    assert len(due) == 4
    skipped = store.due_deliveries(T0 + 1, skip_ids={due[0]["id"]}, skip_targets={"b"})
    assert [(d["alert_id"], d["target"]) for d in skipped] == [(due[2]["alert_id"], "a")]
    assert store.next_delivery_due(skip_targets={"a", "b"}) is None
    assert store.next_delivery_due(skip_ids={due[0]["id"]}) == T0


# -- retention --------------------------------------------------------------------------------


def test_purge_deletes_old_rows_in_bounded_batches(store: Store) -> None:
    old = [
        batch(
            seq,
            t=T0 + seq,
            gpu_samples=[gpu_sample(T0 + seq)],
            events=[Event(t=T0 + seq, node="n01", kind="xid", xid=13)],
        )
        for seq in range(1, 26)
    ]
    new = [batch(seq, t=T0 + 1000 + seq, gpu_samples=[gpu_sample(T0 + 1000 + seq)]) for seq in range(26, 31)]
    store.ingest(old + new)
    store.open_alert(finding(), now=T0, targets=["hook"])  # alerts are not retention data

    deletes: list[tuple[str, int]] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("DELETE"):
            deletes.append((statement.split()[2], cursor.rowcount))

    event.listen(store._engine, "after_cursor_execute", record)
    # Events and batches (with their samples: a batch never compacted past retention goes whole).
    assert store.purge(older_than=T0 + 500, batch_rows=4) == 25 + 25
    event.remove(store._engine, "after_cursor_execute", record)

    assert all(rowcount <= 4 for _, rowcount in deletes)
    # 25 rows in chunks of 4: six full DELETEs and a last one of 1.
    assert [n for table, n in deletes if table == "events"] == [4, 4, 4, 4, 4, 4, 1]
    assert len(store.gpu_samples_since(0)) == 5
    assert store.count_rows("events") == 0
    assert store.count_rows("batches") == 5
    assert store.count_rows("alerts") == 1 and store.count_rows("deliveries") == 1
    assert [s.t for s in store.gpu_samples_since(0)] == [T0 + 1000 + s for s in range(26, 31)]
    assert store.purge(older_than=T0 + 500) == 0
    with pytest.raises(ValueError):
        store.purge(older_than=T0, batch_rows=0)


# -- failures ---------------------------------------------------------------------------------


def _break_next_sample_insert(store: Store, database) -> None:
    """Make the next write fail the way production does: SQLite disk full, PostgreSQL lost."""
    if database.kind == "sqlite":
        with store._engine.connect() as conn:
            pages = conn.exec_driver_sql("PRAGMA page_count").scalar()

        # max_page_count is per connection: set it on every new one, then drop the old ones.
        def cap_pages(dbapi_connection, _record):
            dbapi_connection.execute(f"PRAGMA max_page_count = {pages + 2}")

        event.listen(store._engine, "connect", cap_pages)
        store._engine.dispose()
        return

    def kill_own_backend(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("INSERT INTO batches"):
            event.remove(store._engine, "before_cursor_execute", kill_own_backend)
            pid = conn.connection.dbapi_connection.info.backend_pid
            with database.admin.connect() as admin:
                admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

    event.listen(store._engine, "before_cursor_execute", kill_own_backend)


def test_failed_write_raises_store_error_and_store_keeps_reading(store: Store, database) -> None:
    store.ingest([batch(1)])
    store.open_alert(finding(), now=T0, targets=["hook"])
    _break_next_sample_insert(store, database)

    # Values that do not compress: bodies are stored under zstd, and this one must not fit.
    noise = random.Random(7)
    big = batch(
        2,
        gpu_samples=[
            GpuSample(
                t=T0 + i * 1e-3,
                node="n01",
                gpu=i % 8,
                metrics={"power_watts": noise.random(), "energy_joules": noise.random(), "fan_percent": noise.random()},
            )
            for i in range(3000)
        ],
    )
    with pytest.raises(StoreError) as info:
        store.ingest([big])
    message = str(info.value)
    assert "ingest" in message and store.url_for_log in message
    if database.kind == "sqlite":
        assert "full" in message

    # Nothing of the failed batch was kept, and reads keep working.
    assert store.last_seq("n01", "boot-a") == 1
    assert store.count_rows("batches") == 1
    assert len(store.gpu_samples_since(0)) == 2
    assert len(store.gpu_samples_since(T0)) == 2
    assert len(store.firing_alerts()) == 1
    assert len(store.due_deliveries(T0)) == 1


@pytest.mark.parametrize(
    "url, shown, hidden",
    [
        ("sqlite:////nonexistent-dir/fleetwatch/fw.db", "nonexistent-dir", None),
        ("postgresql+psycopg://fw:s3cret@127.0.0.1:1/fleet", "127.0.0.1:1", "s3cret"),
        ("postgresql://fw:s3cret@127.0.0.1:1/fleet", "127.0.0.1:1", "s3cret"),
        ("mysql://fw:s3cret@localhost/fleet", "mysql", "s3cret"),
        ("not a url", "not a url", None),
    ],
)
def test_unusable_database_raises_store_error_naming_it(url: str, shown: str, hidden: str | None) -> None:
    with pytest.raises(StoreError) as info:
        Store(url)
    assert shown in str(info.value)
    if hidden:
        assert hidden not in str(info.value)


# -- the board an alert is about (issue 12) -------------------------------------------------------


def test_alerts_name_their_board_from_the_inventory_or_their_finding(store: Store) -> None:
    board = {"index": 3, "uuid": "GPU-3", "name": "NVIDIA H100 80GB HBM3", "pci_bus_id": "0000:9b:00.0"}
    store.upsert_node("n01", "boot-a", "0.4.0", True, 1.0, [{**board, "serial": "1654922012345"}], seen_at=T0)
    store.open_alert(finding(), now=T0 + 1, targets=[])
    # A kernel-log XID whose index the agent could not tell: the finding's own bus id and UUID stay.
    unknown = finding(gpu=None, key="94@0000:cb:00.0", uuid="GPU-cb", pci_bus_id="0000:cb:00.0")
    store.open_alert(unknown, now=T0 + 2, targets=[])
    named = {a["gpu"]: a for a in store.firing_alerts()}
    assert {k: named[3][k] for k in ("uuid", "pci_bus_id", "serial", "model")} == {
        "uuid": "GPU-3",
        "pci_bus_id": "0000:9b:00.0",
        "serial": "1654922012345",
        "model": "NVIDIA H100 80GB HBM3",
    }
    assert (named[None]["uuid"], named[None]["pci_bus_id"], named[None]["serial"]) == ("GPU-cb", "0000:cb:00.0", None)
