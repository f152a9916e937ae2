"""`fleetwatch-agent --once --json`: one JSON object with everything a cycle sees, on any machine."""

import json
import os
import subprocess
import sys
from pathlib import Path

from fleetwatch.agent.sources.gpm import GPM_FIELDS
from fleetwatch.wire import GPU_FIELDS, INTEGER_FIELDS

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def run_once(*extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWATCH_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleetwatch.agent.main",
            "--config",
            "/dev/null",
            "--once",
            "--json",
            "--simulate",
            "--sysfs-root",
            str(FIXTURES / "sys"),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_once_json_has_inventory_gpus_host_infiniband_and_kernel_xids() -> None:
    result = run_once(
        "--kmsg-path", str(FIXTURES / "kmsg" / "dmesg-T.txt"), "--collector-address", "c1.example:9470,c2.example:9470"
    )
    assert result["nvml_available"] is True
    assert result["collector_address"] == ["c1.example:9470", "c2.example:9470"]
    assert len(result["inventory"]) == 8 and len(result["gpus"]) == 8
    assert {g["name"] for g in result["inventory"]} == {"NVIDIA H100 80GB HBM3"}
    assert result["host"]["mem_total_bytes"] > 0
    assert any(p["ib_state"] == "ACTIVE" for p in result["infiniband"])
    xids = [e for e in result["events"] if e["kind"] == "xid"]
    assert xids and all(e["source"] == "kmsg" and e["xid"] > 0 for e in xids)
    assert all(s["success"] for s in result["sources"].values())


def test_every_field_is_present_with_its_type_or_listed_unsupported() -> None:
    result = run_once("--kmsg-path", "")
    for gpu in result["gpus"]:
        metrics = gpu["metrics"]
        unsupported = set(result["unsupported"].get(str(gpu["gpu"]), []))
        assert not unsupported & set(metrics), "a field is both reported and unsupported"
        # One cycle: no rates over two reads yet (the PCIe byte counters, GPM).
        rates = {"pcie_tx_bytes_per_second", "pcie_rx_bytes_per_second", *GPM_FIELDS}
        assert set(metrics) | unsupported >= set(GPU_FIELDS) - rates
        for name, value in metrics.items():
            assert isinstance(value, int if name in INTEGER_FIELDS else (int, float)), (name, value)
        # what an H100 SXM board does not have (nvidia-smi shows N/A): absent, not 0
        assert {"fan_percent", "retired_pages_sbe", "retired_pages_dbe", "retired_pages_pending"} <= unsupported


def test_once_without_json_is_readable() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWATCH_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleetwatch.agent.main",
            "--config",
            "/dev/null",
            "--once",
            "--simulate",
            "--sim-gpus",
            "2",
            "--kmsg-path",
            "",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "GPU 0 GPU-" in proc.stdout and "not supported: " in proc.stdout and "host: " in proc.stdout
