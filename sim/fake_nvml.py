"""A pynvml-compatible NVML over a SimNode: pynvml's function names, ctypes shapes, units, errors.

The NVML source is handed either the real `pynvml` module or `make_fake_nvml(node)`; it calls the
same names on both. Everything that is not a function (NVML_* constants, nvmlEventType* and
nvmlClocksEventReason* bits, the c_nvml* structures, the NVMLError_* classes) is pynvml's own
object, so `except nvml.NVMLError_NotSupported` catches the fake's errors and the real ones alike.

What a board answers NOT_SUPPORTED (calls, field ids, per-link NVLink counters) and its quirks
come from its profile (fleetwatch.sim.profiles), modelled on what a real H100/H200 reports: the field
values an H100 answers (memory temperature, 64-bit PCIe byte counters, energy, ECC, remapped rows)
are answered, so the NVML source's one-batch-per-GPU fast path is the one exercised.
"""

from __future__ import annotations

import ctypes
import inspect
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pynvml

from fleetwatch.sim.node import NVLINK_COUNTERS, SimNode, XidEvent
from fleetwatch.sim.profiles import GpuProfile

# What the captures print: "DRIVER version : 590.48.01", "CUDA Version : 13.1"; NVML encodes the
# CUDA version as 1000 * major + 10 * minor.
DRIVER_VERSION = "590.48.01"
CUDA_DRIVER_VERSION = 13010

# Event types a Hopper board accepts in nvmlDeviceRegisterEvents.
SUPPORTED_EVENT_TYPES = (
    pynvml.nvmlEventTypeSingleBitEccError
    | pynvml.nvmlEventTypeDoubleBitEccError
    | pynvml.nvmlEventTypePState
    | pynvml.nvmlEventTypeXidCriticalError
    | pynvml.nvmlEventTypeClock
)

# NVLink traffic of a training job's collectives at full utilisation, MiB/s over all links (an
# H100's 18 links carry up to 450 GB/s each way; data-parallel all-reduce uses a fraction).
_GPM_NVLINK_MIB_PER_SECOND = 60_000.0


def gpm_model(
    gpu: int, util: tuple[Any, Any], mem_util: tuple[Any, Any], sm_clock: tuple[Any, Any], sm_clock_max: float
) -> dict[str, Any]:
    """GPM metrics over an interval from the workload's readings at its two ends (floats or arrays),
    by pynvml constant name, in NVML's units (percent; NVLink in MiB/s).

    A training step keeps the SMs busy while the GPU is (utilisation), most of that on the tensor
    pipes, with data moving over NVLink for the collectives, slower when the clocks are held down;
    an idle GPU shows none. The simulator's fast path (fleetwatch.sim.rows) computes the same.
    """
    busy = (util[0] + util[1]) / 2
    clock = (sm_clock[0] + sm_clock[1]) / 2 / sm_clock_max
    sm_active = busy * (0.82 + 0.02 * (gpu % 4))
    nvlink = busy / 100.0 * np.minimum(1.0, clock) * _GPM_NVLINK_MIB_PER_SECOND
    return {
        "NVML_GPM_METRIC_GRAPHICS_UTIL": busy,
        "NVML_GPM_METRIC_SM_UTIL": sm_active,
        "NVML_GPM_METRIC_SM_OCCUPANCY": sm_active * 0.45,
        "NVML_GPM_METRIC_ANY_TENSOR_UTIL": sm_active * 0.7,
        "NVML_GPM_METRIC_DRAM_BW_UTIL": (mem_util[0] + mem_util[1]) / 2,
        "NVML_GPM_METRIC_FP64_UTIL": busy * 0.0,
        "NVML_GPM_METRIC_FP32_UTIL": sm_active * 0.12,
        "NVML_GPM_METRIC_FP16_UTIL": sm_active * 0.04,
        "NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC": nvlink,
        "NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC": nvlink,
    }


# A frozen test clock must not turn the event wait into a spin: re-check at most this often.
_MIN_EVENT_RECHECK_SECONDS = 0.01

_NVLINK_COUNTER_BY_CONSTANT = {
    pynvml.NVML_NVLINK_ERROR_DL_REPLAY: "replay",
    pynvml.NVML_NVLINK_ERROR_DL_RECOVERY: "recovery",
    pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT: "crc_flit",
    pynvml.NVML_NVLINK_ERROR_DL_CRC_DATA: "crc_data",
}
assert set(_NVLINK_COUNTER_BY_CONSTANT.values()) == set(NVLINK_COUNTERS)

# nvmlProcessInfo_t's gpuInstanceId / computeInstanceId outside MIG: 0xFFFFFFFF ("N/A" in the
# capture's Processes section).
_NO_MIG_INSTANCE = 0xFFFFFFFF
# nvmlTemperature_v1: sizeof(nvmlTemperature_v1_t) | 1 << 24, as pynvml defines it (older pynvml
# releases, which nvidia-ml-py>=12.535 allows, predate the versioned temperature call).
_TEMPERATURE_V1 = getattr(pynvml, "nvmlTemperature_v1", 0x100000C)


