"""Tests for the simulator: board profiles against the real captures, the fake NVML's pynvml shapes,
units and errors, fault parsing, event delivery, and a realistic, deterministic workload."""

from __future__ import annotations

import ctypes
import itertools
import math
import re
import threading
import time
from pathlib import Path

import pynvml
import pytest

from fleetwatch.sim.fake_nvml import CUDA_DRIVER_VERSION, DRIVER_VERSION, make_fake_nvml
from fleetwatch.sim.node import HGX_PCI_BUSES, SimNode
from fleetwatch.sim.profiles import H100_80GB_HBM3, H200, PROFILES, profile_for
from fleetwatch.sim.scenario import KINDS, Fault, parse_fault

CAPTURES = Path(__file__).resolve().parent.parent / "fixtures" / "nvidia-smi"
MIB = 1024 * 1024
START = 1_700_000_000.0


class ManualClock:
    """A clock the test moves by hand."""

    def __init__(self, t: float = START) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _query_section(text: str, section: str) -> dict[str, str]:
    """`nvidia-smi -q` output of one capture section as {"PCI/GPU Link Info/Link Width/Max": "16x"}."""
    lines = text.split("\n")
    begin = next(i for i, line in enumerate(lines) if line.startswith(f"# {section} :: query (-q)"))
    values: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in lines[begin + 3 :]:
        if line.startswith("####"):
            break
        if not line.strip() or line.startswith("="):
            continue
        indent = len(line) - len(line.lstrip())
        key, sep, value = line.strip().partition(" : ")
        if indent == 0 and not sep:  # "GPU 00000000:00:09.0": the one GPU's heading
            continue
        key = key.strip() if sep else line.strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = "/".join([k for _, k in stack] + [key])
        if sep:
            values[path] = value.strip()
        else:
            stack.append((indent, key))
    return values


def _capture(profile) -> str:
    return (CAPTURES / profile.capture).read_text(encoding="utf-8")


def _number(value: str) -> float:
    return float(value.split()[0])


# ---- profiles against the captures ------------------------------------------------------------


@pytest.mark.parametrize("profile", [H100_80GB_HBM3, H200], ids=lambda p: p.model)
def test_profile_matches_its_capture(profile):
    text = _capture(profile)
    load = _query_section(text, "load")
    idle = _query_section(text, "idle")
    assert load["Product Name"] == profile.name
    assert load["Driver Version"] == DRIVER_VERSION
    assert load["CUDA Version"] == "13.1" and CUDA_DRIVER_VERSION == 13010
    assert _number(load["FB Memory Usage/Total"]) * MIB == profile.memory_total_bytes
    assert _number(load["FB Memory Usage/Reserved"]) * MIB == profile.memory_reserved_bytes
    assert _number(load["GPU Power Readings/Current Power Limit"]) == profile.power_limit_watts
    assert _number(load["GPU Power Readings/Min Power Limit"]) == profile.power_min_limit_watts
    assert _number(load["Max Clocks/SM"]) == profile.sm_clock_max_mhz
    assert _number(load["Max Clocks/Memory"]) == profile.mem_clock_max_mhz
    assert _number(load["Max Clocks/Video"]) == profile.video_clock_max_mhz
    assert _number(load["Clocks/SM"]) == profile.sm_clock_max_mhz  # boosts to max under load
    assert _number(idle["Clocks/SM"]) == profile.sm_clock_idle_mhz
    assert _number(load["PCI/GPU Link Info/PCIe Generation/Max"]) == profile.pcie_link_gen_max
    assert load["PCI/GPU Link Info/Link Width/Max"] == f"{profile.pcie_link_width_max}x"
    assert int(load["PCI/Device Id"], 16) == profile.pcie_device_id
    assert int(load["PCI/Sub System Id"], 16) == profile.pcie_subsystem_id
    assert _number(idle["Temperature/GPU Current Temp"]) == profile.temp_idle_celsius
    assert _number(load["Temperature/GPU Current Temp"]) == profile.temp_load_celsius
    # Driver 590 prints thresholds relative to T.Limit; the absolute max operating temperature is
    # the idle reading plus its margin, and slowdown sits the printed offset above it.
    max_operating = _number(idle["Temperature/GPU Current Temp"]) + _number(idle["Temperature/GPU T.Limit Temp"])
    assert max_operating == profile.temp_gpu_max_celsius
    slowdown = max_operating - _number(idle["Temperature/GPU Slowdown T.Limit Temp"])
    assert slowdown == profile.temp_slowdown_celsius
    assert profile.temp_gpu_max_celsius < profile.temp_slowdown_celsius < profile.temp_shutdown_celsius
    # What the board reports as N/A is what the fake answers NOT_SUPPORTED.
    assert load["Fan Speed"] == "N/A" and "nvmlDeviceGetFanSpeed" in profile.not_supported
    assert load["Retired Pages/Single Bit ECC"] == "N/A"
    assert load["Retired Pages/Pending Page Blacklist"] == "N/A"
    assert {"nvmlDeviceGetRetiredPages", "nvmlDeviceGetRetiredPagesPendingStatus"} <= profile.not_supported
    assert load["Remapped Rows/Pending"] == "No"  # row remapping is supported
    nvlink_lines = text.split("# $ nvidia-smi nvlink -s\n", 1)[1].split("\n")[1:]
    nvlink_block = "\n".join(line for line in itertools.takewhile(lambda x: not x.startswith("#"), nvlink_lines))
    links = re.findall(r"^\s+Link (\d+): 26.562 GB/s$", nvlink_block, re.M)
    assert len(links) == profile.nvlink_links == 18
    # The query-gpu CSV prints the supported clock event reasons mask.
    assert f", 0x{profile.clock_event_reasons_supported:016X}, " in text


