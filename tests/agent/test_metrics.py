"""Tests for the agent's /metrics: the naming tables, scaled values, absent fields, vanished GPUs,
XIDs, inventory, DCGM exporter names and units, agent health, the HTTP server, and a golden file.

Every scrape goes through a real MetricsServer on port 0 and is parsed with prometheus_client's
text parser, as Prometheus would read it.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import os
import re
import socket
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from fleetwatch import wire
from fleetwatch.agent import metrics
from fleetwatch.agent.config import AgentConfig
from fleetwatch.agent.metrics import (
    DCGM_METRICS,
    GPU_METRICS,
    HOST_METRICS,
    IB_METRICS,
    AgentMetrics,
    MetricsServer,
)
from fleetwatch.agent.sources.nvml import NvmlSource
from fleetwatch.agent.state import AgentState, SourceStats
from fleetwatch.configfile import ConfigError, describe, load_config
from fleetwatch.nvml_bits import CLOCK_EVENT_REASONS
from fleetwatch.sim.fake_nvml import make_fake_nvml
from fleetwatch.sim.node import SimNode
from tests.selfsigned import ServerCert, make_server_cert

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "metrics" / "agent-sim.prom"
START = 1_700_000_000.0
MIB = 1024 * 1024
GIB = 1024 * MIB

# One value for every canonical GPU field, in canonical units (what the NVML source produces).
FULL_GPU_METRICS: dict[str, float | int] = {
    "gpu_util_percent": 97.0,
    "mem_util_percent": 41.0,
    "mem_used_bytes": 71_000 * MIB + 123,
    "mem_total_bytes": 80 * GIB,
    "temp_gpu_celsius": 61.0,
    "temp_mem_celsius": 52.0,
    "temp_slowdown_celsius": 87.0,
    "temp_shutdown_celsius": 92.0,
    "power_watts": 655.25,
    "power_limit_watts": 700.0,
    "energy_joules": 123_456_789.012,
    "sm_clock_mhz": 1980.0,
    "sm_clock_max_mhz": 1980.0,
    "mem_clock_mhz": 2619.0,
    "clock_event_reasons": 0x04,
    "fan_percent": 35.0,
    "pcie_replay_total": 3,
    "pcie_tx_bytes_per_second": 2_048_000.0,
    "pcie_rx_bytes_per_second": 10_240_000.0,
    "pcie_link_gen": 5,
    "pcie_link_gen_max": 5,
    "pcie_link_width": 16,
    "pcie_link_width_max": 16,
    "ecc_sbe_volatile_total": 2,
    "ecc_dbe_volatile_total": 0,
    "ecc_sbe_aggregate_total": 17,
    "ecc_dbe_aggregate_total": 1,
    "retired_pages_sbe": 4,
    "retired_pages_dbe": 1,
    "retired_pages_pending": 0,
    "remapped_rows_correctable": 2,
    "remapped_rows_uncorrectable": 1,
    "remap_pending": 0,
    "remap_failure": 0,
    "nvlink_links_up": 18,
    "nvlink_links_total": 18,
    "nvlink_crc_flit_errors_total": 12,
    "nvlink_crc_data_errors_total": 3,
    "nvlink_replay_errors_total": 6,
    "nvlink_recovery_errors_total": 0,
    # NVML GPM, over the last interval.
    "graphics_active_percent": 98.0,
    "sm_active_percent": 81.5,
    "sm_occupancy_percent": 36.5,
    "tensor_active_percent": 57.0,
    "dram_active_percent": 42.0,
    "fp64_active_percent": 0.0,
    "fp32_active_percent": 9.5,
    "fp16_active_percent": 3.25,
    "nvlink_tx_bytes_per_second": 62_914_560_000.0,
    "nvlink_rx_bytes_per_second": 61_865_984_000.0,
}
# What an H100 SXM does not support: absent, so no sample.
H100_ABSENT = ("fan_percent", "retired_pages_sbe", "retired_pages_dbe", "retired_pages_pending")


def _inventory_entry(index: int) -> dict[str, Any]:
    bus = (0x18, 0x2A)[index]
    return {
        "index": index,
        "uuid": f"GPU-0000000{index}-1111-2222-3333-444444444444",
        "name": "NVIDIA H100 80GB HBM3",
        "pci_bus_id": f"0000:{bus:02x}:00.0",
        "serial": f"165412345678{index}",
        "memory_total_bytes": 80 * GIB,
        "driver_version": "570.124.06",
        "cuda_version": "12.8",
        "power_limit_watts": 700.0,
        "sm_clock_max_mhz": 1980,
        "mem_clock_max_mhz": 2619,
    }


def build_state() -> AgentState:
    """A fixed two-GPU node: GPU 0 reports every field, GPU 1 lacks what an H100 lacks and is throttled."""
    state = AgentState(node="n01")
    state.inventory = [_inventory_entry(0), _inventory_entry(1)]
    gpu1 = {k: v for k, v in FULL_GPU_METRICS.items() if k not in H100_ABSENT}
    gpu1.update({"clock_event_reasons": 0x08 | 0x40, "sm_clock_mhz": 990.0, "temp_gpu_celsius": 88.0})
    state.gpus = {
        0: {
            "gpu": 0,
            "t": START,
            "uuid": state.inventory[0]["uuid"],
            "job": "j7",
            "rank": 0,
            "metrics": dict(FULL_GPU_METRICS),
        },
        1: {"gpu": 1, "t": START, "uuid": state.inventory[1]["uuid"], "job": "j7", "rank": 1, "metrics": gpu1},
    }
    state.host = {
        "cpu_percent": 12.5,
        "load1": 3.25,
        "mem_used_bytes": 200 * GIB,
        "mem_total_bytes": 2048 * GIB,
        "disk_used_bytes": 300 * GIB,
        "disk_total_bytes": 1000 * GIB,
        "net_rx_bytes_total": 987_654_321,
        "net_tx_bytes_total": 123_456_789,
    }
    state.ib_ports = [
        {
            "device": "mlx5_0",
            "port": 1,
            "ib_state": "ACTIVE",
            "ib_rate_gbps": 400.0,
            "ib_link_downed_total": 1,
            "ib_symbol_error_total": 5,
            "ib_rcv_errors_total": 2,
            "ib_link_error_recovery_total": 0,
        },
        {"device": "mlx5_1", "port": 1, "ib_state": "DOWN", "ib_rate_gbps": 10.0, "ib_link_downed_total": 3},
    ]
    state.xid_counts = {(1, 79): 1, (0, 13): 2, (None, 31): 1}
    state.sources = {
        "nvml": SourceStats(last_duration_seconds=0.0125, last_success=True, errors_total=0),
        "host": SourceStats(last_duration_seconds=0.002, last_success=False, errors_total=4),
    }
    state.sample_wall_seconds_last = 0.031
    state.sample_cpu_seconds_last = 0.012
    state.samples_total = 42
    state.spool_bytes = 65536
    state.spool_batches = 3
    state.spool_dropped_batches_total = 1
    state.collector_connected = True
    state.collector_entry, state.collector_address = "collectors.example.internal:9470", "10.0.0.9:9470"
    state.nvml_available = True
    return state


# ---- helpers ------------------------------------------------------------------------------------


class Scraper:
    """A running MetricsServer and a way to GET from it."""

    def __init__(self, server: MetricsServer) -> None:
        self.server = server

    def get(self, path: str = "/metrics", headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.server.port}{path}", headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def text(self) -> str:
        status, _, body = self.get()
        assert status == 200
        return body.decode()


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[MetricsServer] = []

    def start(state: AgentState, dcgm_names: bool = False) -> Scraper:
        server = MetricsServer(state, "127.0.0.1", 0, dcgm_names=dcgm_names)
        server.start()
        servers.append(server)
        return Scraper(server)

    yield start
    for server in servers:
        server.stop()


def series(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value, as prometheus_client's parser reads the exposition."""
    out: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in out, f"duplicate series {key}"
            out[key] = sample.value
    return out


