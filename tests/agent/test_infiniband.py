"""Tests for the InfiniBand source on the fixture sysfs tree (tests/fixtures/sys, see SOURCE.md)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from fleetwatch.agent.sources import infiniband
from fleetwatch.agent.sources.infiniband import (
    InfinibandSource,
    parse_counter,
    parse_rate_gbps,
    parse_state,
)
from fleetwatch.wire import IB_FIELDS, INTEGER_FIELDS

FIXTURE_SYSFS = Path(__file__).resolve().parent.parent / "fixtures" / "sys"

# What the fixture tree must read as, port by port (values as the files hold them).
EXPECTED_PORTS: list[dict[str, Any]] = [
    {
        "device": "mlx5_0",
        "port": 1,
        "ib_state": "ACTIVE",
        "ib_phys_state": "LinkUp",
        "link_layer": "InfiniBand",
        "ib_rate_gbps": 400.0,
        "ib_link_downed_total": 3,
        "ib_symbol_error_total": 1284,
        "ib_rcv_errors_total": 17,
        "ib_link_error_recovery_total": 2,
    },
    {
        "device": "mlx5_1",
        "port": 1,
        "ib_state": "DOWN",
        "ib_phys_state": "Polling",
        "link_layer": "InfiniBand",
        # A port without a link shows the firmware's default speed; ib_state says it is down.
        "ib_rate_gbps": 10.0,
        "ib_link_downed_total": 1,
        "ib_symbol_error_total": 0,
        "ib_rcv_errors_total": 0,
        "ib_link_error_recovery_total": 0,
    },
    {
        "device": "mlx5_2",
        "port": 1,
        "ib_state": "ACTIVE",
        "ib_phys_state": "LinkUp",
        "link_layer": "Ethernet",
        "ib_rate_gbps": 100.0,
        "ib_link_downed_total": 0,
        "ib_symbol_error_total": 0,
        "ib_rcv_errors_total": 0,
        "ib_link_error_recovery_total": 0,
    },
    {
        "device": "mlx5_3",
        "port": 1,
        "ib_state": "ACTIVE",
        "ib_phys_state": "LinkUp",
        "link_layer": "InfiniBand",
        "ib_rate_gbps": 200.0,
        "ib_link_downed_total": 12,
        # counters/symbol_error is missing on this port: the field is absent, not 0.
        "ib_rcv_errors_total": 65535,  # 16-bit counter, saturated: reported as read
        "ib_link_error_recovery_total": 255,  # 8-bit counter, saturated
    },
]


class ManualClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def sysfs_copy(tmp_path: Path) -> Path:
    """A writable copy of the fixture tree, under a root that is not /sys."""
    root = tmp_path / "host" / "sys"
    shutil.copytree(FIXTURE_SYSFS, root)
    return root


def _add_port(sysfs_root: Path, device: str, files: dict[str, str], port: int = 1) -> Path:
    port_dir = sysfs_root / "class" / "infiniband" / device / "ports" / str(port)
    for rel, text in files.items():
        path = port_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return port_dir


def test_fixture_tree_parses_exactly() -> None:
    assert InfinibandSource(str(FIXTURE_SYSFS)).sample() == EXPECTED_PORTS


def test_fields_are_canonical_with_wire_types() -> None:
    for port in InfinibandSource(str(FIXTURE_SYSFS)).sample():
        assert set(port) <= {"device", "port", "ib_phys_state", "link_layer", *IB_FIELDS}
        for key, value in port.items():
            if key in INTEGER_FIELDS or key == "port":
                assert type(value) is int, key
            elif key == "ib_rate_gbps":
                assert type(value) is float
            else:
                assert type(value) is str, key
    # The fully populated port carries every canonical field.
    assert set(IB_FIELDS) <= set(InfinibandSource(str(FIXTURE_SYSFS)).sample()[0])


def test_missing_or_unreadable_counter_is_absent_never_zero(sysfs_copy: Path) -> None:
    counters = sysfs_copy / "class" / "infiniband" / "mlx5_0" / "ports" / "1" / "counters"
    (counters / "link_downed").unlink()
    # What the kernel writes when the driver has no performance management agent.
    (counters / "port_rcv_errors").write_text("N/A (no PMA)\n")
    # Unreadable (a read fails with an OSError): a directory in the file's place does that
    # even for root, where a chmod would not.
    (counters / "link_error_recovery").unlink()
    (counters / "link_error_recovery").mkdir()
    port = InfinibandSource(str(sysfs_copy)).sample()[0]
    assert "ib_link_downed_total" not in port
    assert "ib_rcv_errors_total" not in port
    assert "ib_link_error_recovery_total" not in port
    assert port["ib_symbol_error_total"] == 1284
    assert port["ib_state"] == "ACTIVE"


def test_port_without_counters_dir_or_rate_keeps_its_state(sysfs_copy: Path) -> None:
    # Intel irdma exposes no counters/ directory at all (node_exporter's procfs skips it too).
    _add_port(
        sysfs_copy,
        "irdma0",
        {"state": "4: ACTIVE", "phys_state": "5: LinkUp", "link_layer": "Ethernet", "rate": "garbage"},
    )
    ports = {p["device"]: p for p in InfinibandSource(str(sysfs_copy)).sample()}
    assert ports["irdma0"] == {
        "device": "irdma0",
        "port": 1,
        "ib_state": "ACTIVE",
        "ib_phys_state": "LinkUp",
        "link_layer": "Ethernet",
    }


def test_no_infiniband_class_dir_gives_empty_list_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock()
    source = InfinibandSource(str(tmp_path), clock=clock)
    with caplog.at_level(logging.DEBUG, logger=infiniband.__name__):
        assert source.sample() == []
        clock.t += 3600.0  # several re-lists, still no driver
        assert source.sample() == []
        assert source.sample() == []
    records = [r for r in caplog.records if r.name == infiniband.__name__]
    assert len(records) == 1
    assert records[0].levelno == logging.DEBUG


def test_sysfs_root_moves_every_read(sysfs_copy: Path) -> None:
    state = sysfs_copy / "class" / "infiniband" / "mlx5_0" / "ports" / "1" / "state"
    state.write_text("2: INIT\n")
    ports = InfinibandSource(str(sysfs_copy) + "/").sample()
    assert ports[0]["ib_state"] == "INIT"
    assert [p["device"] for p in ports] == ["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3"]
    # The fixture tree itself is untouched, and the default root is the machine's /sys.
    assert InfinibandSource(str(FIXTURE_SYSFS)).sample()[0]["ib_state"] == "ACTIVE"
    assert InfinibandSource().class_dir == "/sys/class/infiniband"


def test_new_port_shows_up_after_relist_interval(sysfs_copy: Path) -> None:
    clock = ManualClock()
    source = InfinibandSource(str(sysfs_copy), clock=clock)
    assert len(source.sample()) == 4
    _add_port(
        sysfs_copy,
        "mlx5_4",
        {
            "state": "4: ACTIVE",
            "phys_state": "5: LinkUp",
            "link_layer": "InfiniBand",
            "rate": "400 Gb/sec (4X NDR)",
            "counters/link_downed": "0",
            "counters/symbol_error": "0",
            "counters/port_rcv_errors": "0",
            "counters/link_error_recovery": "0",
        },
    )
    clock.t += 59.0
    assert "mlx5_4" not in [p["device"] for p in source.sample()]
    clock.t += 1.0
    ports = source.sample()
    assert [p["device"] for p in ports] == ["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3", "mlx5_4"]
    assert ports[-1]["ib_rate_gbps"] == 400.0


def test_listing_is_cached_between_relists(sysfs_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = ManualClock()
    source = InfinibandSource(str(sysfs_copy), clock=clock)
    source.sample()
    scans: list[str] = []
    real_scandir = infiniband.os.scandir

    def counting_scandir(path: str) -> Any:
        scans.append(path)
        return real_scandir(path)

    monkeypatch.setattr(infiniband.os, "scandir", counting_scandir)
    clock.t += 30.0
    assert source.sample() == EXPECTED_PORTS
    assert scans == []
    clock.t += 30.0
    source.sample()
    assert scans  # the interval passed: listed again


def test_removed_device_is_dropped_at_once_and_relisted(sysfs_copy: Path) -> None:
    clock = ManualClock()
    source = InfinibandSource(str(sysfs_copy), clock=clock)
    assert len(source.sample()) == 4
    shutil.rmtree(sysfs_copy / "class" / "infiniband" / "mlx5_1")
    clock.t += 1.0
    assert [p["device"] for p in source.sample()] == ["mlx5_0", "mlx5_2", "mlx5_3"]
    # Re-listed on the next cycle, not a minute later: a re-added device comes straight back.
    shutil.copytree(FIXTURE_SYSFS / "class" / "infiniband" / "mlx5_1", sysfs_copy / "class" / "infiniband" / "mlx5_1")
    clock.t += 1.0
    assert source.sample() == EXPECTED_PORTS


@pytest.mark.parametrize(
    ("text", "gbps"),
    [
        ("400 Gb/sec (4X NDR)\n", 400.0),
        ("100 Gb/sec (4X EDR)\n", 100.0),
        ("2.5 Gb/sec (1X SDR)\n", 2.5),
        ("10 Gb/sec (4X)\n", 10.0),  # kernels before SDR was named
        ("56 Gb/sec (4X FDR)\n", 56.0),
        ("800 Gb/sec (4X XDR)\n", 800.0),
        ("N/A\n", None),
        ("", None),
    ],
)
def test_parse_rate_gbps(text: str, gbps: float | None) -> None:
    assert parse_rate_gbps(text) == gbps


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("4: ACTIVE\n", "ACTIVE"),
        ("1: DOWN\n", "DOWN"),
        ("5: LinkUp\n", "LinkUp"),
        ("7: Phy Test\n", "Phy Test"),
        ("ACTIVE\n", "ACTIVE"),
    ],
)
def test_parse_state(text: str, name: str) -> None:
    assert parse_state(text) == name


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("0\n", 0),
        ("65535\n", 65535),
        ("18446744073709551615\n", 2**64 - 1),
        ("N/A (no PMA)\n", None),
        ("-1\n", None),
        ("\n", None),
    ],
)
def test_parse_counter(text: str, count: int | None) -> None:
    assert parse_counter(text) == count
