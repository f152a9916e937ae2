"""The agent's /metrics endpoint: Prometheus families built at scrape time from the AgentState cache.

Every canonical field (fleetwatch.wire) is exported under one name chosen in the tables of
fleetwatch.metric_names (the collector's remote write sends the same series), following Prometheus
conventions: base units (hertz, bytes, joules, ratios 0-1), `_total` on counters, bounded labels
(`node`, `gpu`, `uuid`; never pids or job ids). With `dcgm_names` the
DCGM exporter's names are added beside ours, in DCGM's own units and labels, so dashboards and
rules written for dcgm-exporter keep working.

On Kubernetes the pod a GPU is allocated to (fleetwatch.agent.sources.podresources) is on one
info series per GPU, `fleetwatch_gpu_pod_info{node, gpu, uuid, namespace, pod, container} 1`,
joined in queries (`* on(node, gpu) group_left(namespace, pod) fleetwatch_gpu_pod_info`): the
fifty-odd GPU series keep their label sets, so a new pod starts no new series but that one.
The DCGM names carry `namespace`, `pod` and `container` on every series where a pod is known,
as dcgm-exporter does with its Kubernetes mapping, since dashboards written for it filter on them.

Series are read from the cache at scrape time (prometheus/client_python's custom-collector
pattern), so a GPU that left `state.gpus` leaves the output with it instead of going stale, and a
field the GPU does not support has no sample at all (never 0).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client.exposition import make_wsgi_app
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from fleetwatch import __version__ as AGENT_VERSION
from fleetwatch.agent.metrics_http import ThreadingWsgiServer, basic_auth, serve
from fleetwatch.agent.state import AgentState
from fleetwatch.https import server_ssl_context
from fleetwatch.metric_names import GPU_METRICS, HOST_METRICS, IB_ACTIVE, IB_METRICS, FieldMetric
from fleetwatch.nvml_bits import CLOCK_EVENT_REASONS
from fleetwatch.xid_catalog import lookup

# ---- DCGM exporter names ----------------------------------------------------------------------
#
# Names, types and units as NVIDIA/dcgm-exporter exposes them: etc/default-counters.csv (names,
# Prometheus types, units in the help text; the ECC, retired-page and NVLink lines are there
# commented out, with their types) and DCGM's dcgmlib/dcgm_fields.h (field ids and meanings) for
# fields outside that file. Labels as its GPU template (internal/pkg/rendermetrics/render_metrics.go)
# writes them: gpu, UUID, pci_bus_id, device ("nvidia<gpu>"), modelName, Hostname.

_BYTES_PER_MIB = 1024 * 1024
# NVML's PCIe throughput unit is KB/s of 1024 bytes; DCGM passes it on unchanged.
_BYTES_PER_KIB = 1024


def _as_is(value: float) -> float:
    return value


def _mib(value_bytes: float) -> int:
    # DCGM divides NVML's bytes by 2^20 in integer arithmetic.
    return int(value_bytes) // _BYTES_PER_MIB


def _free_mib(total_bytes: float, used_bytes: float) -> int:
    return (int(total_bytes) - int(used_bytes)) // _BYTES_PER_MIB


def _millijoules(joules: float) -> int:
    # NVML counts whole mJ; the NVML source divided by 1000, so this restores the integer.
    return round(joules * 1000)


def _ratio(percent: float) -> float:
    return percent / 100.0


def _kib_per_second(bytes_per_second: float) -> int:
    return round(bytes_per_second / _BYTES_PER_KIB)


@dataclass(frozen=True)
class DcgmMetric:
    """One DCGM exporter series: `convert(*canonical values)` under DCGM's field name."""

    name: str
    type: Literal["gauge", "counter"]  # dcgm-exporter's; its counters are exposed untyped, see _dcgm_families
    fields: tuple[str, ...]  # canonical GPU fields read; absent if any is absent
    convert: Callable[..., float | int]
    help: str


