"""The simulator's fast path (fleetwatch.sim.rows, SimFleet.batches()) gives, record for record,
what SimFleet.records() gives through the agent's NVML source over the fake NVML."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fleetwatch.detectors.engine import GpuRows, RecentData
from fleetwatch.records import GpuSample
from fleetwatch.sim import rows
from fleetwatch.sim.fleet import SimFleet
from fleetwatch.wire import GPU_FIELDS

from .test_sim_fleet import MIXED, scenario


def expanded(records):
    """batches() with each GpuRows as the GpuSamples it stands for."""
    for record in records:
        if isinstance(record, GpuRows):
            yield from record.samples()
        else:
            yield record


def assert_same(spec):
    fleet = SimFleet.from_scenario(spec)
    assert all(rows.supported(sim) for sim in fleet.sims.values())
    reference = list(fleet.records())
    fast = list(expanded(SimFleet.from_scenario(spec).batches()))
    assert len(fast) == len(reference)
    for got, want in zip(fast, reference):
        assert got == want


# Every fault kind the H100/H200 boards take, and the healthy noise, across three nodes: lost and
# missing GPUs (the NVML source re-initialised, PCIe rates starting over), a silent node, link and
# counter faults, slowdowns and their peers, idle GPUs at Gen1.
FAULTS = scenario(
    nodes=3,
    duration=200,
    seed=3,
    jobs=[
        {"id": "j1", "nodes": ["n01", "n02"], "step_seconds": 0.9, "report_steps": True},
        {"id": "j2", "nodes": ["n03"], "step_seconds": 1.1, "report_steps": False, "start_seconds": 20},
    ],
    faults=[
        {"kind": "gpu_lost", "node": "n01", "gpu": 2, "at_seconds": 150},
        {"kind": "gpu_missing", "node": "n03", "gpu": 5, "at_seconds": 40, "duration_seconds": 50},
        {"kind": "node_silent", "node": "n02", "at_seconds": 60, "duration_seconds": 12},
        {"kind": "nvlink_down", "node": "n02", "gpu": 1, "at_seconds": 30, "link": 4},
        {"kind": "nvlink_errors", "node": "n02", "gpu": 6, "at_seconds": 80, "link": 2},
        {"kind": "pcie_replays", "node": "n01", "gpu": 0, "at_seconds": 25, "duration_seconds": 60},
        {"kind": "pcie_downtrain", "node": "n01", "gpu": 4, "at_seconds": 35, "pcie_gen": 4, "pcie_width": 8},
        {"kind": "ecc_sbe_burst", "node": "n03", "gpu": 0, "at_seconds": 50, "duration_seconds": 30},
        {"kind": "ecc_dbe", "node": "n03", "gpu": 1, "at_seconds": 120},
        {"kind": "row_remap_pending", "node": "n03", "gpu": 2, "at_seconds": 70, "duration_seconds": 40},
        {"kind": "row_remap_failure", "node": "n03", "gpu": 3, "at_seconds": 130},
        {"kind": "thermal_slowdown", "node": "n01", "gpu": 5, "at_seconds": 45, "duration_seconds": 60},
        {"kind": "power_brake", "node": "n01", "gpu": 6, "at_seconds": 90, "duration_seconds": 40},
        {"kind": "hw_slowdown", "node": "n03", "gpu": 4, "at_seconds": 100},
        {"kind": "xid", "xid": 48, "node": "n01", "gpu": 7, "at_seconds": 110.5},
        {"kind": "slow_rank", "node": "n02", "gpu": 0, "at_seconds": 20, "factor": 1.3},
    ],
    noise=[
        {"kind": "idle_gpu", "node": "n02", "gpu": 7, "at_seconds": 10, "duration_seconds": 50},
        {"kind": "checkpoint_pause", "job": "j1", "at_seconds": 140, "duration_seconds": 15},
        {"kind": "single_sbe", "at_seconds": 33},
    ],
)


@pytest.mark.parametrize("spec", [FAULTS, MIXED, scenario(nodes=1, duration=20, model="H200", interval=0.5)])
def test_the_fast_path_gives_the_records_the_nvml_source_gives(spec):
    assert_same(spec)


def test_a_gpu_lost_before_the_source_starts_reports_once_without_its_uuid():
    assert_same(scenario(nodes=1, duration=12, faults=[{"kind": "gpu_lost", "node": "n01", "gpu": 1, "at_seconds": 0}]))


def test_gpu_rows_feed_recent_data_as_the_gpu_samples_would():
    fleet = SimFleet.from_scenario(MIXED)
    by_rows, by_samples = RecentData(retention_seconds=60), RecentData(retention_seconds=60)
    now = None
    for record in fleet.batches():
        if isinstance(record, GpuRows):
            by_rows.add_gpu_rows(
                record.node, record.t, record.gpus, record.values, record.uuids, record.jobs, record.ranks
            )
            for sample in record.samples():
                by_samples.add_gpu(sample)
            now = record.t
    assert now is not None
    a, b = by_rows.window(now, watching_since=now - 240), by_samples.window(now, watching_since=now - 240)
    assert list(a.gpu) == list(b.gpu)
    for key in a.gpu:
        assert list(a.gpu[key]) == list(b.gpu[key])
    assert a.nodes == b.nodes


def test_gpu_rows_are_in_the_wire_column_order():
    record = next(r for r in SimFleet.from_scenario(scenario(nodes=1, duration=3)).batches() if isinstance(r, GpuRows))
    assert record.values.shape == (8, len(GPU_FIELDS))
    (sample,) = [s for s in record.samples() if s.gpu == 0]
    assert isinstance(sample, GpuSample)
    column = {name: i for i, name in enumerate(GPU_FIELDS)}
    assert record.values[0, column["power_limit_watts"]] == sample.metrics["power_limit_watts"] == 700.0
    assert np.isnan(record.values[0, column["fan_percent"]]) and "fan_percent" not in sample.metrics


def test_fast_path_speed():
    """Prints the fast path's rate against the NVML source's (the corpus evaluation runs it)."""
    spec = scenario(nodes=4, duration=400, seed=5, noise=[{"kind": "checkpoint_pause", "at_seconds": 200}])
    fleet = SimFleet.from_scenario(spec)
    started = time.perf_counter()
    count = sum(len(r.gpus) for r in fleet.batches() if isinstance(r, GpuRows))
    elapsed = time.perf_counter() - started
    assert count == 4 * 8 * 400
    print(f"\nsim fast path: {count} GPU samples in {elapsed:.2f} s: {elapsed / count * 1e6:.1f} us per GPU sample")
