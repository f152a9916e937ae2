"""Tests for the NVML source over the fake NVML: canonical fields and units, NOT_SUPPORTED learned
once, fallbacks (field ids to calls, versioned to deprecated calls, per-link NVLink counters to
all-lane totals), running processes, GPU lost, every fault kind at its time, XID events, cost per
cycle, and load_nvml(). The per-field contract and the sentinel cases are in test_nvml_contract.py."""

from __future__ import annotations

import collections
import ctypes.util
import logging
import sys
import threading
import time
from typing import Any

import pynvml
import pytest

from fleetwatch import wire
from fleetwatch.agent.sources.gpm import GPM_FIELDS
from fleetwatch.agent.sources.nvml import NvmlSource, load_nvml
from fleetwatch.sim.fake_nvml import FakeNvml, make_fake_nvml
from fleetwatch.sim.node import SimNode
from fleetwatch.sim.scenario import Fault, parse_fault
from fleetwatch.v1 import telemetry_pb2 as pb

START = 1_700_000_000.0
MIB = 1024 * 1024
# What an H100 SXM answers NOT_SUPPORTED ("N/A" in the capture; NVLink 4 keeps no data-CRC count).
H100_ABSENT = {
    "fan_percent",
    "retired_pages_sbe",
    "retired_pages_dbe",
    "retired_pages_pending",
    "nvlink_crc_data_errors_total",
}
# Derived from two readings of the PCIe byte counters: absent from the first cycle only.
PCIE_RATES = {"pcie_tx_bytes_per_second", "pcie_rx_bytes_per_second"}
# Rates over two reads (the PCIe byte counters, GPM samples): none on the first cycle.
FIRST_CYCLE_GAPS = PCIE_RATES | set(GPM_FIELDS)


class ManualClock:
    def __init__(self, t: float = START) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class CountingNvml:
    """Wraps an NVML object and counts calls per function name; `hidden` names are missing, as in
    an older pynvml."""

    def __init__(self, inner: Any, hidden: frozenset[str] = frozenset()) -> None:
        self._inner = inner
        self._hidden = hidden
        self.calls: collections.Counter[str] = collections.Counter()

    def __getattr__(self, name: str) -> Any:
        if name in self._hidden:
            raise AttributeError(name)
        value = getattr(self._inner, name)
        if name.startswith("nvml") and callable(value) and not isinstance(value, type):

            def counted(*args: Any, **kwargs: Any) -> Any:
                self.calls[name] += 1
                return value(*args, **kwargs)

            return counted
        return value


def _source(faults=(), model="H100", seed=0, clock=None, counting=False, gpu_count=8):
    clock = clock or ManualClock()
    node = SimNode("node-a", gpu_count=gpu_count, model=model, faults=faults, seed=seed, start=START, clock=clock)
    nvml: Any = make_fake_nvml(node)
    if counting:
        nvml = CountingNvml(nvml)
    source = NvmlSource(nvml, clock=clock)
    source.start()
    return source, node, clock, nvml


def _by_gpu(samples):
    return {s["gpu"]: s["metrics"] for s in samples}


# ---- fields, units, inventory -----------------------------------------------------------------


@pytest.mark.parametrize("model", ["H100", "H200"])
def test_contract_every_gpu_field_is_typed_or_absent(model):
    source, node, clock, _ = _source(model=model)
    for cycle in range(3):
        samples, events = source.sample()
        clock.t += 1.0
        assert events == [] and len(samples) == 8
        for sample in samples:
            metrics = sample["metrics"]
            assert set(metrics) <= set(wire.GPU_FIELDS)
            for name in wire.GPU_FIELDS:
                if name not in metrics:
                    continue
                value = metrics[name]
                if name in wire.INTEGER_FIELDS:
                    assert type(value) is int and value >= 0, name
                else:
                    assert type(value) is float, name
            # Absent means NOT_SUPPORTED on this board; never a 0 or a sentinel in its place.
            assert set(wire.GPU_FIELDS) - set(metrics) == H100_ABSENT | (FIRST_CYCLE_GAPS if cycle == 0 else set())
            wire.fill_metrics(pb.GpuMetrics(), metrics)  # fits the wire contract
            assert set(sample) == {"gpu", "t", "uuid", "metrics", "pids"}
            assert sample["pids"] == list(node.processes(sample["gpu"]))
            assert sample["t"] == clock.t - 1.0
    assert source.unsupported_fields() == {gpu: sorted(H100_ABSENT) for gpu in range(8)}


