"""Agent batches into per-node blocks and back (fleetwatch.collector.storage.blocks): what goes in as a
serialized pb.Batch must come out of gpu_samples / host_samples / ib_ports as the same records,
through encode_block / decode_block, with values that cannot be measurements absent (never 0)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetwatch import limits
from fleetwatch.collector.storage.blocks import (
    FIELD_NAMES,
    FIELD_NUMBERS,
    NodeBlocks,
    blocks_from_bodies,
    gpu_samples,
    host_samples,
    ib_ports,
    series_columns,
)
from fleetwatch.collector.storage.chunks import (
    LAST,
    MEAN,
    RAW,
    SERIES_STRIDE,
    STATS,
    Block,
    column_id,
    decode_block,
    encode_block,
    rollup,
)
from fleetwatch.records import GpuSample, HostSample
from fleetwatch.v1 import telemetry_pb2 as pb
from fleetwatch.wire import GPU_FIELDS, HOST_FIELDS, IB_FIELDS, INTEGER_FIELDS, fill_metrics

NODE = "rack1-n07"
T0 = 1_700_000_000.0
STEP = 10.0
STEPS = 12
U32_ALL_ONES = 2**32 - 1
U64_ALL_ONES = 2**64 - 1
INT64_MAX = 2**63 - 1

# -- building batches -----------------------------------------------------------------------------


@dataclass
class Gpu:
    gpu: int
    metrics: dict[str, Any]
    uuid: str = ""
    job: str = ""
    rank: int | None = None


@dataclass
class Port:
    device: str
    port: int
    state: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Step:
    t: float
    gpus: list[Gpu] = field(default_factory=list)
    host: dict[str, Any] | None = None  # host metrics; None: no HostMetrics
    ports: list[Port] = field(default_factory=list)
    seq: int = 1


def batch_of(step: Step) -> pb.Batch:
    batch = pb.Batch(seq=step.seq, t=step.t)
    for g in step.gpus:
        sample = batch.gpus.add(gpu=g.gpu, t=step.t, uuid=g.uuid, job=g.job)
        if g.rank is not None:
            sample.rank = g.rank
        fill_metrics(sample.metrics, g.metrics)
    if step.host is not None or step.ports:
        batch.host.t = step.t
        if step.host is not None:
            fill_metrics(batch.host.metrics, step.host)
        for p in step.ports:
            port = batch.host.ib_ports.add(device=p.device, port=p.port, ib_state=p.state)
            fill_metrics(port, p.metrics)
    return batch


def bodies_of(steps: list[Step]) -> list[bytes]:
    return [batch_of(s).SerializeToString() for s in steps]


def storable(metrics: dict[str, Any]) -> dict[str, float | int]:
    """What a reader must get back: limits.storable_metric's verdict per field (None: absent)."""
    out: dict[str, float | int] = {}
    for name, value in metrics.items():
        if value is None:
            continue
        kept = limits.storable_metric(name, value)
        if kept is not None:
            out[name] = kept
    return out


def expected_gpu_samples(steps: list[Step], node: str = NODE) -> list[GpuSample]:
    out = []
    for s in steps:
        for g in s.gpus:
            metrics = storable(g.metrics)
            if metrics:
                out.append(GpuSample(s.t, node, g.gpu, metrics, g.uuid or None, g.job or None, g.rank))
    return sorted(out, key=lambda x: (x.t, x.gpu))


def expected_host_samples(steps: list[Step], node: str = NODE) -> list[HostSample]:
    out = [HostSample(s.t, node, storable(s.host)) for s in steps if s.host is not None and storable(s.host)]
    return sorted(out, key=lambda x: x.t)


def expected_ib_ports(steps: list[Step]) -> list[dict[str, Any]]:
    out = []
    for s in steps:
        for p in s.ports:
            entry: dict[str, Any] = {"t": s.t, "device": p.device, "port": p.port}
            if p.state:
                entry["ib_state"] = p.state
            entry.update(storable(p.metrics))
            out.append(entry)
    return sorted(out, key=lambda e: (e["t"], e["device"], e["port"]))


def assert_types(metrics: Any) -> None:
    for name, value in metrics.items():
        if name in INTEGER_FIELDS:
            assert type(value) is int, f"{name}: {value!r} should be an int"
        else:
            assert type(value) is float, f"{name}: {value!r} should be a float"


def stored(blocks: dict[str, Block]) -> dict[str, Block]:
    """The blocks as a reader gets them back from the database."""
    return {kind: decode_block(encode_block(block)) for kind, block in blocks.items()}


# -- the scenario: a 4-GPU node with host metrics and three InfiniBand ports ----------------------


def uuid_of(gpu: int) -> str:
    return f"GPU-{gpu:08x}-1111-2222-3333-444455556666"