def gpu_labels(state: AgentState, index: int) -> dict[str, str]:
    return {"node": state.node, "gpu": str(index), "uuid": state.gpus[index]["uuid"]}


def dcgm_labels(state: AgentState, index: int) -> dict[str, str]:
    entry = state.inventory[index]
    domain, rest = entry["pci_bus_id"].split(":", 1)
    return {
        "gpu": str(index),
        "UUID": entry["uuid"],
        "pci_bus_id": f"{int(domain, 16):08X}:{rest.upper()}",
        "device": f"nvidia{index}",
        "modelName": entry["name"],
        "Hostname": state.node,
        "DCGM_FI_DRIVER_VERSION": entry["driver_version"],
    }


def lookup(found: dict, name: str, labels: dict[str, str]) -> float | None:
    return found.get((name, frozenset(labels.items())))


def names_with_label(found: dict, label: str, value: str) -> set[str]:
    return {name for name, labels in found if (label, value) in labels}


# ---- the tables ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "fields"),
    [(GPU_METRICS, wire.GPU_FIELDS), (HOST_METRICS, wire.HOST_FIELDS), (IB_METRICS, wire.IB_FIELDS)],
    ids=["gpu", "host", "ib"],
)
def test_every_canonical_field_is_in_its_table_exactly_once(table, fields):
    canonical = [spec.canonical for spec in table]
    assert sorted(canonical) == sorted(fields)
    assert len(canonical) == len(set(canonical))


def test_metric_names_follow_prometheus_conventions():
    specs = GPU_METRICS + HOST_METRICS + IB_METRICS
    names = [spec.name for spec in specs]
    assert len(names) == len(set(names))
    for table, prefix in (
        (GPU_METRICS, "fleetwatch_gpu_"),
        (HOST_METRICS, "fleetwatch_host_"),
        (IB_METRICS, "fleetwatch_ib_"),
    ):
        for spec in table:
            assert re.fullmatch(r"[a-z][a-z0-9_]*", spec.name), spec.name
            assert spec.name.startswith(prefix), spec.name
            # Counters, and only counters, end in _total; units are base units, never the canonical ones.
            assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
            assert not re.search(r"_(percent|mhz|gbps|milli\w*|kilo\w*)(_|$)", spec.name), spec.name
            assert spec.help and spec.help.endswith("."), spec.name


