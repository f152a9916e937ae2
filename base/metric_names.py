"""The metric names of the canonical fields: one table, read by the agent's /metrics and the collector's remote write.

Every canonical field (fleetwatch.wire) is exported under one name chosen here, following
Prometheus conventions: base units (hertz, bytes, joules, ratios 0-1), `_total` on counters,
bounded labels (GPU series: `node`, `gpu`, `uuid`; host series: `node`; InfiniBand ports:
`node`, `device`, `port`; never pids or job ids). The agent serves them on its /metrics
(fleetwatch.agent.metrics) and the collector sends the same series, under the same names, labels
and values, to Prometheus remote-write receivers (fleetwatch.collector.remote_write), so a
dashboard reads either. The table lives in the base layer because those two layers never import
each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

Kind = Literal["gauge", "counter", "bitmask", "state"]

_MHZ_TO_HERTZ = Fraction(10**6)
_PERCENT_TO_RATIO = Fraction(1, 100)
# InfiniBand rates are in Gb/s of 10^9 bits; node_exporter reports them in bytes/second too.
_GBPS_TO_BYTES_PER_SECOND = Fraction(10**9, 8)
_ONE = Fraction(1)


@dataclass(frozen=True)
class FieldMetric:
    """How one canonical field is exported: `value * scale` under `name`.

    kind "bitmask" is a gauge of the raw mask plus one 0/1 series per named bit; kind "state" is
    a text field exported as `<name>` 1/0 plus an info-style series carrying the text.
    """

    canonical: str
    name: str  # full exposition name; counters end in _total
    kind: Kind
    scale: Fraction
    help: str

    def convert(self, value: float | int) -> float | int:
        if self.scale == 1:
            return value
        # Numerator first, then an exact division: 97 / 100 is 0.97, 97 * 0.01 is not.
        return value * self.scale.numerator / self.scale.denominator


# The one mapping from canonical GPU fields (wire.GPU_FIELDS) to metric names. Labels: node, gpu, uuid.
GPU_METRICS: tuple[FieldMetric, ...] = (
    FieldMetric(
        "gpu_util_percent",
        "fleetwatch_gpu_utilization_ratio",
        "gauge",
        _PERCENT_TO_RATIO,
        "Fraction of the last sample period during which a kernel ran on the GPU (NVML utilization.gpu).",
    ),
    FieldMetric(
        "mem_util_percent",
        "fleetwatch_gpu_memory_utilization_ratio",
        "gauge",
        _PERCENT_TO_RATIO,
        "Fraction of the last sample period during which device memory was read or written "
        "(NVML utilization.memory; not the fraction allocated).",
    ),
    FieldMetric(
        "mem_used_bytes",
        "fleetwatch_gpu_memory_used_bytes",
        "gauge",
        _ONE,
        "Device memory allocated, without the driver's reserved memory.",
    ),
    FieldMetric("mem_total_bytes", "fleetwatch_gpu_memory_total_bytes", "gauge", _ONE, "Device memory installed."),
    FieldMetric("temp_gpu_celsius", "fleetwatch_gpu_temperature_celsius", "gauge", _ONE, "GPU core temperature."),
    FieldMetric("temp_mem_celsius", "fleetwatch_gpu_memory_temperature_celsius", "gauge", _ONE, "HBM temperature."),
    FieldMetric(
        "temp_slowdown_celsius",
        "fleetwatch_gpu_slowdown_temperature_celsius",
        "gauge",
        _ONE,
        "Core temperature at which the GPU starts hardware thermal slowdown.",
    ),
    FieldMetric(
        "temp_shutdown_celsius",
        "fleetwatch_gpu_shutdown_temperature_celsius",
        "gauge",
        _ONE,
        "Core temperature at which the GPU shuts down.",
    ),
    FieldMetric("power_watts", "fleetwatch_gpu_power_watts", "gauge", _ONE, "Board power draw."),
    FieldMetric(
        "power_limit_watts", "fleetwatch_gpu_power_limit_watts", "gauge", _ONE, "Power limit the driver enforces."
    ),
    FieldMetric(
        "energy_joules",
        "fleetwatch_gpu_energy_joules_total",
        "counter",
        _ONE,
        "Energy consumed since the driver was loaded.",
    ),
    FieldMetric("sm_clock_mhz", "fleetwatch_gpu_sm_clock_hertz", "gauge", _MHZ_TO_HERTZ, "SM clock frequency."),
    FieldMetric(
        "sm_clock_max_mhz",
        "fleetwatch_gpu_sm_clock_max_hertz",
        "gauge",
        _MHZ_TO_HERTZ,
        "Maximum (boost) SM clock frequency.",
    ),
    FieldMetric(
        "mem_clock_mhz", "fleetwatch_gpu_memory_clock_hertz", "gauge", _MHZ_TO_HERTZ, "Memory clock frequency."
    ),
    FieldMetric(
        "clock_event_reasons",
        "fleetwatch_gpu_clock_event_reasons",
        "bitmask",
        _ONE,
        "Why the clocks are below maximum, as NVML's nvmlClocksEventReason* bitmask; "
        "see fleetwatch_gpu_clock_event_reason for the bits by name.",
    ),
    FieldMetric(
        "fan_percent",
        "fleetwatch_gpu_fan_speed_ratio",
        "gauge",
        _PERCENT_TO_RATIO,
        "Fan speed as a fraction of its maximum.",
    ),
    FieldMetric(
        "pcie_replay_total",
        "fleetwatch_gpu_pcie_replays_total",
        "counter",
        _ONE,
        "PCIe replays (link-level retransmissions).",
    ),
    FieldMetric(
        "pcie_tx_bytes_per_second",
        "fleetwatch_gpu_pcie_transmit_bytes_per_second",
        "gauge",
        _ONE,
        "PCIe bytes sent by the GPU per second (NVML samples a short window).",
    ),
    FieldMetric(
        "pcie_rx_bytes_per_second",
        "fleetwatch_gpu_pcie_receive_bytes_per_second",
        "gauge",
        _ONE,
        "PCIe bytes received by the GPU per second (NVML samples a short window).",
    ),
    FieldMetric("pcie_link_gen", "fleetwatch_gpu_pcie_link_generation", "gauge", _ONE, "Current PCIe link generation."),
    FieldMetric(
        "pcie_link_gen_max",
        "fleetwatch_gpu_pcie_link_generation_max",
        "gauge",
        _ONE,
        "Highest PCIe link generation the GPU and system support.",
    ),
    FieldMetric("pcie_link_width", "fleetwatch_gpu_pcie_link_width_lanes", "gauge", _ONE, "Current PCIe link width."),
    FieldMetric(
        "pcie_link_width_max",
        "fleetwatch_gpu_pcie_link_width_max_lanes",
        "gauge",
        _ONE,
        "Widest PCIe link the GPU and system support.",
    ),
    FieldMetric(
        "ecc_sbe_volatile_total",
        "fleetwatch_gpu_ecc_sbe_volatile_errors_total",
        "counter",
        _ONE,
        "Corrected (single-bit) ECC errors since the driver was loaded.",
    ),
    FieldMetric(
        "ecc_dbe_volatile_total",
        "fleetwatch_gpu_ecc_dbe_volatile_errors_total",
        "counter",
        _ONE,
        "Uncorrected (double-bit) ECC errors since the driver was loaded.",
    ),
    FieldMetric(
        "ecc_sbe_aggregate_total",
        "fleetwatch_gpu_ecc_sbe_aggregate_errors_total",
        "counter",
        _ONE,
        "Corrected (single-bit) ECC errors over the board's life.",
    ),
    FieldMetric(
        "ecc_dbe_aggregate_total",
        "fleetwatch_gpu_ecc_dbe_aggregate_errors_total",
        "counter",
        _ONE,
        "Uncorrected (double-bit) ECC errors over the board's life.",
    ),
    FieldMetric(
        "retired_pages_sbe",
        "fleetwatch_gpu_retired_pages_sbe",
        "gauge",
        _ONE,
        "Pages retired after repeated single-bit ECC errors (pre-Ampere page retirement).",
    ),
    FieldMetric(
        "retired_pages_dbe",
        "fleetwatch_gpu_retired_pages_dbe",
        "gauge",
        _ONE,
        "Pages retired after a double-bit ECC error (pre-Ampere page retirement).",
    ),
    FieldMetric(
        "retired_pages_pending",
        "fleetwatch_gpu_retired_pages_pending",
        "gauge",
        _ONE,
        "1 while a page retirement waits for the next driver reload.",
    ),
    FieldMetric(
        "remapped_rows_correctable",
        "fleetwatch_gpu_remapped_rows_correctable",
        "gauge",
        _ONE,
        "Memory rows remapped after correctable errors.",
    ),
    FieldMetric(
        "remapped_rows_uncorrectable",
        "fleetwatch_gpu_remapped_rows_uncorrectable",
        "gauge",
        _ONE,
        "Memory rows remapped after uncorrectable errors.",
    ),
    FieldMetric(
        "remap_pending", "fleetwatch_gpu_row_remap_pending", "gauge", _ONE, "1 while a row remap waits for a GPU reset."
    ),
    FieldMetric(
        "remap_failure",
        "fleetwatch_gpu_row_remap_failed",
        "gauge",
        _ONE,
        "1 when a row remap failed: the GPU needs inspection.",
    ),
    FieldMetric("nvlink_links_up", "fleetwatch_gpu_nvlink_links_up", "gauge", _ONE, "NVLinks that are up."),
    FieldMetric("nvlink_links_total", "fleetwatch_gpu_nvlink_links", "gauge", _ONE, "NVLinks the GPU has."),
    FieldMetric(
        "nvlink_crc_flit_errors_total",
        "fleetwatch_gpu_nvlink_crc_flit_errors_total",
        "counter",
        _ONE,
        "NVLink flow-control CRC errors, all links.",
    ),
    FieldMetric(
        "nvlink_crc_data_errors_total",
        "fleetwatch_gpu_nvlink_crc_data_errors_total",
        "counter",
        _ONE,
        "NVLink data CRC errors, all links.",
    ),
    FieldMetric(
        "nvlink_replay_errors_total",
        "fleetwatch_gpu_nvlink_replay_errors_total",
        "counter",
        _ONE,
        "NVLink replays, all links.",
    ),
    FieldMetric(
        "nvlink_recovery_errors_total",
        "fleetwatch_gpu_nvlink_recovery_errors_total",
        "counter",
        _ONE,
        "NVLink recoveries, all links.",
    ),
    # NVML GPM (Hopper and newer), each over one sampling interval: agent/sources/gpm.py.
    *(
        FieldMetric(canonical, name, "gauge", _PERCENT_TO_RATIO, help_text)
        for canonical, name, help_text in (
            (
                "graphics_active_percent",
                "fleetwatch_gpu_graphics_engine_active_ratio",
                "Fraction of the interval a graphics or compute engine was active (GPM; DCGM's GR_ENGINE_ACTIVE).",
            ),
            (
                "sm_active_percent",
                "fleetwatch_gpu_sm_active_ratio",
                "Fraction of the interval the SMs were busy, averaged over SMs (GPM; DCGM's SM_ACTIVE).",
            ),
            (
                "sm_occupancy_percent",
                "fleetwatch_gpu_sm_occupancy_ratio",
                "Resident warps against the SMs' maximum, averaged over the interval (GPM; DCGM's SM_OCCUPANCY).",
            ),
            (
                "tensor_active_percent",
                "fleetwatch_gpu_tensor_active_ratio",
                "Fraction of the interval any tensor pipe was busy (GPM; DCGM's PIPE_TENSOR_ACTIVE).",
            ),
            (
                "dram_active_percent",
                "fleetwatch_gpu_dram_active_ratio",
                "Device memory bandwidth used against its peak (GPM; DCGM's DRAM_ACTIVE).",
            ),
            (
                "fp64_active_percent",
                "fleetwatch_gpu_fp64_active_ratio",
                "Fraction of the interval the FP64 pipe was busy, tensor work aside (GPM).",
            ),
            (
                "fp32_active_percent",
                "fleetwatch_gpu_fp32_active_ratio",
                "Fraction of the interval the FP32 pipe was busy, tensor work aside (GPM).",
            ),
            (
                "fp16_active_percent",
                "fleetwatch_gpu_fp16_active_ratio",
                "Fraction of the interval the FP16 pipe was busy, tensor work aside (GPM).",
            ),
        )
    ),
    FieldMetric(
        "nvlink_tx_bytes_per_second",
        "fleetwatch_gpu_nvlink_transmit_bytes_per_second",
        "gauge",
        _ONE,
        "NVLink bytes sent per second over all links, over the interval (GPM).",
    ),
    FieldMetric(
        "nvlink_rx_bytes_per_second",
        "fleetwatch_gpu_nvlink_receive_bytes_per_second",
        "gauge",
        _ONE,
        "NVLink bytes received per second over all links, over the interval (GPM).",
    ),
)

# Canonical host fields (wire.HOST_FIELDS). Labels: node.
HOST_METRICS: tuple[FieldMetric, ...] = (
    FieldMetric(
        "cpu_percent",
        "fleetwatch_host_cpu_utilization_ratio",
        "gauge",
        _PERCENT_TO_RATIO,
        "Fraction of CPU time not idle, all CPUs, over the last sample period.",
    ),
    FieldMetric("load1", "fleetwatch_host_load1", "gauge", _ONE, "1-minute load average."),
    FieldMetric(
        "mem_used_bytes",
        "fleetwatch_host_memory_used_bytes",
        "gauge",
        _ONE,
        "Host memory in use (total minus available).",
    ),
    FieldMetric("mem_total_bytes", "fleetwatch_host_memory_total_bytes", "gauge", _ONE, "Host memory installed."),
    FieldMetric(
        "disk_used_bytes",
        "fleetwatch_host_disk_used_bytes",
        "gauge",
        _ONE,
        "Disk space used on the agent's filesystem.",
    ),
    FieldMetric(
        "disk_total_bytes", "fleetwatch_host_disk_total_bytes", "gauge", _ONE, "Disk space on the agent's filesystem."
    ),
    FieldMetric(
        "net_rx_bytes_total",
        "fleetwatch_host_network_receive_bytes_total",
        "counter",
        _ONE,
        "Bytes received on all network interfaces.",
    ),
    FieldMetric(
        "net_tx_bytes_total",
        "fleetwatch_host_network_transmit_bytes_total",
        "counter",
        _ONE,
        "Bytes sent on all network interfaces.",
    ),
)

# Canonical InfiniBand port fields (wire.IB_FIELDS). Labels: node, device, port.
IB_METRICS: tuple[FieldMetric, ...] = (
    FieldMetric(
        "ib_state",
        "fleetwatch_ib_port_up",
        "state",
        _ONE,
        "1 when the port is ACTIVE, else 0; the state itself is on fleetwatch_ib_port_state.",
    ),
    FieldMetric(
        "ib_rate_gbps",
        "fleetwatch_ib_port_rate_bytes_per_second",
        "gauge",
        _GBPS_TO_BYTES_PER_SECOND,
        "Port signalling rate.",
    ),
    FieldMetric(
        "ib_link_downed_total",
        "fleetwatch_ib_link_downed_total",
        "counter",
        _ONE,
        "Times the link went down (saturates at 255).",
    ),
    FieldMetric(
        "ib_symbol_error_total",
        "fleetwatch_ib_symbol_errors_total",
        "counter",
        _ONE,
        "Symbol errors on the link (saturates at 65535).",
    ),
    FieldMetric(
        "ib_rcv_errors_total",
        "fleetwatch_ib_receive_errors_total",
        "counter",
        _ONE,
        "Received packets with errors (saturates at 65535).",
    ),
    FieldMetric(
        "ib_link_error_recovery_total",
        "fleetwatch_ib_link_error_recovery_total",
        "counter",
        _ONE,
        "Successful link error recoveries (saturates at 255).",
    ),
)


# The sysfs `state` text of a port that passes traffic: fleetwatch_ib_port_up is 1 for it.
IB_ACTIVE = "ACTIVE"