def test_profile_lookup():
    assert profile_for("h100") is H100_80GB_HBM3
    assert profile_for("NVIDIA H200") is H200
    assert set(PROFILES) == {"H100", "H200"}
    with pytest.raises(ValueError, match=r"unknown GPU model 'A100'.*H100, H200"):
        profile_for("A100")


# ---- fault specs ------------------------------------------------------------------------------


def test_parse_fault_examples():
    assert parse_fault("xid:79@5+8") == Fault("xid", gpu=5, at_seconds=8.0, xid=79)
    assert parse_fault("thermal_slowdown@2+6") == Fault("thermal_slowdown", 2, 6.0)
    assert parse_fault("thermal_slowdown@2+6/30") == Fault("thermal_slowdown", 2, 6.0, duration_seconds=30.0)
    assert parse_fault(" ecc_dbe:94@0+1.5 ").effective_xid == 94
    assert parse_fault("ecc_dbe@0+1").effective_xid == 48
    assert parse_fault("gpu_lost@1+2").effective_xid == 79
    assert parse_fault("pcie_downtrain@7+0.5/10").end_seconds == 10.5
    assert parse_fault("power_brake@1+2").effective_xid is None
    assert str(parse_fault("thermal_slowdown@2+6/30")) == "thermal_slowdown@2+6/30"
    assert set(KINDS) == {
        "xid",
        "ecc_dbe",
        "row_remap_pending",
        "row_remap_failure",
        "nvlink_errors",
        "nvlink_down",
        "pcie_replays",
        "pcie_downtrain",
        "thermal_slowdown",
        "power_brake",
        "gpu_lost",
    }
    for kind in KINDS:
        spec = f"{kind}:13@0+1" if kind == "xid" else f"{kind}@0+1"
        assert parse_fault(spec).kind == kind


@pytest.mark.parametrize(
    "spec, message",
    [
        ("thermal@2+6", "unknown kind 'thermal'"),
        ("xid@5+8", "needs a number"),
        ("xid:abc@5+8", "XID 'abc' is not a positive integer"),
        ("xid:0@5+8", "XID '0' is not a positive integer"),
        ("thermal_slowdown2+6", r"expected KIND\[:XID\]@GPU\+SECONDS"),
        ("thermal_slowdown@2", "missing '\\+SECONDS'"),
        ("thermal_slowdown@x+6", "GPU 'x' is not a GPU index"),
        ("thermal_slowdown@-1+6", "GPU '-1' is not a GPU index"),
        ("thermal_slowdown@2+soon", "start 'soon' is not a number"),
        ("thermal_slowdown@2+6/", "duration '' is not a number"),
        ("thermal_slowdown@2+6/0", "duration_seconds must be > 0"),
        ("gpu_lost@2+6/30", "takes no duration"),
    ],
)
def test_parse_fault_rejects_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_fault(spec)
    assert repr(spec) in str(info.value)