def gpu_metrics(g: int, i: int) -> dict[str, Any]:
    m: dict[str, Any] = {
        "temp_gpu_celsius": 40.0 + g + (i % 3),
        "power_watts": (250_123 + g * 10_000 + i * 7) / 1000,  # W from mW: three decimals
        "energy_joules": (10**10 + i * 2_500_123) / 1000,  # J from mJ, increasing
        "gpu_util_percent": (0.1 + 0.2) * i + g / 3,  # not a decimal: kept to the bit
        "mem_used_bytes": 40 * 2**30 + i * 4096,
        "mem_total_bytes": 80 * 2**30,
        "clock_event_reasons": 4 if i in (3, 4) else 0,
        "pcie_link_gen": 4,
        "pcie_link_width": 16,
        "remap_pending": 0,  # a zero is a value, not an absence
        "ecc_dbe_volatile_total": 1 if (g == 2 and i >= 9) else 0,
        "nvlink_crc_flit_errors_total": 2**53 - 100 + i if g == 0 else i,  # exact up to 2**53
    }
    if g in (0, 1):  # only two GPUs report fan speed
        m["fan_percent"] = 30.0 + i
    if i == 4:  # values that are not measurements
        if g == 0:
            m["temp_gpu_celsius"] = math.nan
            m["power_watts"] = math.inf
        if g == 1:
            m["ecc_dbe_volatile_total"] = U64_ALL_ONES  # NVML's "not available"
            m["fan_percent"] = -math.inf
        if g == 2:
            m["pcie_link_width"] = U32_ALL_ONES  # all ones of a uint32 field: not available
        if g == 3:
            m["gpu_util_percent"] = math.nan
    return m


def scenario() -> list[Step]:
    steps = []
    for i in range(STEPS):
        t = T0 + i * STEP + (0.125 if i % 2 else 0.0)
        gpus = [
            Gpu(0, gpu_metrics(0, i), uuid_of(0), "job-a", 0),  # rank 0 is a rank
            Gpu(1, gpu_metrics(1, i), uuid_of(1), "job-a" if i < 6 else "job-b", 1 if i < 6 else 3),
            Gpu(2, gpu_metrics(2, i), uuid_of(2), "job-a", None),  # a rank that is absent
        ]
        if i < 8:  # GPU 3 stops reporting
            gpus.append(Gpu(3, gpu_metrics(3, i), uuid_of(3)))  # no job, no rank
        host: dict[str, Any] | None = {
            "cpu_percent": 12.5 + i / 7,
            "load1": (350 + i) / 100,
            "mem_used_bytes": 300 * 2**30 + i,
            "mem_total_bytes": 2048 * 2**30,
            "disk_used_bytes": 10**12,
            "net_rx_bytes_total": 10**9 + i * 123_456,
            "net_tx_bytes_total": 10**9 + i * 654_321,
        }
        if i == 4:
            host["cpu_percent"] = math.nan
            host["net_rx_bytes_total"] = U64_ALL_ONES
        if i == 3:
            host = None  # a batch with InfiniBand ports but no host metrics
        state = "DOWN" if 5 <= i < 8 else "ACTIVE"
        ports = [
            Port(
                "mlx5_0",
                1,
                state,
                {
                    "ib_rate_gbps": 400.0 if state == "ACTIVE" else 0.0,
                    "ib_link_downed_total": 0 if i < 5 else 1,
                    "ib_symbol_error_total": U64_ALL_ONES if i == 2 else 7,
                    "ib_rcv_errors_total": i,
                    "ib_link_error_recovery_total": 0,
                },
            ),
            Port("mlx5_1", 1, "INIT" if i < 2 else "ACTIVE"),  # a state, no counters
            Port("mlx5_0", 2, "", {"ib_rate_gbps": 200.0, "ib_rcv_errors_total": 2 * i}),  # counters, no state
        ]
        steps.append(Step(t, gpus, host, ports, seq=i + 1))
    return steps


@pytest.fixture(scope="module")
def steps() -> list[Step]:
    return scenario()


@pytest.fixture(scope="module")
def made(steps: list[Step]) -> dict[str, Block]:
    return blocks_from_bodies(NODE, bodies_of(steps))


@pytest.fixture(scope="module", params=["built", "stored"])
def blocks(request: pytest.FixtureRequest, made: dict[str, Block]) -> dict[str, Block]:
    return made if request.param == "built" else stored(made)


# -- the scenario's records -----------------------------------------------------------------------


def test_scenario_makes_one_block_per_kind(made: dict[str, Block]) -> None:
    assert set(made) == {"gpu", "host", "ib"}
    assert len(made["gpu"]) == STEPS
    assert len(made["host"]) == STEPS - 1  # step 3 has no host metrics
    assert len(made["ib"]) == STEPS
    assert made["ib"].text["ports"] == [["mlx5_0", 1], ["mlx5_1", 1], ["mlx5_0", 2]]


def test_gpu_samples_round_trip(blocks: dict[str, Block], steps: list[Step]) -> None:
    got = gpu_samples(NODE, blocks["gpu"])
    want = expected_gpu_samples(steps)
    assert len(got) == 3 * STEPS + 8
    assert got == want
    for sample in got:
        assert_types(sample.metrics)


def test_host_samples_round_trip(blocks: dict[str, Block], steps: list[Step]) -> None:
    got = host_samples(NODE, blocks["host"])
    assert got == expected_host_samples(steps)
    assert len(got) == STEPS - 1
    for sample in got:
        assert_types(sample.metrics)


def test_ib_ports_round_trip(blocks: dict[str, Block], steps: list[Step]) -> None:
    got = ib_ports(blocks["ib"])
    assert got == expected_ib_ports(steps)
    for entry in got:
        assert type(entry["t"]) is float
        assert type(entry["port"]) is int
        assert_types({k: v for k, v in entry.items() if k not in ("t", "device", "port", "ib_state")})