def test_units_match_the_capture():
    source, node, clock, _ = _source()
    source.sample()  # the PCIe rates need a first reading of the byte counters
    clock.t += 2.0
    metrics = _by_gpu(source.sample()[0])[0]
    assert metrics["power_limit_watts"] == 700.0
    assert 550.0 <= metrics["power_watts"] <= 690.0
    assert metrics["mem_total_bytes"] == 81559 * MIB
    assert 0.8 * 81559 * MIB < metrics["mem_used_bytes"] < 81559 * MIB
    assert metrics["sm_clock_max_mhz"] == 1980.0 and 1900.0 <= metrics["sm_clock_mhz"] <= 1980.0
    assert metrics["mem_clock_mhz"] == 2619.0
    assert metrics["temp_slowdown_celsius"] == 89.0 and metrics["temp_shutdown_celsius"] == 92.0
    assert 55.0 <= metrics["temp_gpu_celsius"] <= 75.0
    assert metrics["temp_mem_celsius"] < metrics["temp_gpu_celsius"]
    assert 95.0 <= metrics["gpu_util_percent"] <= 100.0
    assert (metrics["pcie_link_gen"], metrics["pcie_link_gen_max"]) == (5, 5)
    assert (metrics["pcie_link_width"], metrics["pcie_link_width_max"]) == (16, 16)
    assert (metrics["nvlink_links_up"], metrics["nvlink_links_total"]) == (18, 18)
    # Byte-counter deltas become bytes/second; energy mJ becomes joules.
    (tx0, rx0), (tx1, rx1) = node.pcie_bytes(0, START), node.pcie_bytes(0, START + 2.0)
    assert metrics["pcie_rx_bytes_per_second"] == (rx1 - rx0) / 2.0
    assert metrics["pcie_tx_bytes_per_second"] == (tx1 - tx0) / 2.0
    assert 1e6 < metrics["pcie_tx_bytes_per_second"] < metrics["pcie_rx_bytes_per_second"] < 1e9
    reading = node.reading(0, START + 2.0)
    assert metrics["energy_joules"] == reading.energy_millijoules / 1000.0
    # The counters and the 20 ms throughput call describe the same traffic.
    middle = node.reading(0, START + 1.0).pcie_rx_kilobytes_per_second * 1024.0
    assert metrics["pcie_rx_bytes_per_second"] == pytest.approx(middle, rel=0.05)


def test_inventory():
    source, node, _, _ = _source(model="H200")
    assert [g["index"] for g in source.inventory] == list(range(8))
    first = source.inventory[0]
    assert first == {
        "index": 0,
        "uuid": node.gpus[0].uuid,
        "name": "NVIDIA H200",
        "pci_bus_id": "0000:18:00.0",
        "serial": node.gpus[0].serial,
        "memory_total_bytes": 143771 * MIB,
        "driver_version": "590.48.01",
        "cuda_version": "13.1",
        "power_limit_watts": 700.0,
        "sm_clock_max_mhz": 1980,
        "mem_clock_max_mhz": 3201,
    }
    assert [g["pci_bus_id"] for g in source.inventory][-4:] == [
        "0000:9a:00.0",
        "0000:ab:00.0",
        "0000:ba:00.0",
        "0000:db:00.0",
    ]
    assert len({g["uuid"] for g in source.inventory}) == 8


def test_not_supported_is_asked_once_per_gpu():
    source, _, clock, nvml = _source(counting=True)
    for _ in range(5):
        source.sample()
        clock.t += 1.0
    calls = nvml.calls
    assert calls["nvmlDeviceGetFanSpeed"] == 8
    # The retirement fields answer NOT_SUPPORTED, then their calls do, once each.
    assert calls["nvmlDeviceGetRetiredPages"] == 16  # SBE and DBE causes
    assert calls["nvmlDeviceGetRetiredPagesPendingStatus"] == 8
    assert calls["nvmlDeviceGetTemperatureThreshold"] == 16  # static: slowdown + shutdown, once
    assert calls["nvmlDeviceGetMaxPcieLinkGeneration"] == 8
    assert calls["nvmlDeviceGetPowerUsage"] == 40
    # Links 18..35 answer INVALID_ARGUMENT on the first cycle and are never asked again.
    assert calls["nvmlDeviceGetNvLinkState"] == 8 * (36 + 18 * 5)
    # 4 counters x 18 links on the first cycle; the data-CRC counter is then dropped.
    assert calls["nvmlDeviceGetNvLinkErrorCounter"] == 8 * (4 * 18 + 4 * 3 * 18)


def test_fast_path_one_field_values_call_per_gpu_and_no_blocking_throughput_call():
    source, _, clock, nvml = _source(counting=True)
    for _ in range(5):
        source.sample()
        clock.t += 1.0
    calls = nvml.calls
    assert calls["nvmlDeviceGetFieldValues"] == 8 * 5
    # Everything the batch answers is never asked through its own call.
    for covered in (
        "nvmlDeviceGetPcieThroughput",
        "nvmlDeviceGetTotalEnergyConsumption",
        "nvmlDeviceGetTotalEccErrors",
        "nvmlDeviceGetRemappedRows",
        "nvmlDeviceGetPcieReplayCounter",
    ):
        assert calls[covered] == 0, covered
    # Current names only: the deprecated ones are fallbacks for libraries that lack these.
    assert calls["nvmlDeviceGetTemperatureV"] == 8 * 5 and calls["nvmlDeviceGetTemperature"] == 0
    assert calls["nvmlDeviceGetCurrentClocksEventReasons"] == 8 * 5
    assert calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == 0
    assert calls["nvmlDeviceGetComputeRunningProcesses"] == 8 * 5