DCGM_METRICS: tuple[DcgmMetric, ...] = (
    # field 203 / 204; default-counters.csv: gauges, in %.
    DcgmMetric("DCGM_FI_DEV_GPU_UTIL", "gauge", ("gpu_util_percent",), _as_is, "GPU utilization (in %)."),
    DcgmMetric("DCGM_FI_DEV_MEM_COPY_UTIL", "gauge", ("mem_util_percent",), _as_is, "Memory utilization (in %)."),
    # fields 252 / 251 / 250, in MiB. DCGM reads FREE from NVML; we derive it as total - used, which
    # also counts the driver-reserved memory (a few hundred MiB) that newer DCGM leaves out.
    DcgmMetric("DCGM_FI_DEV_FB_USED", "gauge", ("mem_used_bytes",), _mib, "Framebuffer memory used (in MiB)."),
    DcgmMetric(
        "DCGM_FI_DEV_FB_FREE",
        "gauge",
        ("mem_total_bytes", "mem_used_bytes"),
        _free_mib,
        "Framebuffer memory free (in MiB).",
    ),
    DcgmMetric("DCGM_FI_DEV_FB_TOTAL", "gauge", ("mem_total_bytes",), _mib, "Framebuffer memory total (in MiB)."),
    # fields 150 / 140 / 158 / 159, in C.
    DcgmMetric("DCGM_FI_DEV_GPU_TEMP", "gauge", ("temp_gpu_celsius",), _as_is, "GPU temperature (in C)."),
    DcgmMetric("DCGM_FI_DEV_MEMORY_TEMP", "gauge", ("temp_mem_celsius",), _as_is, "Memory temperature (in C)."),
    DcgmMetric(
        "DCGM_FI_DEV_SLOWDOWN_TEMP", "gauge", ("temp_slowdown_celsius",), _as_is, "Slowdown temperature (in C)."
    ),
    DcgmMetric(
        "DCGM_FI_DEV_SHUTDOWN_TEMP", "gauge", ("temp_shutdown_celsius",), _as_is, "Shutdown temperature (in C)."
    ),
    # field 155 (W); 164 is the enforced limit (W), which is what power_limit_watts holds.
    DcgmMetric("DCGM_FI_DEV_POWER_USAGE", "gauge", ("power_watts",), _as_is, "Power draw (in W)."),
    DcgmMetric(
        "DCGM_FI_DEV_ENFORCED_POWER_LIMIT", "gauge", ("power_limit_watts",), _as_is, "Enforced power limit (in W)."
    ),
    # field 156; default-counters.csv: counter, in mJ.
    DcgmMetric(
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "counter",
        ("energy_joules",),
        _millijoules,
        "Total energy consumption since the driver was loaded (in mJ).",
    ),
    # fields 100 / 113 / 101, in MHz.
    DcgmMetric("DCGM_FI_DEV_SM_CLOCK", "gauge", ("sm_clock_mhz",), _as_is, "SM clock frequency (in MHz)."),
    DcgmMetric(
        "DCGM_FI_DEV_MAX_SM_CLOCK", "gauge", ("sm_clock_max_mhz",), _as_is, "Maximum SM clock frequency (in MHz)."
    ),
    DcgmMetric("DCGM_FI_DEV_MEM_CLOCK", "gauge", ("mem_clock_mhz",), _as_is, "Memory clock frequency (in MHz)."),
    # field 112: CLOCKS_EVENT_REASONS since DCGM 3.3, CLOCK_THROTTLE_REASONS before (kept as an
    # alias); dcgm-exporter names a series after the field name in its counters file, and both
    # names are in use in existing dashboards.
    DcgmMetric(
        "DCGM_FI_DEV_CLOCKS_EVENT_REASONS",
        "gauge",
        ("clock_event_reasons",),
        _as_is,
        "Clock event reasons now in effect (bitmask of DCGM_CLOCKS_EVENT_REASON_*).",
    ),
    DcgmMetric(
        "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS",
        "gauge",
        ("clock_event_reasons",),
        _as_is,
        "Clock throttle reasons now in effect (bitmask; the pre-3.3 name of field 112).",
    ),
    # field 191, in percent 0-100.
    DcgmMetric("DCGM_FI_DEV_FAN_SPEED", "gauge", ("fan_percent",), _as_is, "Fan speed (in %)."),
    # field 202; default-counters.csv: counter.
    DcgmMetric(
        "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
        "counter",
        ("pcie_replay_total",),
        _as_is,
        "PCIe replays since the driver was loaded.",
    ),
    # fields 200 / 201: NVML's PCIe throughput in KB/s. default-counters.csv types them counter
    # although the value is a rate; we keep its type so its users see what they saw.
    DcgmMetric(
        "DCGM_FI_DEV_PCIE_TX_THROUGHPUT",
        "counter",
        ("pcie_tx_bytes_per_second",),
        _kib_per_second,
        "PCIe TX throughput (in KB/s) via NVML.",
    ),
    DcgmMetric(
        "DCGM_FI_DEV_PCIE_RX_THROUGHPUT",
        "counter",
        ("pcie_rx_bytes_per_second",),
        _kib_per_second,
        "PCIe RX throughput (in KB/s) via NVML.",
    ),
    # fields 237 / 235 / 238 / 236: not in default-counters.csv; gauges.
    DcgmMetric("DCGM_FI_DEV_PCIE_LINK_GEN", "gauge", ("pcie_link_gen",), _as_is, "PCIe current link generation."),
    DcgmMetric(
        "DCGM_FI_DEV_PCIE_MAX_LINK_GEN", "gauge", ("pcie_link_gen_max",), _as_is, "PCIe maximum link generation."
    ),
    DcgmMetric("DCGM_FI_DEV_PCIE_LINK_WIDTH", "gauge", ("pcie_link_width",), _as_is, "PCIe current link width."),
    DcgmMetric(
        "DCGM_FI_DEV_PCIE_MAX_LINK_WIDTH", "gauge", ("pcie_link_width_max",), _as_is, "PCIe maximum link width."
    ),
    # fields 310-313; default-counters.csv (commented out): counters.
    DcgmMetric(
        "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
        "counter",
        ("ecc_sbe_volatile_total",),
        _as_is,
        "Single-bit ECC errors since the driver was loaded.",
    ),
    DcgmMetric(
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
        "counter",
        ("ecc_dbe_volatile_total",),
        _as_is,
        "Double-bit ECC errors since the driver was loaded.",
    ),
    DcgmMetric(
        "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL",
        "counter",
        ("ecc_sbe_aggregate_total",),
        _as_is,
        "Single-bit ECC errors over the board's life.",
    ),
    DcgmMetric(
        "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL",
        "counter",
        ("ecc_dbe_aggregate_total",),
        _as_is,
        "Double-bit ECC errors over the board's life.",
    ),
    # fields 390-392; default-counters.csv (commented out): counters.
    DcgmMetric(
        "DCGM_FI_DEV_RETIRED_SBE", "counter", ("retired_pages_sbe",), _as_is, "Pages retired for single-bit ECC errors."
    ),
    DcgmMetric(
        "DCGM_FI_DEV_RETIRED_DBE", "counter", ("retired_pages_dbe",), _as_is, "Pages retired for double-bit ECC errors."
    ),
    DcgmMetric(
        "DCGM_FI_DEV_RETIRED_PENDING",
        "counter",
        ("retired_pages_pending",),
        _as_is,
        "1 while a page retirement is pending.",
    ),
    # fields 394 / 393 (counters) and 395 (gauge) in default-counters.csv; 396 is not there: gauge.
    DcgmMetric(
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
        "counter",
        ("remapped_rows_correctable",),
        _as_is,
        "Rows remapped for correctable errors.",
    ),
    DcgmMetric(
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
        "counter",
        ("remapped_rows_uncorrectable",),
        _as_is,
        "Rows remapped for uncorrectable errors.",
    ),
    DcgmMetric("DCGM_FI_DEV_ROW_REMAP_FAILURE", "gauge", ("remap_failure",), _as_is, "1 if a row remap failed."),
    DcgmMetric("DCGM_FI_DEV_ROW_REMAP_PENDING", "gauge", ("remap_pending",), _as_is, "1 while a row remap is pending."),
    # fields 409 / 419 / 429 / 439 (totals over all links); default-counters.csv (commented out): counters.
    DcgmMetric(
        "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL",
        "counter",
        ("nvlink_crc_flit_errors_total",),
        _as_is,
        "NVLink flow-control CRC errors, all links.",
    ),
    DcgmMetric(
        "DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL",
        "counter",
        ("nvlink_crc_data_errors_total",),
        _as_is,
        "NVLink data CRC errors, all links.",
    ),
    DcgmMetric(
        "DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL",
        "counter",
        ("nvlink_replay_errors_total",),
        _as_is,
        "NVLink replays, all links.",
    ),
    DcgmMetric(
        "DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL",
        "counter",
        ("nvlink_recovery_errors_total",),
        _as_is,
        "NVLink recoveries, all links.",
    ),
    # The profiling fields (DCGM_FI_PROF_*, 1001-1012 in DCGM's dcgm_fields.h) from NVML GPM: ratios
    # 0-1 as DCGM gives them, bandwidths in bytes per second.
    DcgmMetric(
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
        "gauge",
        ("graphics_active_percent",),
        _ratio,
        "Share of the interval a graphics or compute engine was active (GPM).",
    ),
    DcgmMetric(
        "DCGM_FI_PROF_SM_ACTIVE",
        "gauge",
        ("sm_active_percent",),
        _ratio,
        "Share of the interval the SMs were busy (GPM).",
    ),
    DcgmMetric(
        "DCGM_FI_PROF_SM_OCCUPANCY",
        "gauge",
        ("sm_occupancy_percent",),
        _ratio,
        "Resident warps against the SMs' maximum (GPM).",
    ),
    DcgmMetric(
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
        "gauge",
        ("tensor_active_percent",),
        _ratio,
        "Share of the interval any tensor pipe was busy (GPM).",
    ),
    DcgmMetric(
        "DCGM_FI_PROF_DRAM_ACTIVE",
        "gauge",
        ("dram_active_percent",),
        _ratio,
        "Device memory bandwidth used against its peak (GPM).",
    ),
    DcgmMetric(
        "DCGM_FI_PROF_PIPE_FP64_ACTIVE",
        "gauge",
        ("fp64_active_percent",),
        _ratio,
        "Share of the interval the FP64 pipe was busy (GPM).",
    ),
    DcgmMetric(
        "DCGM_FI_PROF_PIPE_FP32_ACTIVE",
        "gauge",
        ("fp32_active_percent",),
        _ratio,
        "Share of the interval the FP32 pipe was busy (GPM).",
    ),
    DcgmMetric(
        "DCGM_FI_PROF_PIPE_FP16_ACTIVE",
        "gauge",
        ("fp16_active_percent",),
        _ratio,
        "Share of the interval the FP16 pipe was busy (GPM).",
    ),
    DcgmMetric(
        "DCGM_FI_PROF_PCIE_TX_BYTES",
        "gauge",
        ("pcie_tx_bytes_per_second",),
        _as_is,
        "PCIe bytes sent per second, headers included.",
    ),
    DcgmMetric(
        "DCGM_FI_PROF_PCIE_RX_BYTES",
        "gauge",
        ("pcie_rx_bytes_per_second",),
        _as_is,
        "PCIe bytes received per second, headers included.",
    ),
    DcgmMetric(
        "DCGM_FI_PROF_NVLINK_TX_BYTES",
        "gauge",
        ("nvlink_tx_bytes_per_second",),
        _as_is,
        "NVLink bytes sent per second, all links (GPM).",
    ),
    # DCGM_FI_DEV_XID_ERRORS (field 230) has labels of its own: AgentMetrics._dcgm_xid.
    DcgmMetric(
        "DCGM_FI_PROF_NVLINK_RX_BYTES",
        "gauge",
        ("nvlink_rx_bytes_per_second",),
        _as_is,
        "NVLink bytes received per second, all links (GPM).",
    ),
    # Not exported: nvlink_links_up/total have no DCGM field (DCGM reports link state per link).
)