def test_units_are_scaled_to_base_units():
    by_canonical = {spec.canonical: spec for spec in GPU_METRICS}
    assert by_canonical["sm_clock_mhz"].convert(1980.0) == 1_980_000_000
    assert by_canonical["gpu_util_percent"].convert(97.0) == 0.97
    assert by_canonical["fan_percent"].convert(35) == 0.35
    assert by_canonical["temp_gpu_celsius"].convert(61.0) == 61.0
    ib = {spec.canonical: spec for spec in IB_METRICS}
    assert ib["ib_rate_gbps"].convert(400.0) == 50_000_000_000  # 400 Gb/s in bytes/s


def test_dcgm_table_reads_canonical_fields_under_unique_dcgm_names():
    names = [spec.name for spec in DCGM_METRICS]
    assert len(names) == len(set(names))
    for spec in DCGM_METRICS:
        assert re.fullmatch(r"DCGM_FI_(DEV|PROF)_[A-Z0-9_]+", spec.name), spec.name
        assert spec.type in ("gauge", "counter")
        assert set(spec.fields) <= set(wire.GPU_FIELDS), spec.name
    # The series of dcgm-exporter's default counters file that we can feed.
    assert {
        "DCGM_FI_DEV_SM_CLOCK",
        "DCGM_FI_DEV_MEM_CLOCK",
        "DCGM_FI_DEV_MEMORY_TEMP",
        "DCGM_FI_DEV_GPU_TEMP",
        "DCGM_FI_DEV_POWER_USAGE",
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "DCGM_FI_DEV_PCIE_TX_THROUGHPUT",
        "DCGM_FI_DEV_PCIE_RX_THROUGHPUT",
        "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_MEM_COPY_UTIL",
        "DCGM_FI_DEV_FB_FREE",
        "DCGM_FI_DEV_FB_USED",
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
        "DCGM_FI_DEV_ROW_REMAP_FAILURE",
        # The profiling fields, from NVML GPM (dashboard 12239's Tensor Core panel, NVLink panels).
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
        "DCGM_FI_PROF_SM_ACTIVE",
        "DCGM_FI_PROF_SM_OCCUPANCY",
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
        "DCGM_FI_PROF_DRAM_ACTIVE",
        "DCGM_FI_PROF_PCIE_TX_BYTES",
        "DCGM_FI_PROF_PCIE_RX_BYTES",
        "DCGM_FI_PROF_NVLINK_TX_BYTES",
        "DCGM_FI_PROF_NVLINK_RX_BYTES",
    } <= set(names)


# ---- what a scrape shows ------------------------------------------------------------------------


def test_every_present_field_appears_under_its_name_with_its_scaled_value(serve):
    state = build_state()
    found = series(serve(state).text())
    for spec in GPU_METRICS:
        value = FULL_GPU_METRICS[spec.canonical]
        sample = spec.name  # counters keep their _total sample name
        assert lookup(found, sample, gpu_labels(state, 0)) == pytest.approx(spec.convert(value)), spec.name
    host = {"node": "n01"}
    for spec in HOST_METRICS:
        assert lookup(found, spec.name, host) == pytest.approx(spec.convert(state.host[spec.canonical])), spec.name
    port = {"node": "n01", "device": "mlx5_0", "port": "1"}
    for spec in IB_METRICS:
        if spec.kind == "state":
            continue
        assert lookup(found, spec.name, port) == pytest.approx(spec.convert(state.ib_ports[0][spec.canonical]))
    # Spot checks of the scaling, spelled out.
    assert lookup(found, "fleetwatch_gpu_sm_clock_hertz", gpu_labels(state, 0)) == 1.98e9
    assert lookup(found, "fleetwatch_gpu_utilization_ratio", gpu_labels(state, 0)) == 0.97
    assert lookup(found, "fleetwatch_gpu_temperature_celsius", gpu_labels(state, 0)) == 61.0
    assert lookup(found, "fleetwatch_gpu_memory_temperature_celsius", gpu_labels(state, 0)) == 52.0
    assert lookup(found, "fleetwatch_gpu_energy_joules_total", gpu_labels(state, 0)) == pytest.approx(123_456_789.012)
    assert lookup(found, "fleetwatch_host_cpu_utilization_ratio", host) == 0.125


def test_counters_are_typed_counter_and_gauges_gauge(serve):
    text = serve(build_state()).text()
    assert "# TYPE fleetwatch_gpu_energy_joules_total counter" in text
    assert "# TYPE fleetwatch_gpu_xid_errors_total counter" in text
    assert "# TYPE fleetwatch_host_network_receive_bytes_total counter" in text
    assert "# TYPE fleetwatch_gpu_power_watts gauge" in text
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    for spec in GPU_METRICS + HOST_METRICS:
        expected = "counter" if spec.kind == "counter" else "gauge"
        assert families[spec.name.removesuffix("_total") if expected == "counter" else spec.name] == expected