def test_field_value_not_supported_is_learned_from_its_own_return_code():
    class NoMemoryTemp(FakeNvml):
        def nvmlDeviceGetFieldValues(self, handle, fieldIds):
            values = super().nvmlDeviceGetFieldValues(handle, fieldIds)
            for value in values:
                value.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
            return values

    clock = ManualClock()
    nvml = CountingNvml(NoMemoryTemp(SimNode("n1", start=START, clock=clock)))
    source = NvmlSource(nvml, clock=clock)
    source.start()
    for _ in range(3):
        samples, _ = source.sample()
        clock.t += 1.0
        assert all("temp_mem_celsius" not in s["metrics"] for s in samples)
        assert all("temp_gpu_celsius" in s["metrics"] for s in samples)
        # Fields with an equivalent call fall back to it in the same cycle.
        assert all({"energy_joules", "ecc_dbe_volatile_total", "remap_pending"} <= set(s["metrics"]) for s in samples)
    assert all("pcie_rx_bytes_per_second" in s["metrics"] for s in samples)  # 20 ms call, KB/s
    assert nvml.calls["nvmlDeviceGetFieldValues"] == 8  # no field left to ask after the first cycle
    assert nvml.calls["nvmlDeviceGetPcieThroughput"] == 8 * 3 * 2
    assert all("temp_mem_celsius" in names for names in source.unsupported_fields().values())


def test_transient_error_leaves_a_field_out_for_one_cycle_only():
    class FlakyPower(FakeNvml):
        failures = 8

        def nvmlDeviceGetPowerUsage(self, handle):
            if self.failures:
                self.failures -= 1
                raise pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)
            return super().nvmlDeviceGetPowerUsage(handle)

    clock = ManualClock()
    source = NvmlSource(FlakyPower(SimNode("n1", start=START, clock=clock)), clock=clock)
    source.start()
    first, _ = source.sample()
    second, _ = source.sample()
    assert all("power_watts" not in s["metrics"] for s in first)
    assert all("power_watts" in s["metrics"] for s in second)


def test_samples_are_deterministic_per_seed():
    a = _source(seed=5)[0].sample()[0]
    b = _source(seed=5)[0].sample()[0]
    c = _source(seed=6)[0].sample()[0]
    assert a == b
    assert [s["metrics"] for s in a] != [s["metrics"] for s in c]


def test_sample_is_cheap_for_eight_gpus():
    source, _, _, _ = _source(clock=time.time)
    source.sample()  # first cycle discovers NVLinks
    cycles = 100
    cpu_before = time.process_time()
    for _ in range(cycles):
        samples, _ = source.sample()
    per_cycle_ms = (time.process_time() - cpu_before) / cycles * 1000.0
    assert len(samples) == 8
    assert per_cycle_ms < 5.0, f"{per_cycle_ms:.2f} ms CPU per 8-GPU cycle"


# ---- fallbacks: versioned to deprecated calls, fields to calls, per-link to all-lane totals ----


def _counting_source(nvml_class=FakeNvml, hidden=frozenset(), profile=None, faults=(), gpu_count=2):
    clock = ManualClock()
    node = SimNode("n1", gpu_count=gpu_count, faults=faults, start=START, clock=clock)
    nvml = CountingNvml(nvml_class(node, profile), hidden=frozenset(hidden))
    source = NvmlSource(nvml, clock=clock)
    source.start()
    return source, node, clock, nvml


def _cycles(source, clock, count):
    samples = []
    for _ in range(count):
        samples, _ = source.sample()
        clock.t += 1.0
    return _by_gpu(samples)


@pytest.mark.parametrize("how", ["pynvml predates it", "driver lacks it", "not supported"])
def test_gpu_temperature_falls_back_to_the_deprecated_call_only_when_v_is_unavailable(how):
    error = {"driver lacks it": pynvml.NVML_ERROR_FUNCTION_NOT_FOUND, "not supported": pynvml.NVML_ERROR_NOT_SUPPORTED}

    class NoTemperatureV(FakeNvml):
        def nvmlDeviceGetTemperatureV(self, handle, sensor, version=pynvml.nvmlTemperature_v1):
            raise pynvml.NVMLError(error[how])

    hidden = {"nvmlDeviceGetTemperatureV"} if how == "pynvml predates it" else set()
    source, node, clock, nvml = _counting_source(NoTemperatureV, hidden=hidden)
    metrics = _cycles(source, clock, 3)
    assert metrics[0]["temp_gpu_celsius"] == float(node.reading(0, clock.t - 1.0).temp_gpu_celsius)
    assert nvml.calls["nvmlDeviceGetTemperatureV"] == (0 if hidden else 2)  # asked once per GPU
    assert nvml.calls["nvmlDeviceGetTemperature"] == 2 * 3
    assert "temp_gpu_celsius" not in source.unsupported_fields()[0]


def test_clock_event_reasons_fall_back_to_the_throttle_name_only_on_an_older_library():
    source, _node, clock, nvml = _counting_source(
        hidden={"nvmlDeviceGetCurrentClocksEventReasons"}, faults=[parse_fault("power_brake@1+0")]
    )
    metrics = _cycles(source, clock, 2)
    assert metrics[1]["clock_event_reasons"] & 0x88 == 0x88
    assert nvml.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == 2 * 2