def test_values_come_back_to_the_bit(blocks: dict[str, Block], steps: list[Step]) -> None:
    got = {(s.t, s.gpu): s for s in gpu_samples(NODE, blocks["gpu"])}
    for step in steps:
        for g in step.gpus:
            sample = got[(step.t, g.gpu)]
            for name in ("gpu_util_percent", "power_watts", "energy_joules"):
                if name in sample.metrics:
                    assert sample.metrics[name].hex() == float(g.metrics[name]).hex()
            assert sample.metrics["nvlink_crc_flit_errors_total"] == g.metrics["nvlink_crc_flit_errors_total"]
            assert sample.t == step.t


def test_labels_per_gpu(blocks: dict[str, Block]) -> None:
    samples = gpu_samples(NODE, blocks["gpu"])
    by_gpu: dict[int, list[GpuSample]] = {}
    for s in samples:
        by_gpu.setdefault(s.gpu, []).append(s)
    assert {(s.uuid, s.job, s.rank) for s in by_gpu[0]} == {(uuid_of(0), "job-a", 0)}
    # The job (and rank) that changes mid-way: each sample keeps the one it was sampled under.
    assert [(s.job, s.rank) for s in by_gpu[1]] == [("job-a", 1)] * 6 + [("job-b", 3)] * 6
    assert {(s.uuid, s.job, s.rank) for s in by_gpu[2]} == {(uuid_of(2), "job-a", None)}
    assert {(s.uuid, s.job, s.rank) for s in by_gpu[3]} == {(uuid_of(3), None, None)}


def test_gpu_that_stops_reporting(blocks: dict[str, Block]) -> None:
    samples = [s for s in gpu_samples(NODE, blocks["gpu"]) if s.gpu == 3]
    assert len(samples) == 8
    assert max(s.t for s in samples) < T0 + 8 * STEP


def test_non_measurements_are_absent_never_zero(blocks: dict[str, Block]) -> None:
    t4 = T0 + 4 * STEP
    at4 = {s.gpu: s.metrics for s in gpu_samples(NODE, blocks["gpu"]) if s.t == t4}
    assert "temp_gpu_celsius" not in at4[0] and "power_watts" not in at4[0]
    assert "ecc_dbe_volatile_total" not in at4[1] and "fan_percent" not in at4[1]
    assert "pcie_link_width" not in at4[2]
    assert "gpu_util_percent" not in at4[3]
    # The rest of those samples is there, zeros included.
    for metrics in at4.values():
        assert metrics["remap_pending"] == 0
        assert metrics["mem_total_bytes"] == 80 * 2**30
    assert at4[0]["fan_percent"] == 34.0
    assert at4[2]["pcie_link_gen"] == 4
    # Fields a GPU never reports are absent in every sample.
    assert all("fan_percent" not in s.metrics for s in gpu_samples(NODE, blocks["gpu"]) if s.gpu in (2, 3))
    host = {s.t: s.metrics for s in host_samples(NODE, blocks["host"])}
    assert "cpu_percent" not in host[t4] and "net_rx_bytes_total" not in host[t4]
    assert host[t4]["load1"] == 3.54
    ports = {(p["t"], p["device"], p["port"]): p for p in ib_ports(blocks["ib"])}
    assert "ib_symbol_error_total" not in ports[(T0 + 2 * STEP, "mlx5_0", 1)]
    assert ports[(T0 + 1 * STEP + 0.125, "mlx5_0", 1)]["ib_symbol_error_total"] == 7


def test_ib_state_changes_and_state_only_ports(blocks: dict[str, Block]) -> None:
    ports = ib_ports(blocks["ib"])
    port1 = [p for p in ports if (p["device"], p["port"]) == ("mlx5_0", 1)]
    assert [p["ib_state"] for p in port1] == ["ACTIVE"] * 5 + ["DOWN"] * 3 + ["ACTIVE"] * 4
    assert [p["ib_link_downed_total"] for p in port1] == [0] * 5 + [1] * 7
    state_only = [p for p in ports if (p["device"], p["port"]) == ("mlx5_1", 1)]
    assert len(state_only) == STEPS
    assert [p["ib_state"] for p in state_only] == ["INIT"] * 2 + ["ACTIVE"] * 10
    assert all(set(p) == {"t", "device", "port", "ib_state"} for p in state_only)
    no_state = [p for p in ports if (p["device"], p["port"]) == ("mlx5_0", 2)]
    assert len(no_state) == STEPS
    assert all("ib_state" not in p for p in no_state)
    assert [p["ib_rcv_errors_total"] for p in no_state] == [2 * i for i in range(STEPS)]


@pytest.mark.parametrize(
    "since",
    [-math.inf, 0.0, T0, T0 + 0.001, T0 + 5 * STEP + 0.125, T0 + 5 * STEP + 0.2, T0 + 11 * STEP + 0.125, T0 + 1e6],
)
def test_since_filters_by_time(blocks: dict[str, Block], since: float) -> None:
    all_gpu = gpu_samples(NODE, blocks["gpu"])
    assert gpu_samples(NODE, blocks["gpu"], since) == [s for s in all_gpu if s.t >= since]
    all_host = host_samples(NODE, blocks["host"])
    assert host_samples(NODE, blocks["host"], since) == [s for s in all_host if s.t >= since]
    all_ib = ib_ports(blocks["ib"])
    assert ib_ports(blocks["ib"], since) == [p for p in all_ib if p["t"] >= since]


