"""fleetwatchctl as an operator uses it: detect over a replay file, status and alerts from a collector."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fleetwatch.agent.sources.kmsg import replay_events
from fleetwatch.ctl.main import main


def run_ctl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fleetwatch.ctl.main", *args], capture_output=True, text=True, input=stdin, timeout=60
    )


def test_detect_replay_of_one_xid_79_prints_one_finding(tmp_path: Path) -> None:
    file = tmp_path / "one.jsonl"
    file.write_text(
        json.dumps(
            {
                "t": 1700000000.4,
                "kind": "xid",
                "node": "n01",
                "gpu": 3,
                "pci_bus_id": "0000:9b:00",
                "xid": 79,
                "message": "GPU has fallen off the bus.",
            }
        )
        + "\n"
    )
    proc = run_ctl("detect", "--replay", str(file))
    assert proc.returncode == 0, proc.stderr
    findings = [json.loads(line) for line in proc.stdout.splitlines()]
    xid = [f for f in findings if f["detector"] == "xid"]
    assert len(xid) == 1
    f = xid[0]
    assert (f["severity"], f["action"], f["node"], f["gpu"], f["start"], f["end"]) == (
        "critical",
        "reboot",
        "n01",
        3,
        1700000000.4,
        None,
    )
    assert list(f) == [
        "detector",
        "severity",
        "action",
        "node",
        "gpu",
        "uuid",
        "pci_bus_id",
        "serial",
        "model",
        "job",
        "rank",
        "start",
        "end",
        "summary",
        "evidence",
    ]
    assert f["evidence"]["xid"] == 79 and "fallen off the bus" in f["summary"]


def test_detect_reads_stdin_and_reports_bad_lines() -> None:
    proc = run_ctl(
        "detect", "--replay", "-", stdin='{"t": 1, "kind": "xid", "node": "n1", "gpu": 0, "xid": 13}\nnot json\n'
    )
    assert proc.returncode == 1
    assert "line 2" in proc.stderr


def test_detect_missing_file_is_a_clear_error(capsys) -> None:
    assert main(["detect", "--replay", "/nonexistent/file.jsonl"]) == 1
    assert "No such file" in capsys.readouterr().err


def test_status_without_collector_says_how_to_point_at_one(capsys) -> None:
    assert main(["--collector", "http://127.0.0.1:9", "status"]) == 1
    assert "cannot reach the collector" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["status", "alerts", "detect", "demo"])
def test_help(command: str) -> None:
    proc = run_ctl(command, "--help")
    assert proc.returncode == 0 and "usage:" in proc.stdout


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "kmsg"


KMSG_FORMATS = ["dmesg.txt", "dmesg-T.txt", "dmesg-iso.txt", "journalctl-k.txt", "kmsg-raw.txt"]


@pytest.mark.parametrize("name", KMSG_FORMATS)
def test_every_kernel_log_format_gives_its_xids(name: str) -> None:
    # Each format's lines as `detect --kmsg` reads them; the CLI's detection runs below on one of them
    # (a replay holds each XID for a day of simulated seconds: seconds of CPU a run).
    events = replay_events((FIXTURES / name).read_text().splitlines(), "n17", boot_time=1_700_000_000.0)
    assert events and all(e.kind == "xid" and e.node == "n17" and e.pci_bus_id for e in events)
    assert 79 in {e.xid for e in events}
    assert min(e.t for e in events) > 1_000_000_000  # wall-clock times, from the line or --boot-time


def test_detect_kmsg_turns_a_kernel_log_into_xid_findings() -> None:
    proc = run_ctl("detect", "--kmsg", str(FIXTURES / KMSG_FORMATS[0]), "--node", "n17", "--boot-time", "1700000000")
    assert proc.returncode == 0, proc.stderr
    findings = [json.loads(line) for line in proc.stdout.splitlines()]
    assert findings and {f["detector"] for f in findings} == {"xid"}
    assert all(f["node"] == "n17" for f in findings)
    by_xid = {f["evidence"]["xid"]: f for f in findings}
    assert (by_xid[79]["severity"], by_xid[79]["action"]) == ("critical", "reboot")
    assert by_xid[79]["summary"] == "XID 79: GPU has fallen off the bus"


def test_detect_kmsg_from_stdin_counts_repeats() -> None:
    text = (FIXTURES / "dmesg.txt").read_text()
    proc = run_ctl("detect", "--kmsg", "-", stdin=text)
    assert proc.returncode == 0, proc.stderr
    counts = [json.loads(line)["evidence"]["count"] for line in proc.stdout.splitlines()]
    assert max(counts) > 1  # a burst of the same XID on one GPU is one finding with its count