class PerLinkCountersNotSupported(FakeNvml):
    """A board whose per-link NVLink counters answer NOT_SUPPORTED while the all-lane totals work."""

    def nvmlDeviceGetNvLinkErrorCounter(self, device, link, counter):
        self._device(device, "nvmlDeviceGetNvLinkErrorCounter")
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)


def test_nvlink_counters_come_from_the_total_fields_where_per_link_calls_fail():
    from dataclasses import replace

    from fleetwatch.sim.profiles import H100_80GB_HBM3

    fault = Fault("nvlink_errors", gpu=1, at_seconds=5.0, link=3, rate_per_second=100.0)
    summing = replace(H100_80GB_HBM3, nvlink_legacy_totals_read_zero=False, nvlink_counters_not_supported=frozenset())
    source, _node, clock, nvml = _counting_source(PerLinkCountersNotSupported, profile=summing, faults=[fault])
    first = _cycles(source, clock, 1)
    # The totals join the batch in the cycle that learned the per-link calls fail.
    assert first[0]["nvlink_crc_flit_errors_total"] == 0 and first[0]["nvlink_crc_data_errors_total"] == 0
    clock.t = START + 15.0
    later = _cycles(source, clock, 1)
    assert later[1]["nvlink_crc_flit_errors_total"] == 1 + 1000  # 100/s for 10 s, through the field
    assert later[1]["nvlink_crc_data_errors_total"] == 1 + 250
    assert later[1]["nvlink_replay_errors_total"] > 0 and later[0]["nvlink_replay_errors_total"] == 0
    assert (later[1]["nvlink_links_up"], later[1]["nvlink_links_total"]) == (18, 18)
    assert nvml.calls["nvmlDeviceGetNvLinkErrorCounter"] == 2 * 4 * 18  # learned once per GPU
    assert nvml.calls["nvmlDeviceGetFieldValues"] == 2 * 2  # still one batch per GPU per cycle
    assert not any(name.startswith("nvlink") for name in source.unsupported_fields()[0])


def test_nvlink_per_link_function_missing_from_pynvml_uses_the_total_fields():
    source, _, clock, _ = _counting_source(hidden={"nvmlDeviceGetNvLinkErrorCounter"})
    metrics = _cycles(source, clock, 2)
    # Hopper's legacy totals answer SUCCESS (with 0); with no per-link call they are all there is.
    assert {name for name in metrics[0] if name.endswith("errors_total") and name.startswith("nvlink")} == {
        "nvlink_crc_flit_errors_total",
        "nvlink_crc_data_errors_total",
        "nvlink_replay_errors_total",
        "nvlink_recovery_errors_total",
    }


def test_hopper_legacy_totals_are_not_asked_when_the_links_keep_per_link_counters():
    source, _, clock, nvml = _counting_source()
    asked: list[int] = []
    inner = nvml._inner
    real = inner.nvmlDeviceGetFieldValues

    def recording(handle, ids):
        asked.extend(ids)
        return real(handle, ids)

    inner.nvmlDeviceGetFieldValues = recording
    _cycles(source, clock, 2)
    assert pynvml.NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL not in asked  # would read a false 0
    assert pynvml.NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL not in asked
    assert "nvlink_crc_data_errors_total" in source.unsupported_fields()[0]


def test_board_without_nvlink_lists_every_nvlink_field_unsupported():
    class NoNvlink(FakeNvml):
        def nvmlDeviceGetNvLinkState(self, device, link):
            self._device(device, "nvmlDeviceGetNvLinkState")
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    source, _, clock, nvml = _counting_source(NoNvlink)
    metrics = _cycles(source, clock, 3)
    assert not any(name.startswith("nvlink") for name in metrics[0])
    nvlink = {name for name in wire.GPU_FIELDS if name.startswith("nvlink")}
    assert nvlink <= set(source.unsupported_fields()[0])
    assert nvml.calls["nvmlDeviceGetNvLinkState"] == 2 * 36 and nvml.calls["nvmlDeviceGetNvLinkErrorCounter"] == 0


# ---- PCIe throughput from the byte counters -----------------------------------------------------


def _with_field(values, field_id, value_type, member, number):
    for value in values:
        if value.fieldId == field_id:
            value.valueType = value_type
            setattr(value.value, member, number)
    return values


def test_pcie_rates_need_two_readings_and_skip_a_counter_reset():
    class Resetting(FakeNvml):
        offset = 0

        def nvmlDeviceGetFieldValues(self, handle, fieldIds):
            values = super().nvmlDeviceGetFieldValues(handle, fieldIds)
            for value in values:
                if value.fieldId in (pynvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES, pynvml.NVML_FI_DEV_PCIE_COUNT_RX_BYTES):
                    value.value.ullVal -= self.offset
            return values

    source, node, clock, nvml = _counting_source(Resetting)
    first = _cycles(source, clock, 1)
    assert not PCIE_RATES & set(first[0])  # one reading is no rate
    second = _cycles(source, clock, 1)
    assert set(second[0]) >= PCIE_RATES
    nvml._inner.offset = node.pcie_bytes(0, START)[1]  # the driver reloaded: counters start over
    third = _cycles(source, clock, 1)
    assert not PCIE_RATES & set(third[0])  # a decrease is a reset, not a huge wrap
    fourth = _cycles(source, clock, 1)
    assert fourth[0]["pcie_rx_bytes_per_second"] > 0
    assert nvml.calls["nvmlDeviceGetPcieThroughput"] == 0
    assert not PCIE_RATES & set(source.unsupported_fields()[0])