def test_an_absent_field_has_no_sample_not_zero(serve):
    state = build_state()
    found = series(serve(state, dcgm_names=True).text())
    for canonical in H100_ABSENT:
        name = next(spec.name for spec in GPU_METRICS if spec.canonical == canonical)
        assert lookup(found, name, gpu_labels(state, 1)) is None, name
        assert lookup(found, name, gpu_labels(state, 0)) is not None, name
    assert lookup(found, "DCGM_FI_DEV_FAN_SPEED", dcgm_labels(state, 1)) is None
    assert lookup(found, "DCGM_FI_DEV_FAN_SPEED", dcgm_labels(state, 0)) == 35.0
    # The second IB port has no symbol counter: no sample for it.
    assert lookup(found, "fleetwatch_ib_symbol_errors_total", {"node": "n01", "device": "mlx5_1", "port": "1"}) is None


def test_a_gpu_removed_from_state_disappears_from_the_output(serve):
    state = build_state()
    scraper = serve(state, dcgm_names=True)
    before = series(scraper.text())
    sampled = {"fleetwatch_gpu_power_watts", "fleetwatch_gpu_clock_event_reason", "DCGM_FI_DEV_GPU_TEMP"}
    assert sampled <= names_with_label(before, "gpu", "1")
    with state.lock:
        del state.gpus[1]
    after = series(scraper.text())
    # Only identity and the XIDs (XID 79 is what removes a GPU) stay for it.
    assert names_with_label(after, "gpu", "1") == {
        "fleetwatch_gpu_info",
        "fleetwatch_gpu_xid_errors_total",
        "fleetwatch_gpu_xids_total",
        "DCGM_FI_DEV_XID_ERRORS",
    }
    assert "fleetwatch_gpu_power_watts" in names_with_label(after, "gpu", "0")


def test_clock_event_reasons_as_bitmask_and_one_series_per_named_bit(serve):
    state = build_state()
    found = series(serve(state).text())
    assert lookup(found, "fleetwatch_gpu_clock_event_reasons", gpu_labels(state, 1)) == 0x48
    bits = {
        reason: lookup(found, "fleetwatch_gpu_clock_event_reason", {**gpu_labels(state, 1), "reason": reason})
        for _, reason in CLOCK_EVENT_REASONS
    }
    assert bits == {
        reason: (1.0 if reason in ("hw_slowdown", "hw_thermal_slowdown") else 0.0) for _, reason in CLOCK_EVENT_REASONS
    }
    assert lookup(found, "fleetwatch_gpu_clock_event_reason", {**gpu_labels(state, 0), "reason": "sw_power_cap"}) == 1


def test_xid_counter_per_gpu_and_code(serve):
    state = build_state()
    scraper = serve(state)
    found = series(scraper.text())
    assert lookup(found, "fleetwatch_gpu_xid_errors_total", {**gpu_labels(state, 0), "xid": "13"}) == 2
    assert lookup(found, "fleetwatch_gpu_xid_errors_total", {**gpu_labels(state, 1), "xid": "79"}) == 1
    # An XID the kernel log could not tie to a GPU.
    assert lookup(found, "fleetwatch_gpu_xid_errors_total", {"node": "n01", "gpu": "", "uuid": "", "xid": "31"}) == 1
    state.count_xid(0, 13)
    found = series(scraper.text())
    assert lookup(found, "fleetwatch_gpu_xid_errors_total", {**gpu_labels(state, 0), "xid": "13"}) == 3
    # All codes together, per GPU.
    assert lookup(found, "fleetwatch_gpu_xids_total", gpu_labels(state, 0)) == 3
    assert lookup(found, "fleetwatch_gpu_xids_total", gpu_labels(state, 1)) == 1
    assert lookup(found, "fleetwatch_gpu_xids_total", {"node": "n01", "gpu": "", "uuid": ""}) == 1


def test_every_gpu_has_an_xid_total_at_zero_before_its_first_xid(serve):
    # A series that first appears at 1 is invisible to increase(): the first XID would fire no rule.
    state = build_state()
    state.xid_counts = {}
    scraper = serve(state)
    found = series(scraper.text())
    for index in (0, 1):
        assert lookup(found, "fleetwatch_gpu_xids_total", gpu_labels(state, index)) == 0
    assert lookup(found, "fleetwatch_gpu_xids_total", {"node": "n01", "gpu": "", "uuid": ""}) == 0
    assert "fleetwatch_gpu_xid_errors_total" not in {name for name, _ in found}
    state.count_xid(1, 79)
    assert lookup(series(scraper.text()), "fleetwatch_gpu_xids_total", gpu_labels(state, 1)) == 1


def test_gpu_info_from_the_inventory(serve):
    state = build_state()
    found = series(serve(state).text())
    entry = state.inventory[1]
    labels = {
        "node": "n01",
        "gpu": "1",
        "uuid": entry["uuid"],
        "name": "NVIDIA H100 80GB HBM3",
        "pci_bus_id": "0000:2a:00.0",
        "serial": entry["serial"],
        "driver_version": "570.124.06",
        "cuda_version": "12.8",
    }
    assert lookup(found, "fleetwatch_gpu_info", labels) == 1
    assert sum(1 for name, _ in found if name == "fleetwatch_gpu_info") == 2


