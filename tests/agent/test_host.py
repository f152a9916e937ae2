"""Tests for the host source: canonical fields here, on a fake procfs tree, and the boot id."""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from pathlib import Path

import psutil
import pytest

from fleetwatch.agent.sources.host import HostSource, _is_loopback
from fleetwatch.wire import HOST_FIELDS, INTEGER_FIELDS

FIXTURE_PROCFS = Path(__file__).resolve().parent.parent / "fixtures" / "proc"
FIXTURE_BOOT_ID = "8f3c2a91-5d4e-4b7a-9c1f-2e6d0a4b7c35"

# Trimmed from a real /proc/meminfo; psutil needs MemTotal, MemFree, MemAvailable and friends.
MEMINFO = """\
MemTotal:       16384000 kB
MemFree:         2048000 kB
MemAvailable:   12288000 kB
Buffers:          512000 kB
Cached:          8192000 kB
SwapCached:            0 kB
Active:          6144000 kB
Inactive:        5120000 kB
Shmem:            256000 kB
Slab:             768000 kB
SReclaimable:     512000 kB
SUnreclaim:       256000 kB
"""
NET_DEV = """\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 7000000    7000    0    0    0     0          0         0  7000000    7000    0    0    0     0       0          0
  eth0: 5000000000 4000000    0    0    0     0          0      1200 3000000000 2500000    0    0    0     0       0          0
   ib0: 900000000000 600000000    0    0    0     0          0         0 800000000000 550000000    0    0    0     0       0          0
"""
# user nice system idle iowait irq softirq steal guest guest_nice, in clock ticks
STAT_BEFORE = "cpu  1000 0 500 8000 500 0 0 0 0 0\nbtime 1700000000\n"
# +600 user (of which +200 guest, already inside user), +200 system, +100 idle, +100 iowait:
# 1000 ticks elapsed, 800 of them busy.
STAT_AFTER = "cpu  1600 0 700 8100 600 0 0 0 200 0\nbtime 1700000000\n"