def test_since_keeps_labels_of_runs_that_started_earlier(blocks: dict[str, Block]) -> None:
    # GPU 1's job-b run starts at step 6: a reader starting at step 9 still sees job-b, and
    # GPU 0's run (started at step 0) still holds.
    since = T0 + 9 * STEP
    got = {s.gpu: s for s in gpu_samples(NODE, blocks["gpu"], since) if s.t == since + 0.125}
    assert got[1].job == "job-b" and got[1].rank == 3
    assert got[0].uuid == uuid_of(0) and got[0].rank == 0
    ports = [p for p in ib_ports(blocks["ib"], since) if p["device"] == "mlx5_1"]
    assert ports and all(p["ib_state"] == "ACTIVE" for p in ports)


def test_samples_are_oldest_first_then_by_gpu(blocks: dict[str, Block]) -> None:
    samples = gpu_samples(NODE, blocks["gpu"])
    assert [(s.t, s.gpu) for s in samples] == sorted((s.t, s.gpu) for s in samples)
    assert all(s.node == NODE for s in samples)


def test_batches_split_differently_give_the_same_records(steps: list[Step]) -> None:
    # GPUs of one time in two batches, host metrics in a third: the block is per node, not per batch.
    bodies = []
    for s in steps:
        bodies.append(batch_of(Step(s.t, s.gpus[:2])).SerializeToString())
        bodies.append(batch_of(Step(s.t, s.gpus[2:])).SerializeToString())
        bodies.append(batch_of(Step(s.t, [], s.host, s.ports)).SerializeToString())
    got = stored(blocks_from_bodies(NODE, bodies))
    assert gpu_samples(NODE, got["gpu"]) == expected_gpu_samples(steps)
    assert host_samples(NODE, got["host"]) == expected_host_samples(steps)
    assert ib_ports(got["ib"]) == expected_ib_ports(steps)


def test_node_blocks_add_batch_equals_add_body(steps: list[Step]) -> None:
    gathered = NodeBlocks(NODE)
    for s in steps:
        gathered.add_batch(batch_of(s))
    direct = gathered.blocks()
    via_bodies = blocks_from_bodies(NODE, bodies_of(steps))
    assert set(direct) == set(via_bodies)
    for kind in direct:
        assert encode_block(direct[kind]) == encode_block(via_bodies[kind])


# -- which blocks a node gets ---------------------------------------------------------------------


def test_no_bodies_no_blocks() -> None:
    assert blocks_from_bodies(NODE, []) == {}
    assert blocks_from_bodies(NODE, [pb.Batch(seq=1, t=T0).SerializeToString()]) == {}


def test_gpu_only_node_has_only_a_gpu_block() -> None:
    steps = [Step(T0 + i, [Gpu(0, {"temp_gpu_celsius": 50.0})]) for i in range(3)]
    assert set(blocks_from_bodies(NODE, bodies_of(steps))) == {"gpu"}


def test_host_without_metrics_or_ports_makes_no_block() -> None:
    batch = pb.Batch(seq=1, t=T0)
    batch.host.t = T0  # a HostSample with nothing in it
    assert blocks_from_bodies(NODE, [batch.SerializeToString()]) == {}


def test_state_only_ports_make_an_ib_block_that_survives_storage() -> None:
    steps = [Step(T0 + i, ports=[Port("mlx5_0", 1, "DOWN" if i == 1 else "ACTIVE")]) for i in range(3)]
    made = blocks_from_bodies(NODE, bodies_of(steps))
    assert set(made) == {"ib"}
    assert len(made["ib"].ids) == 1  # the state's column
    for block in (made["ib"], decode_block(encode_block(made["ib"]))):
        assert ib_ports(block) == [
            {"t": T0, "device": "mlx5_0", "port": 1, "ib_state": "ACTIVE"},
            {"t": T0 + 1, "device": "mlx5_0", "port": 1, "ib_state": "DOWN"},
            {"t": T0 + 2, "device": "mlx5_0", "port": 1, "ib_state": "ACTIVE"},
        ]