def test_job_and_rank_are_never_labels(serve):
    state = build_state()
    text = serve(state, dcgm_names=True).text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert not {"job", "rank", "pid"} & set(sample.labels), sample
    assert "j7" not in text


def test_host_and_infiniband_ports(serve):
    state = build_state()
    found = series(serve(state).text())
    active = {"node": "n01", "device": "mlx5_0", "port": "1"}
    down = {"node": "n01", "device": "mlx5_1", "port": "1"}
    assert lookup(found, "fleetwatch_ib_port_up", active) == 1
    assert lookup(found, "fleetwatch_ib_port_up", down) == 0
    assert lookup(found, "fleetwatch_ib_port_state", {**active, "state": "ACTIVE"}) == 1
    assert lookup(found, "fleetwatch_ib_port_state", {**down, "state": "DOWN"}) == 1
    assert lookup(found, "fleetwatch_ib_port_rate_bytes_per_second", active) == 5e10
    assert lookup(found, "fleetwatch_ib_link_downed_total", down) == 3
    assert lookup(found, "fleetwatch_host_load1", {"node": "n01"}) == 3.25
    assert lookup(found, "fleetwatch_host_memory_total_bytes", {"node": "n01"}) == 2048 * GIB


def test_agent_health(serve):
    state = build_state()
    found = series(serve(state).text())
    assert lookup(found, "fleetwatch_agent_sample_duration_seconds", {}) == 0.031
    assert lookup(found, "fleetwatch_agent_sample_cpu_seconds", {}) == 0.012
    assert lookup(found, "fleetwatch_agent_samples_total", {}) == 42
    assert lookup(found, "fleetwatch_agent_spool_bytes", {}) == 65536
    assert lookup(found, "fleetwatch_agent_spool_batches", {}) == 3
    assert lookup(found, "fleetwatch_agent_spool_dropped_batches_total", {}) == 1
    assert lookup(found, "fleetwatch_agent_collector_connected", {}) == 1
    collector = {"collector": "collectors.example.internal:9470", "address": "10.0.0.9:9470"}
    assert lookup(found, "fleetwatch_agent_collector_info", collector) == 1
    assert lookup(found, "fleetwatch_agent_nvml_available", {}) == 1
    assert lookup(found, "fleetwatch_agent_source_duration_seconds", {"source": "nvml"}) == 0.0125
    assert lookup(found, "fleetwatch_agent_source_success", {"source": "nvml"}) == 1
    assert lookup(found, "fleetwatch_agent_source_success", {"source": "host"}) == 0
    assert lookup(found, "fleetwatch_agent_source_errors_total", {"source": "host"}) == 4
    assert lookup(found, "fleetwatch_agent_build_info", {"version": metrics.AGENT_VERSION}) == 1


def test_host_only_agent_exports_health_and_host_without_gpu_series(serve):
    state = AgentState(node="cpu-01")
    state.host = {"cpu_percent": 50.0}
    found = series(serve(state, dcgm_names=True).text())
    assert lookup(found, "fleetwatch_agent_nvml_available", {}) == 0
    assert lookup(found, "fleetwatch_host_cpu_utilization_ratio", {"node": "cpu-01"}) == 0.5
    assert not [name for name, _ in found if name.startswith(("fleetwatch_gpu_", "DCGM_"))]


# ---- DCGM exporter names ------------------------------------------------------------------------


def test_dcgm_names_only_when_asked(serve):
    state = build_state()
    assert "DCGM_" not in serve(state).text()
    assert "DCGM_FI_DEV_GPU_UTIL{" in serve(state, dcgm_names=True).text()