def test_32_bit_pcie_byte_counters_alias_so_the_throughput_call_is_used():
    class NarrowCounters(FakeNvml):
        def nvmlDeviceGetFieldValues(self, handle, fieldIds):
            values = super().nvmlDeviceGetFieldValues(handle, fieldIds)
            for value in values:
                if value.fieldId in (pynvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES, pynvml.NVML_FI_DEV_PCIE_COUNT_RX_BYTES):
                    value.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
                    value.value.uiVal = value.value.ullVal & 0xFFFFFFFF
            return values

    source, node, clock, nvml = _counting_source(NarrowCounters)
    metrics = _cycles(source, clock, 2)
    reading = node.reading(1, clock.t - 1.0)
    assert metrics[1]["pcie_rx_bytes_per_second"] == reading.pcie_rx_kilobytes_per_second * 1024.0  # KB/s
    assert nvml.calls["nvmlDeviceGetPcieThroughput"] == 2 * 2 * 2  # TX and RX, both cycles


def test_pcie_fields_missing_from_an_older_pynvml_use_the_throughput_call():
    source, _, clock, nvml = _counting_source(hidden={"NVML_FI_DEV_PCIE_COUNT_TX_BYTES"})
    metrics = _cycles(source, clock, 1)
    assert set(metrics[0]) >= PCIE_RATES  # the call gives a rate on the first cycle
    assert nvml.calls["nvmlDeviceGetPcieThroughput"] == 2 * 2


def test_field_values_call_unsupported_as_a_whole_falls_back_to_calls():
    class NoFieldValues(FakeNvml):
        def nvmlDeviceGetFieldValues(self, handle, fieldIds):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

    source, _, clock, nvml = _counting_source(NoFieldValues)
    metrics = _cycles(source, clock, 2)
    assert {
        "energy_joules",
        "pcie_replay_total",
        "ecc_sbe_volatile_total",
        "remapped_rows_correctable",
        "pcie_rx_bytes_per_second",
    } <= set(metrics[0])
    assert "temp_mem_celsius" not in metrics[0] and "temp_mem_celsius" in source.unsupported_fields()[0]
    assert nvml.calls["nvmlDeviceGetFieldValues"] == 2


def test_field_errors_other_than_not_supported_leave_the_field_out_for_that_cycle_only():
    class FlakyFields(FakeNvml):
        failures = 2

        def nvmlDeviceGetFieldValues(self, handle, fieldIds):
            values = super().nvmlDeviceGetFieldValues(handle, fieldIds)
            if self.failures:
                self.failures -= 1
                for value in values:
                    if value.fieldId == pynvml.NVML_FI_DEV_MEMORY_TEMP:
                        value.nvmlReturn = pynvml.NVML_ERROR_UNKNOWN
            return values

    source, _, clock, _nvml = _counting_source(FlakyFields)
    first = _cycles(source, clock, 1)
    assert all("temp_mem_celsius" not in m for m in first.values())
    assert "energy_joules" in first[0]  # the other values of the same call are fine
    second = _cycles(source, clock, 1)
    assert all("temp_mem_celsius" in m for m in second.values())
    assert source.unsupported_fields()[0] == sorted(H100_ABSENT)


# ---- running processes ---------------------------------------------------------------------------


def test_pids_default_to_one_training_worker_per_gpu_in_rank_order():
    source, node, _clock, _ = _source()
    samples, _ = source.sample()
    pids = [s["pids"] for s in samples]
    assert all(len(p) == 1 for p in pids)
    assert [p[0] for p in pids] == list(range(pids[0][0], pids[0][0] + 8))
    assert 10_000 <= pids[0][0] < 4_194_304  # a 64-bit host's default pid_max
    assert pids == [list(node.processes(g)) for g in range(8)]


def test_pids_follow_placed_processes_sorted_and_once():
    clock = ManualClock()
    node = SimNode("n1", gpu_count=3, start=START, clock=clock, processes={0: [4321, 1234, 4321], 2: []})
    source = NvmlSource(make_fake_nvml(node), clock=clock)
    source.start()
    assert [s["pids"] for s in source.sample()[0]] == [[1234, 4321], [], []]
    node.place_processes(1, [777])
    node.place_processes(0, [])
    assert [s["pids"] for s in source.sample()[0]] == [[], [777], []]
    with pytest.raises(ValueError):
        node.place_processes(3, [1])
    with pytest.raises(ValueError):
        node.place_processes(0, [0])