_GPU_LABELS = ("node", "gpu", "uuid")
_DCGM_LABELS = ("gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname", "DCGM_FI_DRIVER_VERSION")
_INFO_LABELS = ("node", "gpu", "uuid", "name", "pci_bus_id", "serial", "driver_version", "cuda_version")
# dcgm-exporter's names for a GPU's pod (internal/pkg/transformation/const.go: podAttribute,
# namespaceAttribute, containerAttribute), on fleetwatch_gpu_pod_info and the DCGM series alike.
_POD_LABELS = ("namespace", "pod", "container")
_IB_LABELS = ("node", "device", "port")


@dataclass(frozen=True)
class _Gpu:
    """One GPU as a scrape sees it: identity (from the sample, else the inventory) and metrics."""

    index: int
    uuid: str
    name: str
    pci_bus_id: str
    metrics: dict[str, Any]
    pod: tuple[str, str, str] | None = None  # (namespace, pod, container) the kubelet allocated it to


@dataclass(frozen=True)
class _Snapshot:
    """What one scrape reads, copied under state.lock so building families does not hold it."""

    node: str
    gpus: list[_Gpu]
    inventory: list[dict[str, Any]]
    host: dict[str, Any]
    ib_ports: list[dict[str, Any]]
    xid_counts: dict[tuple[int | None, int], int]
    sources: list[tuple[str, float, bool, int]]
    sample_wall_seconds_last: float
    sample_cpu_seconds_last: float
    samples_total: int
    spool_bytes: int
    spool_batches: int
    spool_dropped_batches_total: int
    spool_quarantined_batches_total: int
    collector_connected: bool
    collector_entry: str
    collector_address: str
    nvml_available: bool
    driver_version: str  # the NVIDIA driver's, from the inventory ("" without NVML)
    xid_last: dict[int | None, int]  # GPU index -> its last XID (None: a kernel-log XID of no known GPU)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _pod(sample: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """(namespace, pod, container) of a GPU sample the kubelet named a pod for, else None."""
    if not sample.get("k8s_pod"):
        return None
    return _text(sample.get("k8s_namespace")), _text(sample["k8s_pod"]), _text(sample.get("k8s_container"))