def test_dcgm_names_in_dcgm_units_and_labels(serve):
    state = build_state()
    text = serve(state, dcgm_names=True).text()
    found = series(text)
    labels = dcgm_labels(state, 0)
    assert labels["pci_bus_id"] == "00000000:18:00.0"
    m = FULL_GPU_METRICS
    expected_gauges = {
        "DCGM_FI_DEV_GPU_UTIL": 97.0,  # percent, not a ratio
        "DCGM_FI_DEV_MEM_COPY_UTIL": 41.0,
        "DCGM_FI_DEV_FB_USED": 71_000,  # MiB, floored as DCGM does
        "DCGM_FI_DEV_FB_TOTAL": 81_920,
        "DCGM_FI_DEV_FB_FREE": (m["mem_total_bytes"] - m["mem_used_bytes"]) // MIB,
        "DCGM_FI_DEV_GPU_TEMP": 61.0,
        "DCGM_FI_DEV_MEMORY_TEMP": 52.0,
        "DCGM_FI_DEV_SLOWDOWN_TEMP": 87.0,
        "DCGM_FI_DEV_SHUTDOWN_TEMP": 92.0,
        "DCGM_FI_DEV_POWER_USAGE": 655.25,  # W
        "DCGM_FI_DEV_ENFORCED_POWER_LIMIT": 700.0,
        "DCGM_FI_DEV_SM_CLOCK": 1980.0,  # MHz
        "DCGM_FI_DEV_MAX_SM_CLOCK": 1980.0,
        "DCGM_FI_DEV_MEM_CLOCK": 2619.0,
        "DCGM_FI_DEV_CLOCKS_EVENT_REASONS": 0x04,
        "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS": 0x04,
        "DCGM_FI_DEV_FAN_SPEED": 35.0,
        "DCGM_FI_DEV_PCIE_LINK_GEN": 5,
        "DCGM_FI_DEV_PCIE_MAX_LINK_WIDTH": 16,
        "DCGM_FI_DEV_ROW_REMAP_FAILURE": 0,
        "DCGM_FI_DEV_ROW_REMAP_PENDING": 0,
    }
    for name, value in expected_gauges.items():
        assert f"# TYPE {name} gauge" in text, name
        assert lookup(found, name, labels) == value, name
    expected_counters = {
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": 123_456_789_012,  # mJ
        "DCGM_FI_DEV_PCIE_TX_THROUGHPUT": 2000,  # KB/s of 1024 bytes
        "DCGM_FI_DEV_PCIE_RX_THROUGHPUT": 10_000,
        "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": 3,
        "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL": 2,
        "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL": 1,
        "DCGM_FI_DEV_RETIRED_SBE": 4,
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": 2,
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": 1,
        "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL": 12,
        "DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL": 6,
    }
    for name, value in expected_counters.items():
        # Written under the bare DCGM name, as dcgm-exporter does (no `_total`), so declared untyped:
        # prometheus_client can write a counter only as `<name>_total`.
        assert f"# TYPE {name} untyped\n" in text, name
        assert re.search(rf"^{name}\{{[^}}]*UUID=\"{labels['UUID']}\"[^}}]*\}} ", text, re.M), name
        assert f"{name}_total" not in text, name
        assert lookup(found, name, labels) == value, name


def test_dcgm_series_disappear_with_the_field(serve):
    state = build_state()
    with state.lock:
        del state.gpus[0]["metrics"]["mem_total_bytes"]
    found = series(serve(state, dcgm_names=True).text())
    labels = dcgm_labels(state, 0)
    # FB_FREE needs the total too; FB_USED does not.
    assert lookup(found, "DCGM_FI_DEV_FB_FREE", labels) is None
    assert lookup(found, "DCGM_FI_DEV_FB_TOTAL", labels) is None
    assert lookup(found, "DCGM_FI_DEV_FB_USED", labels) == 71_000


# ---- from a real sampling cycle -----------------------------------------------------------------


def test_a_cycle_of_the_simulated_node(serve):
    node = SimNode("n01", gpu_count=8, start=START, clock=lambda: START + 60.0)
    source = NvmlSource(make_fake_nvml(node), clock=lambda: START + 60.0)
    source.start()
    try:
        gpus, _events = source.sample()
    finally:
        source.close()
    state = AgentState(node="n01", nvml_available=True)
    state.inventory = source.inventory
    state.gpus = {sample["gpu"]: sample for sample in gpus}
    assert len(state.gpus) == 8
    found = series(serve(state, dcgm_names=True).text())
    for index, sample in state.gpus.items():
        labels = gpu_labels(state, index)
        for spec in GPU_METRICS:
            value = sample["metrics"].get(spec.canonical)
            got = lookup(found, spec.name, labels)
            if value is None:
                assert got is None, (index, spec.name)
            else:
                assert got == pytest.approx(spec.convert(value)), (index, spec.name)
        for canonical in H100_ABSENT:
            assert canonical not in sample["metrics"]
        dcgm = dcgm_labels(state, index)
        assert lookup(found, "DCGM_FI_DEV_FB_USED", dcgm) == sample["metrics"]["mem_used_bytes"] // MIB
        assert lookup(found, "DCGM_FI_DEV_SM_CLOCK", dcgm) == sample["metrics"]["sm_clock_mhz"]
        assert lookup(found, "DCGM_FI_DEV_GPU_UTIL", dcgm) == sample["metrics"]["gpu_util_percent"]
    assert sum(1 for name, _ in found if name == "fleetwatch_gpu_info") == 8


# ---- the collector and the server ---------------------------------------------------------------


def test_collect_reads_the_state_under_its_lock():
    state = build_state()
    collector = AgentMetrics(state)
    done = threading.Event()

    def scrape() -> None:
        list(collector.collect())
        done.set()

    with state.lock:
        thread = threading.Thread(target=scrape, daemon=True)
        thread.start()
        assert not done.wait(0.2)
    assert done.wait(5)
    thread.join()


def test_server_gzip_when_asked(serve):
    scraper = serve(build_state())
    assert scraper.server.port > 0
    status, headers, body = scraper.get("/metrics")
    assert status == 200 and "Content-Encoding" not in headers
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    status, headers, body = scraper.get("/metrics", {"Accept-Encoding": "gzip"})
    assert status == 200 and headers.get("Content-Encoding") == "gzip"
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b"fleetwatch_gpu_power_watts" in gzip.decompress(body)


