"""The agent's dense batch form (Batch.gpu_columns and Batch.hosts, several sampling cycles in one):
checked as whole arrays at the collector's edge, stored and compacted into the same blocks and
records as the same samples sent one GpuSample at a time (the 0.1.0 form)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from sqlalchemy import insert, select

from fleetwatch import limits
from fleetwatch.collector.server import reporting_interval_seconds
from fleetwatch.collector.storage import schema
from fleetwatch.collector.storage.blocks import blocks_from_bodies, gpu_samples, host_samples
from fleetwatch.collector.storage.compaction import compact
from fleetwatch.collector.storage.store import Store
from fleetwatch.collector.validate import ClockWindow, InvalidMessage, check_batch, check_hello
from fleetwatch.detectors.model import NodeState
from fleetwatch.detectors.node_silent import NodeSilentDetector
from fleetwatch.v1 import telemetry_pb2 as pb
from fleetwatch.wire import GPU_FIELD_NUMBERS, GPU_FIELDS, fill_metrics, gpu_columns_message

NODE = "n01"
BOOT = "boot-1"
T0 = 1_700_000_000.0
U64_NOT_AVAILABLE = 2**64 - 1


def samples(cycles: int = 5, gpus: int = 2) -> list[dict]:
    """Sample dicts as the agent's sampler makes them: GPU 1 lacks fan_percent, jobs change mid-way."""
    out = []
    for c in range(cycles):
        for g in range(gpus):
            metrics: dict[str, float | int | None] = {
                "power_watts": 300.0 + c + 0.125 * g,
                "temp_gpu_celsius": 60.0 + g,
                "sm_clock_mhz": 1980.0 - 15 * c,
                "ecc_sbe_volatile_total": c // 2,
                "clock_event_reasons": 4 if c == 3 else 0,
                "fan_percent": None if g == 1 else 30.0,
            }
            out.append(
                {
                    "t": T0 + c,
                    "gpu": g,
                    "uuid": f"GPU-{g}",
                    "job": "train-a" if c < 3 else "train-b",
                    "rank": g if c < 3 else None,
                    "metrics": metrics,
                }
            )
    return out


def dense_batch(seq: int, rows: list[dict], hosts: int = 5) -> pb.Batch:
    batch = pb.Batch(seq=seq, t=T0 + hosts, gpu_columns=gpu_columns_message(rows))
    for c in range(hosts):
        host = batch.hosts.add(t=T0 + c)
        fill_metrics(host.metrics, {"cpu_percent": 12.5 + c, "load1": 3.25})
    return batch


def per_sample_batches(rows: list[dict], hosts: int = 5) -> list[pb.Batch]:
    """The same samples in the 0.1.0 form: one batch per cycle."""
    batches = []
    for c in range(hosts):
        batch = pb.Batch(seq=c + 1, t=T0 + c)
        for row in rows:
            if row["t"] != T0 + c:
                continue
            sample = batch.gpus.add(gpu=row["gpu"], t=row["t"], uuid=row["uuid"], job=row["job"])
            if row["rank"] is not None:
                sample.rank = row["rank"]
            fill_metrics(sample.metrics, row["metrics"])
        batch.host.t = T0 + c
        fill_metrics(batch.host.metrics, {"cpu_percent": 12.5 + c, "load1": 3.25})
        batches.append(batch)
    return batches


def check(batch: pb.Batch, dropped: Counter[str] | None = None):
    return check_batch(NODE, BOOT, batch, received_at=T0 + 10, window=ClockWindow(), dropped=dropped)


def test_dense_and_per_sample_forms_store_the_same_records() -> None:
    rows = samples()
    dense = blocks_from_bodies(NODE, [dense_batch(1, rows).SerializeToString()])
    per_sample = blocks_from_bodies(NODE, [b.SerializeToString() for b in per_sample_batches(rows)])
    assert gpu_samples(NODE, dense["gpu"]) == gpu_samples(NODE, per_sample["gpu"])
    assert host_samples(NODE, dense["host"]) == host_samples(NODE, per_sample["host"])
    got = gpu_samples(NODE, dense["gpu"])
    assert len(got) == 10
    # Absent stays absent (never 0 or NaN), integers stay integers, labels follow the job change.
    gpu1 = [s for s in got if s.gpu == 1]
    assert all("fan_percent" not in s.metrics for s in gpu1)
    assert gpu1[4].metrics["ecc_sbe_volatile_total"] == 2 and isinstance(gpu1[4].metrics["ecc_sbe_volatile_total"], int)
    assert [(s.job, s.rank) for s in gpu1] == [("train-a", 1)] * 3 + [("train-b", None)] * 2