class _PlainFieldValue(ctypes.Structure):
    """c_nvmlFieldValue_t's layout without pynvml's Python-level attribute hooks, for filling the
    returned array fast (the caller gets real c_nvmlFieldValue_t elements)."""

    _fields_ = list(pynvml.c_nvmlFieldValue_t._fields_)


def _packed_layout() -> bool:
    """Whether c_nvmlFieldValue_t is laid out as the packers below write it (it is on every
    64-bit Linux pynvml: fieldId, scopeId, timestamp, latencyUsec, valueType, nvmlReturn, value)."""
    t = pynvml.c_nvmlFieldValue_t
    expected = {
        "fieldId": (0, 4),
        "scopeId": (4, 4),
        "timestamp": (8, 8),
        "latencyUsec": (16, 8),
        "valueType": (24, 4),
        "nvmlReturn": (28, 4),
        "value": (32, 8),
    }
    try:
        layout = {name: (getattr(t, name).offset, getattr(t, name).size) for name, _ in t._fields_}
    except AttributeError:
        return False
    return layout == expected and ctypes.sizeof(t) == 40


_PACKED_FIELD_VALUES = _packed_layout()
_FIELD_VALUE_SIZE = ctypes.sizeof(pynvml.c_nvmlFieldValue_t)
# Native byte order, no padding: the union's 32-bit member in its first 4 bytes, or all 8 bytes.
_PACK_UINT = struct.Struct("=IIqqIII4x").pack_into
_PACK_ULL = struct.Struct("=IIqqIIQ").pack_into

_NVLINK_TOTAL_FIELDS = {
    pynvml.NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL: "crc_flit",
    pynvml.NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL: "crc_data",
    pynvml.NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL: "replay",
    pynvml.NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL: "recovery",
}


def _error(code: int) -> pynvml.NVMLError:
    """pynvml's own exception for `code` (NVMLError.__new__ picks the NVMLError_* subclass)."""
    return pynvml.NVMLError(code)


def _address(pointer: Any) -> int | None:
    try:
        return ctypes.cast(pointer, ctypes.c_void_p).value
    except (TypeError, ctypes.ArgumentError):
        return None


@dataclass
class _EventSet:
    registered: dict[int, tuple[int, float]] = field(default_factory=dict)  # gpu -> (mask, since)
    delivered: set[int] = field(default_factory=set)  # indexes into node.xid_events
    freed: bool = False


