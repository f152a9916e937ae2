"""Smoke test on a real NVIDIA GPU and driver: the agent's NVML source against the real pynvml.

Skipped where load_nvml() finds no usable NVML (no driver, no GPU); run on a GPU node with
`.venv/bin/python -m pytest -m gpu tests/gpu -s` (-s prints the timings and what was unsupported).

What it holds the real library to: every canonical GPU field is either reported with the right
type and no NVML sentinel, or listed by the agent as unsupported for that GPU; a few values agree
with nvidia-smi within tolerances that allow for the two tools sampling at different instants; and
on a board with the PCIe byte-counter fields the agent never calls the 20 ms-blocking
nvmlDeviceGetPcieThroughput.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fleetwatch import wire
from fleetwatch.agent.sources.gpm import GPM_FIELDS
from fleetwatch.agent.sources.nvml import NvmlSource, load_nvml

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
SENTINELS = {0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF, -1}
# Rates derived from two readings (the PCIe byte counters, GPM samples): a single --once cycle has one.
PCIE_RATES = {"pcie_tx_bytes_per_second", "pcie_rx_bytes_per_second", *GPM_FIELDS}


@pytest.fixture(scope="module")
def nvml() -> Any:
    module = load_nvml()
    if module is None:
        pytest.skip("no usable NVML here (no NVIDIA driver or GPU)")
    yield module
    module.nvmlShutdown()  # the reference load_nvml() took


def _check_fields(gpu: dict[str, Any], unsupported: set[str], allowed_gaps: set[str]) -> None:
    metrics = gpu["metrics"]
    assert set(metrics) <= set(wire.GPU_FIELDS), set(metrics) - set(wire.GPU_FIELDS)
    for name in wire.GPU_FIELDS:
        if name not in metrics:
            assert name in unsupported or name in allowed_gaps, (
                f"GPU {gpu['gpu']}: {name} neither reported nor listed unsupported"
            )
            continue
        value = metrics[name]
        assert name not in unsupported, f"GPU {gpu['gpu']}: {name} reported and listed unsupported"
        if name in wire.INTEGER_FIELDS:
            assert type(value) is int and value >= 0, (name, value)
        else:
            assert type(value) is float, (name, value)
        assert value not in SENTINELS, (name, value)


def _agent_once(tmp_path: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWATCH_")}
    command = [
        sys.executable,
        "-m",
        "fleetwatch.agent.main",
        "--once",
        "--json",
        "--no-simulate",
        "--spool-dir",
        str(tmp_path / "spool"),
        "--config",
        "/dev/null",
        "--kmsg-path",
        "",
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _nvidia_smi(*arguments: str) -> list[list[str]]:
    executable = shutil.which("nvidia-smi")
    if executable is None:
        pytest.skip("nvidia-smi is not installed")
    done = subprocess.run([executable, *arguments], capture_output=True, text=True, timeout=60, check=True)
    return [[cell.strip() for cell in line.split(",")] for line in done.stdout.splitlines() if line.strip()]


def _number(cell: str) -> float | None:
    return None if "N/A" in cell or "Not Supported" in cell else float(cell)


def test_once_json_reports_every_field_or_lists_it_unsupported(nvml, tmp_path):
    result = _agent_once(tmp_path)
    assert result["nvml_available"] is True
    count = nvml.nvmlDeviceGetCount()
    assert [entry["index"] for entry in result["inventory"]] == list(range(count))
    lost = {event["gpu"] for event in result["events"] if event["kind"] == "gpu_lost"}
    assert sorted(gpu["gpu"] for gpu in result["gpus"]) == sorted(set(range(count)) - lost)
    for gpu in result["gpus"]:
        unsupported = set(result["unsupported"].get(str(gpu["gpu"]), []))
        assert unsupported <= set(wire.GPU_FIELDS)
        _check_fields(gpu, unsupported, allowed_gaps=PCIE_RATES)
        print(f"GPU {gpu['gpu']}: {len(gpu['metrics'])} fields, unsupported: {sorted(unsupported)}")


def test_values_agree_with_nvidia_smi(nvml, tmp_path):
    before = _nvidia_smi(
        "--query-gpu=index,uuid,temperature.gpu,power.draw,clocks.sm,memory.total", "--format=csv,noheader,nounits"
    )
    result = _agent_once(tmp_path)
    after = _nvidia_smi(
        "--query-gpu=index,uuid,temperature.gpu,power.draw,clocks.sm,memory.total", "--format=csv,noheader,nounits"
    )
    smi = {int(row[0]): row for row in before}
    smi_after = {int(row[0]): row for row in after}
    for gpu in result["gpus"]:
        row, row_after, metrics = smi[gpu["gpu"]], smi_after[gpu["gpu"]], gpu["metrics"]
        assert gpu["uuid"] == row[1]
        checks = (
            # (field, nvidia-smi column, tolerance as (absolute, fraction of nvidia-smi's value))
            ("temp_gpu_celsius", 2, (5.0, 0.0)),
            ("power_watts", 3, (50.0, 0.25)),  # both are the driver's 1 s average on Ampere+
            ("sm_clock_mhz", 4, (300.0, 0.30)),  # clocks move with load between the two reads
        )
        for name, column, (absolute, fraction) in checks:
            values = [_number(row[column]), _number(row_after[column])]
            if values[0] is None:
                assert name not in metrics, f"nvidia-smi has no {name} but the agent reported {metrics[name]}"
                continue
            low, high = min(values), max(values)  # the agent read between the two nvidia-smi calls
            slack = max(absolute, fraction * high)
            assert low - slack <= metrics[name] <= high + slack, (name, metrics[name], values)
        # memory.total is the framebuffer size in MiB, reserved memory included, like NVML's total.
        assert abs(metrics["mem_total_bytes"] / MIB - float(row[5])) <= 1.0
        inventory = result["inventory"][gpu["gpu"]]
        assert inventory["uuid"] == row[1] and abs(inventory["memory_total_bytes"] / MIB - float(row[5])) <= 1.0


def test_source_over_real_pynvml_two_cycles_fast_path_and_pids(nvml):
    counting = _Counting(nvml)
    source = NvmlSource(counting)
    source.start()
    try:
        compute_before = _compute_apps()
        started = time.perf_counter()
        source.sample()
        first_seconds = time.perf_counter() - started
        time.sleep(1.0)
        started = time.perf_counter()
        samples, _events = source.sample()
        second_seconds = time.perf_counter() - started
        compute_after = _compute_apps()
        unsupported = source.unsupported_fields()
        for sample in samples:
            # Two cycles in, the PCIe rates are there too, or listed unsupported.
            _check_fields(sample, set(unsupported[sample["gpu"]]), allowed_gaps=set())
            assert all(type(pid) is int and pid > 0 for pid in sample["pids"])
            # Processes nvidia-smi saw before and after our read hold a context throughout.
            steady = compute_before.get(sample["uuid"], set()) & compute_after.get(sample["uuid"], set())
            assert steady <= set(sample["pids"]), (steady, sample["pids"])
        throughput_calls = counting.calls["nvmlDeviceGetPcieThroughput"]
        print(
            f"{len(samples)} GPUs: first cycle {first_seconds * 1000:.1f} ms, second {second_seconds * 1000:.1f} ms "
            f"wall; nvmlDeviceGetPcieThroughput calls: {throughput_calls}; "
            f"field-values calls: {counting.calls['nvmlDeviceGetFieldValues']}"
        )
        if throughput_calls == 0 and samples:
            # The fast path: no 20 ms blocking call, so a cycle costs calls in the microseconds.
            assert second_seconds < 0.05 * len(samples), second_seconds
        else:
            print("PCIe byte-counter fields unavailable here: the 20 ms throughput call is in use")
    finally:
        source.close()


def test_gpm_on_hopper_gives_dcgm_profiling_fields(nvml):
    """On Hopper and newer, GPM answers from the second cycle on: the fields DCGM_FI_PROF_* come from."""
    source = NvmlSource(nvml)
    source.start()
    try:
        source.sample()
        time.sleep(1.0)
        samples, _ = source.sample()
        unsupported = source.unsupported_fields()
    finally:
        source.close()
    for sample in samples:
        handle = nvml.nvmlDeviceGetHandleByIndex(sample["gpu"])
        major, _minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        gpm = {name: sample["metrics"].get(name) for name in GPM_FIELDS}
        print(f"GPU {sample['gpu']} (compute {major}.x): GPM {gpm}")
        if major >= 9:
            assert set(GPM_FIELDS) <= set(sample["metrics"]) | set(unsupported[sample["gpu"]])
            assert "sm_active_percent" in sample["metrics"], "a Hopper GPU without GPM SM activity"
        else:
            assert set(GPM_FIELDS) <= set(unsupported[sample["gpu"]])


def _compute_apps() -> dict[str, set[int]]:
    rows = _nvidia_smi("--query-compute-apps=gpu_uuid,pid", "--format=csv,noheader")
    apps: dict[str, set[int]] = collections.defaultdict(set)
    for row in rows:
        if len(row) == 2 and row[1].isdigit():
            apps[row[0]].add(int(row[1]))
    return apps


class _Counting:
    """pynvml with a count of calls per function name."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.calls: collections.Counter[str] = collections.Counter()

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if name.startswith("nvml") and callable(value) and not isinstance(value, type):

            def counted(*args: Any, **kwargs: Any) -> Any:
                self.calls[name] += 1
                return value(*args, **kwargs)

            return counted
        return value
