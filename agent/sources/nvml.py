"""The NVML source: per-GPU samples and XID / GPU-lost events from an injected pynvml-like module.

The module is `pynvml` on a GPU node (see load_nvml) or the fake NVML of fleetwatch.sim on a simulated
one; this code calls the same pynvml names on both and has no notion of which it is talking to.
Units follow the canonical names: NVML's mW, mJ and KB/s become watts, joules and bytes/second.

Each canonical field comes from a *route*: one NVML call, or a group of field ids read through the
one nvmlDeviceGetFieldValues call each GPU gets per cycle. A route that NVML answers NOT_SUPPORTED
(or that this pynvml or driver lacks) is learned dead for that GPU and never asked again; where a
route has a fallback (a field id with an equivalent call, a versioned call with its deprecated
predecessor) the fallback takes over in the same cycle. A field with no live route left is
absent from every sample and listed by unsupported_fields(). NVML's "not available" values
(all ones, or -1 for signed results), any value no GPU can report (fleetwatch.limits: NaN, a count
beyond a signed 64-bit integer, all ones however NVML typed it) and any other transient failure
leave the field out of that one cycle only: an unsupported or unknown value is never reported as 0
or as a sentinel.
"""

from __future__ import annotations

import ctypes
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fleetwatch.agent.sources.gpm import GPM_FIELDS, GpmReader, GpmUnsupported
from fleetwatch.limits import XID_MAX, XID_MIN, storable_metric

log = logging.getLogger(__name__)

# NVML's PCIe throughput is in KB/s of 1024 bytes (nvml.h nvmlDeviceGetPcieThroughput: "throughput
# in KB/s"; nvtop#208 confirms KiB).
_BYTES_PER_KB = 1024
_MILLI = 1000.0  # mW -> W (nvmlDeviceGetPowerUsage / EnforcedPowerLimit), mJ -> J (energy)
# NVML_VALUE_NOT_AVAILABLE is -1 (nvml.h), i.e. all ones in the unsigned result types.
_U32_NOT_AVAILABLE = 0xFFFF_FFFF
_U64_NOT_AVAILABLE = 0xFFFF_FFFF_FFFF_FFFF
# How long close() waits for an event wait in another thread before freeing the event set.
_CLOSE_WAIT_SECONDS = 5.0
# A byte counter narrower than this wraps faster than any sampling interval at PCIe speeds
# (2**32 B at Gen5 x16's ~63 GB/s is 68 ms), so its deltas alias and cannot give a rate.
_MIN_BYTE_COUNTER_BITS = 64

_NVLINK_FIELDS = (
    "nvlink_links_up",
    "nvlink_links_total",
    "nvlink_crc_flit_errors_total",
    "nvlink_crc_data_errors_total",
    "nvlink_replay_errors_total",
    "nvlink_recovery_errors_total",
)
# (canonical total, per-link counter constant, legacy all-lane total field constant)
_NVLINK_COUNTERS = (
    ("nvlink_crc_flit_errors_total", "NVML_NVLINK_ERROR_DL_CRC_FLIT", "NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL"),
    ("nvlink_crc_data_errors_total", "NVML_NVLINK_ERROR_DL_CRC_DATA", "NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL"),
    ("nvlink_replay_errors_total", "NVML_NVLINK_ERROR_DL_REPLAY", "NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL"),
    ("nvlink_recovery_errors_total", "NVML_NVLINK_ERROR_DL_RECOVERY", "NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL"),
)

