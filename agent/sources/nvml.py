"""The NVML source: per-GPU samples and XID / GPU-lost events from an injected pynvml-like module.

The module is `pynvml` on a GPU node (see load_nvml) or the fake NVML of agent.sim on a simulated
one; this code calls the same pynvml names on both and has no notion of which it is talking to.
Units follow the canonical names: NVML's mW, mJ and KB/s become watts, joules and bytes/second.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)

# NVML's PCIe throughput is in KB/s of 1024 bytes.
_BYTES_PER_KB = 1024
# How long close() waits for an event wait in another thread before freeing the event set.
_CLOSE_WAIT_SECONDS = 5.0

_NVLINK_COUNTER_FIELDS = (
    ("nvlink_crc_flit_errors_total", "NVML_NVLINK_ERROR_DL_CRC_FLIT"),
    ("nvlink_crc_data_errors_total", "NVML_NVLINK_ERROR_DL_CRC_DATA"),
    ("nvlink_replay_errors_total", "NVML_NVLINK_ERROR_DL_REPLAY"),
    ("nvlink_recovery_errors_total", "NVML_NVLINK_ERROR_DL_RECOVERY"),
)

_VALUE_MEMBERS = (
    ("NVML_VALUE_TYPE_DOUBLE", "dVal"),
    ("NVML_VALUE_TYPE_UNSIGNED_INT", "uiVal"),
    ("NVML_VALUE_TYPE_UNSIGNED_LONG", "ulVal"),
    ("NVML_VALUE_TYPE_UNSIGNED_LONG_LONG", "ullVal"),
    ("NVML_VALUE_TYPE_SIGNED_LONG_LONG", "sllVal"),
    ("NVML_VALUE_TYPE_SIGNED_INT", "siVal"),
    ("NVML_VALUE_TYPE_UNSIGNED_SHORT", "usVal"),
)


def load_nvml() -> object | None:
    """pynvml, initialised, or None (with one warning) when there is no usable NVML here.

    The nvmlInit() reference taken here is held for the life of the process; NvmlSource.start()
    takes and close() releases its own.
    """
    try:
        import pynvml
    except ImportError as exc:
        log.warning("NVML unavailable (%s): running host-only", exc)
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:  # LibraryNotFound, DriverNotLoaded, NoPermission, ...
        log.warning("NVML unavailable (%s: %s): running host-only", type(exc).__name__, exc)
        return None
    except OSError as exc:
        log.warning("NVML unavailable (%s): running host-only", exc)
        return None
    return pynvml


def _handle_key(handle: Any) -> Any:
    """A hashable identity for a device handle that survives NVML returning a fresh pointer object
    (event data carries a new c_nvmlDevice_t for the same device)."""
    try:
        return ctypes.cast(handle, ctypes.c_void_p).value
    except (TypeError, ctypes.ArgumentError):
        return id(handle)


def _pci_bus_id(raw: str) -> str:
    """NVML's "00000000:18:00.0" as "0000:18:00.0" (4-digit domain, lower case)."""
    domain, sep, rest = raw.strip().partition(":")
    try:
        return f"{int(domain, 16):04x}:{rest.lower()}" if sep else raw.strip().lower()
    except ValueError:
        return raw.strip().lower()


def _cuda_version(encoded: int) -> str:
    """NVML's 13010 as "13.1"."""
    return f"{encoded // 1000}.{(encoded % 1000) // 10}"


@dataclass
class _Gpu:
    """What the source knows and has learned about one GPU."""

    index: int
    handle: Any = None
    uuid: str | None = None
    pci_bus_id: str | None = None
    usable: bool = True  # False when NVML refused the handle for a reason other than GPU lost
    lost: bool = False
    lost_reported: bool = False
    unsupported: set[str] = field(default_factory=set)  # probe names answered NOT_SUPPORTED
    static: dict[str, float | int] = field(default_factory=dict)  # values that never change
    static_done: set[str] = field(default_factory=set)
    memory_v2: bool = True
    nvlinks: list[int] | None = None  # links that answer, learned on the first cycle
    nvlink_skip: set[tuple[int, int]] = field(default_factory=set)  # (link, counter) unsupported
    errors_logged: set[str] = field(default_factory=set)