def test_openmetrics_when_asked_is_valid_also_with_dcgm_names(serve):
    # What Prometheus asks for first; a counter sample without `_total` would not parse.
    status, headers, body = serve(build_state(), dcgm_names=True).get(
        "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
    families = {f.name: f for f in openmetrics_families(body.decode())}
    assert families["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"].type == "unknown"
    assert families["fleetwatch_gpu_energy_joules"].type == "counter"


def test_server_listens_on_an_ipv6_literal():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    server = MetricsServer(build_state(), "::1", 0)
    try:
        server.start()
    except OSError as exc:  # the kernel or the container has IPv6 off
        pytest.skip(f"cannot bind ::1: {exc}")
    try:
        with urllib.request.urlopen(f"http://[::1]:{server.port}/metrics", timeout=5) as response:
            assert b"fleetwatch_gpu_power_watts" in response.read()
    finally:
        server.stop()


def test_stop_closes_the_port_and_stop_without_start_returns():
    server = MetricsServer(AgentState(node="n01"), "127.0.0.1", 0)
    server.stop()
    server.start()
    port = server.port
    server.stop()
    server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


# ---- golden file --------------------------------------------------------------------------------


def test_whole_output_matches_the_golden_file(serve, monkeypatch):
    """Regenerate with FLEETWATCH_UPDATE_GOLDEN=1 after a deliberate change, and review the diff."""
    monkeypatch.setattr(metrics, "AGENT_VERSION", "0.0.0-golden")  # a release must not churn the file
    text = serve(build_state(), dcgm_names=True).text()
    if os.environ.get("FLEETWATCH_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_dcgm_xid_errors_is_the_last_xid_of_each_gpu(serve) -> None:
    state = AgentState(node="n01")
    state.gpus = {
        0: {"gpu": 0, "uuid": "GPU-a", "metrics": {"power_watts": 600.0}},
        1: {"gpu": 1, "uuid": "GPU-b", "metrics": {"power_watts": 610.0}},
    }
    state.count_xid(0, 13)
    state.count_xid(0, 31)
    text = serve(state, dcgm_names=True).text()
    samples = {
        s.labels["gpu"]: (s.value, s.labels["err_code"], s.labels["err_msg"])
        for f in text_string_to_metric_families(text)
        if f.name == "DCGM_FI_DEV_XID_ERRORS"
        for s in f.samples
    }
    # Every GPU from the start (0 without an XID), with dcgm-exporter's err_code and err_msg.
    assert samples == {
        "0": (31.0, "31", "GPU memory page fault (usually the application; repeated on one GPU points at the GPU)"),
        "1": (0.0, "0", ""),
    }


# ---- HTTPS and basic auth -----------------------------------------------------------------------

USER = "prometheus"
PASSWORD = "metrics-SENTINEL-93ad"


@pytest.fixture(scope="module")
def server_cert(tmp_path_factory: pytest.TempPathFactory) -> ServerCert:
    return make_server_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def trusted() -> Iterator[Any]:
    """Starts MetricsServers with TLS or basic auth settings on 127.0.0.1, stopped after the test."""
    servers: list[MetricsServer] = []

    def start(**settings: Any) -> MetricsServer:
        server = MetricsServer(build_state(), "127.0.0.1", 0, **settings)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def scrape(url: str, headers: dict[str, str] | None = None, ca_file: Path | None = None) -> tuple[int, dict, bytes]:
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else None
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def tls(cert: ServerCert) -> dict[str, str]:
    return {"tls_cert_file": str(cert.cert_file), "tls_key_file": str(cert.key_file)}


def test_tls_scrape_works_with_the_ca(trusted, server_cert: ServerCert) -> None:
    server = trusted(**tls(server_cert))
    assert server.scheme == "https"
    status, _, body = scrape(f"https://127.0.0.1:{server.port}/metrics", ca_file=server_cert.ca_file)
    assert status == 200 and b"fleetwatch_gpu_power_watts" in body


def test_tls_port_refuses_plain_http_and_keeps_serving(trusted, server_cert: ServerCert) -> None:
    server = trusted(**tls(server_cert))
    with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError)):
        scrape(f"http://127.0.0.1:{server.port}/metrics")
    assert scrape(f"https://127.0.0.1:{server.port}/metrics", ca_file=server_cert.ca_file)[0] == 200


def test_a_client_stuck_before_its_handshake_does_not_stop_other_scrapes(trusted, server_cert: ServerCert) -> None:
    # The handshake runs in the connection's thread: a silent peer holds only that one.
    server = trusted(**tls(server_cert))
    with socket.create_connection(("127.0.0.1", server.port), timeout=5):
        status, _, _ = scrape(f"https://127.0.0.1:{server.port}/metrics", ca_file=server_cert.ca_file)
    assert status == 200