def test_only_non_measurements_store_no_columns() -> None:
    steps = [Step(T0, [Gpu(0, {"temp_gpu_celsius": 50.0}), Gpu(1, {"temp_gpu_celsius": math.nan})])]
    block = blocks_from_bodies(NODE, bodies_of(steps))["gpu"]
    assert block.ids.tolist() == [column_id(FIELD_NUMBERS["gpu"]["temp_gpu_celsius"], RAW, 0)]
    assert [s.gpu for s in gpu_samples(NODE, block)] == [0]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("temp_gpu_celsius", math.nan),
        ("temp_gpu_celsius", math.inf),
        ("power_watts", -math.inf),
        ("ecc_sbe_volatile_total", U64_ALL_ONES),
        ("ecc_sbe_volatile_total", U64_ALL_ONES - 1),
        ("clock_event_reasons", U64_ALL_ONES),
        ("mem_used_bytes", 2**63 + 2**20),
        ("pcie_link_gen", U32_ALL_ONES),
        ("nvlink_links_up", U32_ALL_ONES),
        ("remap_failure", U32_ALL_ONES),
    ],
)
def test_each_non_measurement_is_absent(name: str, value: Any) -> None:
    steps = [
        Step(T0, [Gpu(0, {name: value, "fan_percent": 40.0})]),
        Step(T0 + 1, [Gpu(0, {name: 0, "fan_percent": 41.0})]),
    ]
    got = gpu_samples(NODE, stored(blocks_from_bodies(NODE, bodies_of(steps)))["gpu"])
    assert [s.metrics for s in got] == [{"fan_percent": 40.0}, {name: 0, "fan_percent": 41.0}]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("pcie_link_gen", U32_ALL_ONES - 1),  # the largest storable uint32 value
        ("ecc_sbe_volatile_total", 2**53),
        ("mem_used_bytes", 0),
        ("temp_gpu_celsius", -40.0),  # a double may be negative
        ("power_watts", 5e-324),
        ("gpu_util_percent", 1.7976931348623157e308),
    ],
)
def test_extreme_measurements_are_kept(name: str, value: Any) -> None:
    steps = [Step(T0, [Gpu(0, {name: value})])]
    (sample,) = gpu_samples(NODE, stored(blocks_from_bodies(NODE, bodies_of(steps)))["gpu"])
    assert sample.metrics == {name: value}
    assert_types(sample.metrics)


def test_host_and_ib_non_measurements_are_absent() -> None:
    steps = [
        Step(
            T0,
            host={"load1": math.nan, "disk_used_bytes": U64_ALL_ONES, "cpu_percent": 3.0},
            ports=[
                Port(
                    "mlx5_0",
                    1,
                    "ACTIVE",
                    {"ib_rate_gbps": math.inf, "ib_rcv_errors_total": U64_ALL_ONES, "ib_link_downed_total": 2},
                )
            ],
        )
    ]
    got = stored(blocks_from_bodies(NODE, bodies_of(steps)))
    assert [s.metrics for s in host_samples(NODE, got["host"])] == [{"cpu_percent": 3.0}]
    assert ib_ports(got["ib"]) == [
        {"t": T0, "device": "mlx5_0", "port": 1, "ib_state": "ACTIVE", "ib_link_downed_total": 2}
    ]


@pytest.mark.parametrize("value", [2**63, 2**63 + 1000], ids=["2**63", "2**63+1000"])
def test_uint64_just_beyond_int64_is_absent(value: int) -> None:
    assert limits.storable_metric("ecc_sbe_volatile_total", value) is None
    steps = [Step(T0, [Gpu(0, {"ecc_sbe_volatile_total": value, "fan_percent": 40.0})])]
    (sample,) = gpu_samples(NODE, blocks_from_bodies(NODE, bodies_of(steps))["gpu"])
    assert sample.metrics == {"fan_percent": 40.0}


def test_uint64_at_the_limit_never_comes_back_beyond_it() -> None:
    # Beyond 2**53 a float cannot tell INT64_MAX from 2**63: such a value is left out, never made bigger.
    steps = [Step(T0, [Gpu(0, {"ecc_sbe_volatile_total": INT64_MAX, "temp_gpu_celsius": 50.0})])]
    [sample] = gpu_samples(NODE, blocks_from_bodies(NODE, bodies_of(steps))["gpu"])
    assert sample.metrics.get("ecc_sbe_volatile_total", 0) <= INT64_MAX


# -- repeated samples -----------------------------------------------------------------------------


def test_same_time_and_gpu_in_two_batches_is_one_sample_the_later() -> None:
    first = Step(T0, [Gpu(0, {"temp_gpu_celsius": 50.0, "power_watts": 300.5}, uuid_of(0), "job-a", 1)])
    later = Step(T0, [Gpu(0, {"temp_gpu_celsius": 51.0, "power_watts": 301.25}, uuid_of(0), "job-b", 2)], seq=2)
    other = Step(T0, [Gpu(1, {"temp_gpu_celsius": 60.0}, uuid_of(1))], seq=3)
    block = blocks_from_bodies(NODE, bodies_of([first, later, other]))["gpu"]
    for b in (block, decode_block(encode_block(block))):
        got = gpu_samples(NODE, b)
        assert len(got) == 2
        assert got[0] == GpuSample(
            T0, NODE, 0, {"temp_gpu_celsius": 51.0, "power_watts": 301.25}, uuid_of(0), "job-b", 2
        )
        assert got[1].gpu == 1


def test_resent_identical_batches_are_one_sample_each(steps: list[Step]) -> None:
    bodies = bodies_of(steps)
    doubled = stored(blocks_from_bodies(NODE, bodies + bodies[3:7]))
    assert gpu_samples(NODE, doubled["gpu"]) == expected_gpu_samples(steps)
    assert host_samples(NODE, doubled["host"]) == expected_host_samples(steps)
    assert len(ib_ports(doubled["ib"])) == len(expected_ib_ports(steps))


def test_resent_identical_batches_keep_ib_state(steps: list[Step]) -> None:
    bodies = bodies_of(steps)
    doubled = stored(blocks_from_bodies(NODE, bodies + bodies[3:7]))
    assert ib_ports(doubled["ib"]) == expected_ib_ports(steps)