def test_fault_and_node_validation():
    with pytest.raises(ValueError, match="needs an XID"):
        Fault("xid", 0, 1.0)
    with pytest.raises(ValueError, match="at_seconds"):
        Fault("ecc_dbe", 0, -1.0)
    with pytest.raises(ValueError, match="targets GPU 8; node n1 has 8"):
        SimNode("n1", faults=[parse_fault("ecc_dbe@8+1")])
    with pytest.raises(ValueError, match="NVLink 18"):
        SimNode("n1", faults=[Fault("nvlink_down", 0, 1.0, link=18)])
    node = SimNode("n1", start=100.0, faults=[parse_fault("ecc_dbe@3+2.5")], clock=ManualClock())
    assert node.fault_time(node.faults[0]) == 102.5


# ---- identity and shapes ----------------------------------------------------------------------


def _fake(model: str = "H100", faults=(), seed: int = 0, clock=None, gpu_count: int = 8):
    clock = clock or ManualClock()
    node = SimNode("node-a", gpu_count=gpu_count, model=model, faults=faults, seed=seed, start=START, clock=clock)
    nvml = make_fake_nvml(node)
    nvml.nvmlInit()
    return nvml, node, clock


def test_identity_like_an_hgx_board():
    nvml, _node, _ = _fake()
    assert nvml.nvmlDeviceGetCount() == 8
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(8)]
    assert all(isinstance(h, pynvml.c_nvmlDevice_t) for h in handles)
    bus_ids = [nvml.nvmlDeviceGetPciInfo(h).busId for h in handles]
    assert bus_ids == [f"00000000:{bus:02X}:00.0" for bus in HGX_PCI_BUSES]
    assert bus_ids[1] == "00000000:2A:00.0" and bus_ids[7] == "00000000:DB:00.0"
    uuids = [nvml.nvmlDeviceGetUUID(h) for h in handles]
    assert len(set(uuids)) == 8
    assert all(re.fullmatch(r"GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", u) for u in uuids)
    serials = [nvml.nvmlDeviceGetSerial(h) for h in handles]
    assert len(set(serials)) == 8 and all(re.fullmatch(r"\d{13}", s) for s in serials)
    assert nvml.nvmlDeviceGetHandleByUUID(uuids[5]) is handles[5]
    other = SimNode("node-b", start=START)
    assert not set(uuids) & {g.uuid for g in other.gpus}
    assert nvml.nvmlSystemGetDriverVersion() == "590.48.01"
    assert nvml.nvmlSystemGetCudaDriverVersion() == 13010
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nvml.nvmlDeviceGetHandleByIndex(8)


@pytest.mark.parametrize("profile", [H100_80GB_HBM3, H200], ids=lambda p: p.model)
def test_shapes_and_units_match_pynvml_and_the_capture(profile):
    nvml, _node, clock = _fake(profile.model)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    assert nvml.nvmlDeviceGetName(h) == profile.name
    pci = nvml.nvmlDeviceGetPciInfo(h)
    assert isinstance(pci, pynvml.nvmlPciInfo_t)
    assert (pci.domain, pci.bus, pci.device) == (0, 0x18, 0)
    assert pci.pciDeviceId == profile.pcie_device_id
    v1 = nvml.nvmlDeviceGetMemoryInfo(h)
    v2 = nvml.nvmlDeviceGetMemoryInfo(h, pynvml.nvmlMemory_v2)
    assert isinstance(v1, pynvml.c_nvmlMemory_t) and isinstance(v2, pynvml.c_nvmlMemory_v2_t)
    assert v1.total == v2.total == profile.memory_total_bytes
    assert v2.reserved == profile.memory_reserved_bytes
    assert v2.used + v2.reserved + v2.free == v2.total
    assert v1.used == v2.used + v2.reserved  # v1 counts the reserved memory as used
    assert 0.8 * v2.total < v2.used < 0.95 * v2.total  # a training job's cached allocations
    util = nvml.nvmlDeviceGetUtilizationRates(h)
    assert isinstance(util, pynvml.c_nvmlUtilization_t)
    assert 95 <= util.gpu <= 100 and 3 <= util.memory <= 20
    assert 500_000 <= nvml.nvmlDeviceGetPowerUsage(h) <= 700_000  # milliwatts
    assert nvml.nvmlDeviceGetEnforcedPowerLimit(h) == 700_000
    assert nvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM) == profile.sm_clock_max_mhz
    assert nvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM) == profile.mem_clock_max_mhz
    assert nvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM) == profile.mem_clock_max_mhz
    assert 1900 <= nvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM) <= 1980
    assert nvml.nvmlDeviceGetTemperatureThreshold(h, pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN) == 89
    assert nvml.nvmlDeviceGetTemperatureThreshold(h, pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN) == 92
    assert nvml.nvmlDeviceGetTemperatureThreshold(h, pynvml.NVML_TEMPERATURE_THRESHOLD_GPU_MAX) == 87
    assert nvml.nvmlDeviceGetCurrPcieLinkGeneration(h) == nvml.nvmlDeviceGetMaxPcieLinkGeneration(h) == 5
    assert nvml.nvmlDeviceGetCurrPcieLinkWidth(h) == nvml.nvmlDeviceGetMaxPcieLinkWidth(h) == 16
    assert nvml.nvmlDeviceGetCurrentClocksEventReasons(h) & ~pynvml.nvmlClocksEventReasonSwPowerCap == 0
    assert nvml.nvmlDeviceGetRemappedRows(h) == (0, 0, 0, 0)
    assert nvml.nvmlDeviceGetTotalEccErrors(h, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC) == 0
    assert 1_000 <= nvml.nvmlDeviceGetPcieThroughput(h, pynvml.NVML_PCIE_UTIL_RX_BYTES) <= 500_000  # KB/s
    assert nvml.nvmlDeviceGetNvLinkState(h, 17) == pynvml.NVML_FEATURE_ENABLED
    assert nvml.nvmlDeviceGetNvLinkErrorCounter(h, 0, pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT) == 0
    values = nvml.nvmlDeviceGetFieldValues(
        h, [pynvml.NVML_FI_DEV_MEMORY_TEMP, (pynvml.NVML_FI_DEV_NVLINK_LINK_COUNT, 0), 9999]
    )
    assert isinstance(values[0], pynvml.c_nvmlFieldValue_t)
    assert values[0].nvmlReturn == pynvml.NVML_SUCCESS
    assert values[0].valueType == pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
    gpu_temp = nvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)
    assert values[0].value.uiVal < gpu_temp  # HBM runs cooler than the core, as in the captures
    assert values[1].value.uiVal == 18
    assert values[2].nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED  # per field, the call succeeds
    energy = nvml.nvmlDeviceGetTotalEnergyConsumption(h)
    clock.t += 10.0
    gained_mj = nvml.nvmlDeviceGetTotalEnergyConsumption(h) - energy
    assert 5_000_000 <= gained_mj <= 7_000_000  # 10 s at 500-700 W, in millijoules