def _nvml_bus_id(bus_id: str) -> str:
    """Our "0000:18:00.0" as NVML and DCGM print it: "00000000:18:00.0" (8-digit domain, upper case)."""
    domain, sep, rest = bus_id.partition(":")
    if not sep:
        return bus_id.upper()
    try:
        return f"{int(domain, 16):08X}:{rest.upper()}"
    except ValueError:
        return bus_id.upper()


class AgentMetrics(Collector):
    """Custom collector over AgentState: every scrape builds its families from the latest cache."""

    def __init__(self, state: AgentState, *, dcgm_names: bool = False) -> None:
        self.state = state
        self.dcgm_names = dcgm_names

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield from self._gpu_families(snap)
        yield from self._gpu_info(snap)
        yield from self._gpu_pod_info(snap)
        yield from self._xid_family(snap)
        if self.dcgm_names:
            yield from self._dcgm_families(snap)
        yield from self._field_families(HOST_METRICS, ("node",), [((snap.node,), snap.host)])
        yield from self._ib_families(snap)
        yield from self._agent_families(snap)
        # Job attribution (state.gpus[i]["job"] / ["rank"]) is deliberately not exported: job ids
        # are unbounded label values (DESIGN: labels never carry job ids); the collector has them.
        # The pod is, on one info series per GPU (the module docstring says why).

    # ---- snapshot ------------------------------------------------------------------------------

    def _snapshot(self) -> _Snapshot:
        state = self.state
        with state.lock:
            inventory = [dict(entry) for entry in state.inventory]
            by_index = {entry.get("index"): entry for entry in inventory}
            gpus = []
            for index in sorted(state.gpus):
                sample = state.gpus[index]
                entry = by_index.get(index, {})
                metrics = dict(sample.get("metrics") or {})
                if index in state.xid_last:
                    metrics["xid_last"] = state.xid_last[index]
                gpus.append(
                    _Gpu(
                        index=index,
                        uuid=_text(sample.get("uuid") or entry.get("uuid")),
                        name=_text(entry.get("name")),
                        pci_bus_id=_text(entry.get("pci_bus_id")),
                        metrics=metrics,
                        pod=_pod(sample),
                    )
                )
            return _Snapshot(
                node=state.node,
                gpus=gpus,
                inventory=inventory,
                host=dict(state.host),
                ib_ports=[dict(port) for port in state.ib_ports],
                xid_counts=dict(state.xid_counts),
                sources=[
                    (name, s.last_duration_seconds, s.last_success, s.errors_total)
                    for name, s in sorted(state.sources.items())
                ],
                sample_wall_seconds_last=state.sample_wall_seconds_last,
                sample_cpu_seconds_last=state.sample_cpu_seconds_last,
                samples_total=state.samples_total,
                spool_bytes=state.spool_bytes,
                spool_batches=state.spool_batches,
                spool_dropped_batches_total=state.spool_dropped_batches_total,
                spool_quarantined_batches_total=state.spool_quarantined_batches_total,
                collector_connected=state.collector_connected,
                collector_entry=state.collector_entry,
                collector_address=state.collector_address,
                nvml_available=state.nvml_available,
                xid_last=dict(state.xid_last),
                driver_version=next((_text(e.get("driver_version")) for e in inventory if e.get("driver_version")), ""),
            )

    # ---- families ------------------------------------------------------------------------------

    @staticmethod
    def _family(
        name: str, help_text: str, counter: bool, labels: Iterable[str]
    ) -> CounterMetricFamily | GaugeMetricFamily:
        if counter:
            return CounterMetricFamily(name, help_text, labels=list(labels))
        return GaugeMetricFamily(name, help_text, labels=list(labels))

    def _field_families(
        self,
        table: tuple[FieldMetric, ...],
        label_names: tuple[str, ...],
        entities: Sequence[tuple[tuple[str, ...], Mapping[str, Any]]],
    ) -> Iterator[Metric]:
        """One family per table row, one sample per entity that has the field (absent: no sample)."""
        for spec in table:
            family = self._family(spec.name, spec.help, spec.kind == "counter", label_names)
            for labels, values in entities:
                value = values.get(spec.canonical)
                if value is not None:
                    family.add_metric(list(labels), spec.convert(value))
            if family.samples:
                yield family

    def _gpu_families(self, snap: _Snapshot) -> Iterator[Metric]:
        entities = [((snap.node, str(g.index), g.uuid), g.metrics) for g in snap.gpus]
        yield from self._field_families(GPU_METRICS, _GPU_LABELS, entities)
        reasons = GaugeMetricFamily(
            "fleetwatch_gpu_clock_event_reason",
            "1 while the named NVML clock event reason (nvmlClocksEventReason*) holds the clocks down, else 0.",
            labels=[*_GPU_LABELS, "reason"],
        )
        for labels, values in entities:
            mask = values.get("clock_event_reasons")
            if mask is None:
                continue
            for bit, reason in CLOCK_EVENT_REASONS:
                reasons.add_metric([*labels, reason], 1 if int(mask) & bit else 0)
        if reasons.samples:
            yield reasons

    def _gpu_info(self, snap: _Snapshot) -> Iterator[Metric]:
        # From the inventory, not state.gpus: a GPU that stopped answering keeps its identity here,
        # so `fleetwatch_gpu_info unless on(node, gpu) fleetwatch_gpu_power_watts` finds it.
        family = GaugeMetricFamily(
            "fleetwatch_gpu_info",
            "GPU identity as NVML reported it when the agent started; always 1.",
            labels=list(_INFO_LABELS),
        )
        for entry in sorted(snap.inventory, key=lambda e: e.get("index", -1)):
            family.add_metric(
                [
                    snap.node,
                    _text(entry.get("index")),
                    _text(entry.get("uuid")),
                    _text(entry.get("name")),
                    _text(entry.get("pci_bus_id")),
                    _text(entry.get("serial")),
                    _text(entry.get("driver_version")),
                    _text(entry.get("cuda_version")),
                ],
                1,
            )
        if family.samples:
            yield family

    def _gpu_pod_info(self, snap: _Snapshot) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "fleetwatch_gpu_pod_info",
            "The Kubernetes namespace, pod and container the GPU is allocated to (the kubelet's pod-resources "
            "API); always 1, absent for a GPU no single pod holds.",
            labels=[*_GPU_LABELS, *_POD_LABELS],
        )
        for gpu in snap.gpus:
            if gpu.pod is not None:
                family.add_metric([snap.node, str(gpu.index), gpu.uuid, *gpu.pod], 1)
        if family.samples:
            yield family

    def _xid_family(self, snap: _Snapshot) -> Iterator[Metric]:
        # Kept for GPUs that left state.gpus: XID 79 (fallen off the bus) is exactly what removes one.
        uuids = {entry.get("index"): _text(entry.get("uuid")) for entry in snap.inventory}
        uuids.update({g.index: g.uuid for g in snap.gpus})
        family = CounterMetricFamily(
            "fleetwatch_gpu_xid_errors_total",
            "XID errors seen since the agent started, by XID code.",
            labels=[*_GPU_LABELS, "xid"],
        )
        # Every code's count in one series per GPU, there at 0 from the start (and one for XIDs the
        # kernel log could not tie to a GPU): increase() over a series that first appears at 1
        # misses that first XID, the one an alert rule is for.
        totals = CounterMetricFamily(
            "fleetwatch_gpu_xids_total",
            "XID errors of any code seen since the agent started; 0 for every GPU from the start.",
            labels=list(_GPU_LABELS),
        )
        per_gpu: dict[int | None, int] = dict.fromkeys([None, *sorted(i for i in uuids if isinstance(i, int))], 0)
        ordered = sorted(snap.xid_counts.items(), key=lambda kv: (kv[0][0] is not None, kv[0][0] or 0, kv[0][1]))
        for (gpu, xid), count in ordered:
            gpu_label = "" if gpu is None else str(gpu)
            uuid = "" if gpu is None else uuids.get(gpu, "")
            family.add_metric([snap.node, gpu_label, uuid, str(xid)], count)
            per_gpu[gpu] = per_gpu.get(gpu, 0) + count
        for gpu, count in sorted(per_gpu.items(), key=lambda kv: (kv[0] is not None, kv[0] or 0)):
            totals.add_metric(
                [snap.node, "" if gpu is None else str(gpu), "" if gpu is None else uuids.get(gpu, "")], count
            )
        if uuids or snap.xid_counts:  # a host-only agent (no GPU) has no GPU series
            yield totals
        if family.samples:
            yield family

    def _dcgm_families(self, snap: _Snapshot) -> Iterator[Metric]:
        for spec in DCGM_METRICS:
            if spec.type == "counter":
                # dcgm-exporter's counters carry no `_total`, and dashboards query them by that bare
                # name. prometheus_client writes a counter family only as `<name>_total` (the text
                # format's TYPE line; OpenMetrics rejects a bare counter sample), so these are
                # declared untyped: the same series and values, valid in both formats.
                family = Metric(spec.name, spec.help, "unknown")
            else:
                family = GaugeMetricFamily(spec.name, spec.help, labels=list(_DCGM_LABELS))
            for gpu in snap.gpus:
                values = [gpu.metrics.get(name) for name in spec.fields]
                if any(v is None for v in values):
                    continue
                family.add_sample(spec.name, self._dcgm_labels(snap, gpu), spec.convert(*values))
            if family.samples:
                yield family
        yield from self._dcgm_xid(snap)

    @staticmethod
    def _dcgm_labels(snap: _Snapshot, gpu: _Gpu) -> dict[str, str]:
        """dcgm-exporter's labels of a GPU series, DCGM_FI_DRIVER_VERSION included, and its pod's where known."""
        labels = {
            "gpu": str(gpu.index),
            "UUID": gpu.uuid,
            "pci_bus_id": _nvml_bus_id(gpu.pci_bus_id) if gpu.pci_bus_id else "",
            "device": f"nvidia{gpu.index}",
            "modelName": gpu.name,
            "Hostname": snap.node,
            "DCGM_FI_DRIVER_VERSION": snap.driver_version,
        }
        if gpu.pod is not None:
            labels.update(zip(_POD_LABELS, gpu.pod))
        return labels

    def _dcgm_xid(self, snap: _Snapshot) -> Iterator[Metric]:
        # Field 230: the last XID's number, 0 for every GPU until its first (as dcgm-exporter shows a
        # GPU without XIDs), with the err_code and err_msg labels dcgm-exporter 3.3.6 added.
        # A GPU that fell off the bus (XID 79) keeps its series: its last XID is what matters most.
        family = GaugeMetricFamily("DCGM_FI_DEV_XID_ERRORS", "Value of the last XID error encountered.")
        sampled = {gpu.index for gpu in snap.gpus}
        gone = [
            _Gpu(
                index=entry["index"],
                uuid=_text(entry.get("uuid")),
                name=_text(entry.get("name")),
                pci_bus_id=_text(entry.get("pci_bus_id")),
                metrics={"xid_last": snap.xid_last[entry["index"]]} if entry["index"] in snap.xid_last else {},
            )
            for entry in snap.inventory
            if isinstance(entry.get("index"), int) and entry["index"] not in sampled
        ]
        for gpu in sorted([*snap.gpus, *gone], key=lambda g: g.index):
            last = int(gpu.metrics.get("xid_last") or 0)
            message = lookup(last).meaning if last else ""
            labels = {**self._dcgm_labels(snap, gpu), "err_code": str(last), "err_msg": message}
            family.add_sample("DCGM_FI_DEV_XID_ERRORS", labels, last)
        if family.samples:
            yield family

    def _ib_families(self, snap: _Snapshot) -> Iterator[Metric]:
        ports = sorted(snap.ib_ports, key=lambda p: (str(p.get("device")), int(p.get("port") or 0)))
        entities = [((snap.node, _text(p.get("device")), _text(p.get("port"))), p) for p in ports]
        numeric = tuple(spec for spec in IB_METRICS if spec.kind != "state")
        state_spec = next(spec for spec in IB_METRICS if spec.kind == "state")
        up = GaugeMetricFamily(state_spec.name, state_spec.help, labels=list(_IB_LABELS))
        states = GaugeMetricFamily(
            "fleetwatch_ib_port_state",
            "The port's logical state (sysfs `state`) as a label; always 1.",
            labels=[*_IB_LABELS, "state"],
        )
        for labels, port in entities:
            state = port.get(state_spec.canonical)
            if not state:
                continue
            up.add_metric(list(labels), 1 if state == IB_ACTIVE else 0)
            states.add_metric([*labels, state], 1)
        for family in (up, states):
            if family.samples:
                yield family
        yield from self._field_families(numeric, _IB_LABELS, entities)

    def _agent_families(self, snap: _Snapshot) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "fleetwatch_agent_sample_duration_seconds",
            "Wall time of the last sampling cycle.",
            value=snap.sample_wall_seconds_last,
        )
        yield GaugeMetricFamily(
            "fleetwatch_agent_sample_cpu_seconds",
            "CPU time the agent spent in the last sampling cycle.",
            value=snap.sample_cpu_seconds_last,
        )
        yield CounterMetricFamily(
            "fleetwatch_agent_samples_total", "Sampling cycles completed.", value=snap.samples_total
        )
        yield GaugeMetricFamily(
            "fleetwatch_agent_spool_bytes", "Bytes of batches spooled, not yet acknowledged.", value=snap.spool_bytes
        )
        yield GaugeMetricFamily(
            "fleetwatch_agent_spool_batches", "Batches spooled, not yet acknowledged.", value=snap.spool_batches
        )
        yield CounterMetricFamily(
            "fleetwatch_agent_spool_dropped_batches_total",
            "Unacknowledged batches dropped because the spool hit its limit.",
            value=snap.spool_dropped_batches_total,
        )
        yield CounterMetricFamily(
            "fleetwatch_agent_spool_quarantined_batches_total",
            "Spooled batches that could not be sent (damaged on disk, or refused by the collector), "
            "moved to the spool's quarantine/ directory.",
            value=snap.spool_quarantined_batches_total,
        )
        yield GaugeMetricFamily(
            "fleetwatch_agent_collector_connected",
            "1 while the stream to the collector is up, else 0.",
            value=1 if snap.collector_connected else 0,
        )
        if snap.collector_connected:
            # An info series (1) naming the collector streamed to: which one a node moved to after a
            # failover. Labels bounded by collector_address and what its names resolve to.
            collector = GaugeMetricFamily(
                "fleetwatch_agent_collector_info",
                "1 for the collector the agent streams to: its collector_address entry and the address dialed.",
                labels=["collector", "address"],
            )
            collector.add_metric([snap.collector_entry, snap.collector_address], 1)
            yield collector
        yield GaugeMetricFamily(
            "fleetwatch_agent_nvml_available",
            "1 when NVML loaded and GPUs are sampled, 0 when the agent runs host-only.",
            value=1 if snap.nvml_available else 0,
        )
        # Per source, as node_exporter's node_scrape_collector_{duration_seconds,success}.
        duration = GaugeMetricFamily(
            "fleetwatch_agent_source_duration_seconds", "Wall time of the source's last sample.", labels=["source"]
        )
        success = GaugeMetricFamily(
            "fleetwatch_agent_source_success", "1 if the source's last sample succeeded, else 0.", labels=["source"]
        )
        errors = CounterMetricFamily(
            "fleetwatch_agent_source_errors_total", "Samples of the source that failed.", labels=["source"]
        )
        for name, seconds, ok, errors_total in snap.sources:
            duration.add_metric([name], seconds)
            success.add_metric([name], 1 if ok else 0)
            errors.add_metric([name], errors_total)
        if snap.sources:
            yield from (duration, success, errors)
        build_info = GaugeMetricFamily(
            "fleetwatch_agent_build_info", "The agent's version; always 1.", labels=["version"]
        )
        build_info.add_metric([AGENT_VERSION], 1)
        yield build_info


