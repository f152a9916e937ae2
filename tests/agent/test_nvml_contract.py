"""The NVML source's contract over every canonical GPU field (fleetwatch.wire.GPU_FIELDS).

Every field, on every board configuration, in every cycle, is either present with the right type
and a value in its unit's plausible range, or absent; absent means listed by unsupported_fields()
(the board or driver cannot give it) or a known one-cycle gap (a rate on the first cycle, a value
NVML reported as "not available"). Nothing is ever 0 or a sentinel in place of a missing value.
The sentinel tests feed NVML's "not available" values through every kind of read: c_uint and
c_ulonglong results (all ones), signed results (-1), and each field value type.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pynvml
import pytest

from fleetwatch import wire
from fleetwatch.agent.sources.gpm import GPM_FIELDS
from fleetwatch.agent.sources.nvml import NvmlSource
from fleetwatch.sim.fake_nvml import FakeNvml
from fleetwatch.sim.node import SimNode
from fleetwatch.sim.profiles import H100_80GB_HBM3, H200, GpuProfile
from fleetwatch.sim.scenario import parse_fault
from fleetwatch.v1 import telemetry_pb2 as pb

START = 1_700_000_000.0
U32_NA = 0xFFFF_FFFF
U64_NA = 0xFFFF_FFFF_FFFF_FFFF
TIB = 1 << 40

# Canonical field -> (Python type, lowest plausible, highest plausible), in the field's own unit.
PLAUSIBLE: dict[str, tuple[type, float, float]] = {
    "gpu_util_percent": (float, 0, 100),
    "mem_util_percent": (float, 0, 100),
    "mem_used_bytes": (int, 0, TIB),
    "mem_total_bytes": (int, 1 << 30, TIB),
    "temp_gpu_celsius": (float, 1, 125),
    "temp_mem_celsius": (float, 1, 125),
    "temp_slowdown_celsius": (float, 40, 125),
    "temp_shutdown_celsius": (float, 40, 125),
    "power_watts": (float, 0, 2_000),
    "power_limit_watts": (float, 50, 2_000),
    "energy_joules": (float, 0, 1e12),  # 1e12 J is 30 years at 1 kW
    "sm_clock_mhz": (float, 0, 4_000),
    "sm_clock_max_mhz": (float, 100, 4_000),
    "mem_clock_mhz": (float, 0, 20_000),
    "clock_event_reasons": (int, 0, 0xFFFF),  # nvmlClocksEventReason* bits sit in the low bits
    "fan_percent": (float, 0, 100),
    "pcie_replay_total": (int, 0, U32_NA - 1),
    "pcie_tx_bytes_per_second": (float, 0, 130e9),  # Gen6 x16 is ~121 GB/s a direction
    "pcie_rx_bytes_per_second": (float, 0, 130e9),
    "pcie_link_gen": (int, 1, 6),
    "pcie_link_gen_max": (int, 1, 6),
    "pcie_link_width": (int, 1, 32),
    "pcie_link_width_max": (int, 1, 32),
    "ecc_sbe_volatile_total": (int, 0, 1 << 62),
    "ecc_dbe_volatile_total": (int, 0, 1 << 62),
    "ecc_sbe_aggregate_total": (int, 0, 1 << 62),
    "ecc_dbe_aggregate_total": (int, 0, 1 << 62),
    "retired_pages_sbe": (int, 0, 1 << 16),
    "retired_pages_dbe": (int, 0, 1 << 16),
    "retired_pages_pending": (int, 0, 1),
    "remapped_rows_correctable": (int, 0, 1 << 16),
    "remapped_rows_uncorrectable": (int, 0, 1 << 16),
    "remap_pending": (int, 0, 1),
    "remap_failure": (int, 0, 1),
    "nvlink_links_up": (int, 0, 36),
    "nvlink_links_total": (int, 1, 36),
    "nvlink_crc_flit_errors_total": (int, 0, 1 << 62),
    "nvlink_crc_data_errors_total": (int, 0, 1 << 62),
    "nvlink_replay_errors_total": (int, 0, 1 << 62),
    "nvlink_recovery_errors_total": (int, 0, 1 << 62),
    # NVML GPM: percentages over the interval, NVLink at most 18 links x 50 GB/s each way.
    **{name: (float, 0, 100) if name.endswith("_percent") else (float, 0, 1e12) for name in GPM_FIELDS},
}
# Rates over two reads: none on the first cycle (PCIe byte counters, GPM's samples).
FIRST_CYCLE_GAPS = {"pcie_tx_bytes_per_second", "pcie_rx_bytes_per_second", *GPM_FIELDS}


class ManualClock:
    def __init__(self, t: float = START) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# A PCIe-era board that still has a fan, retires pages and keeps every NVLink counter per link:
# the H100's behaviour with nothing answered NOT_SUPPORTED, so every canonical field is exercised.
EVERYTHING = replace(
    H100_80GB_HBM3,
    not_supported=frozenset(),
    fields_not_supported=frozenset(),
    nvlink_counters_not_supported=frozenset(),
    nvlink_legacy_totals_read_zero=False,
)


class CallsOnly(FakeNvml):
    """A driver without the field-values call: everything through the per-metric calls."""

    def nvmlDeviceGetFieldValues(self, handle: Any, fieldIds: Any) -> Any:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)


CONFIGURATIONS: dict[str, tuple[str, type[FakeNvml], GpuProfile | None]] = {
    "H100": ("H100", FakeNvml, None),
    "H200": ("H200", FakeNvml, None),
    "everything supported": ("H100", FakeNvml, EVERYTHING),
    "calls only": ("H100", CallsOnly, EVERYTHING),
}
# Every fault kind at once, on different GPUs, so the ranges hold under faults too.
FAULTS = [
    parse_fault(spec)
    for spec in (
        "ecc_dbe@0+1",
        "row_remap_pending@1+1",
        "row_remap_failure@1+2",
        "nvlink_errors@2+1",
        "nvlink_down@3+1",
        "pcie_replays@4+1",
        "pcie_downtrain@5+1",
        "thermal_slowdown@6+1",
        "power_brake@7+1",
        "xid:13@0+1",
    )
]


def _source(configuration: str, faults=()) -> tuple[NvmlSource, SimNode, ManualClock]:
    model, nvml_class, profile = CONFIGURATIONS[configuration]
    clock = ManualClock()
    node = SimNode("contract", model=model, faults=faults, start=START, clock=clock)
    source = NvmlSource(nvml_class(node, profile), clock=clock)
    source.start()
    return source, node, clock


def _check_sample(metrics: dict[str, Any], unsupported: set[str], first_cycle: bool) -> None:
    assert set(metrics) <= set(wire.GPU_FIELDS), set(metrics) - set(wire.GPU_FIELDS)
    for name in wire.GPU_FIELDS:
        if name not in metrics:
            gap = first_cycle and name in FIRST_CYCLE_GAPS
            assert name in unsupported or gap, f"{name} absent but not learned unsupported"
            continue
        assert name not in unsupported, f"{name} present but listed unsupported"
        kind, low, high = PLAUSIBLE[name]
        value = metrics[name]
        assert type(value) is kind, (name, value)
        assert kind is int or math.isfinite(value), (name, value)
        assert low <= value <= high, (name, value)
    # Relations a real board keeps.
    pairs = (
        ("mem_used_bytes", "mem_total_bytes"),
        ("nvlink_links_up", "nvlink_links_total"),
        ("pcie_link_gen", "pcie_link_gen_max"),
        ("pcie_link_width", "pcie_link_width_max"),
        ("sm_clock_mhz", "sm_clock_max_mhz"),
        ("temp_slowdown_celsius", "temp_shutdown_celsius"),
    )
    for small, large in pairs:
        if small in metrics and large in metrics:
            assert metrics[small] <= metrics[large], (small, large)
    wire.fill_metrics(pb.GpuMetrics(), metrics)


def test_the_plausible_table_covers_exactly_the_canonical_fields():
    assert set(PLAUSIBLE) == set(wire.GPU_FIELDS)
    for name, (kind, _, _) in PLAUSIBLE.items():
        assert (kind is int) == (name in wire.INTEGER_FIELDS), name


@pytest.mark.parametrize("faulty", [False, True], ids=["healthy", "faulty"])
@pytest.mark.parametrize("configuration", sorted(CONFIGURATIONS))
def test_every_field_is_typed_and_plausible_or_absent_and_listed(configuration, faulty):
    source, _, clock = _source(configuration, FAULTS if faulty else ())
    for cycle in range(4):
        samples, _ = source.sample()
        unsupported = source.unsupported_fields()
        assert len(samples) == 8
        for sample in samples:
            _check_sample(sample["metrics"], set(unsupported[sample["gpu"]]), first_cycle=cycle == 0)
            assert all(type(pid) is int and pid > 0 for pid in sample["pids"])
        clock.t += 1.0 if cycle else 5.0  # the faults start 1-2 s in


def test_every_canonical_field_is_present_in_some_configuration():
    seen: set[str] = set()
    for configuration in CONFIGURATIONS:
        source, _, clock = _source(configuration)
        source.sample()
        clock.t += 1.0
        for sample in source.sample()[0]:
            seen |= set(sample["metrics"])
    assert seen == set(wire.GPU_FIELDS)


@pytest.mark.parametrize("profile", [H100_80GB_HBM3, H200], ids=["H100", "H200"])
def test_hopper_lists_exactly_what_its_capture_shows_as_na(profile):
    source, _, _ = _source(profile.model)
    source.sample()
    expected = [
        "fan_percent",
        "nvlink_crc_data_errors_total",
        "retired_pages_dbe",
        "retired_pages_pending",
        "retired_pages_sbe",
    ]
    assert source.unsupported_fields() == {gpu: expected for gpu in range(8)}


# ---- sentinels -------------------------------------------------------------------------------


def _call_sentinel(method: str, transform: Callable[[Any], Any]) -> type[FakeNvml]:
    """A FakeNvml whose `method` answers through `transform` while the class's `active` is set."""

    def answer(self: Any, *args: Any, **kwargs: Any) -> Any:
        value = getattr(FakeNvml, method)(self, *args, **kwargs)
        return transform(value) if type(self).active else value

    return type(f"Sentinel_{method}", (FakeNvml,), {"active": True, method: answer})