def test_not_supported_and_invalid_answers_like_the_board():
    nvml, _, _ = _fake()
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    assert nvml.NVMLError_NotSupported is pynvml.NVMLError_NotSupported
    assert nvml.NVML_ERROR_NOT_SUPPORTED == pynvml.NVML_ERROR_NOT_SUPPORTED
    for call in (
        lambda: nvml.nvmlDeviceGetFanSpeed(h),
        lambda: nvml.nvmlDeviceGetRetiredPages(h, pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR),
        lambda: nvml.nvmlDeviceGetRetiredPagesPendingStatus(h),
        lambda: nvml.nvmlDeviceGetTemperatureThreshold(h, pynvml.NVML_TEMPERATURE_THRESHOLD_ACOUSTIC_CURR),
    ):
        with pytest.raises(pynvml.NVMLError_NotSupported) as info:
            call()
        assert info.value.value == pynvml.NVML_ERROR_NOT_SUPPORTED and str(info.value) == "Not Supported"
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nvml.nvmlDeviceGetNvLinkState(h, 18)  # H100 SXM has links 0..17
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nvml.nvmlDeviceGetClockInfo(h, 99)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nvml.nvmlDeviceGetName(object())
    with pytest.raises(AttributeError):
        nvml.nvmlDeviceGetVbiosVersion  # not simulated: loud, not a silent default  # noqa: B018


def test_uninitialised_library_refuses_calls():
    node = SimNode("n1", start=START, clock=ManualClock())
    nvml = make_fake_nvml(node)
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        nvml.nvmlDeviceGetCount()
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    nvml.nvmlShutdown()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        nvml.nvmlDeviceGetPowerUsage(handle)


def test_lost_gpu_fails_every_call_with_gpu_is_lost():
    nvml, _node, clock = _fake(faults=[parse_fault("gpu_lost@3+10")])
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(8)]
    assert nvml.nvmlDeviceGetPowerUsage(handles[3]) > 0
    clock.t = START + 10.0
    for call in (
        nvml.nvmlDeviceGetPowerUsage,
        nvml.nvmlDeviceGetUUID,
        nvml.nvmlDeviceGetUtilizationRates,
        nvml.nvmlDeviceGetRemappedRows,
        nvml.nvmlDeviceGetFanSpeed,
        nvml.nvmlDeviceGetSupportedEventTypes,
    ):
        with pytest.raises(pynvml.NVMLError_GpuIsLost):
            call(handles[3])
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        nvml.nvmlDeviceGetHandleByIndex(3)
    assert nvml.nvmlDeviceGetCount() == 8  # the device stays enumerated in this NVML session
    assert all(nvml.nvmlDeviceGetPowerUsage(handles[i]) > 0 for i in range(8) if i != 3)


