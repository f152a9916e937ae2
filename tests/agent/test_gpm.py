"""NVML GPM through the NVML source: DCGM's profiling metrics per sampling interval, on the fake NVML."""

from __future__ import annotations

import dataclasses
from typing import Any

import pynvml
import pytest

from fleetwatch.agent.sources.gpm import GPM_FIELDS, GpmReader
from fleetwatch.agent.sources.nvml import NvmlSource
from fleetwatch.sim.fake_nvml import FakeNvml, make_fake_nvml
from fleetwatch.sim.node import IDLE_ACTIVITY, RUNNING, SimNode

START = 1_000_000.0


class Clock:
    def __init__(self) -> None:
        self.t = START

    def __call__(self) -> float:
        return self.t


def source_over(nvml: Any, clock: Clock) -> NvmlSource:
    source = NvmlSource(nvml, clock=clock)
    source.start()
    return source


def cycles(source: NvmlSource, clock: Clock, count: int) -> list[dict[int, dict[str, Any]]]:
    out = []
    for _ in range(count):
        samples, _ = source.sample()
        out.append({s["gpu"]: s["metrics"] for s in samples})
        clock.t += 1.0
    return out


def test_metrics_between_cycles_follow_the_workload() -> None:
    clock = Clock()
    # GPU 0 trains; GPU 1 is idle (no job on it).
    activity = {0: [(0.0, RUNNING)], 1: [(0.0, IDLE_ACTIVITY)]}
    node = SimNode("n01", gpu_count=2, start=START - 600, clock=clock, activity=activity)
    source = source_over(make_fake_nvml(node), clock)
    try:
        first, second, third = cycles(source, clock, 3)
    finally:
        source.close()
    # The first cycle only takes the first sample: no rate yet, and no made-up zero.
    assert not set(GPM_FIELDS) & set(first[0])
    busy, idle = second[0], second[1]
    assert set(GPM_FIELDS) <= set(busy) and set(GPM_FIELDS) <= set(third[0])
    assert busy["graphics_active_percent"] > 90 and 50 < busy["tensor_active_percent"] < busy["sm_active_percent"]
    assert busy["nvlink_tx_bytes_per_second"] > 1e10  # a training job's collectives, tens of GB/s
    assert idle["graphics_active_percent"] == 0 and idle["tensor_active_percent"] == 0
    assert idle["nvlink_tx_bytes_per_second"] == 0


def test_a_gpu_without_gpm_is_learned_once_and_not_asked_again() -> None:
    clock = Clock()
    node = SimNode("n01", gpu_count=1, start=START - 600, clock=clock)
    profile = dataclasses.replace(
        node.profile, not_supported=node.profile.not_supported | {"nvmlGpmQueryDeviceSupport"}
    )
    nvml = make_fake_nvml(node, profile)
    calls = {"n": 0}
    query = nvml.nvmlGpmQueryDeviceSupport

    def counting(handle: Any) -> Any:
        calls["n"] += 1
        return query(handle)

    nvml.nvmlGpmQueryDeviceSupport = counting  # type: ignore[method-assign]
    source = source_over(nvml, clock)
    try:
        results = cycles(source, clock, 3)
    finally:
        source.close()
    assert calls["n"] == 1
    assert all(not set(GPM_FIELDS) & set(metrics[0]) for metrics in results)
    assert results[-1][0]["gpu_util_percent"] > 0  # the rest of the GPU is read as before
    assert set(GPM_FIELDS) <= set(source.unsupported_fields()[0])


def test_a_metric_the_gpu_lacks_leaves_only_that_field_out() -> None:
    clock = Clock()
    node = SimNode("n01", gpu_count=1, start=START - 600, clock=clock)

    class NoFp64(FakeNvml):
        def _gpm_values(self, gpu: int, t0: float, t1: float) -> dict[int, float]:
            values = super()._gpm_values(gpu, t0, t1)
            del values[pynvml.NVML_GPM_METRIC_FP64_UTIL]
            return values

    source = source_over(NoFp64(node), clock)
    try:
        _, second = cycles(source, clock, 2)
    finally:
        source.close()
    assert "fp64_active_percent" not in second[0]
    assert set(GPM_FIELDS) - {"fp64_active_percent"} <= set(second[0])


def test_a_library_without_gpm_calls_reports_none() -> None:
    class OldLibrary:
        NVMLError = pynvml.NVMLError
        NVML_SUCCESS = pynvml.NVML_SUCCESS

    reader = GpmReader(OldLibrary())
    with pytest.raises(Exception, match="no GPM calls"):
        reader.read(0, object(), {})


def test_close_frees_every_sample() -> None:
    clock = Clock()
    node = SimNode("n01", gpu_count=2, start=START - 600, clock=clock)
    nvml = make_fake_nvml(node)
    source = source_over(nvml, clock)
    cycles(source, clock, 2)
    assert len(nvml._gpm_samples) == 4  # two per GPU, reused cycle after cycle
    source.close()
    assert nvml._gpm_samples == {}