def test_later_non_measurement_replaces_the_earlier_value() -> None:
    first = Step(T0, [Gpu(0, {"temp_gpu_celsius": 50.0, "fan_percent": 30.0})])
    later = Step(T0, [Gpu(0, {"temp_gpu_celsius": math.nan, "fan_percent": 31.0})], seq=2)
    (sample,) = gpu_samples(NODE, blocks_from_bodies(NODE, bodies_of([first, later]))["gpu"])
    assert sample.metrics == {"fan_percent": 31.0}


def test_later_sample_without_a_field_replaces_the_earlier_whole() -> None:
    first = Step(T0, [Gpu(0, {"temp_gpu_celsius": 50.0, "power_watts": 300.5})])
    later = Step(T0, [Gpu(0, {"temp_gpu_celsius": 51.0})], seq=2)
    (sample,) = gpu_samples(NODE, blocks_from_bodies(NODE, bodies_of([first, later]))["gpu"])
    assert sample.metrics == {"temp_gpu_celsius": 51.0}


# -- batches out of time order --------------------------------------------------------------------


def test_values_of_batches_out_of_time_order() -> None:
    # A spooled batch sent after a newer one: values land at their own times.
    steps = [Step(T0 + 20, [Gpu(0, {"temp_gpu_celsius": 3.0})]), Step(T0, [Gpu(0, {"temp_gpu_celsius": 1.0})])]
    got = gpu_samples(NODE, blocks_from_bodies(NODE, bodies_of(steps))["gpu"])
    assert [(s.t, s.metrics["temp_gpu_celsius"]) for s in got] == [(T0, 1.0), (T0 + 20, 3.0)]


def test_labels_of_batches_out_of_time_order() -> None:
    steps = [
        Step(T0 + 20, [Gpu(0, {"temp_gpu_celsius": 3.0}, uuid_of(0), "job-b", 2)]),
        Step(T0, [Gpu(0, {"temp_gpu_celsius": 1.0}, uuid_of(0), "job-a", 1)]),
    ]
    got = gpu_samples(NODE, blocks_from_bodies(NODE, bodies_of(steps))["gpu"])
    assert [(s.t, s.uuid, s.job, s.rank) for s in got] == [
        (T0, uuid_of(0), "job-a", 1),
        (T0 + 20, uuid_of(0), "job-b", 2),
    ]


def test_labels_when_a_late_batch_falls_between_two_others() -> None:
    steps = [
        Step(T0, [Gpu(0, {"temp_gpu_celsius": 1.0}, uuid_of(0), "job-a")]),
        Step(T0 + 20, [Gpu(0, {"temp_gpu_celsius": 3.0}, uuid_of(0), "job-a")]),
        Step(T0 + 10, [Gpu(0, {"temp_gpu_celsius": 2.0}, uuid_of(0), "job-b")]),
    ]
    got = gpu_samples(NODE, blocks_from_bodies(NODE, bodies_of(steps))["gpu"])
    assert [(s.t, s.job) for s in got] == [(T0, "job-a"), (T0 + 10, "job-b"), (T0 + 20, "job-a")]


def test_ib_state_of_batches_out_of_time_order() -> None:
    steps = [
        Step(T0 + 20, ports=[Port("mlx5_0", 1, "DOWN", {"ib_rate_gbps": 0.0})]),
        Step(T0, ports=[Port("mlx5_0", 1, "ACTIVE", {"ib_rate_gbps": 400.0})]),
    ]
    got = ib_ports(blocks_from_bodies(NODE, bodies_of(steps))["ib"])
    assert got == [
        {"t": T0, "device": "mlx5_0", "port": 1, "ib_state": "ACTIVE", "ib_rate_gbps": 400.0},
        {"t": T0 + 20, "device": "mlx5_0", "port": 1, "ib_state": "DOWN", "ib_rate_gbps": 0.0},
    ]


# -- a port that stops reporting ------------------------------------------------------------------


def test_port_that_starts_late_has_no_earlier_entries() -> None:
    steps = [
        Step(T0, ports=[Port("mlx5_0", 1, "ACTIVE", {"ib_rate_gbps": 400.0})]),
        Step(T0 + 10, ports=[Port("mlx5_0", 1, "ACTIVE", {"ib_rate_gbps": 400.0}), Port("mlx5_1", 1, "ACTIVE")]),
    ]
    got = ib_ports(blocks_from_bodies(NODE, bodies_of(steps))["ib"])
    assert got == expected_ib_ports(steps)


@pytest.mark.parametrize("state", ["ACTIVE", ""], ids=["with-state", "without-state"])
def test_port_that_stops_reporting_has_no_later_entries(state: str) -> None:
    steps = [
        Step(
            T0,
            ports=[
                Port("mlx5_0", 1, "ACTIVE", {"ib_rate_gbps": 400.0}),
                Port("mlx5_1", 1, state, {"ib_rate_gbps": 200.0}),
            ],
        ),
        Step(T0 + 10, ports=[Port("mlx5_0", 1, "ACTIVE", {"ib_rate_gbps": 400.0})]),
    ]
    got = ib_ports(blocks_from_bodies(NODE, bodies_of(steps))["ib"])
    assert got == expected_ib_ports(steps)