def test_checked_rows_feed_detection_with_every_value_in_place() -> None:
    rows = samples()
    item = check(dense_batch(7, rows))
    assert item.gpu_rows is not None and not item.gpu_samples
    assert item.gpu_sample_count == 10 and len(item.host_samples) == 5
    values = item.gpu_rows.values
    assert values.shape == (10, len(GPU_FIELDS))
    power = GPU_FIELDS.index("power_watts")
    assert values[:, power].tolist() == [r["metrics"]["power_watts"] for r in rows]
    assert math.isnan(values[1, GPU_FIELDS.index("fan_percent")])  # GPU 1 has no fan reading
    labels = [item.gpu_rows.labels[i] for i in item.gpu_rows.label.tolist()]
    assert labels[0] == ("GPU-0", "train-a", 0) and labels[-1] == ("GPU-1", "train-b", None)
    assert item.gpu_rows.newest_rows() == {0: 8, 1: 9}


def test_values_that_cannot_be_measurements_are_dropped_and_counted() -> None:
    rows = samples(cycles=1)
    rows[0]["metrics"]["ecc_sbe_volatile_total"] = float(U64_NOT_AVAILABLE)  # NVML's "not available"
    rows[1]["metrics"]["clock_event_reasons"] = -1  # a count cannot be negative
    rows[1]["metrics"]["temp_gpu_celsius"] = math.inf
    rows[0]["metrics"]["power_watts"] = math.nan  # the dense form's "absent": not counted
    dropped: Counter[str] = Counter()
    item = check(dense_batch(1, rows, hosts=1), dropped)
    assert dropped == Counter({"ecc_sbe_volatile_total": 1, "clock_event_reasons": 1, "temp_gpu_celsius": 1})
    values = item.gpu_rows.values
    for row, name in ((0, "ecc_sbe_volatile_total"), (1, "clock_event_reasons"), (1, "temp_gpu_celsius")):
        assert math.isnan(values[row, GPU_FIELDS.index(name)])
    assert values[1, GPU_FIELDS.index("power_watts")] == 300.125