class MetricsServer:
    """The agent's /metrics on host:port (port 0 picks a free one), over HTTPS and behind basic auth if asked.

    prometheus_client's WSGI app serves the registry on every path, gzip-compressed when the
    scraper accepts it, in the text or the OpenMetrics format as its Accept header asks; the
    server (fleetwatch.agent.metrics_http) listens over IPv4 or IPv6 as the host resolves.
    """

    def __init__(
        self,
        state: AgentState,
        host: str,
        port: int,
        *,
        dcgm_names: bool = False,
        tls_cert_file: str = "",
        tls_key_file: str = "",
        basic_auth_user: str = "",
        basic_auth_password: str = "",
    ) -> None:
        """Basic auth is on when `basic_auth_user` is set; TLS when `tls_cert_file` is (its key in `tls_key_file`)."""
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(AgentMetrics(state, dcgm_names=dcgm_names))
        self.host = host
        self.port = port  # the bound port once start() returned
        self.tls_cert_file = tls_cert_file
        self.tls_key_file = tls_key_file
        self._basic_auth = (basic_auth_user, basic_auth_password) if basic_auth_user else None
        self._server: ThreadingWsgiServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert_file else "http"

    def start(self) -> None:
        """Binds and serves from a daemon thread; OSError when the address or the certificate cannot be used."""
        if self._server is not None:
            return
        # Loaded at start: a renewed certificate takes a restart.
        ssl_context = server_ssl_context(
            self.tls_cert_file, self.tls_key_file, cert_key="metrics_tls_cert_file", key_key="metrics_tls_key_file"
        )
        app = make_wsgi_app(self.registry)
        if self._basic_auth is not None:
            app = basic_auth(app, *self._basic_auth)
        self._server, self._thread = serve(app, self.host, self.port, ssl_context)
        self.port = self._server.server_port

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        # shutdown() returns once serve_forever() noticed it (it polls every 0.5 s).
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server = self._thread = None