# -- fields this version does not know ------------------------------------------------------------


def with_unknown_column(block: Block, cid: int, values: np.ndarray, present: np.ndarray) -> Block:
    return Block(
        block.t,
        np.append(block.ids, cid),
        np.column_stack([block.values, values]),
        np.column_stack([block.present, present]),
        block.text,
    )


@pytest.mark.parametrize("slot", [0, 2, 5], ids=["gpu0", "gpu2", "gpu-without-samples-column-absent"])
def test_unknown_field_number_is_ignored_by_gpu_samples(made: dict[str, Block], steps: list[Step], slot: int) -> None:
    number = 300  # not a GpuMetrics field (a newer agent's)
    assert number not in FIELD_NAMES["gpu"]
    rows = len(made["gpu"])
    # Present where the GPU has samples (a sample of slot 5 would have no known metric at all).
    present = np.ones(rows, bool) if slot != 5 else np.zeros(rows, bool)
    block = with_unknown_column(made["gpu"], column_id(number, RAW, slot), np.arange(rows, dtype=float), present)
    for b in (block, decode_block(encode_block(block))):
        assert gpu_samples(NODE, b) == expected_gpu_samples(steps)


def test_unknown_field_number_is_ignored_by_host_samples_and_ib_ports(
    made: dict[str, Block], steps: list[Step]
) -> None:
    host = made["host"]
    host = with_unknown_column(host, column_id(30, RAW, 0), np.full(len(host), 7.0), np.ones(len(host), bool))
    assert host_samples(NODE, decode_block(encode_block(host))) == expected_host_samples(steps)
    ib = made["ib"]
    ib = with_unknown_column(ib, column_id(30, RAW, 0), np.full(len(ib), 7.0), np.ones(len(ib), bool))
    assert ib_ports(decode_block(encode_block(ib))) == expected_ib_ports(steps)


def test_unknown_field_on_the_wire_is_ignored() -> None:
    # A newer agent's GpuMetrics with a field 300 (double 1.5) this version's proto does not have.
    metrics = fill_metrics(pb.GpuMetrics(), {"temp_gpu_celsius": 50.0, "mem_used_bytes": 2**30})
    unknown = bytes([(300 << 3 | 1) & 0x7F | 0x80, (300 << 3 | 1) >> 7]) + np.float64(1.5).tobytes()
    metrics = pb.GpuMetrics.FromString(metrics.SerializeToString() + unknown)
    batch = pb.Batch(seq=1, t=T0)
    batch.gpus.add(gpu=0, t=T0, uuid=uuid_of(0)).metrics.CopyFrom(metrics)
    body = batch.SerializeToString()
    assert unknown in body
    (sample,) = gpu_samples(NODE, stored(blocks_from_bodies(NODE, [body]))["gpu"])
    assert sample.metrics == {"temp_gpu_celsius": 50.0, "mem_used_bytes": 2**30}


def test_rollup_columns_are_not_samples(made: dict[str, Block]) -> None:
    # A GPU block's rollup holds statistics, not samples: gpu_samples reads RAW columns only.
    rolled = rollup(made["gpu"])
    assert not (rolled.ids % STATS == RAW).any()
    assert gpu_samples(NODE, rolled) == []
    mixed = with_unknown_column(
        made["gpu"], column_id(5, MEAN, 0), np.zeros(len(made["gpu"])), np.ones(len(made["gpu"]), bool)
    )
    mixed = with_unknown_column(mixed, column_id(5, LAST, 0), np.zeros(len(mixed)), np.ones(len(mixed), bool))
    assert gpu_samples(NODE, mixed) == gpu_samples(NODE, made["gpu"])


# -- series_columns and field maps ----------------------------------------------------------------


def test_field_numbers_follow_the_proto() -> None:
    assert FIELD_NUMBERS["gpu"] == {f.name: f.number for f in pb.GpuMetrics.DESCRIPTOR.fields}
    assert FIELD_NUMBERS["host"] == {f.name: f.number for f in pb.HostMetrics.DESCRIPTOR.fields}
    assert set(FIELD_NUMBERS["ib"]) == set(IB_FIELDS)
    assert "device" not in FIELD_NUMBERS["ib"] and "port" not in FIELD_NUMBERS["ib"]
    assert set(FIELD_NUMBERS["gpu"]) == set(GPU_FIELDS)
    assert set(FIELD_NUMBERS["host"]) == set(HOST_FIELDS)
    for kind in FIELD_NUMBERS:
        assert {n: name for name, n in FIELD_NUMBERS[kind].items()} == FIELD_NAMES[kind]
        assert max(FIELD_NUMBERS[kind].values()) * STATS + STATS - 1 < SERIES_STRIDE


