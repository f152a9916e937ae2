"""`fleetwatchctl detect --kmsg` names the board of every XID: its PCI bus id always, its UUID where
the log says it, its index, serial and model with --inventory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FIXTURE = Path(__file__).parents[1] / "fixtures" / "kmsg" / "multi-gpu-node.txt"
UUID_18 = "GPU-2086cea6-1668-6969-eb8c-c4d96a0678a3"
UUID_9B = "GPU-4e391288-897c-ba5d-6944-dfbea55ebcfa"


def detect(*args: str) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "fleetwatch.ctl.main", "detect", "--kmsg", str(FIXTURE), "--node", "gpu-node-17", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def _by_board(findings: list[dict]) -> dict[tuple[str, int], dict]:
    return {(f["pci_bus_id"], f["evidence"]["xid"]): f for f in findings if f["detector"] == "xid"}


def test_each_xid_keeps_its_boards_pci_bus_id_and_the_logs_uuid() -> None:
    findings = _by_board(detect())
    # Two boards' XID 94 stay two findings: the bus id tells them apart without an index.
    assert set(findings) == {("0000:9b:00.0", 119), ("0000:18:00.0", 94), ("0000:cb:00.0", 94), ("0000:cb:00.0", 13)}
    assert findings[("0000:9b:00.0", 119)]["uuid"] == UUID_9B
    assert findings[("0000:18:00.0", 94)]["uuid"] == UUID_18
    assert findings[("0000:cb:00.0", 94)]["uuid"] is None  # the log never says which board that is
    assert all(f["gpu"] is None and f["serial"] is None for f in findings.values())


def test_with_an_inventory_each_finding_names_index_serial_and_model(tmp_path: Path) -> None:
    inventory = tmp_path / "gpus.csv"
    inventory.write_text(
        "index, uuid, pci.bus_id, serial, name\n"
        f"0, {UUID_18}, 00000000:18:00.0, 1654922012345, NVIDIA H100 80GB HBM3\n"
        f"4, {UUID_9B}, 00000000:9B:00.0, 1654922012349, NVIDIA H100 80GB HBM3\n"
        "7, GPU-77777777-897c-ba5d-6944-dfbea55ebcfa, 00000000:CB:00.0, 1654922012352, NVIDIA H100 80GB HBM3\n"
    )
    findings = _by_board(detect("--inventory", str(inventory)))
    named = {key: (f["gpu"], f["serial"], f["model"]) for key, f in findings.items()}
    assert named == {
        ("0000:9b:00.0", 119): (4, "1654922012349", "NVIDIA H100 80GB HBM3"),
        ("0000:18:00.0", 94): (0, "1654922012345", "NVIDIA H100 80GB HBM3"),
        ("0000:cb:00.0", 94): (7, "1654922012352", "NVIDIA H100 80GB HBM3"),
        ("0000:cb:00.0", 13): (7, "1654922012352", "NVIDIA H100 80GB HBM3"),
    }
    assert findings[("0000:cb:00.0", 94)]["uuid"] == "GPU-77777777-897c-ba5d-6944-dfbea55ebcfa"


def test_an_unreadable_inventory_is_one_line_and_exit_1(tmp_path: Path) -> None:
    bad = tmp_path / "gpus.txt"
    bad.write_text("not an inventory\n")
    proc = subprocess.run(
        [sys.executable, "-m", "fleetwatch.ctl.main", "detect", "--kmsg", str(FIXTURE), "--inventory", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "no GPU with a UUID or PCI bus id" in proc.stderr