def _broken(change) -> pb.Batch:
    batch = dense_batch(1, samples(cycles=2), hosts=2)
    change(batch)
    return batch


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        (lambda b: b.gpu_columns.gpu.pop(), "gpu_columns.gpu", "3 entries for 4 rows"),
        (lambda b: b.gpu_columns.label.append(0), "gpu_columns.label", "5 entries for 4 rows"),
        (lambda b: b.gpu_columns.fields.__setitem__(0, 999), "gpu_columns.fields[0]", "not a GpuMetrics field"),
        (
            lambda b: b.gpu_columns.fields.__setitem__(1, b.gpu_columns.fields[0]),
            "gpu_columns.fields",
            "more than once",
        ),
        (lambda b: setattr(b.gpu_columns, "values", b.gpu_columns.values[:-8]), "gpu_columns.values", "bytes, not"),
        (lambda b: b.gpu_columns.t.__setitem__(2, T0 + 10 + 3600), "gpu_columns.t[2]", "ahead of the collector"),
        (lambda b: b.gpu_columns.t.__setitem__(1, math.nan), "gpu_columns.t[1]", "not a time"),
        (lambda b: b.gpu_columns.gpu.__setitem__(3, 4_000_000_000), "gpu_columns.gpu[3]", "not a GPU index"),
        (lambda b: b.gpu_columns.label.__setitem__(0, 9), "gpu_columns.label[0]", "names no entry"),
        (lambda b: setattr(b.gpu_columns.labels[0], "job", "a\x00b"), "gpu_columns.labels[0].job", ""),
        (lambda b: b.gpus.add(gpu=0, t=T0), "gpu_columns", "not both"),
        (lambda b: setattr(b.host, "t", T0), "hosts", "not both"),
    ],
)
def test_a_malformed_dense_batch_is_refused_naming_the_field(change, field: str, problem: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        check(_broken(change))
    assert caught.value.field == field
    assert problem in caught.value.problem


def test_checks_remembered_from_earlier_batches_still_refuse_a_bad_one() -> None:
    # Field lists and labels are checked once per distinct value and remembered: an agent sends
    # the same ones in every batch. A batch that differs is checked in full.
    for _ in range(3):
        check(_broken(lambda b: None))
    with pytest.raises(InvalidMessage) as caught:
        check(_broken(lambda b: setattr(b.gpu_columns.labels[1], "uuid", "G" * (limits.GPU_UUID_MAX_CHARS + 1))))
    assert caught.value.field == "gpu_columns.labels[1].uuid"
    with pytest.raises(InvalidMessage) as caught:
        check(_broken(lambda b: b.gpu_columns.fields.__setitem__(2, b.gpu_columns.fields[0])))
    assert caught.value.field == "gpu_columns.fields"


def test_dense_batches_are_bounded_in_rows_and_host_samples() -> None:
    too_many = [{"t": T0, "gpu": 0, "metrics": {"power_watts": 1.0}} for _ in range(limits.MAX_GPU_ROWS_PER_BATCH + 1)]
    with pytest.raises(InvalidMessage, match=r"gpu_columns\.t"):
        check(pb.Batch(seq=1, t=T0, gpu_columns=gpu_columns_message(too_many)))
    hosts = pb.Batch(seq=1, t=T0, hosts=[pb.HostSample(t=T0)] * (limits.MAX_CYCLES_PER_BATCH + 1))
    with pytest.raises(InvalidMessage, match="hosts"):
        check(hosts)


def test_the_wire_arrays_are_little_endian_float64_rows_by_fields() -> None:
    rows = samples(cycles=1, gpus=1)
    msg = gpu_columns_message(rows)
    names = [name for name, n in sorted(GPU_FIELD_NUMBERS.items(), key=lambda kv: kv[1]) if n in msg.fields]
    sent = np.frombuffer(msg.values, dtype="<f8")
    assert sent.tolist() == [float(rows[0]["metrics"][name]) for name in names]
    assert list(msg.t) == [T0] and list(msg.gpu) == [0] and list(msg.label) == [0]


def test_bodies_wait_for_compaction_compressed_and_older_raw_ones_still_compact(store: Store) -> None:
    """A dense body is kept as a zstd frame until compaction; one an earlier build kept as the bare
    message is read the same way."""
    rows = samples()
    batch = dense_batch(1, rows)
    item = check(batch)
    assert store.ingest([item]) == [True]
    legacy = dense_batch(2, [dict(r, t=r["t"] + 5) for r in rows])
    with store.writing("a body as an earlier build stored it") as conn:
        conn.execute(
            insert(schema.batches),
            [{"node": NODE, "boot_id": BOOT, "seq": 2, "received_at": T0 + 11, "body": legacy.SerializeToString()}],
        )
    with store.reading("bodies") as conn:
        bodies = dict(conn.execute(select(schema.batches.c.seq, schema.batches.c.body)).all())
    assert bodies[1][:4] == b"\x28\xb5\x2f\xfd" and len(bodies[1]) < len(batch.SerializeToString()) / 2
    result = compact(store, now=T0 + 3600, after_seconds=60)
    assert result.batches == 2 and result.undecodable == 0
    stored = store.gpu_samples_since(0)
    assert len(stored) == 20 and stored[-1].t == T0 + 9


def test_a_node_batching_five_seconds_may_be_quiet_for_three_batches_not_three_samples() -> None:
    hello = pb.Hello(node=NODE, boot_id=BOOT, sampling_interval_seconds=1.0, batch_interval_seconds=5.0)
    assert check_hello(hello) == []
    assert reporting_interval_seconds(hello) == 5.0
    assert reporting_interval_seconds(pb.Hello(sampling_interval_seconds=1.0)) == 1.0  # a 0.1.0 agent
    assert reporting_interval_seconds(hello, sampling_override_seconds=10.0) == 10.0
    state = NodeState(node=NODE, last_seen=T0, sampling_interval_seconds=reporting_interval_seconds(hello))
    assert NodeSilentDetector().silent_after_seconds(state) == 15.0
    for bad in (limits.BATCH_INTERVAL_MAX_SECONDS + 1, -1.0, math.nan):
        hello.batch_interval_seconds = bad
        with pytest.raises(InvalidMessage, match="batch_interval_seconds"):
            check_hello(hello)