def _field_sentinel(field_id: int, value_type: int, member: str, number: Any) -> type[FakeNvml]:
    def answer(self: Any, handle: Any, fieldIds: Any) -> Any:
        values = FakeNvml.nvmlDeviceGetFieldValues(self, handle, fieldIds)
        if type(self).active:
            for value in values:
                if value.fieldId == field_id:
                    value.valueType = value_type
                    setattr(value.value, member, number)
        return values

    return type(f"Sentinel_field_{field_id}", (FakeNvml,), {"active": True, "nvmlDeviceGetFieldValues": answer})


def _utilization(value: Any) -> Any:
    return pynvml.c_nvmlUtilization_t(gpu=U32_NA, memory=value.memory)


def _memory(value: Any) -> Any:
    value.used = U64_NA
    return value


U32, U64 = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
SENTINELS: dict[str, tuple[type[FakeNvml], set[str], frozenset[str]]] = {
    # case: (NVML with the sentinel, fields it must take out, pynvml names hidden)
    "power usage c_uint all ones": (
        _call_sentinel("nvmlDeviceGetPowerUsage", lambda v: U32_NA),
        {"power_watts"},
        frozenset(),
    ),
    "enforced limit c_uint all ones": (
        _call_sentinel("nvmlDeviceGetEnforcedPowerLimit", lambda v: U32_NA),
        {"power_limit_watts"},
        frozenset(),
    ),
    "temperature V signed -1": (
        _call_sentinel("nvmlDeviceGetTemperatureV", lambda v: -1),
        {"temp_gpu_celsius"},
        frozenset(),
    ),
    "deprecated temperature c_uint all ones": (
        _call_sentinel("nvmlDeviceGetTemperature", lambda v: U32_NA),
        {"temp_gpu_celsius"},
        frozenset({"nvmlDeviceGetTemperatureV"}),
    ),
    "clocks c_uint all ones": (
        _call_sentinel("nvmlDeviceGetClockInfo", lambda v: U32_NA),
        {"sm_clock_mhz", "mem_clock_mhz"},
        frozenset(),
    ),
    "clock event reasons c_ulonglong all ones": (
        _call_sentinel("nvmlDeviceGetCurrentClocksEventReasons", lambda v: U64_NA),
        {"clock_event_reasons"},
        frozenset(),
    ),
    "utilization struct member all ones": (
        _call_sentinel("nvmlDeviceGetUtilizationRates", _utilization),
        {"gpu_util_percent"},
        frozenset(),
    ),
    "memory info c_ulonglong all ones": (
        _call_sentinel("nvmlDeviceGetMemoryInfo", _memory),
        {"mem_used_bytes", "mem_total_bytes"},
        frozenset(),
    ),
    "pcie link gen all ones": (
        _call_sentinel("nvmlDeviceGetCurrPcieLinkGeneration", lambda v: U32_NA),
        {"pcie_link_gen"},
        frozenset(),
    ),
    "pcie link width 0 (unknown under a hypervisor)": (
        _call_sentinel("nvmlDeviceGetCurrPcieLinkWidth", lambda v: 0),
        {"pcie_link_width"},
        frozenset(),
    ),
    "nvlink counter c_ulonglong all ones": (
        _call_sentinel("nvmlDeviceGetNvLinkErrorCounter", lambda v: U64_NA),
        {"nvlink_crc_flit_errors_total", "nvlink_replay_errors_total", "nvlink_recovery_errors_total"},
        frozenset(),
    ),
    "memory temperature field uint all ones": (
        _field_sentinel(pynvml.NVML_FI_DEV_MEMORY_TEMP, U32, "uiVal", U32_NA),
        {"temp_mem_celsius"},
        frozenset(),
    ),
    "memory temperature field 0 (no sensor)": (
        _field_sentinel(pynvml.NVML_FI_DEV_MEMORY_TEMP, U32, "uiVal", 0),
        {"temp_mem_celsius"},
        frozenset(),
    ),
    "memory temperature field signed int -1": (
        _field_sentinel(pynvml.NVML_FI_DEV_MEMORY_TEMP, pynvml.NVML_VALUE_TYPE_SIGNED_INT, "siVal", -1),
        {"temp_mem_celsius"},
        frozenset(),
    ),
    "energy field ull all ones": (
        _field_sentinel(pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION, U64, "ullVal", U64_NA),
        {"energy_joules"},
        frozenset(),
    ),
    "energy field signed long long -1": (
        _field_sentinel(
            pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION, pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG, "sllVal", -1
        ),
        {"energy_joules"},
        frozenset(),
    ),
    "ecc field ull all ones": (
        _field_sentinel(pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL, U64, "ullVal", U64_NA),
        {"ecc_dbe_volatile_total"},
        frozenset(),
    ),
    # A value NVML hands over as a double can carry the all-ones count as 1.8e19: no counter is
    # that high, and live detection would alert on it ("1.8e19 double-bit errors").
    "ecc field double of all ones": (
        _field_sentinel(pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL, pynvml.NVML_VALUE_TYPE_DOUBLE, "dVal", float(U64_NA)),
        {"ecc_dbe_volatile_total"},
        frozenset(),
    ),
    "ecc field signed long long negative": (
        _field_sentinel(pynvml.NVML_FI_DEV_ECC_SBE_VOL_TOTAL, pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG, "sllVal", -2),
        {"ecc_sbe_volatile_total"},
        frozenset(),
    ),
    "ecc field ull beyond a 64-bit signed count": (
        _field_sentinel(pynvml.NVML_FI_DEV_ECC_DBE_AGG_TOTAL, U64, "ullVal", U64_NA - 1),
        {"ecc_dbe_aggregate_total"},
        frozenset(),
    ),
    "replay field unsigned short all ones": (
        _field_sentinel(pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER, pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT, "usVal", 0xFFFF),
        {"pcie_replay_total"},
        frozenset(),
    ),
    "remapped rows field uint all ones": (
        _field_sentinel(pynvml.NVML_FI_DEV_REMAPPED_UNC, U32, "uiVal", U32_NA),
        {"remapped_rows_correctable", "remapped_rows_uncorrectable", "remap_pending", "remap_failure"},
        frozenset(),
    ),
    "pcie byte counter field ull all ones": (
        _field_sentinel(pynvml.NVML_FI_DEV_PCIE_COUNT_RX_BYTES, U64, "ullVal", U64_NA),
        {"pcie_tx_bytes_per_second", "pcie_rx_bytes_per_second"},
        frozenset(),
    ),
    "memory temperature field double NaN": (
        _field_sentinel(pynvml.NVML_FI_DEV_MEMORY_TEMP, pynvml.NVML_VALUE_TYPE_DOUBLE, "dVal", math.nan),
        {"temp_mem_celsius"},
        frozenset(),
    ),
}