# ---- events -----------------------------------------------------------------------------------


def _register_all(nvml) -> object:
    event_set = nvml.nvmlEventSetCreate()
    for i in range(nvml.nvmlDeviceGetCount()):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        nvml.nvmlDeviceRegisterEvents(h, pynvml.nvmlEventTypeXidCriticalError, event_set)
    return event_set


def test_event_wait_delivers_each_xid_once_at_its_time():
    nvml, _node, clock = _fake(faults=[parse_fault("xid:31@5+2"), parse_fault("ecc_dbe@1+4")])
    event_set = _register_all(nvml)
    clock.t = START + 1.9
    with pytest.raises(pynvml.NVMLError_Timeout):
        nvml.nvmlEventSetWait_v2(event_set, 20)
    clock.t = START + 5.0
    first = nvml.nvmlEventSetWait_v2(event_set, 20)
    second = nvml.nvmlEventSetWait(event_set, 20)
    assert isinstance(first, pynvml.c_nvmlEventData_t)
    assert (first.eventType, first.eventData) == (pynvml.nvmlEventTypeXidCriticalError, 31)
    assert (second.eventType, second.eventData) == (pynvml.nvmlEventTypeXidCriticalError, 48)
    # event.device is a new pointer object to the same device: compare addresses, as with NVML.
    address = lambda p: ctypes.cast(p, ctypes.c_void_p).value  # noqa: E731
    assert address(first.device) == address(nvml.nvmlDeviceGetHandleByIndex(5))
    assert address(second.device) == address(nvml.nvmlDeviceGetHandleByIndex(1))
    with pytest.raises(pynvml.NVMLError_Timeout):
        nvml.nvmlEventSetWait_v2(event_set, 20)
    nvml.nvmlEventSetFree(event_set)


def test_event_wait_blocks_without_spinning_until_the_fault():
    start = time.time()
    node = SimNode("n1", start=start, faults=[parse_fault("xid:79@2+0.3")])
    nvml = make_fake_nvml(node)
    nvml.nvmlInit()
    event_set = _register_all(nvml)
    cpu_before, wall_before = time.process_time(), time.monotonic()
    data = nvml.nvmlEventSetWait_v2(event_set, 2000)
    waited, cpu = time.monotonic() - wall_before, time.process_time() - cpu_before
    assert data.eventData == 79
    assert 0.2 <= time.time() - start <= 0.8 and waited < 0.8
    assert cpu < 0.1  # a condition wait, not a polling loop


def test_event_wait_honours_its_timeout_and_wakes_on_free():
    nvml, _, _ = _fake()
    event_set = _register_all(nvml)
    before = time.monotonic()
    with pytest.raises(pynvml.NVMLError_Timeout):
        nvml.nvmlEventSetWait_v2(event_set, 100)
    assert 0.09 <= time.monotonic() - before < 0.5
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            nvml.nvmlEventSetWait_v2(event_set, 5000)
        except pynvml.NVMLError as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.05)
    nvml.nvmlEventSetFree(event_set)
    waiter.join(timeout=2.0)
    assert not waiter.is_alive() and isinstance(errors[0], pynvml.NVMLError_InvalidArgument)


def test_events_before_registration_and_unsupported_types():
    nvml, _, clock = _fake(faults=[parse_fault("xid:13@0+1"), parse_fault("xid:43@0+3")])
    clock.t = START + 2.0
    event_set = _register_all(nvml)  # registered after the first XID: NVML never queues it
    clock.t = START + 3.0
    assert nvml.nvmlEventSetWait_v2(event_set, 20).eventData == 43
    with pytest.raises(pynvml.NVMLError_Timeout):
        nvml.nvmlEventSetWait_v2(event_set, 20)
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    supported = nvml.nvmlDeviceGetSupportedEventTypes(h)
    assert supported & pynvml.nvmlEventTypeXidCriticalError
    with pytest.raises(pynvml.NVMLError_NotSupported):  # one unsupported bit fails the whole call
        nvml.nvmlDeviceRegisterEvents(h, pynvml.nvmlEventTypeAll, event_set)


# ---- workload ---------------------------------------------------------------------------------