def test_basic_auth_without_credentials_is_401_with_a_challenge(trusted) -> None:
    server = trusted(basic_auth_user=USER, basic_auth_password=PASSWORD)
    status, headers, body = scrape(f"http://127.0.0.1:{server.port}/metrics")
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Basic realm="fleetwatch agent", charset="UTF-8"'
    assert b"fleetwatch_" not in body


@pytest.mark.parametrize(
    "headers",
    [
        basic(USER, "wrong"),
        basic("someone", PASSWORD),
        basic(USER, PASSWORD + "x"),
        {"Authorization": "Basic !!not-base64!!"},
        {"Authorization": f"Bearer {PASSWORD}"},
    ],
    ids=["wrong-password", "wrong-user", "longer", "not-base64", "bearer"],
)
def test_basic_auth_with_wrong_credentials_is_401(trusted, headers: dict[str, str]) -> None:
    server = trusted(basic_auth_user=USER, basic_auth_password=PASSWORD)
    assert scrape(f"http://127.0.0.1:{server.port}/metrics", headers)[0] == 401


def test_basic_auth_with_the_right_credentials_is_200(trusted) -> None:
    server = trusted(basic_auth_user=USER, basic_auth_password=PASSWORD)
    status, headers, body = scrape(f"http://127.0.0.1:{server.port}/metrics", basic(USER, PASSWORD))
    assert status == 200 and b"fleetwatch_gpu_power_watts" in body
    # prometheus_client's app still negotiates: gzip for Prometheus, which asks for it.
    status, headers, body = scrape(
        f"http://127.0.0.1:{server.port}/metrics", {**basic(USER, PASSWORD), "Accept-Encoding": "gzip"}
    )
    assert headers["Content-Encoding"] == "gzip" and b"fleetwatch_gpu_power_watts" in gzip.decompress(body)


def test_tls_and_basic_auth_together(trusted, server_cert: ServerCert) -> None:
    server = trusted(basic_auth_user=USER, basic_auth_password=PASSWORD, **tls(server_cert))
    url = f"https://127.0.0.1:{server.port}/metrics"
    assert scrape(url, ca_file=server_cert.ca_file)[0] == 401
    assert scrape(url, basic(USER, PASSWORD), ca_file=server_cert.ca_file)[0] == 200


def test_an_unloadable_certificate_stops_the_start_naming_the_file(tmp_path: Path, server_cert: ServerCert) -> None:
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not PEM\n")
    server = MetricsServer(
        build_state(), "127.0.0.1", 0, tls_cert_file=str(garbage), tls_key_file=str(server_cert.key_file)
    )
    with pytest.raises(OSError, match=f"cannot load metrics_tls_cert_file {garbage}"):
        server.start()
    server.stop()


def test_the_password_comes_from_its_file_and_is_never_described(tmp_path: Path) -> None:
    (tmp_path / "password").write_text(PASSWORD + "\n")
    env = {
        "FLEETWATCH_METRICS_BASIC_AUTH_USER": USER,
        "FLEETWATCH_METRICS_BASIC_AUTH_PASSWORD_FILE": str(tmp_path / "password"),
    }
    config = load_config(AgentConfig, path=None, env=env)
    assert config.metrics_basic_auth_password.reveal() == PASSWORD
    assert PASSWORD not in str(describe(config))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"FLEETWATCH_METRICS_TLS_CERT_FILE": "/x.crt"},
            "metrics_tls_key_file: must be set with metrics_tls_cert_file",
        ),
        ({"FLEETWATCH_METRICS_TLS_KEY_FILE": "/x.key"}, "metrics_tls_cert_file: must be set with metrics_tls_key_file"),
        (
            {"FLEETWATCH_METRICS_BASIC_AUTH_USER": USER},
            r"metrics_basic_auth_password_file \(or metrics_basic_auth_password\): must be set with "
            "metrics_basic_auth_user",
        ),
        (
            {"FLEETWATCH_METRICS_BASIC_AUTH_PASSWORD": PASSWORD},
            r"metrics_basic_auth_user: must be set with metrics_basic_auth_password_file",
        ),
        (
            {"FLEETWATCH_METRICS_BASIC_AUTH_USER": "a:b", "FLEETWATCH_METRICS_BASIC_AUTH_PASSWORD": PASSWORD},
            "metrics_basic_auth_user: must not contain ':'",
        ),
    ],
)
def test_metrics_trust_settings_come_in_pairs(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        load_config(AgentConfig, path=None, env=env)
    assert PASSWORD not in str(error.value)


def test_dcgm_xid_errors_stays_for_a_gpu_that_fell_off_the_bus(serve) -> None:
    state = build_state()
    state.count_xid(1, 79)
    del state.gpus[1]  # NVML lost it: no more samples, still in the inventory
    found = series(serve(state, dcgm_names=True).text())
    labels = {**dcgm_labels(state, 1), "err_code": "79", "err_msg": "GPU has fallen off the bus"}
    assert lookup(found, "DCGM_FI_DEV_XID_ERRORS", labels) == 79
    assert lookup(found, "DCGM_FI_DEV_GPU_UTIL", dcgm_labels(state, 1)) is None