class Hiding:
    """An NVML object without some names, as an older pynvml would be."""

    def __init__(self, inner: Any, hidden: frozenset[str]) -> None:
        self._inner, self._hidden = inner, hidden

    def __getattr__(self, name: str) -> Any:
        if name in self._hidden:
            raise AttributeError(name)
        return getattr(self._inner, name)


@pytest.mark.parametrize("case", sorted(SENTINELS))
def test_not_available_values_are_absent_for_that_cycle_and_never_learned_unsupported(case):
    nvml_class, taken_out, hidden = SENTINELS[case]
    clock = ManualClock()
    node = SimNode("sentinel", gpu_count=2, start=START, clock=clock)
    nvml = nvml_class(node)
    source = NvmlSource(Hiding(nvml, hidden) if hidden else nvml, clock=clock)
    source.start()
    nvml_class.active = False
    source.sample()  # a good first reading (the PCIe rates need one)
    clock.t += 1.0
    nvml_class.active = True
    samples, _ = source.sample()
    for sample in samples:
        assert not taken_out & set(sample["metrics"]), taken_out & set(sample["metrics"])
        assert not set(sample["metrics"].values()) & {U32_NA, U64_NA, -1}
        _check_sample(sample["metrics"], set(source.unsupported_fields()[sample["gpu"]]) | taken_out, False)
    assert not taken_out & set(source.unsupported_fields()[0])  # a value, not a capability, was missing
    clock.t += 1.0
    nvml_class.active = False
    samples, _ = source.sample()
    assert all(taken_out <= set(s["metrics"]) for s in samples)  # back as soon as NVML has it