def _series(node: SimNode, gpu: int, seconds: int, step: float = 1.0):
    return [node.reading(gpu, START + i * step) for i in range(int(seconds / step))]


def test_workload_looks_like_training_on_h100():
    node = SimNode("n7", start=START, seed=3, clock=ManualClock())
    for gpu in range(8):
        readings = _series(node, gpu, 900)
        assert all(95 <= r.gpu_util_percent <= 100 for r in readings)
        assert len({r.gpu_util_percent for r in readings}) > 2  # in steps, not flat
        assert all(550_000 <= r.power_milliwatts <= 690_000 for r in readings)
        clocks = [r.sm_clock_mhz for r in readings]
        assert max(clocks) == 1980 and min(clocks) >= 1900
        assert sum(c == 1980 for c in clocks) > 0.6 * len(clocks)
        assert all(55 <= r.temp_gpu_celsius <= 75 for r in readings)
        assert all(r.temp_mem_celsius < r.temp_gpu_celsius for r in readings)
        energies = [r.energy_millijoules for r in readings]
        assert all(b > a for a, b in zip(energies, energies[1:]))
        assert all(r.clock_event_reasons in (0, pynvml.nvmlClocksEventReasonSwPowerCap) for r in readings)


def _corr(xs, ys) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    return cov / math.sqrt(sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys))


def test_power_clock_and_temperature_move_together():
    node = SimNode("n2", start=START, clock=ManualClock())
    readings = _series(node, 0, 1800)
    power = [r.power_milliwatts for r in readings]
    # Temperature follows the power of the last minute (thermal inertia), not the instant.
    smoothed = [sum(power[max(0, i - 60) : i + 1]) / len(power[max(0, i - 60) : i + 1]) for i in range(len(power))]
    assert _corr(smoothed[120:], [r.temp_gpu_celsius for r in readings][120:]) > 0.5
    # At the power cap the firmware trims the clock: the highest draws come with the lowest clocks.
    capped = [r for r in readings if r.clock_event_reasons & pynvml.nvmlClocksEventReasonSwPowerCap]
    if capped:
        assert all(r.sm_clock_mhz < 1980 for r in capped)

    slow = SimNode("n2", start=START, clock=ManualClock(), faults=[parse_fault("power_brake@4+300/120")])
    before, during = slow.reading(4, START + 299.0), slow.reading(4, START + 330.0)
    after = slow.reading(4, START + 700.0)
    assert during.sm_clock_mhz < 0.5 * before.sm_clock_mhz
    assert during.power_milliwatts < 0.5 * before.power_milliwatts
    later = slow.reading(4, START + 410.0)
    assert later.temp_gpu_celsius < before.temp_gpu_celsius - 5  # cools, with a lag
    assert during.temp_gpu_celsius > later.temp_gpu_celsius
    assert after.sm_clock_mhz >= 1950 and after.power_milliwatts > 500_000
    # Its synchronous peers wait in collectives: full clock, less power.
    peer_before, peer_during = slow.reading(0, START + 299.0), slow.reading(0, START + 330.0)
    assert peer_during.sm_clock_mhz >= 1950
    assert peer_during.power_milliwatts < 0.85 * peer_before.power_milliwatts


def test_readings_are_deterministic_per_seed_and_time():
    a = SimNode("n3", start=START, seed=11, clock=ManualClock())
    b = SimNode("n3", start=START, seed=11, clock=ManualClock())
    c = SimNode("n3", start=START, seed=12, clock=ManualClock())
    times = [START + 0.37 * i for i in range(200)]
    # Ask b in another order: values depend on the time only, not on the query history.
    assert [a.reading(2, t) for t in times] == [b.reading(2, t) for t in reversed(times)][::-1]
    assert [g.uuid for g in a.gpus] == [g.uuid for g in b.gpus]
    assert [a.reading(2, t) for t in times] != [c.reading(2, t) for t in times]
    assert [g.uuid for g in a.gpus] != [g.uuid for g in c.gpus]


# ---- newer calls, field values, processes -------------------------------------------------------


def test_temperature_v_is_the_signed_versioned_call():
    nvml, _node, _clock = _fake()
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    assert nvml.nvmlDeviceGetTemperatureV(h, pynvml.NVML_TEMPERATURE_GPU) == nvml.nvmlDeviceGetTemperature(
        h, pynvml.NVML_TEMPERATURE_GPU
    )
    assert nvml.nvmlDeviceGetTemperatureV(h, pynvml.NVML_TEMPERATURE_GPU, pynvml.nvmlTemperature_v1) > 0
    with pytest.raises(pynvml.NVMLError_ArgumentVersionMismatch):
        nvml.nvmlDeviceGetTemperatureV(h, pynvml.NVML_TEMPERATURE_GPU, 0x2000010)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nvml.nvmlDeviceGetTemperatureV(h, pynvml.NVML_TEMPERATURE_COUNT)