class NvmlSource:
    """Samples every GPU through `nvml` (pynvml or a compatible object) and waits for its XIDs."""

    name = "nvml"

    def __init__(self, nvml: Any, clock: Callable[[], float] = time.time) -> None:
        self.nvml = nvml
        self.clock = clock
        self.inventory: list[dict[str, Any]] = []
        self._gpus: list[_Gpu] = []
        self._gpu_by_key: dict[Any, _Gpu] = {}
        self._event_set: Any = None
        self._started = False
        self._closed = threading.Event()
        self._wait_lock = threading.Lock()
        self._wait_errors_logged: set[str] = set()
        self._NVMLError = nvml.NVMLError
        self._GpuIsLost = nvml.NVMLError_GpuIsLost
        self._Timeout = nvml.NVMLError_Timeout
        # An older library without a call, or a call this library has but the driver lacks, is
        # "not supported" for our purposes, learned once like NOT_SUPPORTED.
        self._learned_unsupported: tuple[type[BaseException], ...] = (
            nvml.NVMLError_NotSupported,
            nvml.NVMLError_FunctionNotFound,
        )
        # Older pynvml has no version argument or constant; older drivers no _v2 entry point.
        self._memory_v2_unavailable: tuple[type[BaseException], ...] = (
            AttributeError,
            TypeError,
            nvml.NVMLError_FunctionNotFound,
            getattr(nvml, "NVMLError_ArgumentVersionMismatch", nvml.NVMLError_FunctionNotFound),
        )
        self._invalid_link: tuple[type[BaseException], ...] = (
            nvml.NVMLError_NotSupported,
            nvml.NVMLError_InvalidArgument,
        )
        self._value_members = {
            getattr(nvml, const): member for const, member in _VALUE_MEMBERS if hasattr(nvml, const)
        }
        self._nvlink_counters = [
            (name, getattr(nvml, const)) for name, const in _NVLINK_COUNTER_FIELDS if hasattr(nvml, const)
        ]
        corrected, uncorrected = nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        volatile, aggregate = nvml.NVML_VOLATILE_ECC, nvml.NVML_AGGREGATE_ECC
        # (probe name, function, static): a static probe's values are read once and reused.
        self._probes: list[tuple[str, Callable[[_Gpu, Any, dict], None], bool]] = [
            ("utilization", self._read_utilization, False),
            ("memory", self._read_memory, False),
            ("temp_gpu", self._read_temp_gpu, False),
            ("temp_mem", self._read_temp_mem, False),
            ("temp_slowdown", self._read_temp_slowdown, True),
            ("temp_shutdown", self._read_temp_shutdown, True),
            ("power", self._read_power, False),
            ("power_limit", self._read_power_limit, False),
            ("energy", self._read_energy, False),
            ("sm_clock", self._read_sm_clock, False),
            ("sm_clock_max", self._read_sm_clock_max, True),
            ("mem_clock", self._read_mem_clock, False),
            ("clock_event_reasons", self._read_clock_event_reasons, False),
            ("fan", self._read_fan, False),
            ("pcie_replay", self._read_pcie_replay, False),
            ("pcie_tx", self._read_pcie_tx, False),
            ("pcie_rx", self._read_pcie_rx, False),
            ("pcie_link_gen", self._read_pcie_link_gen, False),
            ("pcie_link_gen_max", self._read_pcie_link_gen_max, True),
            ("pcie_link_width", self._read_pcie_link_width, False),
            ("pcie_link_width_max", self._read_pcie_link_width_max, True),
            ("ecc_sbe_volatile", self._read_ecc(corrected, volatile, "ecc_sbe_volatile_total"), False),
            ("ecc_dbe_volatile", self._read_ecc(uncorrected, volatile, "ecc_dbe_volatile_total"), False),
            ("ecc_sbe_aggregate", self._read_ecc(corrected, aggregate, "ecc_sbe_aggregate_total"), False),
            ("ecc_dbe_aggregate", self._read_ecc(uncorrected, aggregate, "ecc_dbe_aggregate_total"), False),
            ("retired_pages_sbe", self._read_retired(
                nvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS, "retired_pages_sbe"), False),
            ("retired_pages_dbe", self._read_retired(
                nvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR, "retired_pages_dbe"), False),
            ("retired_pages_pending", self._read_retired_pending, False),
            ("remapped_rows", self._read_remapped_rows, False),
            ("nvlink", self._read_nvlink, False),
        ]

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Initialise NVML, build the inventory and register for XID events where supported."""
        if self._started:
            return
        nvml = self.nvml
        nvml.nvmlInit()
        self._started = True
        driver_version = self._optional(nvml.nvmlSystemGetDriverVersion)
        cuda_encoded = self._optional(nvml.nvmlSystemGetCudaDriverVersion)
        cuda_version = _cuda_version(cuda_encoded) if cuda_encoded is not None else None
        self._gpus = [_Gpu(index=i) for i in range(nvml.nvmlDeviceGetCount())]
        self.inventory = []
        for gpu in self._gpus:
            entry: dict[str, Any] = {
                "index": gpu.index,
                "uuid": None,
                "name": None,
                "pci_bus_id": None,
                "serial": None,
                "memory_total_bytes": None,
                "driver_version": driver_version,
                "cuda_version": cuda_version,
                "power_limit_watts": None,
                "sm_clock_max_mhz": None,
                "mem_clock_max_mhz": None,
            }
            try:
                self._describe(gpu, entry)
            except self._GpuIsLost:
                gpu.lost = True
                log.warning("GPU %d is lost (NVML_ERROR_GPU_IS_LOST) at start", gpu.index)
            except self._NVMLError as exc:
                gpu.usable = False
                log.warning("GPU %d cannot be read through NVML (%s); not sampling it", gpu.index, exc)
            self.inventory.append(entry)
        self._register_events()

    def _describe(self, gpu: _Gpu, entry: dict[str, Any]) -> None:
        nvml = self.nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(gpu.index)
        gpu.handle = handle
        self._gpu_by_key[_handle_key(handle)] = gpu
        gpu.uuid = entry["uuid"] = nvml.nvmlDeviceGetUUID(handle)
        entry["name"] = nvml.nvmlDeviceGetName(handle)
        gpu.pci_bus_id = entry["pci_bus_id"] = _pci_bus_id(nvml.nvmlDeviceGetPciInfo(handle).busId)
        entry["serial"] = self._optional(nvml.nvmlDeviceGetSerial, handle)
        memory = self._optional(nvml.nvmlDeviceGetMemoryInfo, handle)
        entry["memory_total_bytes"] = int(memory.total) if memory is not None else None
        limit_mw = self._optional(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        entry["power_limit_watts"] = limit_mw / 1000.0 if limit_mw is not None else None
        entry["sm_clock_max_mhz"] = self._optional(nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_SM)
        entry["mem_clock_max_mhz"] = self._optional(nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_MEM)

    def _optional(self, function: Callable[..., Any], *args: Any) -> Any:
        """The call's result, or None when NVML cannot answer it (a lost GPU still raises)."""
        try:
            return function(*args)
        except self._GpuIsLost:
            raise
        except self._NVMLError as exc:
            log.debug("%s unavailable: %s", getattr(function, "__name__", function), exc)
            return None

    def _register_events(self) -> None:
        nvml = self.nvml
        xid_bit = nvml.nvmlEventTypeXidCriticalError
        try:
            self._event_set = nvml.nvmlEventSetCreate()
        except self._NVMLError as exc:
            log.warning("NVML event set unavailable (%s): XIDs only from the kernel log", exc)
            return
        registered = 0
        for gpu in self._gpus:
            if gpu.handle is None or gpu.lost or not gpu.usable:
                continue
            try:
                # Registering a type the GPU does not support fails the whole call, so mask first.
                mask = nvml.nvmlDeviceGetSupportedEventTypes(gpu.handle) & xid_bit
                if mask:
                    nvml.nvmlDeviceRegisterEvents(gpu.handle, mask, self._event_set)
                    registered += 1
            except self._GpuIsLost:
                gpu.lost = True
            except self._NVMLError as exc:
                log.info("GPU %d: no NVML XID events (%s)", gpu.index, exc)
        if not registered:
            self._free_event_set()

    def _free_event_set(self) -> None:
        if self._event_set is None:
            return
        try:
            self.nvml.nvmlEventSetFree(self._event_set)
        except self._NVMLError as exc:
            log.debug("nvmlEventSetFree: %s", exc)
        self._event_set = None

    def close(self) -> None:
        """Free the event set (after any wait in progress returns) and release NVML."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._event_set is not None:
            # Freeing an event set another thread is waiting on is undefined in NVML.
            if self._wait_lock.acquire(timeout=_CLOSE_WAIT_SECONDS):
                try:
                    self._free_event_set()
                finally:
                    self._wait_lock.release()
            else:
                log.warning("NVML event wait still running after %.0f s; not freeing its set",
                            _CLOSE_WAIT_SECONDS)
        if self._started:
            try:
                self.nvml.nvmlShutdown()
            except self._NVMLError as exc:
                log.debug("nvmlShutdown: %s", exc)

    # ---- sampling ------------------------------------------------------------------------------

    def sample(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(one sample per readable GPU, events); a lost GPU gives one gpu_lost event, then silence."""
        if self._closed.is_set():
            return [], []
        now = self.clock()
        samples: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        for gpu in self._gpus:
            if not gpu.usable:
                continue
            if not gpu.lost:
                try:
                    metrics = self._read_gpu(gpu)
                except self._GpuIsLost:
                    gpu.lost = True
                else:
                    samples.append({"gpu": gpu.index, "t": now, "uuid": gpu.uuid, "metrics": metrics})
                    continue
            if not gpu.lost_reported:
                gpu.lost_reported = True
                events.append(
                    {
                        "t": now,
                        "kind": "gpu_lost",
                        "gpu": gpu.index,
                        "uuid": gpu.uuid,
                        "pci_bus_id": gpu.pci_bus_id,
                        "message": "GPU is lost: NVML calls fail with NVML_ERROR_GPU_IS_LOST",
                        "source": "nvml",
                    }
                )
        return samples, events

    def _read_gpu(self, gpu: _Gpu) -> dict[str, float | int]:
        handle = gpu.handle
        metrics: dict[str, float | int] = {}
        for name, probe, static in self._probes:
            if name in gpu.unsupported or name in gpu.static_done:
                continue
            try:
                probe(gpu, handle, gpu.static if static else metrics)
            except self._GpuIsLost:
                raise
            except self._learned_unsupported as exc:
                gpu.unsupported.add(name)
                log.debug("GPU %d: %s not supported (%s); not asking again", gpu.index, name, exc)
            except AttributeError as exc:
                # This pynvml predates the call (e.g. ClocksEventReasons before 12.535).
                gpu.unsupported.add(name)
                log.warning("GPU %d: %s unavailable in this pynvml (%s)", gpu.index, name, exc)
            except self._NVMLError as exc:
                # Transient (Unknown, Timeout, ...): the field is absent this cycle, asked again next.
                if name not in gpu.errors_logged:
                    gpu.errors_logged.add(name)
                    log.warning("GPU %d: reading %s failed: %s", gpu.index, name, exc)
            else:
                if static:
                    gpu.static_done.add(name)
        metrics.update(gpu.static)
        return metrics

    # ---- probes: each reads one NVML call (or a few) into canonical fields ----------------------

    def _read_utilization(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        rates = self.nvml.nvmlDeviceGetUtilizationRates(handle)
        out["gpu_util_percent"] = float(rates.gpu)
        out["mem_util_percent"] = float(rates.memory)

    def _read_memory(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        nvml = self.nvml
        if gpu.memory_v2:
            # v2 reports driver-reserved memory apart, so `used` matches nvidia-smi's Used.
            try:
                info = nvml.nvmlDeviceGetMemoryInfo(handle, nvml.nvmlMemory_v2)
            except self._memory_v2_unavailable:
                gpu.memory_v2 = False
            else:
                out["mem_used_bytes"] = int(info.used)
                out["mem_total_bytes"] = int(info.total)
                return
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        out["mem_used_bytes"] = int(info.used)
        out["mem_total_bytes"] = int(info.total)

    def _read_temp_gpu(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        out["temp_gpu_celsius"] = float(self.nvml.nvmlDeviceGetTemperature(handle, self.nvml.NVML_TEMPERATURE_GPU))

    def _read_temp_mem(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        nvml = self.nvml
        value = nvml.nvmlDeviceGetFieldValues(handle, [nvml.NVML_FI_DEV_MEMORY_TEMP])[0]
        # The call succeeds as a whole; each field carries its own return code.
        if value.nvmlReturn != nvml.NVML_SUCCESS:
            raise nvml.NVMLError(value.nvmlReturn)
        member = self._value_members.get(value.valueType)
        if member is None:
            raise nvml.NVMLError(nvml.NVML_ERROR_UNKNOWN)
        out["temp_mem_celsius"] = float(getattr(value.value, member))

    def _read_temp_slowdown(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        nvml = self.nvml
        out["temp_slowdown_celsius"] = float(
            nvml.nvmlDeviceGetTemperatureThreshold(handle, nvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)
        )

    def _read_temp_shutdown(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        nvml = self.nvml
        out["temp_shutdown_celsius"] = float(
            nvml.nvmlDeviceGetTemperatureThreshold(handle, nvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN)
        )

    def _read_power(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        out["power_watts"] = self.nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0

    def _read_power_limit(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        out["power_limit_watts"] = self.nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0

    def _read_energy(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        out["energy_joules"] = self.nvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0

    def _read_sm_clock(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        out["sm_clock_mhz"] = float(self.nvml.nvmlDeviceGetClockInfo(handle, self.nvml.NVML_CLOCK_SM))

    def _read_sm_clock_max(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        out["sm_clock_max_mhz"] = float(self.nvml.nvmlDeviceGetMaxClockInfo(handle, self.nvml.NVML_CLOCK_SM))

    def _read_mem_clock(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        out["mem_clock_mhz"] = float(self.nvml.nvmlDeviceGetClockInfo(handle, self.nvml.NVML_CLOCK_MEM))

    def _read_clock_event_reasons(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        out["clock_event_reasons"] = int(self.nvml.nvmlDeviceGetCurrentClocksEventReasons(handle))

    def _read_fan(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        out["fan_percent"] = float(self.nvml.nvmlDeviceGetFanSpeed(handle))

    def _read_pcie_replay(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        out["pcie_replay_total"] = int(self.nvml.nvmlDeviceGetPcieReplayCounter(handle))

    def _read_pcie_tx(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        kb = self.nvml.nvmlDeviceGetPcieThroughput(handle, self.nvml.NVML_PCIE_UTIL_TX_BYTES)
        out["pcie_tx_bytes_per_second"] = float(kb * _BYTES_PER_KB)

    def _read_pcie_rx(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        kb = self.nvml.nvmlDeviceGetPcieThroughput(handle, self.nvml.NVML_PCIE_UTIL_RX_BYTES)
        out["pcie_rx_bytes_per_second"] = float(kb * _BYTES_PER_KB)

    def _read_pcie_link_gen(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        out["pcie_link_gen"] = int(self.nvml.nvmlDeviceGetCurrPcieLinkGeneration(handle))

    def _read_pcie_link_gen_max(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        out["pcie_link_gen_max"] = int(self.nvml.nvmlDeviceGetMaxPcieLinkGeneration(handle))

    def _read_pcie_link_width(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        out["pcie_link_width"] = int(self.nvml.nvmlDeviceGetCurrPcieLinkWidth(handle))

    def _read_pcie_link_width_max(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        out["pcie_link_width_max"] = int(self.nvml.nvmlDeviceGetMaxPcieLinkWidth(handle))

    def _read_ecc(self, error_type: int, counter_type: int, name: str) -> Callable[[_Gpu, Any, dict], None]:
        def read(gpu: _Gpu, handle: Any, out: dict) -> None:
            out[name] = int(self.nvml.nvmlDeviceGetTotalEccErrors(handle, error_type, counter_type))

        return read

    def _read_retired(self, cause: int, name: str) -> Callable[[_Gpu, Any, dict], None]:
        def read(gpu: _Gpu, handle: Any, out: dict) -> None:
            out[name] = len(self.nvml.nvmlDeviceGetRetiredPages(handle, cause))

        return read

    def _read_retired_pending(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        out["retired_pages_pending"] = int(self.nvml.nvmlDeviceGetRetiredPagesPendingStatus(handle))

    def _read_remapped_rows(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        correctable, uncorrectable, pending, failure = self.nvml.nvmlDeviceGetRemappedRows(handle)
        out["remapped_rows_correctable"] = int(correctable)
        out["remapped_rows_uncorrectable"] = int(uncorrectable)
        out["remap_pending"] = int(pending)
        out["remap_failure"] = int(failure)

    def _read_nvlink(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        nvml = self.nvml
        if gpu.nvlinks is None:
            links = []
            for link in range(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18)):
                try:
                    nvml.nvmlDeviceGetNvLinkState(handle, link)
                except self._invalid_link:
                    continue
                links.append(link)
            if not links:
                raise nvml.NVMLError_NotSupported()
            gpu.nvlinks = links
        up = total = 0
        enabled = nvml.NVML_FEATURE_ENABLED
        for link in gpu.nvlinks:
            try:
                state = nvml.nvmlDeviceGetNvLinkState(handle, link)
            except self._invalid_link:
                continue
            total += 1
            up += state == enabled
        out["nvlink_links_up"] = up
        out["nvlink_links_total"] = total
        skip = gpu.nvlink_skip
        for name, counter in self._nvlink_counters:
            count = 0
            answered = False
            for link in gpu.nvlinks:
                if (link, counter) in skip:
                    continue
                try:
                    count += nvml.nvmlDeviceGetNvLinkErrorCounter(handle, link, counter)
                except self._invalid_link:
                    skip.add((link, counter))
                    continue
                answered = True
            if answered:
                out[name] = int(count)

    # ---- events --------------------------------------------------------------------------------

    def wait_events(self, timeout_seconds: float) -> list[dict[str, Any]]:
        """One blocking nvmlEventSetWait_v2 (run it on its own thread): [] or one XID event.

        Never raises: a timeout gives [], and so does an NVML error (after waiting out the timeout,
        so a caller looping on this cannot spin).
        """
        if self._event_set is None or self._closed.is_set():
            self._closed.wait(timeout_seconds)
            return []
        nvml = self.nvml
        error: BaseException | None = None
        with self._wait_lock:
            if self._closed.is_set() or self._event_set is None:
                return []
            try:
                data = nvml.nvmlEventSetWait_v2(self._event_set, max(0, int(timeout_seconds * 1000)))
            except self._Timeout:
                return []
            except self._NVMLError as exc:
                error = exc
        if error is not None:
            kind = type(error).__name__
            if kind not in self._wait_errors_logged:
                self._wait_errors_logged.add(kind)
                log.warning("NVML event wait failed: %s", error)
            self._closed.wait(timeout_seconds)
            return []
        if not data.eventType & nvml.nvmlEventTypeXidCriticalError:
            return []
        gpu = self._gpu_by_key.get(_handle_key(data.device))
        return [
            {
                "t": self.clock(),
                "kind": "xid",
                "gpu": gpu.index if gpu is not None else None,
                "uuid": gpu.uuid if gpu is not None else None,
                "pci_bus_id": gpu.pci_bus_id if gpu is not None else None,
                "xid": int(data.eventData),
                "message": "",
                "source": "nvml",
            }
        ]
