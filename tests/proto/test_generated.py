"""The committed gRPC modules must match what `make proto` generates from the .proto today."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


# The wire contract, the kubelet's pod-resources API the agent reads, and Prometheus's remote-write
# messages the collector sends (both vendored).
@pytest.mark.parametrize(
    "proto",
    [
        "fleetwatch/v1/telemetry.proto",
        "fleetwatch/kubelet/podresources/v1/api.proto",
        "fleetwatch/prompb/types.proto",
        "fleetwatch/prompb/remote.proto",
    ],
)
def test_generated_modules_are_current(tmp_path: Path, proto: str) -> None:
    pytest.importorskip("grpc_tools")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(ROOT / "proto" / proto),
        ],
        check=True,
        timeout=120,
    )
    folder, stem = proto.rsplit("/", 1)[0], proto.rsplit("/", 1)[1].removesuffix(".proto")
    generated = (f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py")
    stale = [
        name
        for name in generated
        if (tmp_path / folder / name).read_text() != (ROOT / "proto" / folder / name).read_text()
    ]
    assert not stale, f"generated modules out of date with {proto}: {stale}; run `make proto` and commit"


def test_canonical_names_match_design() -> None:
    from fleetwatch.agent.sources.gpm import GPM_FIELDS
    from fleetwatch.wire import GPU_FIELDS, HOST_FIELDS, IB_FIELDS

    design_gpu = [
        "gpu_util_percent",
        "mem_util_percent",
        "mem_used_bytes",
        "mem_total_bytes",
        "temp_gpu_celsius",
        "temp_mem_celsius",
        "temp_slowdown_celsius",
        "power_watts",
        "power_limit_watts",
        "energy_joules",
        "sm_clock_mhz",
        "sm_clock_max_mhz",
        "mem_clock_mhz",
        "clock_event_reasons",
        "fan_percent",
        "pcie_replay_total",
        "pcie_tx_bytes_per_second",
        "pcie_rx_bytes_per_second",
        "pcie_link_gen",
        "pcie_link_gen_max",
        "pcie_link_width",
        "pcie_link_width_max",
        "ecc_sbe_volatile_total",
        "ecc_dbe_volatile_total",
        "ecc_sbe_aggregate_total",
        "ecc_dbe_aggregate_total",
        "retired_pages_sbe",
        "retired_pages_dbe",
        "retired_pages_pending",
        "remapped_rows_correctable",
        "remapped_rows_uncorrectable",
        "remap_pending",
        "remap_failure",
        "nvlink_links_up",
        "nvlink_links_total",
        "nvlink_crc_flit_errors_total",
        "nvlink_crc_data_errors_total",
        "nvlink_replay_errors_total",
        "nvlink_recovery_errors_total",
    ]
    assert set(design_gpu) <= set(GPU_FIELDS)
    # Beyond DESIGN.md's list: the shutdown threshold and the NVML GPM fields (agent/sources/gpm.py).
    assert set(GPU_FIELDS) - set(design_gpu) == {"temp_shutdown_celsius", *GPM_FIELDS}
    assert HOST_FIELDS == (
        "cpu_percent",
        "load1",
        "mem_used_bytes",
        "mem_total_bytes",
        "disk_used_bytes",
        "disk_total_bytes",
        "net_rx_bytes_total",
        "net_tx_bytes_total",
    )
    assert IB_FIELDS == (
        "ib_state",
        "ib_rate_gbps",
        "ib_link_downed_total",
        "ib_symbol_error_total",
        "ib_rcv_errors_total",
        "ib_link_error_recovery_total",
    )