def _fields(nvml, handle, *ids):
    return {value.fieldId: value for value in nvml.nvmlDeviceGetFieldValues(handle, list(ids))}


def test_field_values_match_the_calls_they_stand_for():
    nvml, _node, clock = _fake(faults=[parse_fault("ecc_dbe@0+1"), parse_fault("row_remap_pending@0+1")])
    clock.t = START + 5.0
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    f = _fields(
        nvml,
        h,
        pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION,
        pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER,
        pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL,
        pynvml.NVML_FI_DEV_ECC_SBE_AGG_TOTAL,
        pynvml.NVML_FI_DEV_REMAPPED_UNC,
        pynvml.NVML_FI_DEV_REMAPPED_PENDING,
    )
    assert all(v.nvmlReturn == pynvml.NVML_SUCCESS for v in f.values())
    energy = f[pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION]
    assert energy.valueType == pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
    assert energy.value.ullVal == nvml.nvmlDeviceGetTotalEnergyConsumption(h)  # millijoules both
    assert f[pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER].value.uiVal == nvml.nvmlDeviceGetPcieReplayCounter(h)
    dbe = nvml.nvmlDeviceGetTotalEccErrors(h, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC)
    assert f[pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL].value.ullVal == dbe == 1
    assert f[pynvml.NVML_FI_DEV_ECC_SBE_AGG_TOTAL].value.ullVal == 0
    _, uncorrectable, pending, _ = nvml.nvmlDeviceGetRemappedRows(h)
    assert (
        (f[pynvml.NVML_FI_DEV_REMAPPED_UNC].value.uiVal, f[pynvml.NVML_FI_DEV_REMAPPED_PENDING].value.uiVal)
        == (uncorrectable, pending)
        == (1, 1)
    )
    assert all(v.timestamp == int(clock.t * 1_000_000) for v in f.values())  # microseconds


def test_hopper_fields_not_supported_answer_per_field():
    nvml, _, _ = _fake()
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    f = _fields(
        nvml, h, pynvml.NVML_FI_DEV_RETIRED_SBE, pynvml.NVML_FI_DEV_RETIRED_PENDING, pynvml.NVML_FI_DEV_MEMORY_TEMP
    )
    assert f[pynvml.NVML_FI_DEV_RETIRED_SBE].nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED
    assert f[pynvml.NVML_FI_DEV_RETIRED_PENDING].nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED
    assert f[pynvml.NVML_FI_DEV_MEMORY_TEMP].nvmlReturn == pynvml.NVML_SUCCESS


def test_pcie_byte_counters_are_64_bit_monotone_and_agree_with_the_throughput_call():
    nvml, node, clock = _fake(faults=[parse_fault("thermal_slowdown@3+30/20")])
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    tx_id, rx_id = pynvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES, pynvml.NVML_FI_DEV_PCIE_COUNT_RX_BYTES
    previous = None
    for second in range(0, 90, 3):
        clock.t = START + second
        f = _fields(nvml, h, tx_id, rx_id)
        assert f[rx_id].valueType == pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
        tx, rx = f[tx_id].value.ullVal, f[rx_id].value.ullVal
        assert rx > 2**32 and tx > 2**32  # terabytes since the driver loaded: past 32 bits
        if previous is not None:
            assert tx > previous[0] and rx > previous[1]
        previous = (tx, rx)
    # Over one second the counter moves by what the 20 ms throughput call reports (KB/s).
    for start in (START + 10.0, START + 40.0):  # before and during the slowdown
        clock.t = start
        rx0 = _fields(nvml, h, rx_id)[rx_id].value.ullVal
        clock.t = start + 0.5
        kilobytes_per_second = nvml.nvmlDeviceGetPcieThroughput(h, pynvml.NVML_PCIE_UTIL_RX_BYTES)
        clock.t = start + 1.0
        rx1 = _fields(nvml, h, rx_id)[rx_id].value.ullVal
        assert (rx1 - rx0) / 1024 == pytest.approx(kilobytes_per_second, rel=0.02)
    # A synchronous job moves at its slowest GPU's pace: GPU 3's thermal slowdown (clock halved)
    # halves the input every GPU pulls, against the same node without the fault.
    healthy = SimNode("node-a", start=START, clock=ManualClock())
    for gpu in (0, 3):
        during, normal = node.reading(gpu, START + 40.0), healthy.reading(gpu, START + 40.0)
        assert during.pcie_rx_kilobytes_per_second == pytest.approx(normal.pcie_rx_kilobytes_per_second / 2, rel=1e-3)