def test_series_columns() -> None:
    temp, power = FIELD_NUMBERS["gpu"]["temp_gpu_celsius"], FIELD_NUMBERS["gpu"]["power_watts"]
    assert series_columns("gpu", 3, ["temp_gpu_celsius", "power_watts"]) == {
        column_id(temp, RAW, 3): "temp_gpu_celsius",
        column_id(power, RAW, 3): "power_watts",
    }
    # Unknown names are skipped; None means every field of the kind.
    assert series_columns("gpu", 0, ["temp_gpu_celsius", "no_such_field"]) == {column_id(temp): "temp_gpu_celsius"}
    everything = series_columns("gpu", 1, None)
    assert sorted(everything.values()) == sorted(GPU_FIELDS)
    assert all(cid // SERIES_STRIDE == 1 for cid in everything)
    assert sorted(series_columns("host", 0, None).values()) == sorted(HOST_FIELDS)
    # ib_state is text (runs), never a column.
    ib = series_columns("ib", 2, None)
    assert "ib_state" not in ib.values()
    assert sorted(ib.values()) == sorted(n for n in IB_FIELDS if n != "ib_state")
    assert series_columns("ib", 0, ["ib_state"]) == {}


def test_series_columns_address_the_stored_columns(made: dict[str, Block]) -> None:
    block = made["gpu"]
    for cid, name in series_columns("gpu", 1, ["temp_gpu_celsius", "fan_percent"]).items():
        times, values = block.column(cid)
        want = [
            (T0 + i * STEP + (0.125 if i % 2 else 0.0), storable(gpu_metrics(1, i)).get(name)) for i in range(STEPS)
        ]
        assert list(zip(times.tolist(), values.tolist())) == [(t, v) for t, v in want if v is not None]
    # GPU 2 never reports fan speed: no column (absent, not zeros).
    (cid,) = series_columns("gpu", 2, ["fan_percent"])
    assert block.column(cid) is None


# -- property: random batches ---------------------------------------------------------------------

# A few fields of every type: doubles, uint64 counters and masks, uint32 flags and widths.
PROPERTY_GPU_FIELDS = [
    "temp_gpu_celsius",
    "power_watts",
    "gpu_util_percent",
    "mem_used_bytes",
    "clock_event_reasons",
    "ecc_dbe_volatile_total",
    "pcie_link_width",
    "remap_pending",
]
PROPERTY_HOST_FIELDS = ["cpu_percent", "load1", "net_rx_bytes_total", "mem_total_bytes"]


_FIELD_TYPES = {f.name: f.type for d in (pb.GpuMetrics.DESCRIPTOR, pb.HostMetrics.DESCRIPTOR) for f in d.fields}


def value_for(name: str) -> st.SearchStrategy[Any]:
    """Values of field `name` an agent may send: measurements, and the ones that are not."""
    if name in INTEGER_FIELDS:
        all_ones = U32_ALL_ONES if _FIELD_TYPES[name] == FieldDescriptor.TYPE_UINT32 else U64_ALL_ONES
        return st.one_of(st.integers(0, min(all_ones - 1, 2**53)), st.just(all_ones), st.sampled_from([0, 1, 4, 16]))
    return st.one_of(
        st.floats(allow_nan=True, allow_infinity=True, width=64),
        st.integers(-(10**6), 10**6).map(lambda k: k / 1000),
    )


@st.composite
def random_steps(draw: st.DrawFn) -> list[Step]:
    count = draw(st.integers(1, 5))
    gaps = draw(st.lists(st.sampled_from([0.001, 0.5, 1.0, 10.0, 1e-6]), min_size=count, max_size=count))
    times = list(T0 + np.cumsum(gaps))
    jobs = st.sampled_from(["", "job-1", "job-2"])
    steps = []
    for t in times:
        gpus = []
        for g in draw(st.lists(st.integers(0, 3), unique=True, max_size=3)):
            names = draw(st.lists(st.sampled_from(PROPERTY_GPU_FIELDS), unique=True, max_size=4))
            metrics = {n: draw(value_for(n)) for n in names}
            metrics["fan_percent"] = float(draw(st.integers(0, 100)))  # every sample has a measurement
            rank = draw(st.one_of(st.none(), st.integers(0, 1000)))
            gpus.append(Gpu(g, metrics, uuid_of(g) if draw(st.booleans()) else "", draw(jobs), rank))
        host = None
        if draw(st.booleans()):
            host = {n: draw(value_for(n)) for n in draw(st.lists(st.sampled_from(PROPERTY_HOST_FIELDS), unique=True))}
        steps.append(Step(float(t), gpus, host))
    return steps


@settings(max_examples=200, deadline=None)
@given(steps=random_steps(), split=st.booleans())
def test_random_batches_round_trip(steps: list[Step], split: bool) -> None:
    if split:  # one batch per GPU sample, and the host apart
        steps_in = [Step(s.t, [g]) for s in steps for g in s.gpus] + [Step(s.t, host=s.host) for s in steps]
        steps_in.sort(key=lambda s: s.t)
    else:
        steps_in = steps
    made = blocks_from_bodies(NODE, bodies_of(steps_in))
    got = stored(made)
    want_gpu = expected_gpu_samples(steps)
    want_host = expected_host_samples(steps)
    assert ("gpu" in made) == bool(want_gpu)
    assert ("host" in made) == bool(want_host)
    if want_gpu:
        samples = gpu_samples(NODE, got["gpu"])
        assert samples == want_gpu
        for s in samples:
            assert_types(s.metrics)
        middle = want_gpu[len(want_gpu) // 2].t
        assert gpu_samples(NODE, got["gpu"], middle) == [s for s in want_gpu if s.t >= middle]
    if want_host:
        samples = host_samples(NODE, got["host"])
        assert samples == want_host
        for s in samples:
            assert_types(s.metrics)