# nvmlValueType_t -> (c_nvmlValue_t member, bits, signed); bits 0 for the double.
_VALUE_TYPES = (
    ("NVML_VALUE_TYPE_DOUBLE", "dVal", 0, True),
    ("NVML_VALUE_TYPE_UNSIGNED_INT", "uiVal", 32, False),
    ("NVML_VALUE_TYPE_UNSIGNED_LONG", "ulVal", ctypes.sizeof(ctypes.c_ulong) * 8, False),
    ("NVML_VALUE_TYPE_UNSIGNED_LONG_LONG", "ullVal", 64, False),
    ("NVML_VALUE_TYPE_SIGNED_LONG_LONG", "sllVal", 64, True),
    ("NVML_VALUE_TYPE_SIGNED_INT", "siVal", 32, True),
    ("NVML_VALUE_TYPE_UNSIGNED_SHORT", "usVal", 16, False),
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


def _u32(value: int) -> int | None:
    """A c_uint result, or None for NVML's all-ones "not available"."""
    return None if value == _U32_NOT_AVAILABLE else value


def _u64(value: int) -> int | None:
    """A c_ulonglong result, or None for NVML's all-ones "not available"."""
    return None if value == _U64_NOT_AVAILABLE else value


class _Missing(Exception):
    """This pynvml has no such function or constant (older nvidia-ml-py than the call needs)."""


class _NoLibraryMismatch(Exception):
    """Stands in for pynvml.NVMLLibraryMismatchError where the module has none (never raised)."""


class _Unusable(Exception):
    """A route answered, but in a form that can never give the field (e.g. a too-narrow counter)."""


@dataclass(eq=False)
class _Route:
    """One way to read some canonical fields: an NVML call (`read`) or field ids (`ids`, `decode`)."""

    name: str
    provides: tuple[str, ...]
    read: Callable[[Any, Any, dict], None] | None = None  # call route: read(gpu, handle, out)
    ids: tuple[Any, ...] | None = None  # field route: ids in the batch (None: pynvml lacks one)
    decode: Callable[[Any, list, dict], None] | None = None  # field route: decode(gpu, values, out)
    fallback: str | None = None  # route that takes over once this one is learned unsupported
    primary: bool = True  # active from the start (False: only as another route's fallback)
    static: bool = False  # call route whose value never changes: read once, then reused
    early: bool = False  # call route run before the field batch (its outcome can add field ids)
    cost: str | None = None  # why taking this route over is worth an operator's notice

    @property
    def is_field(self) -> bool:
        return self.decode is not None


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
    calls: list[_Route] = field(default_factory=list)  # live call routes, in reading order
    fields: list[_Route] = field(default_factory=list)  # live field routes
    batch_ids: list[Any] | None = None  # the field ids asked each cycle; None: rebuild from `fields`
    batch_slices: list[tuple[_Route, int, int]] = field(default_factory=list)
    dead: set[str] = field(default_factory=set)  # routes learned unsupported
    unsupported_fields: set[str] = field(default_factory=set)  # canonical fields with no live route
    static: dict[str, float | int] = field(default_factory=dict)  # values that never change
    memory_v2: bool = True
    nvlinks: list[int] | None = None  # links that answer, learned on the first cycle
    # (canonical name, counter, links that keep it) read per link each cycle; None: not learned yet
    nvlink_counters: list[tuple[str, int, tuple[int, ...]]] | None = None
    nvlink_skip: set[tuple[int, int]] = field(default_factory=set)  # (link, counter) unsupported
    pcie_previous: tuple[int, int, float] | None = None  # (TX bytes, RX bytes, seconds) last read
    processes: str | None = "nvmlDeviceGetComputeRunningProcesses"  # None: not supported
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
        self._NotSupported = nvml.NVMLError_NotSupported
        # pynvml raises this (not an NVMLError) when the unversioned process call's _v3 entry point
        # is missing from an older driver.
        self._LibraryMismatch = getattr(nvml, "NVMLLibraryMismatchError", _NoLibraryMismatch)
        # An older library without a call, or a call this library has but the driver lacks (or has
        # deprecated, or whose struct version it does not know), is "not supported" for our
        # purposes, learned once like NOT_SUPPORTED.
        self._learned_unsupported: tuple[type[BaseException], ...] = tuple(
            getattr(nvml, name)
            for name in (
                "NVMLError_NotSupported",
                "NVMLError_FunctionNotFound",
                "NVMLError_ArgumentVersionMismatch",
                "NVMLError_Deprecated",
            )
            if hasattr(nvml, name)
        ) + (_Missing, _Unusable, GpmUnsupported)
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
        # Per-field return codes that mean "this GPU or driver will never answer this field":
        # NOT_SUPPORTED, and INVALID_ARGUMENT / DEPRECATED for ids an older or newer driver does not
        # know (some drivers answer INVALID_ARGUMENT instead of NOT_SUPPORTED for fields their
        # architecture lacks: DataDog/datadog-agent nvlink_fields.go).
        self._field_unsupported_codes = frozenset(
            getattr(nvml, name)
            for name in (
                "NVML_ERROR_NOT_SUPPORTED",
                "NVML_ERROR_INVALID_ARGUMENT",
                "NVML_ERROR_DEPRECATED",
                "NVML_ERROR_FUNCTION_NOT_FOUND",
            )
            if hasattr(nvml, name)
        )
        self._success = nvml.NVML_SUCCESS
        self._gpu_lost_code = nvml.NVML_ERROR_GPU_IS_LOST
        self._value_types = {
            getattr(nvml, const): (member, bits, signed)
            for const, member, bits, signed in _VALUE_TYPES
            if hasattr(nvml, const)
        }
        # pynvml's structures override __getattribute__ in Python (bytes -> str), ~0.5 us per
        # attribute; the field values are read through a plain ctypes view of the same memory.
        layout = getattr(nvml, "c_nvmlFieldValue_t", None)
        self._plain_field_value: type[ctypes.Structure] | None = (
            type("_PlainFieldValue", (ctypes.Structure,), {"_fields_": list(layout._fields_)})
            if isinstance(layout, type) and issubclass(layout, ctypes.Structure)
            else None
        )
        self._max_nvlinks = getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18)
        self._nvlink_counter_consts = [
            (name, getattr(nvml, const)) for name, const, _ in _NVLINK_COUNTERS if hasattr(nvml, const)
        ]
        self._gpm = GpmReader(nvml)
        self._routes = {route.name: route for route in self._build_routes()}

    def _field_ids(self, *constants: str) -> tuple[int, ...] | None:
        """The NVML_FI_* ids, or None when this pynvml predates one of them."""
        try:
            return tuple(getattr(self.nvml, constant) for constant in constants)
        except AttributeError:
            return None

    def _build_routes(self) -> list[_Route]:
        nvml, R, ids = self.nvml, _Route, self._field_ids
        corrected, uncorrected = nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        volatile, aggregate = nvml.NVML_VOLATILE_ECC, nvml.NVML_AGGREGATE_ECC
        routes = [
            # NVLink first: when its per-link counters fail it adds the legacy totals to the batch.
            R("nvlink", _NVLINK_FIELDS, read=self._read_nvlink, early=True),
            R("utilization", ("gpu_util_percent", "mem_util_percent"), read=self._read_utilization),
            # DCGM's profiling metrics through NVML GPM, Hopper and newer (learned unsupported before).
            R("gpm", GPM_FIELDS, read=self._read_gpm),
            R("memory", ("mem_used_bytes", "mem_total_bytes"), read=self._read_memory),
            R("temp_gpu", ("temp_gpu_celsius",), read=self._read_temp_gpu, fallback="temp_gpu_deprecated"),
            R("temp_gpu_deprecated", ("temp_gpu_celsius",), read=self._read_temp_gpu_deprecated, primary=False),
            R(
                "temp_mem_field",
                ("temp_mem_celsius",),
                ids=ids("NVML_FI_DEV_MEMORY_TEMP"),
                decode=self._decode_temp_mem,
            ),
            R(
                "temp_slowdown",
                ("temp_slowdown_celsius",),
                static=True,
                read=self._threshold("temp_slowdown_celsius", nvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN),
            ),
            R(
                "temp_shutdown",
                ("temp_shutdown_celsius",),
                static=True,
                read=self._threshold("temp_shutdown_celsius", nvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN),
            ),
            R("power", ("power_watts",), read=self._read_power),
            R("power_limit", ("power_limit_watts",), read=self._read_power_limit),
            R(
                "energy_field",
                ("energy_joules",),
                ids=ids("NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION"),
                decode=self._decode_energy,
                fallback="energy",
            ),
            R("energy", ("energy_joules",), read=self._read_energy, primary=False),
            R("sm_clock", ("sm_clock_mhz",), read=self._clock("sm_clock_mhz", nvml.NVML_CLOCK_SM)),
            R("sm_clock_max", ("sm_clock_max_mhz",), read=self._read_sm_clock_max, static=True),
            R("mem_clock", ("mem_clock_mhz",), read=self._clock("mem_clock_mhz", nvml.NVML_CLOCK_MEM)),
            R(
                "clock_event_reasons",
                ("clock_event_reasons",),
                fallback="clock_throttle_reasons",
                read=self._reasons("nvmlDeviceGetCurrentClocksEventReasons"),
            ),
            R(
                "clock_throttle_reasons",
                ("clock_event_reasons",),
                primary=False,
                read=self._reasons("nvmlDeviceGetCurrentClocksThrottleReasons"),
            ),
            R("fan", ("fan_percent",), read=self._read_fan),
            R(
                "pcie_replay_field",
                ("pcie_replay_total",),
                ids=ids("NVML_FI_DEV_PCIE_REPLAY_COUNTER"),
                decode=self._decode_count("pcie_replay_total"),
                fallback="pcie_replay",
            ),
            R("pcie_replay", ("pcie_replay_total",), read=self._read_pcie_replay, primary=False),
            R(
                "pcie_bytes_field",
                ("pcie_tx_bytes_per_second", "pcie_rx_bytes_per_second"),
                ids=ids("NVML_FI_DEV_PCIE_COUNT_TX_BYTES", "NVML_FI_DEV_PCIE_COUNT_RX_BYTES"),
                decode=self._decode_pcie_bytes,
                fallback="pcie_throughput",
            ),
            R(
                "pcie_throughput",
                ("pcie_tx_bytes_per_second", "pcie_rx_bytes_per_second"),
                read=self._read_pcie_throughput,
                primary=False,
                cost="nvmlDeviceGetPcieThroughput blocks ~20 ms per call, 40 ms per GPU per cycle",
            ),
            R(
                "pcie_link_gen",
                ("pcie_link_gen",),
                read=self._link("pcie_link_gen", "nvmlDeviceGetCurrPcieLinkGeneration"),
            ),
            R(
                "pcie_link_gen_max",
                ("pcie_link_gen_max",),
                static=True,
                read=self._link("pcie_link_gen_max", "nvmlDeviceGetMaxPcieLinkGeneration"),
            ),
            R(
                "pcie_link_width",
                ("pcie_link_width",),
                read=self._link("pcie_link_width", "nvmlDeviceGetCurrPcieLinkWidth"),
            ),
            R(
                "pcie_link_width_max",
                ("pcie_link_width_max",),
                static=True,
                read=self._link("pcie_link_width_max", "nvmlDeviceGetMaxPcieLinkWidth"),
            ),
        ]
        for name, const, error_type, counter_type in (
            ("ecc_sbe_volatile_total", "NVML_FI_DEV_ECC_SBE_VOL_TOTAL", corrected, volatile),
            ("ecc_dbe_volatile_total", "NVML_FI_DEV_ECC_DBE_VOL_TOTAL", uncorrected, volatile),
            ("ecc_sbe_aggregate_total", "NVML_FI_DEV_ECC_SBE_AGG_TOTAL", corrected, aggregate),
            ("ecc_dbe_aggregate_total", "NVML_FI_DEV_ECC_DBE_AGG_TOTAL", uncorrected, aggregate),
        ):
            routes.append(R(f"{name}_field", (name,), ids=ids(const), decode=self._decode_count(name), fallback=name))
            routes.append(R(name, (name,), read=self._ecc(name, error_type, counter_type), primary=False))
        for name, const, read in (
            (
                "retired_pages_sbe",
                "NVML_FI_DEV_RETIRED_SBE",
                self._retired("retired_pages_sbe", nvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS),
            ),
            (
                "retired_pages_dbe",
                "NVML_FI_DEV_RETIRED_DBE",
                self._retired("retired_pages_dbe", nvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR),
            ),
            ("retired_pages_pending", "NVML_FI_DEV_RETIRED_PENDING", self._read_retired_pending),
        ):
            routes.append(R(f"{name}_field", (name,), ids=ids(const), decode=self._decode_count(name), fallback=name))
            routes.append(R(name, (name,), read=read, primary=False))
        remapped = ("remapped_rows_correctable", "remapped_rows_uncorrectable", "remap_pending", "remap_failure")
        routes.append(
            R(
                "remapped_rows_field",
                remapped,
                decode=self._decode_remapped,
                fallback="remapped_rows",
                ids=ids(
                    "NVML_FI_DEV_REMAPPED_COR",
                    "NVML_FI_DEV_REMAPPED_UNC",
                    "NVML_FI_DEV_REMAPPED_PENDING",
                    "NVML_FI_DEV_REMAPPED_FAILURE",
                ),
            )
        )
        routes.append(R("remapped_rows", remapped, read=self._read_remapped_rows, primary=False))
        # Fallbacks for the per-link NVLink counters, switched on by _read_nvlink only (see there).
        for name, _, total_const in _NVLINK_COUNTERS:
            routes.append(
                R(f"{name}_field", (name,), ids=ids(total_const), decode=self._decode_count(name), primary=False)
            )
        return routes

    def _plan(self, gpu: _Gpu) -> None:
        """Every primary route live for `gpu`, or its fallback where this pynvml lacks its ids."""
        for route in self._routes.values():
            if route.primary:
                if route.is_field and route.ids is None:
                    self._route_unsupported(gpu, route, "this pynvml has no such field id")
                else:
                    self._activate(gpu, route)

    def _activate(self, gpu: _Gpu, route: _Route) -> None:
        if route.name in gpu.dead:
            return
        if route.is_field:
            if route not in gpu.fields:
                gpu.fields.append(route)
                gpu.batch_ids = None
        elif route not in gpu.calls:
            gpu.calls.append(route)

    def _route_unsupported(self, gpu: _Gpu, route: _Route, reason: object) -> None:
        """Learn that `route` never answers on `gpu`: drop it and hand over to its fallback."""
        gpu.dead.add(route.name)
        if route in gpu.calls:
            gpu.calls.remove(route)
        if route in gpu.fields:
            gpu.fields.remove(route)
            gpu.batch_ids = None
        fallback = self._routes.get(route.fallback) if route.fallback else None
        if fallback is not None and fallback.name not in gpu.dead and not (fallback.is_field and fallback.ids is None):
            log.log(
                logging.INFO if fallback.cost else logging.DEBUG,
                "GPU %d: %s not supported (%s); reading it through %s%s",
                gpu.index,
                route.name,
                reason,
                fallback.name,
                f" ({fallback.cost})" if fallback.cost else "",
            )
            self._activate(gpu, fallback)
        elif fallback is not None:
            self._route_unsupported(gpu, fallback, reason)
        else:
            gpu.unsupported_fields.update(route.provides)
            log.debug("GPU %d: %s not supported (%s); not asking again", gpu.index, route.name, reason)

    def unsupported_fields(self) -> dict[int, list[str]]:
        """Canonical fields each GPU was learned not to support (NVML index -> sorted names).

        A field shows up here after the first cycle that asked for it; it is then absent from
        every sample of that GPU. Fields missing for a transient reason are not listed.
        """
        return {
            gpu.index: sorted(gpu.unsupported_fields | self._gpm.unsupported(gpu.index))
            for gpu in self._gpus
            if gpu.usable
        }

    def _call(self, name: str, *args: Any) -> Any:
        """nvml.<name>(*args), or _Missing when this pynvml predates the function."""
        function = getattr(self.nvml, name, None)
        if function is None:
            raise _Missing(f"pynvml has no {name}")
        return function(*args)

    def _log_once(self, gpu: _Gpu, key: str, message: str, *args: Any) -> None:
        if key not in gpu.errors_logged:
            gpu.errors_logged.add(key)
            log.warning("GPU %d: " + message, gpu.index, *args)

    def _not_available(self, gpu: _Gpu, name: str) -> None:
        self._log_once(gpu, "na:" + name, "%s read as NVML's not-available value; left out", name)

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
            self._plan(gpu)
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
        memory_total = _u64(memory.total) if memory is not None else None
        entry["memory_total_bytes"] = int(memory_total) if memory_total is not None else None
        limit_mw = self._optional(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        sm_max = self._optional(nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_SM)
        mem_max = self._optional(nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_MEM)
        limit_mw = _u32(limit_mw) if limit_mw is not None else None
        entry["power_limit_watts"] = limit_mw / _MILLI if limit_mw is not None else None
        entry["sm_clock_max_mhz"] = _u32(sm_max) if sm_max is not None else None
        entry["mem_clock_max_mhz"] = _u32(mem_max) if mem_max is not None else None

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
                log.warning("NVML event wait still running after %.0f s; not freeing its set", _CLOSE_WAIT_SECONDS)
        if self._started:
            self._gpm.close()
            try:
                self.nvml.nvmlShutdown()
            except self._NVMLError as exc:
                log.debug("nvmlShutdown: %s", exc)

    # ---- sampling ------------------------------------------------------------------------------

    def sample(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(one sample per readable GPU, events); a lost GPU gives one gpu_lost event, then silence.

        A sample is {"gpu", "t", "uuid", "metrics", "pids"}: `pids` lists the processes with a
        compute context on the GPU (for job attribution; [] when NVML cannot tell).
        """
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
                    pids = self._read_pids(gpu)
                except self._GpuIsLost:
                    gpu.lost = True
                else:
                    samples.append({"gpu": gpu.index, "t": now, "uuid": gpu.uuid, "metrics": metrics, "pids": pids})
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
        metrics: dict[str, float | int] = {}
        self._run_calls(gpu, metrics, early=True)
        if gpu.fields:
            self._read_fields(gpu, metrics)
        # Fallbacks switched on by the batch (a field the GPU lacks) run in this same cycle.
        self._run_calls(gpu, metrics, early=False)
        metrics.update(gpu.static)
        return self._measurements(gpu, metrics)

    def _measurements(self, gpu: _Gpu, metrics: dict[str, float | int]) -> dict[str, float | int]:
        """`metrics` without the values no GPU can report, whatever route they came by.

        The reads above catch NVML's exact "not available" values; this catches the rest the same
        way the collector does (fleetwatch.limits.storable_metric): NaN, a field value NVML typed
        as a double holding all ones (1.8e19), a negative or beyond-int64 count. Left out here,
        such a value never reaches the agent's /metrics, the collector's live detection or its
        database, which would otherwise disagree (the database cannot hold it, detection alerts on it).
        """
        kept: dict[str, float | int] = {}
        for name, value in metrics.items():
            storable = storable_metric(name, value)
            if storable is None:
                self._log_once(gpu, "range:" + name, "%s read as %r, which is no measurement; left out", name, value)
            else:
                kept[name] = storable
        return kept

    def _run_calls(self, gpu: _Gpu, metrics: dict, early: bool) -> None:
        handle, calls = gpu.handle, gpu.calls
        i = 0
        while i < len(calls):  # a route learned unsupported hands over to a fallback appended here
            route = calls[i]
            i += 1
            if route.early is not early:
                continue
            try:
                route.read(gpu, handle, gpu.static if route.static else metrics)  # type: ignore[misc]
            except self._GpuIsLost:
                raise
            except self._learned_unsupported as exc:
                self._route_unsupported(gpu, route, exc)
                i -= 1
            except self._NVMLError as exc:
                # Transient (Unknown, Timeout, ...): absent this cycle, asked again next cycle.
                self._log_once(gpu, route.name, "reading %s failed: %s", route.name, exc)
            else:
                if route.static and all(name in gpu.static for name in route.provides):
                    calls.remove(route)
                    i -= 1

    def _rebuild_batch(self, gpu: _Gpu) -> list[Any]:
        batch: list[Any] = []
        gpu.batch_slices = []
        for route in gpu.fields:
            start = len(batch)
            batch.extend(route.ids)  # type: ignore[arg-type]
            gpu.batch_slices.append((route, start, len(batch)))
        gpu.batch_ids = batch
        return batch

    def _read_fields(self, gpu: _Gpu, metrics: dict) -> None:
        """One nvmlDeviceGetFieldValues for every live field route of `gpu`."""
        batch = gpu.batch_ids if gpu.batch_ids is not None else self._rebuild_batch(gpu)
        try:
            values = self._call("nvmlDeviceGetFieldValues", gpu.handle, batch)
        except self._GpuIsLost:
            raise
        except self._learned_unsupported as exc:
            for route in list(gpu.fields):
                self._route_unsupported(gpu, route, exc)
            return
        except self._NVMLError as exc:
            self._log_once(gpu, "field values", "nvmlDeviceGetFieldValues failed: %s", exc)
            return
        plain = self._plain_field_value
        if (
            plain is not None
            and isinstance(values, ctypes.Array)
            and ctypes.sizeof(values) == ctypes.sizeof(plain) * len(values)
        ):
            values = (plain * len(values)).from_buffer(values)
        success, unsupported = self._success, self._field_unsupported_codes
        # Each value carries its own return code; the call as a whole succeeded. Usually all are
        # SUCCESS, checked in one pass before the per-route checks.
        all_succeeded = all(value.nvmlReturn == success for value in values)
        for route, start, stop in gpu.batch_slices:
            chunk = values[start:stop]
            if not all_succeeded:
                codes = [value.nvmlReturn for value in chunk]
                if self._gpu_lost_code in codes:
                    raise self._GpuIsLost()
                if any(code in unsupported for code in codes):
                    self._route_unsupported(gpu, route, f"field return codes {codes}")
                    continue
                if any(code != success for code in codes):
                    self._log_once(
                        gpu, route.name, "field values for %s failed with return codes %s", route.name, codes
                    )
                    continue
            try:
                route.decode(gpu, chunk, metrics)  # type: ignore[misc]
            except _Unusable as exc:
                self._route_unsupported(gpu, route, exc)

    def _number(self, value: Any) -> tuple[int | float | None, int]:
        """(the field's number, or None for NVML's not-available value; its width in bits)."""
        kind = self._value_types.get(value.valueType)
        if kind is None:
            raise _Unusable(f"unknown NVML value type {value.valueType}")
        member, bits, signed = kind
        number = getattr(value.value, member)
        if bits == 0:
            return (None if math.isnan(number) else number), bits
        if signed:
            return (None if number == -1 else number), bits
        return (None if number == (1 << bits) - 1 else number), bits

    def _read_pids(self, gpu: _Gpu) -> list[int]:
        """Pids with a compute context on the GPU, sorted, each once.

        NVML gives host-namespace pids, and older drivers only those (NVIDIA/nvidia-docker#1483;
        newer ones translate them into the caller's namespace, Project-HAMi/HAMi-core#112), so an
        agent in a container needs the host's pid namespace to attribute them. usedGpuMemory,
        unused here, is None or 0 under MIG and in containers.
        """
        if gpu.processes is None:
            return []
        try:
            processes = self._call(gpu.processes, gpu.handle)
        except self._GpuIsLost:
            raise
        except self._learned_unsupported as exc:
            gpu.processes = None
            log.info("GPU %d: running processes not available (%s); no job attribution", gpu.index, exc)
            return []
        except self._LibraryMismatch as exc:
            # The unversioned pynvml call maps to a _v3 entry point this older driver lacks.
            fallback = "nvmlDeviceGetComputeRunningProcesses_v2"
            gpu.processes = fallback if gpu.processes != fallback else None
            if gpu.processes is None:
                log.info("GPU %d: running processes not available (%s); no job attribution", gpu.index, exc)
                return []
            return self._read_pids(gpu)
        except self._NVMLError as exc:
            self._log_once(gpu, "processes", "reading running processes failed: %s", exc)
            return []
        return sorted({pid for pid in (int(p.pid) for p in processes) if 0 < pid != _U32_NOT_AVAILABLE})

    # ---- call routes: each fills its canonical fields from one NVML call (or a few) -------------

    def _read_utilization(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        rates = self.nvml.nvmlDeviceGetUtilizationRates(handle)
        for name, value in (("gpu_util_percent", rates.gpu), ("mem_util_percent", rates.memory)):
            if value == _U32_NOT_AVAILABLE:
                self._not_available(gpu, name)
            else:
                out[name] = float(value)

    def _read_memory(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        nvml = self.nvml
        info = None
        if gpu.memory_v2:
            # v2 reports driver-reserved memory apart, so `used` matches nvidia-smi's Used.
            try:
                info = nvml.nvmlDeviceGetMemoryInfo(handle, nvml.nvmlMemory_v2)
            except self._memory_v2_unavailable:
                gpu.memory_v2 = False
        if info is None:
            info = nvml.nvmlDeviceGetMemoryInfo(handle)
        used, total = _u64(info.used), _u64(info.total)
        if used is None or total is None:
            self._not_available(gpu, "memory")
            return
        out["mem_used_bytes"] = int(used)
        out["mem_total_bytes"] = int(total)

    def _read_temp_gpu(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        # nvmlDeviceGetTemperatureV replaces nvmlDeviceGetTemperature (pynvml: "DEPRECATED: Use
        # nvmlDeviceGetTemperatureV instead; will be removed in CUDA 14.0"); its value is a
        # signed int, so "not available" is -1.
        celsius = self._call("nvmlDeviceGetTemperatureV", handle, self.nvml.NVML_TEMPERATURE_GPU)
        if celsius == -1:
            self._not_available(gpu, "temp_gpu_celsius")
        else:
            out["temp_gpu_celsius"] = float(celsius)

    def _read_temp_gpu_deprecated(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        # Only where the library or driver lacks the versioned call (or answers NOT_SUPPORTED).
        celsius = _u32(self._call("nvmlDeviceGetTemperature", handle, self.nvml.NVML_TEMPERATURE_GPU))
        if celsius is None:
            self._not_available(gpu, "temp_gpu_celsius")
        else:
            out["temp_gpu_celsius"] = float(celsius)

    def _threshold(self, name: str, threshold: int) -> Callable[[_Gpu, Any, dict], None]:
        def read(gpu: _Gpu, handle: Any, out: dict) -> None:
            # Absolute degrees C (driver 590's nvidia-smi prints them relative to T.Limit instead).
            celsius = _u32(self.nvml.nvmlDeviceGetTemperatureThreshold(handle, threshold))
            if celsius is None:
                self._not_available(gpu, name)
            else:
                out[name] = float(celsius)

        return read

    def _read_power(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        # Milliwatts; a 1 s average on Ampere (but GA100) and newer, instantaneous before
        # (NVML API reference, nvmlDeviceGetPowerUsage).
        milliwatts = _u32(self.nvml.nvmlDeviceGetPowerUsage(handle))
        if milliwatts is None:
            self._not_available(gpu, "power_watts")
        else:
            out["power_watts"] = milliwatts / _MILLI

    def _read_power_limit(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        # The limit the driver enforces after every limiter (in milliwatts), which can sit below
        # nvmlDeviceGetPowerManagementLimit; read each cycle since an operator can change it.
        milliwatts = _u32(self.nvml.nvmlDeviceGetEnforcedPowerLimit(handle))
        if milliwatts is None:
            self._not_available(gpu, "power_limit_watts")
        else:
            out["power_limit_watts"] = milliwatts / _MILLI

    def _read_energy(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        # Millijoules since the driver was last reloaded (pynvml NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION).
        millijoules = _u64(self.nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        if millijoules is None:
            self._not_available(gpu, "energy_joules")
        else:
            out["energy_joules"] = millijoules / _MILLI

    def _clock(self, name: str, clock: int) -> Callable[[_Gpu, Any, dict], None]:
        def read(gpu: _Gpu, handle: Any, out: dict) -> None:
            mhz = _u32(self.nvml.nvmlDeviceGetClockInfo(handle, clock))
            if mhz is None:
                self._not_available(gpu, name)
            else:
                out[name] = float(mhz)

        return read

    def _read_sm_clock_max(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        mhz = _u32(self.nvml.nvmlDeviceGetMaxClockInfo(handle, self.nvml.NVML_CLOCK_SM))
        if mhz is None:
            self._not_available(gpu, "sm_clock_max_mhz")
        else:
            out["sm_clock_max_mhz"] = float(mhz)

    def _reasons(self, function: str) -> Callable[[_Gpu, Any, dict], None]:
        # nvmlDeviceGetCurrentClocksEventReasons is the R535 name of the same 64-bit mask; the
        # throttle name is deprecated (pynvml: "will be removed in CUDA 14.0") and only used
        # where the library or driver predates the new one.
        def read(gpu: _Gpu, handle: Any, out: dict) -> None:
            mask = _u64(self._call(function, handle))
            if mask is None:
                self._not_available(gpu, "clock_event_reasons")
            else:
                out["clock_event_reasons"] = int(mask)

        return read

    def _read_fan(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        # Percent of the fan's maximum; SXM boards have no fan and answer NOT_SUPPORTED ("Fan
        # Speed : N/A" in the H100 and H200 captures).
        percent = _u32(self.nvml.nvmlDeviceGetFanSpeed(handle))
        if percent is None:
            self._not_available(gpu, "fan_percent")
        else:
            out["fan_percent"] = float(percent)

    def _read_gpm(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        self._gpm.read(gpu.index, handle, out)

    def _read_pcie_replay(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        count = _u32(self.nvml.nvmlDeviceGetPcieReplayCounter(handle))
        if count is None:
            self._not_available(gpu, "pcie_replay_total")
        else:
            out["pcie_replay_total"] = int(count)

    def _read_pcie_throughput(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        # Only where the byte-counter fields are not supported: each call samples a byte counter
        # over 20 ms (NVML API reference) and so blocks ~20 ms, 40 ms per GPU per cycle.
        nvml = self.nvml
        for name, counter in (
            ("pcie_tx_bytes_per_second", nvml.NVML_PCIE_UTIL_TX_BYTES),
            ("pcie_rx_bytes_per_second", nvml.NVML_PCIE_UTIL_RX_BYTES),
        ):
            kilobytes = _u32(nvml.nvmlDeviceGetPcieThroughput(handle, counter))
            if kilobytes is None:
                self._not_available(gpu, name)
            else:
                out[name] = float(kilobytes * _BYTES_PER_KB)

    def _link(self, name: str, function: str) -> Callable[[_Gpu, Any, dict], None]:
        # The Max calls give the best the GPU *and its slot* allow, so current < max is a link that
        # trained below what it could; generation and width 0 only come from hosts that cannot
        # tell (nvidia-smi's "N/A" under some hypervisors).
        def read(gpu: _Gpu, handle: Any, out: dict) -> None:
            value = _u32(self._call(function, handle))
            if not value:
                self._not_available(gpu, name)
            else:
                out[name] = int(value)

        return read

    def _ecc(self, name: str, error_type: int, counter_type: int) -> Callable[[_Gpu, Any, dict], None]:
        def read(gpu: _Gpu, handle: Any, out: dict) -> None:
            count = _u64(self.nvml.nvmlDeviceGetTotalEccErrors(handle, error_type, counter_type))
            if count is None:
                self._not_available(gpu, name)
            else:
                out[name] = int(count)

        return read

    def _retired(self, name: str, cause: int) -> Callable[[_Gpu, Any, dict], None]:
        # Page retirement is the pre-Ampere mechanism; Ampere and later remap rows instead and
        # answer NOT_SUPPORTED here ("Retired Pages ... : N/A" in the captures).
        def read(gpu: _Gpu, handle: Any, out: dict) -> None:
            out[name] = len(self.nvml.nvmlDeviceGetRetiredPages(handle, cause))

        return read

    def _read_retired_pending(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        state = _u32(self.nvml.nvmlDeviceGetRetiredPagesPendingStatus(handle))
        if state is None:
            self._not_available(gpu, "retired_pages_pending")
        else:
            out["retired_pages_pending"] = 1 if state == self.nvml.NVML_FEATURE_ENABLED else 0

    def _read_remapped_rows(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        values = self.nvml.nvmlDeviceGetRemappedRows(handle)  # (correctable, uncorrectable, pending, failure)
        if any(value == _U32_NOT_AVAILABLE for value in values):
            self._not_available(gpu, "remapped_rows")
            return
        correctable, uncorrectable, pending, failure = values
        out["remapped_rows_correctable"] = int(correctable)
        out["remapped_rows_uncorrectable"] = int(uncorrectable)
        out["remap_pending"] = 1 if pending else 0
        out["remap_failure"] = 1 if failure else 0

    def _read_nvlink(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        """Links up/total from each link's state, and the error counters summed over the links."""
        nvml = self.nvml
        if gpu.nvlinks is None:
            answering: list[int] = []
            for link in range(self._max_nvlinks):
                try:
                    nvml.nvmlDeviceGetNvLinkState(handle, link)
                except self._invalid_link:
                    continue
                answering.append(link)
            if not answering:
                raise self._NotSupported()  # no NVLink (a PCIe board): none of its fields exist
            gpu.nvlinks = answering
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
        if gpu.nvlink_counters is None:
            self._learn_nvlink_counters(gpu, handle, out)
            return
        if not gpu.nvlink_counters:
            return  # none per link (the all-lane total fields, if any, are in the batch)
        read = self.nvml.nvmlDeviceGetNvLinkErrorCounter
        for name, counter, links in gpu.nvlink_counters:
            count = 0
            try:
                for link in links:
                    count += read(handle, link, counter)
            except self._GpuIsLost:
                raise
            except self._NVMLError as exc:
                # A partial sum would look like the counter going backwards: absent this cycle.
                self._log_once(gpu, name, "reading %s failed: %s", name, exc)
                continue
            if count >= _U64_NOT_AVAILABLE:  # a link read NVML's not-available value
                self._not_available(gpu, name)
                continue
            out[name] = count

    def _nvlink_counter(self, gpu: _Gpu, handle: Any, name: str, counter: int) -> int | None:
        """While learning: one counter summed over the links that keep it (the others go into
        nvlink_skip); None when a link fails for another reason this cycle."""
        read = getattr(self.nvml, "nvmlDeviceGetNvLinkErrorCounter", None)
        if read is None:
            raise _Missing("pynvml has no nvmlDeviceGetNvLinkErrorCounter")
        skip = gpu.nvlink_skip
        count = 0
        for link in gpu.nvlinks:  # type: ignore[union-attr]
            if (link, counter) in skip:
                continue
            try:
                value = read(handle, link, counter)
            except self._GpuIsLost:
                raise
            except self._invalid_link:
                skip.add((link, counter))
                continue
            except self._learned_unsupported:
                raise  # FunctionNotFound and the like: the call, not this link, is missing
            except self._NVMLError as exc:
                self._log_once(gpu, name, "reading %s failed: %s", name, exc)
                return None
            if value == _U64_NOT_AVAILABLE:
                self._not_available(gpu, name)
                return None
            count += value
        return int(count)

    def _learn_nvlink_counters(self, gpu: _Gpu, handle: Any, out: dict) -> None:
        """First cycle: which counters the links answer per link, and what to do about the rest.

        Per-link nvmlDeviceGetNvLinkErrorCounter is what `nvidia-smi nvlink -e` reads. Where no
        counter answers per link at all, the legacy all-lane total fields take over. Where some
        answer and one does not, the link generation lacks that counter (Hopper's NVLink 4 has no
        data CRC): its legacy total is not asked, because on Hopper those totals answer SUCCESS
        with 0 whatever happened (DataDog/datadog-agent#55966), a 0 standing in for "unsupported".
        """
        links = gpu.nvlinks or []
        constants = dict(self._nvlink_counter_consts)
        answered: list[tuple[str, int, tuple[int, ...]]] = []
        missing: list[str] = []
        transient = False
        for name, _, _ in _NVLINK_COUNTERS:
            counter = constants.get(name)
            if counter is None:  # this pynvml predates the counter's constant
                missing.append(name)
                continue
            try:
                count = self._nvlink_counter(gpu, handle, name, counter)
            except self._learned_unsupported:  # the per-link call itself is missing
                gpu.nvlink_skip.update((link, counter) for link in links)
                count = None
            if all((link, counter) in gpu.nvlink_skip for link in links):
                missing.append(name)
            elif count is None:
                transient = True  # a link failed for another reason: learn again next cycle
            else:
                kept = tuple(link for link in links if (link, counter) not in gpu.nvlink_skip)
                answered.append((name, counter, kept))
                out[name] = count
        if transient:
            return
        gpu.nvlink_counters = answered
        if answered:
            if missing:
                gpu.unsupported_fields.update(missing)
                log.info("GPU %d: NVLink %s not kept per link on this GPU", gpu.index, ", ".join(missing))
            return
        log.info("GPU %d: no per-link NVLink error counters; reading the all-lane total fields", gpu.index)
        for name in missing:
            route = self._routes[f"{name}_field"]
            if route.ids is None:
                self._route_unsupported(gpu, route, "this pynvml has no such field id")
            else:
                self._activate(gpu, route)

    # ---- field routes: decode their values from the one field-values call ------------------------

    def _decode_temp_mem(self, gpu: _Gpu, values: list, out: dict) -> None:
        celsius, _ = self._number(values[0])
        # HBM at 0 C is not a reading: boards without a memory sensor have answered 0.
        if not celsius:
            self._not_available(gpu, "temp_mem_celsius")
        else:
            out["temp_mem_celsius"] = float(celsius)

    def _decode_energy(self, gpu: _Gpu, values: list, out: dict) -> None:
        # Millijoules since the driver was last reloaded (pynvml's comment on the field id).
        millijoules, _ = self._number(values[0])
        if millijoules is None:
            self._not_available(gpu, "energy_joules")
        else:
            out["energy_joules"] = millijoules / _MILLI

    def _decode_count(self, name: str) -> Callable[[_Gpu, list, dict], None]:
        def decode(gpu: _Gpu, values: list, out: dict) -> None:
            count, _ = self._number(values[0])
            if count is None:
                self._not_available(gpu, name)
            else:
                out[name] = int(count)

        return decode

    def _decode_remapped(self, gpu: _Gpu, values: list, out: dict) -> None:
        numbers = [self._number(value)[0] for value in values]
        if any(number is None for number in numbers):
            self._not_available(gpu, "remapped_rows")
            return
        correctable, uncorrectable, pending, failure = numbers
        out["remapped_rows_correctable"] = int(correctable)  # type: ignore[arg-type]
        out["remapped_rows_uncorrectable"] = int(uncorrectable)  # type: ignore[arg-type]
        out["remap_pending"] = 1 if pending else 0
        out["remap_failure"] = 1 if failure else 0

    def _decode_pcie_bytes(self, gpu: _Gpu, values: list, out: dict) -> None:
        """Bytes/second from two readings of the cumulative PCIe byte counters (first cycle: none).

        The counters replace nvmlDeviceGetPcieThroughput, which blocks 20 ms per call. nvml.h:
        "PCIe transmit bytes. Value can be wrapped." A 64-bit counter takes years to wrap at
        PCIe speeds, so a decrease is a reset (driver reload): that cycle is skipped.
        """
        (tx, tx_bits), (rx, rx_bits) = self._number(values[0]), self._number(values[1])
        if min(tx_bits, rx_bits) < _MIN_BYTE_COUNTER_BITS:
            raise _Unusable(f"PCIe byte counters are {min(tx_bits, rx_bits)}-bit: they would alias")
        if tx is None or rx is None:
            self._not_available(gpu, "pcie_bytes")
            return
        # The driver's own timestamp of the reading (microseconds) where it gives one.
        stamp = values[0].timestamp
        seconds = stamp / 1e6 if stamp > 0 else self.clock()
        previous = gpu.pcie_previous
        gpu.pcie_previous = (int(tx), int(rx), seconds)
        if previous is None:
            return
        elapsed = seconds - previous[2]
        if elapsed <= 0 or tx < previous[0] or rx < previous[1]:
            return
        out["pcie_tx_bytes_per_second"] = (tx - previous[0]) / elapsed
        out["pcie_rx_bytes_per_second"] = (rx - previous[1]) / elapsed

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
        xid = int(data.eventData)
        if not XID_MIN <= xid <= XID_MAX:
            # Not an XID the driver defines: the collector refuses a batch carrying it (whole), so
            # it is said here, once a GPU, and left out.
            key = "xid-range"
            if gpu is not None:
                self._log_once(gpu, key, "NVML reported XID event data %d, which is no XID; left out", xid)
            elif key not in self._wait_errors_logged:
                self._wait_errors_logged.add(key)
                log.warning("NVML reported XID event data %d, which is no XID; left out", xid)
            return []
        return [
            {
                "t": self.clock(),
                "kind": "xid",
                "gpu": gpu.index if gpu is not None else None,
                "uuid": gpu.uuid if gpu is not None else None,
                "pci_bus_id": gpu.pci_bus_id if gpu is not None else None,
                "xid": xid,
                "message": "",
                "source": "nvml",
            }
        ]