class FakeNvml:
    """The fake NVML library for one simulated node; build it with make_fake_nvml(node)."""

    def __init__(self, node: SimNode, profile: GpuProfile | None = None) -> None:
        """`profile` overrides what the board supports (not how it behaves, which is the node's):
        for a board that, say, has a fan and retires pages."""
        self.node = node
        self.profile = profile if profile is not None else node.profile
        self._init_count = 0
        self._cond = threading.Condition()
        # Handles are real c_nvmlDevice_t pointers (to small buffers we own), like the real ones,
        # so code that keys handles by address works on both.
        self._handle_memory = [ctypes.create_string_buffer(16) for _ in node.gpus]
        self._handles = [ctypes.cast(ctypes.addressof(buf), pynvml.c_nvmlDevice_t) for buf in self._handle_memory]
        self._gpu_by_id = {id(h): i for i, h in enumerate(self._handles)}
        self._gpu_by_address = {ctypes.addressof(buf): i for i, buf in enumerate(self._handle_memory)}
        self._event_memory: list[ctypes.Array] = []
        # GPM samples by address: their buffer, and (GPU, time) once taken.
        self._gpm_samples: dict[int, tuple[ctypes.Array, tuple[int, float] | None]] = {}
        self._event_sets: dict[int, _EventSet] = {}
        p = self.profile
        self._thresholds = {
            pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN: p.temp_shutdown_celsius,
            pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN: p.temp_slowdown_celsius,
            pynvml.NVML_TEMPERATURE_THRESHOLD_GPU_MAX: p.temp_gpu_max_celsius,
            pynvml.NVML_TEMPERATURE_THRESHOLD_MEM_MAX: p.temp_mem_max_celsius,
        }
        self._max_clocks = {
            pynvml.NVML_CLOCK_GRAPHICS: p.sm_clock_max_mhz,
            pynvml.NVML_CLOCK_SM: p.sm_clock_max_mhz,
            pynvml.NVML_CLOCK_MEM: p.mem_clock_max_mhz,
            pynvml.NVML_CLOCK_VIDEO: p.video_clock_max_mhz,
        }
        self._fields = self._field_readers()
        self._lost_at = tuple(node.lost_at(gpu) for gpu in range(node.gpu_count))
        self._missing = tuple(node.missing_windows(gpu) for gpu in range(node.gpu_count))
        self._nvlink_count = self.profile.nvlink_links
        quiet = self._quiet_nvlink_gpus()
        self._quiet_handles = frozenset(id(h) for gpu, h in enumerate(self._handles) if quiet[gpu])
        # Counters that read 0 on a link without faults (the others raise, via the full path).
        self._nvlink_zero_counters = frozenset(
            {pynvml.NVML_NVLINK_ERROR_DL_ECC_DATA}
            | {
                c
                for c, name in _NVLINK_COUNTER_BY_CONSTANT.items()
                if name not in self.profile.nvlink_counters_not_supported
            }
        )

    # ---- plumbing ------------------------------------------------------------------------------

    def _check_init(self) -> None:
        if self._init_count <= 0:
            raise _error(pynvml.NVML_ERROR_UNINITIALIZED)

    def _device(self, handle: Any, function: str) -> tuple[int, float]:
        """(GPU index, now) for a device call; raises what NVML would for this device and call."""
        if self._init_count <= 0:
            raise _error(pynvml.NVML_ERROR_UNINITIALIZED)
        gpu = self._gpu_by_id.get(id(handle))
        if gpu is None:
            gpu = self._gpu_by_address.get(_address(handle))  # type: ignore[arg-type]
            if gpu is None:
                raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        now = self.node.clock()
        lost = self._lost_at[gpu]
        if lost is not None and now >= lost:
            raise _error(pynvml.NVML_ERROR_GPU_IS_LOST)
        if self._missing[gpu] and self.node.is_missing(gpu, now):
            raise _error(pynvml.NVML_ERROR_UNKNOWN)
        if function in self.profile.not_supported:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu, now

    def _event_set(self, event_set: Any) -> _EventSet:
        state = self._event_sets.get(_address(event_set))  # type: ignore[arg-type]
        if state is None or state.freed:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return state

    # ---- library and system --------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self._init_count += 1

    def nvmlInitWithFlags(self, flags: int) -> None:
        self._init_count += 1

    def nvmlShutdown(self) -> None:
        self._check_init()
        self._init_count -= 1
        with self._cond:
            self._cond.notify_all()

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check_init()
        return DRIVER_VERSION

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._check_init()
        return CUDA_DRIVER_VERSION

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        return self.nvmlSystemGetCudaDriverVersion()

    # ---- device enumeration and identity -------------------------------------------------------

    def nvmlDeviceGetCount(self) -> int:
        self._check_init()
        return self.node.gpu_count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        self._check_init()
        if not 0 <= index < self.node.gpu_count:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        # NVML documents GPU_IS_LOST for a GPU that fell off the bus before the handle was taken.
        if self.node.is_lost(index):
            raise _error(pynvml.NVML_ERROR_GPU_IS_LOST)
        # A GPU the driver lost track of without an XID: "Unable to determine the device handle
        # for GPU 0000:3A:00.0: Unknown Error" in nvidia-smi; the other GPUs keep their indices.
        if self.node.is_missing(index):
            raise _error(pynvml.NVML_ERROR_UNKNOWN)
        return self._handles[index]

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> Any:
        self._check_init()
        wanted = uuid.decode() if isinstance(uuid, bytes) else uuid
        for gpu in self.node.gpus:
            if gpu.uuid == wanted:
                return self.nvmlDeviceGetHandleByIndex(gpu.index)
        raise _error(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetIndex(self, handle: Any) -> int:
        return self._device(handle, "nvmlDeviceGetIndex")[0]

    def nvmlDeviceGetName(self, handle: Any) -> str:
        self._device(handle, "nvmlDeviceGetName")
        return self.profile.name

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        gpu, _ = self._device(handle, "nvmlDeviceGetUUID")
        return self.node.gpus[gpu].uuid

    def nvmlDeviceGetSerial(self, handle: Any) -> str:
        gpu, _ = self._device(handle, "nvmlDeviceGetSerial")
        return self.node.gpus[gpu].serial

    def nvmlDeviceGetPciInfo(self, handle: Any) -> pynvml.nvmlPciInfo_t:
        gpu, _ = self._device(handle, "nvmlDeviceGetPciInfo")
        sim = self.node.gpus[gpu]
        info = pynvml.nvmlPciInfo_t()
        info.busIdLegacy = f"{sim.pci_domain:04X}:{sim.pci_bus:02X}:00.0"
        info.domain = sim.pci_domain
        info.bus = sim.pci_bus
        info.device = 0
        info.pciDeviceId = self.profile.pcie_device_id
        info.pciSubSystemId = self.profile.pcie_subsystem_id
        info.busId = sim.pci_bus_id
        return info

    def nvmlDeviceGetPciInfo_v3(self, handle: Any) -> pynvml.nvmlPciInfo_t:
        return self.nvmlDeviceGetPciInfo(handle)

    # ---- memory, utilisation, temperature, power, clocks ---------------------------------------

    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: int | None = None) -> Any:
        gpu, now = self._device(handle, "nvmlDeviceGetMemoryInfo")
        total = self.profile.memory_total_bytes
        reserved = self.profile.memory_reserved_bytes
        allocated = self.node.reading(gpu, now).mem_used_bytes
        if not version:
            # v1 folds the driver's reserved memory into `used`.
            return pynvml.c_nvmlMemory_t(total=total, free=total - reserved - allocated, used=allocated + reserved)
        if version != pynvml.nvmlMemory_v2:
            raise _error(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        return pynvml.c_nvmlMemory_v2_t(
            version=version, total=total, reserved=reserved, free=total - reserved - allocated, used=allocated
        )

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> pynvml.c_nvmlUtilization_t:
        gpu, now = self._device(handle, "nvmlDeviceGetUtilizationRates")
        reading = self.node.reading(gpu, now)
        return pynvml.c_nvmlUtilization_t(gpu=reading.gpu_util_percent, memory=reading.mem_util_percent)

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        gpu, now = self._device(handle, "nvmlDeviceGetTemperature")
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.node.reading(gpu, now).temp_gpu_celsius

    def nvmlDeviceGetTemperatureV(self, handle: Any, sensor: int, version: int = _TEMPERATURE_V1) -> int:
        """The versioned call that replaces nvmlDeviceGetTemperature (pynvml: "DEPRECATED: Use
        nvmlDeviceGetTemperatureV instead; will be removed in CUDA 14.0"); a signed int."""
        gpu, now = self._device(handle, "nvmlDeviceGetTemperatureV")
        if version != _TEMPERATURE_V1:
            raise _error(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.node.reading(gpu, now).temp_gpu_celsius

    def nvmlDeviceGetTemperatureThreshold(self, handle: Any, threshold: int) -> int:
        self._device(handle, "nvmlDeviceGetTemperatureThreshold")
        if not 0 <= threshold < pynvml.NVML_TEMPERATURE_THRESHOLD_COUNT:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        value = self._thresholds.get(threshold)
        if value is None:  # acoustic and GPS targets: "GPU Target Temperature : N/A"
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return value

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        gpu, now = self._device(handle, "nvmlDeviceGetPowerUsage")
        return self.node.reading(gpu, now).power_milliwatts

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        self._device(handle, "nvmlDeviceGetEnforcedPowerLimit")
        return self.profile.power_limit_milliwatts

    def nvmlDeviceGetPowerManagementLimit(self, handle: Any) -> int:
        self._device(handle, "nvmlDeviceGetPowerManagementLimit")
        return self.profile.power_limit_milliwatts

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int:
        gpu, now = self._device(handle, "nvmlDeviceGetTotalEnergyConsumption")
        return self.node.reading(gpu, now).energy_millijoules

    def nvmlDeviceGetClockInfo(self, handle: Any, type: int) -> int:
        gpu, now = self._device(handle, "nvmlDeviceGetClockInfo")
        reading = self.node.reading(gpu, now)
        if type in (pynvml.NVML_CLOCK_GRAPHICS, pynvml.NVML_CLOCK_SM):
            return reading.sm_clock_mhz
        if type == pynvml.NVML_CLOCK_MEM:
            return reading.mem_clock_mhz
        if type == pynvml.NVML_CLOCK_VIDEO:
            return reading.video_clock_mhz
        raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def nvmlDeviceGetMaxClockInfo(self, handle: Any, type: int) -> int:
        self._device(handle, "nvmlDeviceGetMaxClockInfo")
        value = self._max_clocks.get(type)
        if value is None:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return value

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int:
        gpu, now = self._device(handle, "nvmlDeviceGetCurrentClocksEventReasons")
        return self.node.reading(gpu, now).clock_event_reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: Any) -> int:
        return self.nvmlDeviceGetCurrentClocksEventReasons(handle)

    def nvmlDeviceGetSupportedClocksEventReasons(self, handle: Any) -> int:
        self._device(handle, "nvmlDeviceGetSupportedClocksEventReasons")
        return self.profile.clock_event_reasons_supported

    def nvmlDeviceGetFanSpeed(self, handle: Any) -> int:
        gpu, now = self._device(handle, "nvmlDeviceGetFanSpeed")
        # Boards with a fan (PCIe cards) follow the core temperature from a 30 % floor.
        return min(100, max(30, 30 + (self.node.reading(gpu, now).temp_gpu_celsius - 40) * 3 // 2))

    # ---- PCIe ----------------------------------------------------------------------------------

    def nvmlDeviceGetPcieReplayCounter(self, handle: Any) -> int:
        gpu, now = self._device(handle, "nvmlDeviceGetPcieReplayCounter")
        return self.node.pcie_replay_count(gpu, now)

    def nvmlDeviceGetPcieThroughput(self, handle: Any, counter: int) -> int:
        """KB/s, like NVML (the real call samples a 20 ms window; this one does not block)."""
        gpu, now = self._device(handle, "nvmlDeviceGetPcieThroughput")
        reading = self.node.reading(gpu, now)
        if counter == pynvml.NVML_PCIE_UTIL_TX_BYTES:
            return reading.pcie_tx_kilobytes_per_second
        if counter == pynvml.NVML_PCIE_UTIL_RX_BYTES:
            return reading.pcie_rx_kilobytes_per_second
        raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle: Any) -> int:
        gpu, now = self._device(handle, "nvmlDeviceGetCurrPcieLinkGeneration")
        return self.node.pcie_link(gpu, now)[0]

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle: Any) -> int:
        self._device(handle, "nvmlDeviceGetMaxPcieLinkGeneration")
        return self.profile.pcie_link_gen_max

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle: Any) -> int:
        gpu, now = self._device(handle, "nvmlDeviceGetCurrPcieLinkWidth")
        return self.node.pcie_link(gpu, now)[1]

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: Any) -> int:
        self._device(handle, "nvmlDeviceGetMaxPcieLinkWidth")
        return self.profile.pcie_link_width_max

    # ---- memory errors -------------------------------------------------------------------------

    def nvmlDeviceGetTotalEccErrors(self, handle: Any, errorType: int, counterType: int) -> int:
        gpu, now = self._device(handle, "nvmlDeviceGetTotalEccErrors")
        if errorType not in (0, 1) or counterType not in (0, 1):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        sbe_volatile, dbe_volatile, sbe_aggregate, dbe_aggregate = self.node.ecc_counts(gpu, now)
        if counterType == pynvml.NVML_VOLATILE_ECC:
            return sbe_volatile if errorType == pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED else dbe_volatile
        return sbe_aggregate if errorType == pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED else dbe_aggregate

    def nvmlDeviceGetRetiredPages(self, device: Any, sourceFilter: int) -> list[int]:
        self._device(device, "nvmlDeviceGetRetiredPages")
        if sourceFilter not in (0, 1):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return []

    def nvmlDeviceGetRetiredPagesPendingStatus(self, device: Any) -> int:
        self._device(device, "nvmlDeviceGetRetiredPagesPendingStatus")
        return pynvml.NVML_FEATURE_DISABLED

    def nvmlDeviceGetRemappedRows(self, device: Any) -> tuple[int, int, int, int]:
        gpu, now = self._device(device, "nvmlDeviceGetRemappedRows")
        return self.node.remapped_rows(gpu, now)

    # ---- NVLink --------------------------------------------------------------------------------

    def _link(self, link: int) -> None:
        # Links past the board's count are invalid arguments, not unsupported features.
        if not 0 <= link < self.profile.nvlink_links:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    # The NVML source reads every link's state and error counters each cycle (18 links x 4 calls per
    # GPU): a GPU with no NVLink fault that can never be lost or go missing answers those from a
    # table, without the per-call device checks (the answers are the same).

    def _quiet_nvlink_gpus(self) -> tuple[bool, ...]:
        not_supported = self.profile.not_supported
        if {"nvmlDeviceGetNvLinkState", "nvmlDeviceGetNvLinkErrorCounter"} & not_supported:
            return (False,) * self.node.gpu_count
        return tuple(
            self._lost_at[gpu] is None
            and not self._missing[gpu]
            and all(f.gpu != gpu or f.kind not in ("nvlink_errors", "nvlink_down") for f in self.node.faults)
            for gpu in range(self.node.gpu_count)
        )

    def nvmlDeviceGetNvLinkState(self, device: Any, link: int) -> int:
        if id(device) in self._quiet_handles and 0 <= link < self._nvlink_count and self._init_count > 0:
            return pynvml.NVML_FEATURE_ENABLED
        gpu, now = self._device(device, "nvmlDeviceGetNvLinkState")
        self._link(link)
        up = self.node.nvlink_up(gpu, link, now)
        return pynvml.NVML_FEATURE_ENABLED if up else pynvml.NVML_FEATURE_DISABLED

    def nvmlDeviceGetNvLinkErrorCounter(self, device: Any, link: int, counter: int) -> int:
        if (
            id(device) in self._quiet_handles
            and counter in self._nvlink_zero_counters
            and 0 <= link < self._nvlink_count
            and self._init_count > 0
        ):
            return 0
        gpu, now = self._device(device, "nvmlDeviceGetNvLinkErrorCounter")
        self._link(link)
        if counter == pynvml.NVML_NVLINK_ERROR_DL_ECC_DATA:
            return 0  # Hopper links count ECC-corrected flits; the simulated faults never cause any
        name = _NVLINK_COUNTER_BY_CONSTANT.get(counter)
        if name is None:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if name in self.profile.nvlink_counters_not_supported:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return self.node.nvlink_error_count(gpu, link, name, now)

    # ---- GPM (GPU Performance Monitoring, Hopper and newer) -------------------------------------

    def nvmlGpmQueryDeviceSupport(self, handle: Any) -> Any:
        self._device(handle, "nvmlGpmQueryDeviceSupport")
        support = pynvml.c_nvmlGpmSupport_t()
        support.version = pynvml.NVML_GPM_SUPPORT_VERSION
        support.isSupportedDevice = 1  # both simulated boards are Hopper
        return support

    def nvmlGpmSampleAlloc(self) -> Any:
        self._check_init()
        buffer = ctypes.create_string_buffer(16)
        self._gpm_samples[ctypes.addressof(buffer)] = (buffer, None)
        return ctypes.cast(ctypes.addressof(buffer), pynvml.c_nvmlGpmSample_t)

    def nvmlGpmSampleFree(self, sample: Any) -> None:
        if self._gpm_samples.pop(_address(sample), None) is None:  # type: ignore[arg-type]
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def nvmlGpmSampleGet(self, handle: Any, sample: Any) -> None:
        gpu, now = self._device(handle, "nvmlGpmSampleGet")
        address = _address(sample)
        if address is None or address not in self._gpm_samples:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        self._gpm_samples[address] = (self._gpm_samples[address][0], (gpu, now))

    def nvmlGpmMetricsGet(self, request: Any) -> Any:
        """The metrics between request.sample1 and sample2 (same GPU, later second), from the workload."""
        self._check_init()
        taken = [self._gpm_samples.get(_address(s), (None, None))[1] for s in (request.sample1, request.sample2)]  # type: ignore[arg-type]
        if request.version != pynvml.NVML_GPM_METRICS_GET_VERSION:
            raise _error(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        first, second = taken
        if first is None or second is None or first[0] != second[0] or second[1] <= first[1]:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        values = self._gpm_values(first[0], first[1], second[1])
        for i in range(request.numMetrics):
            metric = request.metrics[i]
            value = values.get(metric.metricId)
            metric.nvmlReturn = pynvml.NVML_SUCCESS if value is not None else pynvml.NVML_ERROR_NOT_SUPPORTED
            metric.value = value if value is not None else 0.0
        return request

    def _gpm_values(self, gpu: int, t0: float, t1: float) -> dict[int, float]:
        """GPM metrics between the samples taken at t0 and t1, from the workload's readings then."""
        before, after = self.node.reading(gpu, t0), self.node.reading(gpu, t1)
        model = gpm_model(
            gpu,
            (before.gpu_util_percent, after.gpu_util_percent),
            (before.mem_util_percent, after.mem_util_percent),
            (before.sm_clock_mhz, after.sm_clock_mhz),
            self.profile.sm_clock_max_mhz,
        )
        values = {getattr(pynvml, const): float(value) for const, value in model.items()}
        try:
            self.nvmlDeviceGetNvLinkState(self._handles[gpu], 0)
        except pynvml.NVMLError_NotSupported:  # a board without NVLink has no NVLink traffic to count
            del values[pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC]
            del values[pynvml.NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC]
        return values

    # ---- field values --------------------------------------------------------------------------

    def _field_readers(self) -> dict[int, tuple[int, Callable[[int, float], int]]]:
        """Field id -> (NVML value type, reader(gpu, now)) for every field this board answers."""
        node, uint, ull = self.node, pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG

        def ecc(i: int) -> Callable[[int, float], int]:
            return lambda gpu, now: node.ecc_counts(gpu, now)[i]

        def remapped(i: int) -> Callable[[int, float], int]:
            return lambda gpu, now: node.remapped_rows(gpu, now)[i]

        def nvlink_total(name: str) -> Callable[[int, float], int]:
            if self.profile.nvlink_legacy_totals_read_zero:
                return lambda gpu, now: 0
            links = range(self.profile.nvlink_links)
            return lambda gpu, now: sum(node.nvlink_error_count(gpu, link, name, now) for link in links)

        table: list[tuple[str, int, Callable[[int, float], int]]] = [
            ("NVML_FI_DEV_MEMORY_TEMP", uint, lambda gpu, now: node.reading(gpu, now).temp_mem_celsius),
            # Millijoules since the driver loaded, like nvmlDeviceGetTotalEnergyConsumption.
            ("NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION", ull, lambda gpu, now: node.reading(gpu, now).energy_millijoules),
            ("NVML_FI_DEV_PCIE_REPLAY_COUNTER", uint, node.pcie_replay_count),
            # Cumulative bytes ("PCIe transmit bytes. Value can be wrapped.", nvml.h), 64-bit here.
            ("NVML_FI_DEV_PCIE_COUNT_TX_BYTES", ull, lambda gpu, now: node.pcie_bytes(gpu, now)[0]),
            ("NVML_FI_DEV_PCIE_COUNT_RX_BYTES", ull, lambda gpu, now: node.pcie_bytes(gpu, now)[1]),
            ("NVML_FI_DEV_ECC_SBE_VOL_TOTAL", ull, ecc(0)),
            ("NVML_FI_DEV_ECC_DBE_VOL_TOTAL", ull, ecc(1)),
            ("NVML_FI_DEV_ECC_SBE_AGG_TOTAL", ull, ecc(2)),
            ("NVML_FI_DEV_ECC_DBE_AGG_TOTAL", ull, ecc(3)),
            ("NVML_FI_DEV_RETIRED_SBE", uint, lambda gpu, now: 0),
            ("NVML_FI_DEV_RETIRED_DBE", uint, lambda gpu, now: 0),
            ("NVML_FI_DEV_RETIRED_PENDING", uint, lambda gpu, now: 0),
            ("NVML_FI_DEV_REMAPPED_COR", uint, remapped(0)),
            ("NVML_FI_DEV_REMAPPED_UNC", uint, remapped(1)),
            ("NVML_FI_DEV_REMAPPED_PENDING", uint, remapped(2)),
            ("NVML_FI_DEV_REMAPPED_FAILURE", uint, remapped(3)),
            ("NVML_FI_DEV_NVLINK_LINK_COUNT", uint, lambda gpu, now: self.profile.nvlink_links),
            ("NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", ull, nvlink_total("crc_flit")),
            ("NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL", ull, nvlink_total("crc_data")),
            ("NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL", ull, nvlink_total("replay")),
            ("NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL", ull, nvlink_total("recovery")),
        ]
        # Ids this pynvml predates (the PCIe byte counters arrived with R550) cannot be asked for.
        readers = {getattr(pynvml, name): (kind, read) for name, kind, read in table if hasattr(pynvml, name)}
        for field_id in self.profile.fields_not_supported:
            readers.pop(field_id, None)
        return readers

    def nvmlDeviceGetFieldValues(self, handle: Any, fieldIds: Sequence[Any]) -> Any:
        """An array of c_nvmlFieldValue_t; an unknown field fails in its own nvmlReturn only."""
        gpu, now = self._device(handle, "nvmlDeviceGetFieldValues")
        values = (pynvml.c_nvmlFieldValue_t * len(fieldIds))()
        timestamp_us = int(now * 1_000_000)
        readers = self._fields
        if _PACKED_FIELD_VALUES:
            # One struct.pack_into per value instead of seven ctypes attribute writes.
            buffer = memoryview(values).cast("B")
            uint = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
            success, not_supported = pynvml.NVML_SUCCESS, pynvml.NVML_ERROR_NOT_SUPPORTED
            for i, field_id in enumerate(fieldIds):
                scope = 0
                if isinstance(field_id, tuple):  # (field id, scope id), as pynvml accepts
                    field_id, scope = field_id
                reader = readers.get(field_id)
                offset = i * _FIELD_VALUE_SIZE
                if reader is None:
                    _PACK_UINT(buffer, offset, field_id, scope, timestamp_us, 0, 0, not_supported, 0)
                    continue
                value_type, read = reader
                pack = _PACK_UINT if value_type == uint else _PACK_ULL
                pack(buffer, offset, field_id, scope, timestamp_us, 0, value_type, success, read(gpu, now))
            return values
        plain = (_PlainFieldValue * len(fieldIds)).from_buffer(values)
        for i, field_id in enumerate(fieldIds):
            value = plain[i]
            if isinstance(field_id, tuple):  # (field id, scope id), as pynvml accepts
                value.fieldId, value.scopeId = field_id
            else:
                value.fieldId = field_id
            value.timestamp = timestamp_us
            value.latencyUsec = 0
            reader = readers.get(value.fieldId)
            if reader is None:
                value.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
                continue
            value_type, read = reader
            value.valueType = value_type
            if value_type == pynvml.NVML_VALUE_TYPE_UNSIGNED_INT:
                value.value.uiVal = read(gpu, now)
            else:
                value.value.ullVal = read(gpu, now)
            value.nvmlReturn = pynvml.NVML_SUCCESS
        return values

    # ---- processes -----------------------------------------------------------------------------

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]:
        """pynvml's friendly objects (pid, usedGpuMemory, gpuInstanceId, computeInstanceId), one per
        process with a compute context, as pynvml builds them from nvmlProcessInfo_t (v3)."""
        gpu, now = self._device(handle, "nvmlDeviceGetComputeRunningProcesses")
        pids = self.node.processes_at(gpu, now)
        if not pids:
            return []
        # The processes share the job's allocations; NVML reports bytes per process.
        each = self.node.reading(gpu, now).mem_used_bytes // len(pids)
        return [
            pynvml.nvmlFriendlyObject(
                {
                    "pid": pid,
                    "usedGpuMemory": each,
                    "gpuInstanceId": _NO_MIG_INSTANCE,
                    "computeInstanceId": _NO_MIG_INSTANCE,
                }
            )
            for pid in pids
        ]

    def nvmlDeviceGetComputeRunningProcesses_v3(self, handle: Any) -> list[Any]:
        return self.nvmlDeviceGetComputeRunningProcesses(handle)

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle: Any) -> list[Any]:
        return self.nvmlDeviceGetComputeRunningProcesses(handle)

    # ---- events --------------------------------------------------------------------------------

    def nvmlEventSetCreate(self) -> Any:
        self._check_init()
        memory = ctypes.create_string_buffer(16)
        self._event_memory.append(memory)
        with self._cond:
            self._event_sets[ctypes.addressof(memory)] = _EventSet()
        return ctypes.cast(ctypes.addressof(memory), pynvml.c_nvmlEventSet_t)

    def nvmlDeviceGetSupportedEventTypes(self, handle: Any) -> int:
        self._device(handle, "nvmlDeviceGetSupportedEventTypes")
        return SUPPORTED_EVENT_TYPES

    def nvmlDeviceRegisterEvents(self, handle: Any, eventTypes: int, eventSet: Any) -> None:
        gpu, now = self._device(handle, "nvmlDeviceRegisterEvents")
        # Like NVML, one unsupported bit fails the whole registration.
        if eventTypes & ~SUPPORTED_EVENT_TYPES:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        with self._cond:
            state = self._event_set(eventSet)
            mask, since = state.registered.get(gpu, (0, now))
            # An event set only sees events that happen after the device was registered.
            state.registered[gpu] = (mask | eventTypes, since)
            self._cond.notify_all()

    def _next_xid(self, state: _EventSet, now: float) -> tuple[int | None, float | None]:
        """(index of the earliest deliverable XID at `now`, time of the next one after `now`)."""
        upcoming: float | None = None
        for i, event in enumerate(self.node.xid_events):
            if i in state.delivered:
                continue
            registration = state.registered.get(event.gpu)
            if registration is None or not registration[0] & pynvml.nvmlEventTypeXidCriticalError:
                continue
            if event.time < registration[1]:
                continue
            if event.time <= now:
                return i, None
            if upcoming is None or event.time < upcoming:
                upcoming = event.time
        return None, upcoming

    def _event_data(self, event: XidEvent) -> pynvml.c_nvmlEventData_t:
        data = pynvml.c_nvmlEventData_t()
        data.device = self._handles[event.gpu]
        data.eventType = pynvml.nvmlEventTypeXidCriticalError
        data.eventData = event.xid
        data.gpuInstanceId = pynvml.NVML_GPU_INSTANCE_ID_ANY
        data.computeInstanceId = pynvml.NVML_COMPUTE_INSTANCE_ID_ANY
        return data

    def nvmlEventSetWait_v2(self, eventSet: Any, timeoutms: int) -> pynvml.c_nvmlEventData_t:
        """Blocks until an XID is due or `timeoutms` passes (NVMLError_Timeout); each XID once."""
        deadline = time.monotonic() + max(0, int(timeoutms)) / 1000.0
        with self._cond:
            while True:
                self._check_init()
                state = self._event_set(eventSet)
                now = self.node.clock()
                due, upcoming = self._next_xid(state, now)
                if due is not None:
                    state.delivered.add(due)
                    return self._event_data(self.node.xid_events[due])
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _error(pynvml.NVML_ERROR_TIMEOUT)
                if upcoming is not None:
                    remaining = min(remaining, max(upcoming - now, _MIN_EVENT_RECHECK_SECONDS))
                self._cond.wait(remaining)

    def nvmlEventSetWait(self, eventSet: Any, timeoutms: int) -> pynvml.c_nvmlEventData_t:
        return self.nvmlEventSetWait_v2(eventSet, timeoutms)

    def nvmlEventSetFree(self, eventSet: Any) -> None:
        with self._cond:
            state = self._event_set(eventSet)
            state.freed = True
            self._cond.notify_all()

    def wake(self) -> None:
        """Wake event waiters so they re-read the clock (for tests that move a manual clock)."""
        with self._cond:
            self._cond.notify_all()


def _adopt_pynvml_names() -> None:
    """Give FakeNvml pynvml's constants, structures and NVMLError classes (never its functions)."""
    for name, value in vars(pynvml).items():
        if name in FakeNvml.__dict__ or inspect.isfunction(value) or inspect.ismodule(value):
            continue
        if name.startswith("NVML") or (
            name.startswith(("nvml", "c_nvml")) and (inspect.isclass(value) or isinstance(value, int))
        ):
            setattr(FakeNvml, name, value)


_adopt_pynvml_names()


def make_fake_nvml(sim_node: SimNode, profile: GpuProfile | None = None) -> FakeNvml:
    """A pynvml-compatible object over `sim_node`; call nvmlInit() on it before use, as with pynvml.

    `profile` (default: the node's) decides which calls and fields answer NOT_SUPPORTED."""
    return FakeNvml(sim_node, profile)