@pytest.fixture
def fake_procfs(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    (root / "net").mkdir(parents=True)
    (root / "meminfo").write_text(MEMINFO)
    (root / "net" / "dev").write_text(NET_DEV)
    (root / "loadavg").write_text("3.52 2.10 1.05 2/1234 56789\n")
    (root / "stat").write_text(STAT_BEFORE)
    return root


def test_sample_on_this_machine_has_canonical_fields_with_plausible_values() -> None:
    source = HostSource()
    time.sleep(0.1)  # at least a few clock ticks, so cpu_percent has a window to measure
    values = source.sample()

    expected = set(HOST_FIELDS)
    if not any(not _is_loopback(n) for n in psutil.net_io_counters(pernic=True)):
        # A sandbox with only loopback: those fields must be absent, not 0.
        expected -= {"net_rx_bytes_total", "net_tx_bytes_total"}
    assert set(values) == expected
    for name, value in values.items():
        assert isinstance(value, int if name in INTEGER_FIELDS else float), name

    assert 0.0 <= values["cpu_percent"] <= 100.0
    assert 0.0 <= values["load1"] < 10_000
    assert values["mem_total_bytes"] == psutil.virtual_memory().total
    assert 0 < values["mem_used_bytes"] < values["mem_total_bytes"]
    disk = shutil.disk_usage("/")
    assert values["disk_total_bytes"] == disk.total
    assert 0 < values["disk_used_bytes"] <= values["disk_total_bytes"]
    for counter in ("net_rx_bytes_total", "net_tx_bytes_total"):
        assert values.get(counter, 0) >= 0


def test_counters_do_not_go_backwards_between_samples() -> None:
    source = HostSource()
    first = source.sample()
    second = source.sample()
    for counter in ("net_rx_bytes_total", "net_tx_bytes_total"):
        if counter in first:
            assert second[counter] >= first[counter]


def test_sample_reads_everything_under_the_procfs_root(fake_procfs: Path, tmp_path: Path) -> None:
    source = HostSource(procfs_root=str(fake_procfs), disk_path=str(tmp_path))
    (fake_procfs / "stat").write_text(STAT_AFTER)
    values = source.sample()

    assert values["cpu_percent"] == pytest.approx(80.0)
    assert values["load1"] == 3.52
    assert values["mem_total_bytes"] == 16384000 * 1024
    assert values["mem_used_bytes"] == (16384000 - 12288000) * 1024  # total - MemAvailable
    # Loopback left out; the Ethernet and IPoIB interfaces summed.
    assert values["net_rx_bytes_total"] == 5000000000 + 900000000000
    assert values["net_tx_bytes_total"] == 3000000000 + 800000000000
    assert values["disk_total_bytes"] == shutil.disk_usage(tmp_path).total
    # The process-global psutil root is put back for everyone else.
    assert psutil.PROCFS_PATH == "/proc"


def test_cpu_percent_absent_without_an_elapsed_window(fake_procfs: Path) -> None:
    source = HostSource(procfs_root=str(fake_procfs))
    assert "cpu_percent" not in source.sample()  # /proc/stat unchanged since construction
    (fake_procfs / "stat").write_text(STAT_AFTER)
    assert source.sample()["cpu_percent"] == pytest.approx(80.0)


def test_unreadable_fields_are_absent_never_zero_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    empty_root = tmp_path / "empty-proc"
    empty_root.mkdir()
    with caplog.at_level(logging.DEBUG, logger="fleetwatch.agent.sources.host"):
        source = HostSource(procfs_root=str(empty_root), disk_path=str(tmp_path))
        first = source.sample()
        second = source.sample()

    # Only the disk, which is read through statvfs on disk_path, not through procfs.
    assert set(first) == set(second) == {"disk_used_bytes", "disk_total_bytes"}
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    for field in ("cpu_percent", "load1", "mem_used_bytes", "net_rx_bytes_total"):
        assert sum(f"host {field}" in m for m in messages) == 1, field


def test_missing_disk_path_drops_only_disk_fields(fake_procfs: Path, tmp_path: Path) -> None:
    source = HostSource(procfs_root=str(fake_procfs), disk_path=str(tmp_path / "missing"))
    values = source.sample()
    assert "disk_used_bytes" not in values and "disk_total_bytes" not in values
    assert values["mem_total_bytes"] == 16384000 * 1024


def test_boot_id_read_from_procfs_root() -> None:
    assert HostSource(procfs_root=str(FIXTURE_PROCFS)).boot_id() == FIXTURE_BOOT_ID


def test_boot_id_of_this_machine_matches_the_kernel() -> None:
    path = Path("/proc/sys/kernel/random/boot_id")
    if not path.exists():
        pytest.skip("no /proc/sys/kernel/random/boot_id on this system")
    assert HostSource().boot_id() == path.read_text().strip()


def test_boot_id_fallback_is_stable_and_changes_with_boot_time(fake_procfs: Path) -> None:
    # fake_procfs has a stat with btime but no sys/kernel/random/boot_id.
    first = HostSource(procfs_root=str(fake_procfs)).boot_id()
    assert first == HostSource(procfs_root=str(fake_procfs)).boot_id()  # agent restart, same boot
    assert str(uuid.UUID(first)) == first  # same shape as a kernel boot id
    assert first != FIXTURE_BOOT_ID

    (fake_procfs / "stat").write_text(STAT_BEFORE.replace("1700000000", "1700086400"))
    rebooted = HostSource(procfs_root=str(fake_procfs)).boot_id()
    assert rebooted != first


def test_boot_id_fallback_ignores_an_empty_file(fake_procfs: Path) -> None:
    boot_id_path = fake_procfs / "sys" / "kernel" / "random" / "boot_id"
    boot_id_path.parent.mkdir(parents=True)
    boot_id_path.write_text("\n")
    with_empty = HostSource(procfs_root=str(fake_procfs)).boot_id()
    boot_id_path.unlink()
    assert with_empty == HostSource(procfs_root=str(fake_procfs)).boot_id()