def test_pids_survive_used_memory_not_available_and_errors():
    class Quirky(FakeNvml):
        mode = "mig"

        def nvmlDeviceGetComputeRunningProcesses(self, handle):
            processes = super().nvmlDeviceGetComputeRunningProcesses(handle)
            if self.mode == "mig":  # pynvml turns NVML_VALUE_NOT_AVAILABLE into None
                for process in processes:
                    process.usedGpuMemory = None
            elif self.mode == "error":
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)
            return processes

    source, node, _clock, nvml = _counting_source(Quirky)
    assert _pids(source) == [list(node.processes(0)), list(node.processes(1))]
    nvml._inner.mode = "error"
    assert _pids(source) == [[], []]  # unknown this cycle
    nvml._inner.mode = "ok"
    assert _pids(source) == [list(node.processes(0)), list(node.processes(1))]


def _pids(source):
    return [s["pids"] for s in source.sample()[0]]


def test_pids_not_supported_is_asked_once_and_older_drivers_use_v2():
    class NoProcesses(FakeNvml):
        def nvmlDeviceGetComputeRunningProcesses(self, handle):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    source, _, _, nvml = _counting_source(NoProcesses)
    assert _pids(source) == [[], []] and _pids(source) == [[], []]
    assert nvml.calls["nvmlDeviceGetComputeRunningProcesses"] == 2

    class OldDriver(FakeNvml):
        def nvmlDeviceGetComputeRunningProcesses(self, handle):
            # pynvml's unversioned call maps to _v3; an older driver has no such entry point.
            raise pynvml.NVMLLibraryMismatchError("Unversioned function called ...")

        def nvmlDeviceGetComputeRunningProcesses_v2(self, handle):
            return FakeNvml.nvmlDeviceGetComputeRunningProcesses(self, handle)

    source, node, _, nvml = _counting_source(OldDriver)
    assert _pids(source) == [list(node.processes(0)), list(node.processes(1))]
    assert _pids(source) == [list(node.processes(0)), list(node.processes(1))]
    assert nvml.calls["nvmlDeviceGetComputeRunningProcesses"] == 2
    assert nvml.calls["nvmlDeviceGetComputeRunningProcesses_v2"] == 2 * 2


# ---- GPU lost ---------------------------------------------------------------------------------


def test_gpu_lost_gives_one_event_and_the_others_keep_sampling():
    source, node, clock, nvml = _source(faults=[parse_fault("gpu_lost@3+10")], counting=True)
    clock.t = START + 9.0
    samples, events = source.sample()
    assert len(samples) == 8 and events == []
    clock.t = START + 10.5
    samples, events = source.sample()
    assert sorted(_by_gpu(samples)) == [0, 1, 2, 4, 5, 6, 7]
    assert events == [
        {
            "t": START + 10.5,
            "kind": "gpu_lost",
            "gpu": 3,
            "uuid": node.gpus[3].uuid,
            "pci_bus_id": "0000:5d:00.0",
            "message": "GPU is lost: NVML calls fail with NVML_ERROR_GPU_IS_LOST",
            "source": "nvml",
        }
    ]
    utilization_calls = nvml.calls["nvmlDeviceGetUtilizationRates"]
    for _ in range(3):
        clock.t += 1.0
        samples, events = source.sample()
        assert len(samples) == 7 and events == []
    assert nvml.calls["nvmlDeviceGetUtilizationRates"] == utilization_calls + 3 * 7


def test_gpu_lost_before_start_is_reported_on_the_first_sample():
    clock = ManualClock(START + 60.0)
    source, _, _, _ = _source(faults=[parse_fault("gpu_lost@2+5")], clock=clock)
    assert source.inventory[2]["uuid"] is None and source.inventory[3]["uuid"] is not None
    samples, events = source.sample()
    assert len(samples) == 7
    assert [(e["kind"], e["gpu"]) for e in events] == [("gpu_lost", 2)]
    assert source.sample()[1] == []


# ---- every fault kind at its time -------------------------------------------------------------

FAULT_AT = 20.0


def _check_xid(before, after, peer):
    # An XID alone is an event: the GPU keeps running and no counter moves.
    assert after is not None and after["ecc_dbe_volatile_total"] == 0 and after["remap_pending"] == 0
    assert after["clock_event_reasons"] & 0x88 == 0 and after["sm_clock_mhz"] >= 1950.0


def _check_ecc_dbe(before, after, peer):
    assert (before["ecc_dbe_volatile_total"], after["ecc_dbe_volatile_total"]) == (0, 1)
    assert (before["ecc_dbe_aggregate_total"], after["ecc_dbe_aggregate_total"]) == (0, 1)


def _check_row_remap_pending(before, after, peer):
    assert (before["remap_pending"], after["remap_pending"]) == (0, 1)
    assert after["remapped_rows_uncorrectable"] == before["remapped_rows_uncorrectable"] + 1


def _check_row_remap_failure(before, after, peer):
    assert (before["remap_failure"], after["remap_failure"]) == (0, 1)


def _check_nvlink_errors(before, after, peer):
    for name in ("nvlink_crc_flit_errors_total", "nvlink_replay_errors_total", "nvlink_recovery_errors_total"):
        assert before[name] == 0 and after[name] > 0, name
    assert "nvlink_crc_data_errors_total" not in after  # Hopper links keep no data-CRC counter
    assert after["nvlink_crc_flit_errors_total"] >= 50  # 20/s by default, sampled 3 s in
    assert peer["nvlink_crc_flit_errors_total"] == 0


