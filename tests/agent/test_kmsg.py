"""Tests for the kernel-log source: real published XID lines in every printer's format, and the follower."""

from __future__ import annotations

import errno
import logging
import os
import queue
import stat
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from fleetwatch.agent.sources.kmsg import (
    FALLEN_OFF_BUS_XID,
    KmsgSource,
    _Assembler,
    _FallenOffBusRepeats,
    _Reader,
    normalize_pci_bus_id,
    parse_line,
    parse_lines,
    replay_events,
)
from fleetwatch.detectors.replay import replay
from fleetwatch.records import Event
from fleetwatch.xid_catalog import lookup

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "kmsg"
BOOT_TIME = 1_700_000_000.0  # Unix seconds; places the lines stamped in seconds since boot
JOURNAL_YEAR = 2024  # journalctl's short format has no year; the tests supply one
WAIT_SECONDS = 5.0  # upper bound on every wait for the follower thread

EVENT_KEYS = {"t", "kind", "gpu", "uuid", "pci_bus_id", "xid", "message", "source"}


def local(year: int, month: int, day: int, hms: str, fraction: float = 0.0) -> float:
    """dmesg -T and journalctl print local time; so does the expectation."""
    hour, minute, second = (int(p) for p in hms.split(":"))
    return datetime(year, month, day, hour, minute, second).timestamp() + fraction