def test_static_threshold_read_as_not_available_is_asked_again():
    nvml_class = _call_sentinel("nvmlDeviceGetTemperatureThreshold", lambda v: U32_NA)
    clock = ManualClock()
    source = NvmlSource(nvml_class(SimNode("s", gpu_count=1, start=START, clock=clock)), clock=clock)
    source.start()
    first = source.sample()[0][0]["metrics"]
    assert "temp_slowdown_celsius" not in first and "temp_shutdown_celsius" not in first
    nvml_class.active = False
    second = source.sample()[0][0]["metrics"]
    assert (second["temp_slowdown_celsius"], second["temp_shutdown_celsius"]) == (89.0, 92.0)


def test_fan_and_retired_pages_sentinels_on_a_board_that_has_them():
    fan = _call_sentinel("nvmlDeviceGetFanSpeed", lambda v: U32_NA)
    pending = _call_sentinel("nvmlDeviceGetRetiredPagesPendingStatus", lambda v: U32_NA)
    for nvml_class, name in ((fan, "fan_percent"), (pending, "retired_pages_pending")):
        clock = ManualClock()
        # Retirement through its call: the board answers the call but not the field.
        profile = replace(EVERYTHING, fields_not_supported=frozenset({pynvml.NVML_FI_DEV_RETIRED_PENDING}))
        source = NvmlSource(nvml_class(SimNode("s", gpu_count=1, start=START, clock=clock), profile), clock=clock)
        source.start()
        assert name not in source.sample()[0][0]["metrics"]
        assert name not in source.unsupported_fields()[0]
        nvml_class.active = False
        assert name in source.sample()[0][0]["metrics"]


def test_process_sentinel_pids_are_dropped():
    class SentinelPid(FakeNvml):
        def nvmlDeviceGetComputeRunningProcesses(self, handle):
            processes = super().nvmlDeviceGetComputeRunningProcesses(handle)
            processes.append(
                pynvml.nvmlFriendlyObject(
                    {"pid": U32_NA, "usedGpuMemory": None, "gpuInstanceId": U32_NA, "computeInstanceId": U32_NA}
                )
            )
            return processes

    clock = ManualClock()
    node = SimNode("s", gpu_count=1, start=START, clock=clock)
    source = NvmlSource(SentinelPid(node), clock=clock)
    source.start()
    assert source.sample()[0][0]["pids"] == list(node.processes(0))