def test_nvlink_counters_like_hopper():
    nvml, node, clock = _fake(faults=[Fault("nvlink_errors", gpu=0, at_seconds=1.0, link=2, rate_per_second=10.0)])
    clock.t = START + 11.0
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    assert nvml.nvmlDeviceGetNvLinkErrorCounter(h, 2, pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT) == 101
    assert nvml.nvmlDeviceGetNvLinkErrorCounter(h, 2, pynvml.NVML_NVLINK_ERROR_DL_ECC_DATA) == 0
    with pytest.raises(pynvml.NVMLError_NotSupported):  # NVLink 4 keeps no data-CRC counter
        nvml.nvmlDeviceGetNvLinkErrorCounter(h, 2, pynvml.NVML_NVLINK_ERROR_DL_CRC_DATA)
    # The legacy all-lane totals answer SUCCESS with 0 on Hopper, whatever the links saw.
    total = _fields(nvml, h, pynvml.NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL)[
        pynvml.NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL
    ]
    assert (total.nvmlReturn, total.value.ullVal) == (pynvml.NVML_SUCCESS, 0)
    # A board whose totals sum the links (a profile override changes support, not behaviour).
    from dataclasses import replace

    summing = make_fake_nvml(node, replace(node.profile, nvlink_legacy_totals_read_zero=False))
    summing.nvmlInit()
    h = summing.nvmlDeviceGetHandleByIndex(0)
    total = _fields(summing, h, pynvml.NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL)
    assert total[pynvml.NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL].value.ullVal == 101


def test_compute_processes_have_pynvml_shapes():
    nvml, node, _clock = _fake()
    h = nvml.nvmlDeviceGetHandleByIndex(3)
    processes = nvml.nvmlDeviceGetComputeRunningProcesses(h)
    assert isinstance(processes[0], pynvml.nvmlFriendlyObject)
    assert [p.pid for p in processes] == list(node.processes(3))
    assert processes[0].usedGpuMemory == nvml.nvmlDeviceGetMemoryInfo(h, pynvml.nvmlMemory_v2).used
    assert processes[0].gpuInstanceId == processes[0].computeInstanceId == 0xFFFFFFFF  # no MIG: N/A
    assert [p.pid for p in nvml.nvmlDeviceGetComputeRunningProcesses_v3(h)] == [p.pid for p in processes]
    node.place_processes(3, [900, 901])
    shared = nvml.nvmlDeviceGetComputeRunningProcesses_v2(h)
    assert [p.pid for p in shared] == [900, 901] and shared[0].usedGpuMemory == processes[0].usedGpuMemory // 2
    node.place_processes(3, [])
    assert nvml.nvmlDeviceGetComputeRunningProcesses(h) == []


def test_default_processes_are_deterministic_per_node_and_seed():
    a, b, c = SimNode("n1", start=START), SimNode("n1", start=START), SimNode("n1", seed=1, start=START)
    assert [a.processes(g) for g in range(8)] == [b.processes(g) for g in range(8)]
    assert a.processes(0) != c.processes(0)
    assert SimNode("n1", start=START, processes={}).processes(0) == ()
    with pytest.raises(ValueError, match="no GPU 8"):
        SimNode("n1", start=START, processes={8: [1]})


def test_capture_shows_what_the_fake_supports():
    text = _capture(H100_80GB_HBM3)
    load = _query_section(text, "load")
    assert load["Temperature/Memory Current Temp"].endswith(" C")  # NVML_FI_DEV_MEMORY_TEMP answers
    assert load["PCI/GPU Link Info/Link Width/Current"] == "16x"
    symbols = text.split("# capabilities :: nvml-symbols", 1)[1]
    for symbol in (
        "nvmlDeviceGetTemperatureV",
        "nvmlDeviceGetCurrentClocksEventReasons",
        "nvmlDeviceGetComputeRunningProcesses_v3",
        "nvmlDeviceGetFieldValues",
    ):
        assert f"\n{symbol}\n" in symbols, symbol
    # Three compute processes under the capture's load, no MIG: "GPU instance ID : N/A".
    assert text.count("Type                          : C") >= 3