def iso(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


# (xid, PCI bus id, pid, process name, t) for every XID parse_lines() finds, in file order.
EXPECTED: dict[str, list[tuple[int, str, int | None, str | None, float]]] = {
    "dmesg.txt": [
        (79, "0000:08:00.0", 982, None, 20.455719),
        # the fallen-off-the-bus line right after it restates the XID 79: folded
        (79, "0000:01:00.0", None, None, 49.261458),  # older driver, no XID line; repeated once: folded
        (48, "0000:07:00.0", None, None, 219.470994),
        (64, "0000:07:00.0", None, None, 219.471050),
        (31, "0000:01:00.0", 13705, "UnrealEditor", 365.969681),
        (31, "0000:01:00.0", 35097, "SpaceEngine.exe", 1451.785035),
        (79, "0000:b3:00.0", None, None, 1843.308145),  # multi-line record, no XID line
        (32, "0000:01:00.0", None, None, 24128.828315),
        (32, "0000:01:00.0", None, None, 24128.828608),
        (31, "0000:01:00.0", None, None, 24128.834365),
        *[
            (13, "0000:43:00.0", None, None, s)
            for s in (93297.027938, 93297.029837, 93297.031618, 93297.040286, 93297.042086, 93297.043905)
        ],
        (45, "0000:dc:00.0", 1818990, "python3", 100200.000100),
        (94, "0000:01:00.0", 7194, None, 100300.000200),  # MIG: "(PCI:0000:01:00 GPU-I:05)"
        (95, "0000:01:00.0", 7062, None, 100300.000300),
        (119, "0000:9b:00.0", 4071838, "python", 100400.000400),
        (74, "0003:00:00.0", None, None, 449410.332316),
    ],
    "dmesg-T.txt": [
        (79, "0000:08:00.0", 982, None, local(2022, 5, 12, "20:40:12")),
        (63, "0000:10:1c.0", 1850, None, local(2023, 5, 19, "07:08:57")),
        (43, "0000:00:05.0", 1045242, "pt_main_thread", local(2024, 7, 31, "23:14:18")),
        (43, "0000:00:05.0", 1084984, "pt_main_thread", local(2024, 7, 31, "23:15:26")),
        (31, "0000:00:07.0", 2512125, "python3.10", local(2024, 8, 5, "03:54:13")),
        (94, "0000:00:08.0", None, None, local(2024, 8, 9, "13:32:56")),
        *[(13, "0000:cb:00.0", None, None, local(2024, 8, 30, "11:43:09"))] * 3,
        (109, "0000:cb:00.0", 1797828, "pt_main_thread", local(2024, 8, 30, "11:43:14")),
        (48, "0000:07:00.0", None, None, local(2024, 12, 2, "11:38:47")),
        (119, "0000:9b:00.0", 2024380, "nvidia-smi", local(2025, 2, 23, "16:24:18")),
        (119, "0000:9b:00.0", 2024380, "nvidia-smi", local(2025, 2, 23, "16:24:24")),
        (119, "0000:9b:00.0", 2024380, "nvidia-smi", local(2025, 2, 23, "16:24:30")),
        (119, "0000:9b:00.0", 1263500, "cache_mgr_main", local(2025, 2, 23, "16:27:12")),
        (119, "0000:9b:00.0", 1240590, "gpud", local(2025, 2, 23, "16:30:13")),
        (74, "0003:00:00.0", None, None, local(2025, 11, 4, "02:10:33")),
        *[(13, "0000:07:00.0", None, None, local(2026, 7, 21, "23:13:57"))] * 8,
    ],
    "dmesg-iso.txt": [
        *[
            (13, "0000:38:00.0", None, None, iso(f"2025-01-21T02:21:33.{us}+00:00"))
            for us in ("498559", "498648", "498749", "498965", "499059", "499153")
        ],
        (43, "0000:38:00.0", 2815167, "pt_main_thread", iso("2025-01-21T02:21:33.502278+00:00")),
        (13, "0000:38:00.0", None, None, iso("2025-01-21T02:44:00.563375+00:00")),
        (13, "0000:38:00.0", None, None, iso("2025-01-21T02:44:00.563475+00:00")),
        (43, "0000:38:00.0", 2823801, "pt_main_thread", iso("2025-01-21T02:44:00.566421+00:00")),
        (119, "0000:9b:00.0", 2024380, "nvidia-smi", iso("2025-02-23T16:24:18.412346+00:00")),
        (119, "0000:9b:00.0", 2024380, "nvidia-smi", iso("2025-02-23T16:24:24.412350+00:00")),
        (48, "0000:07:00.0", None, None, iso("2025-03-10T08:00:00.000001+01:00")),
        (64, "0000:07:00.0", None, None, iso("2025-03-10T08:00:00.000057+01:00")),
        (94, "0000:00:08.0", None, None, iso("2025-04-01T12:00:00+00:00")),
        (95, "0000:01:00.0", 7062, None, iso("2025-04-01T12:00:05+00:00")),
        (74, "0003:00:00.0", None, None, iso("2025-05-05T05:05:05.123456-07:00")),
        (79, "0000:08:00.0", 982, None, iso("2025-06-01T10:00:00.455719+00:00")),
    ],
    "journalctl-k.txt": [
        (31, "0000:c1:00.0", 12890, None, local(JOURNAL_YEAR, 11, 29, "11:28:11")),
        (31, "0000:c1:00.0", 12890, None, local(JOURNAL_YEAR, 11, 29, "11:28:11")),
        *[(13, "0000:41:00.0", None, None, local(JOURNAL_YEAR, 2, 15, "17:37:45"))] * 8,
        (63, "0000:10:1c.0", 1850, None, local(JOURNAL_YEAR, 5, 19, "07:08:57")),
        (13, "0000:01:00.0", 1773, ".gala-wrapped", local(JOURNAL_YEAR, 7, 6, "20:02:59")),
        (13, "0000:01:00.0", 2183, None, local(JOURNAL_YEAR, 10, 20, "18:54:04")),
        (13, "0000:01:00.0", 2183, None, local(JOURNAL_YEAR, 10, 20, "18:54:04")),
        (13, "0000:01:00.0", 25555, None, local(JOURNAL_YEAR, 10, 20, "18:54:04")),
        (48, "0000:07:00.0", None, None, local(JOURNAL_YEAR, 12, 2, "11:38:47")),
        (64, "0000:07:00.0", None, None, local(JOURNAL_YEAR, 12, 2, "11:38:47")),
        (79, "0000:08:00.0", 982, None, local(JOURNAL_YEAR, 3, 3, "04:05:06")),
        (74, "0003:00:00.0", None, None, local(JOURNAL_YEAR, 3, 3, "04:09:10")),
        (94, "0000:00:08.0", None, None, local(JOURNAL_YEAR, 3, 3, "04:11:12", 0.125001)),  # short-precise
        (95, "0000:01:00.0", 7062, None, local(JOURNAL_YEAR, 3, 3, "04:11:13")),
        (79, "0000:b3:00.0", None, None, local(JOURNAL_YEAR, 3, 3, "04:12:00")),  # multi-line record
        (119, "0000:9b:00.0", 2024380, "nvidia-smi", iso("2025-01-17T17:40:02+00:00")),  # -o short-iso
    ],
    "kmsg-raw.txt": [
        (79, "0000:08:00.0", 982, None, 20.455719),
        (48, "0000:07:00.0", None, None, 219.470994),
        (64, "0000:07:00.0", None, None, 219.471050),
        (79, "0000:b3:00.0", None, None, 1843.308145),  # \x0a-escaped multi-line record
        (13, "0000:43:00.0", None, None, 93297.027938),  # prefix with an extra ",caller=" field
        (13, "0000:43:00.0", None, None, 93297.029837),
        (13, "0000:43:00.0", None, None, 93297.031618),
        # the user-facility record (prio 12) claiming XID 79 is not the driver's: ignored
        (119, "0000:9b:00.0", 4071838, "python", 100400.000400),  # with SUBSYSTEM/DEVICE lines
        (119, "0000:9b:00.0", 28232, "cache_mgr_main", 100460.000400),
        (119, "0000:9b:00.0", 28232, "cache_mgr_main", 100520.000400),
        (74, "0003:00:00.0", None, None, 449410.332316),
        (94, "0000:01:00.0", 7194, None, 449410.400000),
        (63, "0000:10:1c.0", 1850, None, 449410.500000),
    ],
}
# Formats stamped in seconds since boot: the expectation above is that number.
SINCE_BOOT_FORMATS = {"dmesg.txt", "kmsg-raw.txt"}


def fixture_lines(name: str) -> list[str]:
    return (FIXTURES / name).read_text(encoding="utf-8").splitlines(keepends=True)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_fixture_parses_to_the_expected_xids(name: str) -> None:
    found = list(parse_lines(fixture_lines(name), boot_time=BOOT_TIME, year=JOURNAL_YEAR))
    got = [(x.xid, x.pci_bus_id, x.pid, x.process) for x in found]
    want = [(xid, bus, pid, process) for xid, bus, pid, process, _ in EXPECTED[name]]
    assert got == want
    for x, (*_, t) in zip(found, EXPECTED[name]):
        if name in SINCE_BOOT_FORMATS:
            assert x.since_boot_seconds == pytest.approx(t, abs=1e-6)
            assert x.t == pytest.approx(BOOT_TIME + t, abs=1e-6)
        else:
            assert x.t == pytest.approx(t, abs=1e-6)
        assert x.message and "NVRM" not in x.message.split(" ", 1)[0]
        assert x.raw


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_xid_line_parses_alone_and_nothing_else_does(name: str) -> None:
    for line in fixture_lines(name):
        if line.startswith(" "):
            continue  # a continuation line; it belongs to the record above
        x = parse_line(line, boot_time=BOOT_TIME, year=JOURNAL_YEAR)
        if line.startswith("12,"):  # kmsg-raw.txt's record from user space (facility 1)
            assert x is None, line
        elif "NVRM: Xid (" in line:
            assert x is not None, line
            # the number after "): " is the XID, read here independently of the parser
            assert x.xid == int(line.split("): ", 1)[1].split(",", 1)[0]), line
        elif "fallen off the bus" in line:
            assert x is not None and x.xid == FALLEN_OFF_BUS_XID, line
        else:
            assert x is None, line


def test_repeated_xids_are_all_kept() -> None:
    found = list(parse_lines(fixture_lines("dmesg-T.txt")))
    assert sum(1 for x in found if x.xid == 119) == 5
    assert sum(1 for x in found if x.xid == 13 and x.pci_bus_id == "0000:07:00.0") == 8
    # the same line twice in a row (a real repeat, not a fold) counts twice
    line = "[24128.828315] NVRM: Xid (PCI:0000:01:00): 32, Channel ID 00000000 intr 00004000\n"
    assert [x.xid for x in parse_lines([line, line])] == [32, 32]


def test_fallen_off_the_bus_after_xid_79_is_folded_but_a_later_one_is_not() -> None:
    xid_79 = "[   20.455719] NVRM: Xid (PCI:0000:08:00): 79, pid=982, GPU has fallen off the bus.\n"
    fallen_soon = "[   20.455720] NVRM: GPU 0000:08:00.0: GPU has fallen off the bus.\n"
    fallen_after_reboot_hold = "[ 2000.000000] NVRM: GPU 0000:08:00.0: GPU has fallen off the bus.\n"
    other_gpu = "[   20.455721] NVRM: GPU 0000:09:00.0: GPU has fallen off the bus.\n"
    found = list(parse_lines([xid_79, fallen_soon, other_gpu, fallen_after_reboot_hold]))
    assert [(x.xid, x.pci_bus_id, x.since_boot_seconds) for x in found] == [
        (79, "0000:08:00.0", 20.455719),
        (79, "0000:09:00.0", 20.455721),
        (79, "0000:08:00.0", 2000.0),
    ]
    # an explicit XID 79 line is never folded, even right after another
    assert len(list(parse_lines([xid_79, xid_79]))) == 2


def test_raw_kmsg_record_with_continuation_lines() -> None:
    record = (
        "4,4100,100400000400,-;NVRM: Xid (PCI:0000:9b:00): 119, pid=4071838, name=python, "
        "Timeout after 45s of waiting for RPC response from GPU4 GSP! Expected function 76 (GSP_RM_CONTROL) (0x20801702 0x4).\n"
        " SUBSYSTEM=pci\n"
        " DEVICE=+pci:0000:9b:00.0\n"
    )
    x = parse_line(record, boot_time=BOOT_TIME)
    assert x is not None
    assert (x.xid, x.pci_bus_id, x.pid, x.process) == (119, "0000:9b:00.0", 4071838, "python")
    assert x.since_boot_seconds == pytest.approx(100400.0004)
    assert x.t == pytest.approx(BOOT_TIME + 100400.0004)
    assert "SUBSYSTEM" not in x.message and x.message.endswith("(0x20801702 0x4).")
    assert x.raw == record.rstrip("\n")
    # the same record fed line by line: one XID, the continuation lines are not records
    assert [y.xid for y in parse_lines(record.splitlines(keepends=True))] == [119]
    # the kernel's own documented example: a non-XID record with context lines
    doc_example = "7,160,424069,-;pci_root PNP0A03:00: host bridge window [io  0x0000-0x0cf7] (ignored)\n SUBSYSTEM=acpi\n DEVICE=+acpi:PNP0A03:00\n"
    assert list(parse_lines([doc_example])) == []


def test_raw_kmsg_escapes_and_foreign_facilities() -> None:
    multi = (
        r"4,2500,1843308145,-;NVRM: The NVIDIA GPU 0000:b3:00.0\x0aNVRM: (PCI ID: 10de:26b5) installed in this "
        r"system has\x0aNVRM: fallen off the bus and is not responding to commands."
    )
    x = parse_line(multi)
    assert x is not None and (x.xid, x.pci_bus_id, x.t) == (79, "0000:b3:00.0", None)
    assert x.message == (
        "The NVIDIA GPU 0000:b3:00.0 (PCI ID: 10de:26b5) installed in this system has "
        "fallen off the bus and is not responding to commands."
    )
    # user space can write to /dev/kmsg, but never as the kernel (facility 0)
    assert (
        parse_line("12,4060,93300000000,-;NVRM: Xid (PCI:0000:43:00): 79, pid=1, GPU has fallen off the bus.") is None
    )
    # `dmesg --decode` shows the facility too
    assert parse_line("user  :warn  : 2025-01-21T02:21:33,498559+00:00 NVRM: Xid (PCI:0000:38:00): 13, x") is None


@pytest.mark.parametrize(
    ("line", "xid", "bus_id"),
    [
        # open-gpu-kernel-modules #1150: the cause names another XID; the line's own XID is first
        (
            "kernel: NVRM: Xid (PCI:0000:dc:00): 45, pid=1818990, name=python3, Ch 00000001 caused by previous Xid 149",
            45,
            "0000:dc:00.0",
        ),
        # NVIDIA's XID documentation example: the oldest format, no "PCI:"
        ("[...] NVRM: Xid (0000:03:00): 14, Channel 00000001", 14, "0000:03:00.0"),
        # MIG attribution with both instance ids (kernel_rc.c format string)
        ("NVRM: Xid (PCI:0000:01:00 GPU-I:05 GPU-CI:01): 43, pid=7, name=python, Ch 00000008", 43, "0000:01:00.0"),
        # pid=<unknown> without quotes (AWS HyperPod documentation)
        (
            "Mar 03 04:05:06 host kernel: NVRM: Xid (PCI:0000:b9:00): 74, pid=<unknown>, name=<unknown>, NVLink: fatal error detected on link 6(0x10000, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0)",
            74,
            "0000:b9:00.0",
        ),
        # the XID number alone, nothing after it
        ("NVRM: Xid (PCI:0000:01:00): 79", 79, "0000:01:00.0"),
        # gpud's test of a driver line without a PCI domain
        ("NVRM: GPU 18:00.0: GPU has fallen off the bus.", 79, "0000:18:00.0"),
        # the driver's domain is printed as given; GB200 uses domains past 0
        (
            "[171167.620236] NVRM: Xid (PCI:0009:01:00): 149, NETIR_LINK_EVT  Fatal   XC0 i0 Link 01 (0x021425c6 0x00000000)",
            149,
            "0009:01:00.0",
        ),
    ],
)
def test_line_variants(line: str, xid: int, bus_id: str) -> None:
    x = parse_line(line)
    assert x is not None
    assert (x.xid, x.pci_bus_id) == (xid, bus_id)


@pytest.mark.parametrize(
    "line",
    [
        "[Tue Jul 21 15:51:15 2026] r8169 0000:03:00.0 eth0: RTL8125B, 58:47:ca:7b:55:71, XID 641, IRQ 51",
        "[Sun Feb 23 16:24:18 2025] NVRM: GPU at PCI:0000:9b:00: GPU-509665ad-b600-ac93-3616-d754b23d636d",
        "May 27 16:50:10 fedora kernel: NVRM: GPU 0000:09:00.0: RmInitAdapter failed! (0x22:0x56:894)",
        "[Sun Feb 23 16:24:36 2025] NVRM: Rate limiting GSP RPC error prints for GPU at PCI:0000:9b:00 (printing 1 of every 30).",
        # user space quoting a kernel line (journalctl without -k): not the kernel's
        "Feb 23 16:24:19 node gpud[1240590]: [XID found] NVRM: Xid (PCI:0000:9b:00): 119, pid=1, name=x, Timeout",
        "NVRM: Xid error: xyz, invalid data",
        "NVRM: Xid (invalid): some error",
        "",
    ],
)
def test_lines_that_are_not_xids(line: str) -> None:
    assert parse_line(line) is None


def test_journalctl_year_defaults_to_the_latest_past_one() -> None:
    x = parse_line("Nov 29 11:28:11 zeus kernel: NVRM: Xid (PCI:0000:c1:00): 31, pid=12890, Ch 0000003b")
    assert x is not None and x.t is not None
    now = datetime.now().timestamp()
    assert now - 366 * 86400 - 2 * 86400 < x.t <= now + 2 * 86400
    assert datetime.fromtimestamp(x.t).strftime("%m-%d %H:%M:%S") == "11-29 11:28:11"


def test_normalize_pci_bus_id() -> None:
    assert normalize_pci_bus_id("PCI:0000:9B:00") == "0000:9b:00.0"
    assert normalize_pci_bus_id("00000000:18:00.0") == "0000:18:00.0"  # NVML's 8-digit domain
    assert normalize_pci_bus_id("18:00.0") == "0000:18:00.0"
    assert normalize_pci_bus_id("0009:01:00") == "0009:01:00.0"
    with pytest.raises(ValueError):
        normalize_pci_bus_id("GPU-509665ad")


# ---- the source ---------------------------------------------------------------------------------


def test_read_existing_on_a_fixture_file_maps_bus_ids_to_gpus() -> None:
    source = KmsgSource(
        str(FIXTURES / "dmesg.txt"),
        bus_id_to_gpu={"00000000:9B:00.0": 4, "0000:43:00.0": 2},
        boot_time=BOOT_TIME,
        clock=lambda: 5.0,
    )
    events = source.read_existing()
    assert len(events) == len(EXPECTED["dmesg.txt"])
    for event, (xid, bus_id, _, _, since_boot) in zip(events, EXPECTED["dmesg.txt"]):
        assert set(event) == EVENT_KEYS
        assert (event["kind"], event["source"], event["uuid"]) == ("xid", "kmsg", None)
        assert (event["xid"], event["pci_bus_id"]) == (xid, bus_id)
        assert event["t"] == pytest.approx(BOOT_TIME + since_boot)  # the record's own time, not clock()
        assert event["gpu"] == {"0000:9b:00.0": 4, "0000:43:00.0": 2}.get(bus_id)
    assert [e["gpu"] for e in events if e["xid"] == 13] == [2] * 6


def test_read_existing_of_raw_kmsg_fixture_uses_boot_time() -> None:
    source = KmsgSource(str(FIXTURES / "kmsg-raw.txt"), boot_time=BOOT_TIME)
    events = source.read_existing()
    assert [(e["xid"], e["t"]) for e in events] == [
        (xid, pytest.approx(BOOT_TIME + s)) for xid, _, _, _, s in EXPECTED["kmsg-raw.txt"]
    ]


class Collector:
    """on_events for follow(): a queue the test can wait on with a timeout."""

    def __init__(self) -> None:
        self.events: queue.Queue[dict] = queue.Queue()

    def __call__(self, events: list[dict]) -> None:
        for event in events:
            self.events.put(event)

    def take(self, count: int) -> list[dict]:
        return [self.events.get(timeout=WAIT_SECONDS) for _ in range(count)]


def start_follow(source: KmsgSource, collector: Collector) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(
        target=source.follow, args=(stop, collector), kwargs={"poll_timeout_seconds": 0.02}, daemon=True
    )
    thread.start()
    assert source.following.wait(WAIT_SECONDS)
    return stop, thread


def finish(stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    thread.join(WAIT_SECONDS)
    assert not thread.is_alive()


def append(path: Path, text: str) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(text)
        f.flush()


def test_follow_reports_appended_lines_only(tmp_path: Path) -> None:
    log_path = tmp_path / "kern.log"
    log_path.write_text("[   20.455719] NVRM: Xid (PCI:0000:08:00): 79, pid=982, GPU has fallen off the bus.\n")
    source = KmsgSource(str(log_path), bus_id_to_gpu={"0000:9b:00.0": 4}, boot_time=BOOT_TIME, clock=lambda: 123.0)
    collector = Collector()
    stop, thread = start_follow(source, collector)
    try:
        append(log_path, "".join(fixture_lines("dmesg-T.txt")[22:40]))  # the XID 119 episode
        events = collector.take(5)
        assert [(e["xid"], e["gpu"], e["pci_bus_id"], e["source"]) for e in events] == [
            (119, 4, "0000:9b:00.0", "kmsg")
        ] * 5
        assert all(e["t"] == 123.0 for e in events)  # new records are stamped when read
        # a line written in two pieces is one line
        append(log_path, "[  219.470994] NVRM: Xid (PCI:0000:07:00): 48, pid='<unknown>', ")
        append(log_path, "name=<unknown>, An uncorrectable double bit error (DBE) has been detected on GPU.\n")
        (event,) = collector.take(1)
        assert (event["xid"], event["gpu"]) == (48, None)
    finally:
        finish(stop, thread)
    assert collector.events.empty()  # the XID 79 that was there before follow() is not reported


def test_follow_carries_on_where_read_existing_stopped(tmp_path: Path) -> None:
    log_path = tmp_path / "kern.log"
    log_path.write_text("".join(fixture_lines("dmesg.txt")[:3]))
    source = KmsgSource(str(log_path), boot_time=BOOT_TIME)
    assert [e["xid"] for e in source.read_existing()] == [79]
    # written between start-up's read and the follower's start: must not be lost
    append(log_path, "[   49.261458] NVRM: GPU at 0000:01:00.0 has fallen off the bus.\n")
    collector = Collector()
    stop, thread = start_follow(source, collector)
    try:
        (event,) = collector.take(1)
        assert (event["xid"], event["pci_bus_id"]) == (79, "0000:01:00.0")
        append(log_path, "[   49.261472] NVRM: GPU at 0000:01:00.0 has fallen off the bus.\n")  # restated
        append(
            log_path,
            "[ 1451.785035] NVRM: Xid (PCI:0000:01:00): 31, pid=35097, name=SpaceEngine.exe, channel 0x0000005c\n",
        )
        (event,) = collector.take(1)
        assert event["xid"] == 31
    finally:
        finish(stop, thread)
    assert collector.events.empty()


def test_follow_starts_over_when_the_file_is_truncated(tmp_path: Path) -> None:
    log_path = tmp_path / "kern.log"
    log_path.write_text("")
    source = KmsgSource(str(log_path), boot_time=BOOT_TIME)
    collector = Collector()
    stop, thread = start_follow(source, collector)
    try:
        append(log_path, "NVRM: Xid (PCI:0000:01:00): 13, pid=1, name=a, before the rotation\n")
        assert collector.take(1)[0]["xid"] == 13
        log_path.write_text("")  # logrotate's copytruncate
        append(log_path, "NVRM: Xid (PCI:0000:01:00): 43, pid=1, name=a, after\n")
        assert collector.take(1)[0]["xid"] == 43
    finally:
        finish(stop, thread)


def test_follow_keeps_going_when_the_consumer_fails(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log_path = tmp_path / "kern.log"
    log_path.write_text("")
    source = KmsgSource(str(log_path), boot_time=BOOT_TIME)
    collector = Collector()
    calls = []

    def flaky(events: list[dict]) -> None:
        calls.append(events)
        if len(calls) == 1:
            raise RuntimeError("spool full")
        collector(events)

    stop = threading.Event()
    thread = threading.Thread(
        target=source.follow, args=(stop, flaky), kwargs={"poll_timeout_seconds": 0.02}, daemon=True
    )
    thread.start()
    assert source.following.wait(WAIT_SECONDS)
    try:
        with caplog.at_level(logging.ERROR, logger="fleetwatch.agent.sources.kmsg"):
            append(log_path, "NVRM: Xid (PCI:0000:01:00): 13, pid=1, name=a, first\n")
            deadline = time.monotonic() + WAIT_SECONDS
            while not calls and time.monotonic() < deadline:
                time.sleep(0.01)
            assert calls
            append(log_path, "NVRM: Xid (PCI:0000:01:00): 31, pid=1, name=a, second\n")
            (event,) = collector.take(1)
        assert event["xid"] == 31
        assert "handling kernel-log XIDs failed" in caplog.text
    finally:
        finish(stop, thread)


def test_missing_log_is_logged_once_and_follow_returns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = KmsgSource(str(tmp_path / "no-such-kmsg"), boot_time=BOOT_TIME)
    with caplog.at_level(logging.WARNING, logger="fleetwatch.agent.sources.kmsg"):
        assert source.read_existing() == []
        stop = threading.Event()
        thread = threading.Thread(target=source.follow, args=(stop, Collector()), daemon=True)
        thread.start()
        thread.join(WAIT_SECONDS)
        assert not thread.is_alive()  # returned by itself, stop never set
    warnings = [r for r in caplog.records if "kernel log XIDs off" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert "no-such-kmsg" in warnings[0].getMessage()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_log_is_logged_and_follow_returns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log_path = tmp_path / "kmsg"
    log_path.write_text("")
    log_path.chmod(0)
    source = KmsgSource(str(log_path), boot_time=BOOT_TIME)
    with caplog.at_level(logging.WARNING, logger="fleetwatch.agent.sources.kmsg"):
        source.follow(threading.Event(), Collector())
    assert "kernel log XIDs off" in caplog.text


def test_overwritten_kmsg_records_are_counted_and_reading_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    """/dev/kmsg answers EPIPE when records were overwritten, then resumes at the oldest left."""
    replies: list[bytes | OSError] = [
        b"4,10,20455719,-;NVRM: Xid (PCI:0000:08:00): 79, pid=982, GPU has fallen off the bus.\n",
        BrokenPipeError(errno.EPIPE, "Broken pipe"),
        b"4,15,93297027938,-;NVRM: Xid (PCI:0000:43:00): 13, pid='<unknown>', name=<unknown>, Graphics Exception\n",
        InterruptedError(errno.EINTR, "Interrupted"),
        b"6,16,93297027999,-;usb 1-1: new high-speed USB device\n SUBSYSTEM=usb\n DEVICE=+usb:1-1\n",
        BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable"),
    ]

    def fake_read(fd: int, size: int) -> bytes:
        reply = replies.pop(0)
        if isinstance(reply, OSError):
            raise reply
        return reply

    reader = _Reader(-1, True, _Assembler(_FallenOffBusRepeats(), BOOT_TIME), read=fake_read)
    with caplog.at_level(logging.WARNING, logger="fleetwatch.agent.sources.kmsg"):
        found = reader.read_available()
    assert [x.xid for x in found] == [79, 13]
    assert reader.records_lost == 4  # seq 11 to 14
    assert reader.last_seq == 16
    assert "4 records lost" in caplog.text
    assert replies == []


def test_kmsg_reader_skips_records_read_before() -> None:
    replies = [
        b"4,10,1,-;NVRM: Xid (PCI:0000:08:00): 79, pid=982, GPU has fallen off the bus.\n",
        b"4,11,2,-;NVRM: Xid (PCI:0000:43:00): 13, pid=1, name=a, b\n",
    ]

    def fake_read(fd: int, size: int) -> bytes:
        if not replies:
            raise BlockingIOError(errno.EAGAIN, "again")
        return replies.pop(0)

    reader = _Reader(-1, True, _Assembler(_FallenOffBusRepeats(), None), read=fake_read)
    reader.skip_through_seq = reader.last_seq = 10
    assert [x.xid for x in reader.read_available()] == [13]
    assert reader.records_lost == 0


@pytest.mark.skipif(
    not (
        os.path.exists("/dev/kmsg") and stat.S_ISCHR(os.stat("/dev/kmsg").st_mode) and os.access("/dev/kmsg", os.R_OK)
    ),
    reason="no readable /dev/kmsg here",
)
def test_real_dev_kmsg_reads_and_follows_without_blocking() -> None:
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError as exc:
        pytest.skip(f"/dev/kmsg cannot be opened: {exc}")
    source = KmsgSource()
    events = source.read_existing()  # returns at the end of the buffer (EAGAIN), never blocks
    assert all(set(e) == EVENT_KEYS and e["source"] == "kmsg" for e in events)
    collector = Collector()
    stop, thread = start_follow(source, collector)
    finish(stop, thread)


# ---- replay -------------------------------------------------------------------------------------


def test_replay_events_times() -> None:
    lines = fixture_lines("dmesg.txt")
    without_boot = replay_events(lines, "n01")
    assert all(isinstance(e, Event) for e in without_boot)
    assert [e.t for e in without_boot] == [pytest.approx(s) for *_, s in EXPECTED["dmesg.txt"]]
    assert {(e.node, e.kind, e.source, e.gpu) for e in without_boot} == {("n01", "xid", "kmsg", None)}
    with_boot = replay_events(lines, "n01", boot_time=BOOT_TIME, bus_id_to_gpu={"0000:43:00.0": 2})
    assert [e.t for e in with_boot] == [pytest.approx(BOOT_TIME + s) for *_, s in EXPECTED["dmesg.txt"]]
    assert [e.gpu for e in with_boot if e.xid == 13] == [2] * 6
    assert with_boot[0].pci_bus_id == "0000:08:00.0" and with_boot[0].message == "GPU has fallen off the bus."
    # lines with no time at all follow the line before
    bare = replay_events(["NVRM: Xid (PCI:0000:01:00): 13, pid=1, name=a, x\n"] * 2, "n01")
    assert [e.t for e in bare] == [0.0, 0.0]


def test_replaying_a_kernel_log_gives_xid_findings_graded_by_the_catalog() -> None:
    events = replay_events(fixture_lines("dmesg-T.txt"), "n01")
    # a day between detector runs: the log spans years, and XID findings fire on each event anyway
    findings = [f for f in replay(events, step_seconds=86400.0) if f.detector == "xid"]
    assert {f.evidence["xid"] for f in findings} == {e.xid for e in events}
    for finding in findings:
        info = lookup(finding.evidence["xid"])
        assert (finding.severity, finding.action, finding.node) == (info.severity, info.action, "n01")
    (gsp,) = [f for f in findings if f.evidence["xid"] == 119]
    assert gsp.severity == "critical" and gsp.evidence["count"] == 5
    assert gsp.start == pytest.approx(local(2025, 2, 23, "16:24:18"))
    (fallen,) = [f for f in findings if f.evidence["xid"] == 79]
    assert fallen.evidence["count"] == 1  # the restating fallen-off-the-bus line is not a second XID