def _check_nvlink_down(before, after, peer):
    assert (before["nvlink_links_up"], after["nvlink_links_up"]) == (18, 17)
    assert after["nvlink_links_total"] == 18


def _check_pcie_replays(before, after, peer):
    assert after["pcie_replay_total"] - before["pcie_replay_total"] > 5  # 2/s; >8 a minute is bad


def _check_pcie_downtrain(before, after, peer):
    assert (before["pcie_link_gen"], before["pcie_link_width"]) == (5, 16)
    assert (after["pcie_link_gen"], after["pcie_link_width"]) == (4, 8)
    assert (after["pcie_link_gen_max"], after["pcie_link_width_max"]) == (5, 16)


def _check_thermal_slowdown(before, after, peer):
    assert before["clock_event_reasons"] & 0x48 == 0
    assert before["temp_gpu_celsius"] < before["temp_slowdown_celsius"]
    assert after["clock_event_reasons"] & 0x48 == 0x48  # HW slowdown + HW thermal slowdown
    assert after["sm_clock_mhz"] <= 0.55 * after["sm_clock_max_mhz"]
    assert after["temp_gpu_celsius"] >= after["temp_slowdown_celsius"]
    assert after["power_watts"] < 0.6 * before["power_watts"]
    # Its synchronous peers wait for it: full clock, lower power.
    assert peer["sm_clock_mhz"] >= 1950.0 and peer["clock_event_reasons"] & 0x48 == 0
    assert peer["power_watts"] < 0.9 * before["power_watts"]


def _check_power_brake(before, after, peer):
    assert before["clock_event_reasons"] & 0x88 == 0
    assert after["clock_event_reasons"] & 0x88 == 0x88  # HW slowdown + HW power brake
    assert after["sm_clock_mhz"] <= 0.5 * after["sm_clock_max_mhz"]
    assert after["power_watts"] < 0.5 * after["power_limit_watts"]


def _check_gpu_lost(before, after, peer):
    assert after is None


FAULT_CHECKS = {
    "xid:13": (_check_xid, 13),
    "ecc_dbe": (_check_ecc_dbe, 48),
    "row_remap_pending": (_check_row_remap_pending, 63),
    "row_remap_failure": (_check_row_remap_failure, 64),
    "nvlink_errors": (_check_nvlink_errors, None),
    "nvlink_down": (_check_nvlink_down, 74),
    "pcie_replays": (_check_pcie_replays, None),
    "pcie_downtrain": (_check_pcie_downtrain, None),
    "thermal_slowdown": (_check_thermal_slowdown, None),
    "power_brake": (_check_power_brake, None),
    "gpu_lost": (_check_gpu_lost, 79),
}


@pytest.mark.parametrize("kind", sorted(FAULT_CHECKS))
def test_every_fault_kind_shows_at_its_time_and_not_before(kind):
    check, xid = FAULT_CHECKS[kind]
    source, node, clock, _ = _source(faults=[parse_fault(f"{kind}@2+{FAULT_AT:g}")])
    baseline = _by_gpu(source.sample()[0])
    clock.t = START + FAULT_AT - 0.5
    before_samples, before_events = source.sample()
    before = _by_gpu(before_samples)
    assert before_events == []
    assert source.wait_events(0.05) == []  # no XID before its time
    sw_power_cap = pynvml.nvmlClocksEventReasonSwPowerCap  # the workload's own, at peak draw
    for gpu in range(8):  # nothing has moved yet beyond the workload's own wander
        assert before[gpu]["clock_event_reasons"] & ~sw_power_cap == 0, gpu
        for name in (
            "ecc_dbe_volatile_total",
            "remap_pending",
            "remap_failure",
            "nvlink_links_up",
            "pcie_link_gen",
            "pcie_link_width",
            "pcie_replay_total",
            "nvlink_crc_flit_errors_total",
        ):
            assert before[gpu][name] == baseline[gpu][name], (gpu, name)
    clock.t = START + FAULT_AT + 3.0
    after_samples, after_events = source.sample()
    after = _by_gpu(after_samples)
    check(before[2], after.get(2), after[0])
    if kind == "gpu_lost":
        assert [(e["kind"], e["gpu"]) for e in after_events] == [("gpu_lost", 2)]
    else:
        assert after_events == []
    events = source.wait_events(0.1)  # a due XID returns at once; none: the timeout
    if xid is None:
        assert events == []
    else:
        assert [(e["kind"], e["gpu"], e["xid"], e["uuid"]) for e in events] == [("xid", 2, xid, node.gpus[2].uuid)]
        assert events[0]["pci_bus_id"] == "0000:3a:00.0" and events[0]["source"] == "nvml"
    source.close()


def test_fault_with_a_duration_clears():
    faults = [
        parse_fault("thermal_slowdown@1+10/20"),
        parse_fault("nvlink_down@4+10/5"),
        parse_fault("pcie_downtrain@6+10/5"),
        parse_fault("row_remap_pending@7+10/5"),
    ]
    source, _, clock, _ = _source(faults=faults)
    clock.t = START + 12.0
    during = _by_gpu(source.sample()[0])
    clock.t = START + 60.0
    after = _by_gpu(source.sample()[0])
    assert during[1]["clock_event_reasons"] & 0x48 and not after[1]["clock_event_reasons"] & 0x48
    assert after[1]["sm_clock_mhz"] >= 1950.0
    assert after[1]["temp_gpu_celsius"] < after[1]["temp_slowdown_celsius"] - 5
    assert (during[4]["nvlink_links_up"], after[4]["nvlink_links_up"]) == (17, 18)
    assert after[4]["nvlink_recovery_errors_total"] == 1  # the link was retrained once
    assert (during[6]["pcie_link_gen"], after[6]["pcie_link_gen"]) == (4, 5)
    assert (during[7]["remap_pending"], after[7]["remap_pending"]) == (1, 0)
    assert after[7]["remapped_rows_uncorrectable"] == 1  # the remapped row stays remapped


def test_nvlink_errors_climb_on_the_chosen_link_at_the_chosen_rate():
    fault = Fault("nvlink_errors", gpu=0, at_seconds=5.0, link=7, rate_per_second=100.0)
    source, _node, clock, nvml = _source(faults=[fault])
    clock.t = START + 15.0
    metrics = _by_gpu(source.sample()[0])[0]
    assert metrics["nvlink_crc_flit_errors_total"] == 1 + 1000
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    assert nvml.nvmlDeviceGetNvLinkErrorCounter(handle, 7, pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT) == 1001
    assert nvml.nvmlDeviceGetNvLinkErrorCounter(handle, 6, pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT) == 0


# ---- events through wait_events ---------------------------------------------------------------


def test_xid_events_arrive_within_half_a_second_of_the_fault():
    start = time.time()
    faults = [parse_fault("xid:31@1+0.4"), parse_fault("ecc_dbe@4+0.7"), parse_fault("gpu_lost@6+1.0")]
    node = SimNode("node-rt", faults=faults, start=start)
    source = NvmlSource(make_fake_nvml(node))
    source.start()
    received: list[dict] = []
    stop = threading.Event()

    def pump() -> None:
        while not stop.is_set():
            received.extend(source.wait_events(0.2))

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    deadline = time.monotonic() + 3.0
    while len(received) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    thread.join(timeout=2.0)
    assert not thread.is_alive()
    assert [(e["gpu"], e["xid"]) for e in received] == [(1, 31), (4, 48), (6, 79)]
    for event, fault in zip(received, faults):
        delay = event["t"] - node.fault_time(fault)
        assert 0.0 <= delay <= 0.5, (fault, delay)
    source.close()


def test_wait_events_never_raises():
    class BrokenWait(FakeNvml):
        def nvmlEventSetWait_v2(self, eventSet, timeoutms):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)

    clock = ManualClock()
    source = NvmlSource(BrokenWait(SimNode("n1", start=START, clock=clock)), clock=clock)
    source.start()
    before = time.monotonic()
    assert source.wait_events(0.1) == []
    assert time.monotonic() - before >= 0.09  # waited out the timeout instead of spinning
    source.close()
    assert source.wait_events(0.01) == []
    assert source.sample() == ([], [])


def test_close_frees_the_event_set_and_releases_nvml():
    source, _, _, nvml = _source(counting=True)
    source.close()
    source.close()
    assert nvml.calls["nvmlEventSetFree"] == 1 and nvml.calls["nvmlShutdown"] == 1
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        nvml.nvmlDeviceGetCount()


# ---- loading the real library -----------------------------------------------------------------


def _nvml_library_present() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


@pytest.mark.skipif(
    _nvml_library_present() or ctypes.util.find_library("nvidia-ml") is not None,
    reason="this machine has an NVIDIA driver",
)
def test_load_nvml_returns_none_without_a_driver(caplog):
    with caplog.at_level(logging.WARNING, logger="fleetwatch.agent.sources.nvml"):
        assert load_nvml() is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("NVML unavailable (NVMLError_LibraryNotFound")
    assert warnings[0].endswith("): running host-only")


def test_load_nvml_returns_none_without_pynvml(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with caplog.at_level(logging.WARNING, logger="fleetwatch.agent.sources.nvml"):
        assert load_nvml() is None
    assert [r.getMessage() for r in caplog.records][-1].endswith("running host-only")


def test_xid_event_data_that_is_no_xid_is_left_out(caplog):
    # The collector refuses a batch carrying an XID outside 1-999 (fleetwatch.limits) as a whole,
    # so event data that is no XID is said once in the log and never sent.
    caplog.set_level(logging.WARNING, logger="fleetwatch.agent.sources.nvml")
    source, _node, clock, _ = _source(faults=[parse_fault("xid:4000@2+1"), parse_fault("xid:79@3+2")])
    clock.t = START + 3.0
    received = source.wait_events(0.1) + source.wait_events(0.1)
    assert [(e["gpu"], e["xid"]) for e in received] == [(3, 79)]
    assert "XID event data 4000, which is no XID" in caplog.text
    source.close()
