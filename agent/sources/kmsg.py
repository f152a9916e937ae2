"""The kernel-log source: NVIDIA XIDs and fallen-off-the-bus lines from /dev/kmsg, dmesg or journalctl.

The driver prints every XID as one kernel log line (src/nvidia/src/kernel/gpu/rc/kernel_rc.c in
NVIDIA/open-gpu-kernel-modules):

    NVRM: Xid (PCI:0000:9b:00): 119, pid=1234, name=python, Timeout after 6s of waiting for ...
    NVRM: Xid (PCI:0000:01:00 GPU-I:05): 94, pid=7194, Contained: CE User Channel (0x9). ...
    NVRM: Xid (PCI:0000:41:00): 13, Graphics Exception: ...          (older drivers: no pid/name)
    NVRM: Xid (0000:03:00): 14, Channel 00000001                      (older still: no "PCI:")

and a GPU that drops off the bus also shows up without an XID, which counts as XID 79:

    NVRM: GPU 0000:08:00.0: GPU has fallen off the bus.
    NVRM: GPU at 0000:01:00.0 has fallen off the bus.                 (older drivers)
    NVRM: The NVIDIA GPU 0000:b3:00.0 / (PCI ID: ...) installed in this system has /
          fallen off the bus and is not responding to commands.       (one multi-line record)

Those messages reach people through five printers, all parsed here: raw /dev/kmsg records
(`prio,seq,usec,flags;text` plus ` KEY=value` continuation lines), `dmesg` (`[ 123.456] text`),
`dmesg -T` (`[Sun Feb 23 16:24:18 2025] text`), `dmesg --time-format iso`
(`2025-01-21T02:21:33,498559+00:00 text`), each optionally with `--decode`'s `kern  :warn  : `,
and `journalctl -k` / syslog files (`Feb 15 17:37:45 host kernel: text`, also `-o short-iso`,
`short-precise` and `short-unix`). tests/fixtures/kmsg holds real published lines of each.
"""

from __future__ import annotations

import logging
import os
import re
import select
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any

import psutil

from fleetwatch.inventory import normalize_pci_bus_id
from fleetwatch.records import Event

log = logging.getLogger(__name__)

FALLEN_OFF_BUS_XID = 79
# s; a fallen-off-the-bus line within this long after an XID 79 (or another such line) for the
# same GPU is the same failure told again (the driver prints both, and repeats the plain line as
# it touches the dead device); NVSentinel's syslog monitor suppresses with the same 5 min buffer.
FALLEN_OFF_BUS_REPEAT_SECONDS = 300.0
# One read() of /dev/kmsg returns exactly one record and fails with EINVAL when the buffer is
# smaller; a record is at most 1 KiB of text plus an 8 KiB dictionary (CONSOLE_EXT_LOG_MAX).
_READ_SIZE_BYTES = 16384
# GPUs a node can hold, with margin; bounds the fallen-off-the-bus memory against garbage input.
_MAX_TRACKED_BUS_IDS = 1024
# s; journalctl's short format has no year: a date more than this far in the future belongs to
# the year before (a log read on Jan 1 that still shows Dec 31).
_FUTURE_SLACK_SECONDS = 2 * 86400.0
# The syslog facility of kernel messages; /dev/kmsg refuses it to writes from user space
# (Documentation/ABI/testing/dev-kmsg), so a record that claims another one is not the driver's.
_KERNEL_FACILITY = 0

_MONTHS = {
    name: number
    for number, name in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), start=1
    )
}
_MONTH = r"(?P<mon>Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
# `dmesg --decode` (-x) puts facility and level first: "kern  :warn  : ".
_DECODE = r"(?:(?P<facility>[a-z]+) *:(?P<level>[a-z]*) *: )?"

# /dev/kmsg: "prio,seq,usec,flags[,more fields];text"; unknown extra fields are to be ignored.
_KMSG_RE = re.compile(r"^(?P<prio>\d+),(?P<seq>\d+),(?P<usec>\d+),(?P<flags>[^;,]*)(?:,[^;]*)?;(?P<text>.*)$")
_DMESG_ISO_RE = re.compile(
    rf"^{_DECODE}(?P<iso>\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d,\d+(?:[+-]\d\d:?\d\d|Z)) (?P<text>.*)$"
)
_DMESG_CTIME_RE = re.compile(
    rf"^{_DECODE}\[(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) {_MONTH} +(?P<day>\d{{1,2}}) "
    r"(?P<hms>\d\d:\d\d:\d\d) (?P<year>\d{4})\] ?(?P<text>.*)$"
)
# Plain dmesg; `dmesg -r` adds the "<4>" priority.
_DMESG_RE = re.compile(rf"^{_DECODE}(?:<\d+>)?\[ *(?P<uptime>\d+\.\d+)\] ?(?P<text>.*)$")
# journalctl -k (short, short-precise) and syslog files; only the kernel's own lines count. The
# host is absent under `journalctl --no-hostname` (and in some syslog templates).
_HOST = r"(?:\S+ )?"
_SYSLOG_RE = re.compile(
    rf"^{_MONTH} +(?P<day>\d{{1,2}}) (?P<hms>\d\d:\d\d:\d\d)(?P<frac>\.\d+)? {_HOST}kernel: ?(?P<text>.*)$"
)
# journalctl -o short-iso / short-iso-precise, and rsyslog's RFC 3339 file format (Debian 12's default).
_JOURNAL_ISO_RE = re.compile(
    rf"^(?P<iso>\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)) {_HOST}kernel: ?(?P<text>.*)$"
)
_JOURNAL_UNIX_RE = re.compile(rf"^(?P<unix>\d{{9,}}\.\d+) {_HOST}kernel: ?(?P<text>.*)$")
# journalctl -o short-full: "Sat 2025-11-29 11:28:11 UTC host kernel: text" (a zone name or offset).
_JOURNAL_FULL_RE = re.compile(
    r"^(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) (?P<date>\d{4}-\d\d-\d\d) (?P<hms>\d\d:\d\d:\d\d)(?P<frac>\.\d+)? "
    rf"(?P<zone>\S+) {_HOST}kernel: ?(?P<text>.*)$"
)
# RFC 5424 syslog (rsyslog's RSYSLOG_SyslogProtocol23Format, syslog-ng): "<4>1 TIMESTAMP HOST
# kernel - - [SD] text", APP-NAME kernel, "-" for absent fields.
_RFC5424_RE = re.compile(
    r"^<(?P<prio>\d{1,3})>1 (?P<iso>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)) "
    r"\S+ kernel \S+ \S+ (?:-|(?:\[[^\]]*\])+) ?(?P<text>.*)$"
)
# journalctl -o short-monotonic: "[   20.455718] host kernel: text": the host and "kernel:" after
# dmesg's stamp.
_AFTER_STAMP_KERNEL_RE = re.compile(r"^(?:\S+ )?kernel: (?P<text>.*)$", re.DOTALL)
# The same printers' lines from user space ("gpud[12]: ... NVRM: Xid ..." quotes a kernel line).
_NOT_KERNEL_RE = re.compile(
    rf"^(?:(?:{_MONTH} +\d{{1,2}} \d\d:\d\d:\d\d|\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\S*|\d{{9,}}\.\d+"
    r"|(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) \d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \S+)"
    rf"(?:\.\d+)? {_HOST}[^\s:]+: "
    # RFC 5424 from any APP-NAME but kernel (those matched _RFC5424_RE first).
    r"|<\d{1,3}>1 \S+ \S+ \S+ )"
)
# journalctl -o short-monotonic of a user-space line: "[   20.455718] host gpud[12]: ...".
_AFTER_STAMP_PROGRAM_RE = re.compile(r"^\S+ [^\s:\[]+\[\d+\]: ")
# Syslog files written from the kernel ring keep printk's own "[seconds]" in the text.
_UPTIME_IN_TEXT_RE = re.compile(r"^\[ *(?P<uptime>\d+\.\d+)\] ?(?P<text>.*)$", re.DOTALL)
_KMSG_ESCAPE_RE = re.compile(r"\\x([0-9a-fA-F]{2})")

_XID_RE = re.compile(
    r"NVRM: Xid \((?:PCI:)?(?P<bus>(?:[0-9a-fA-F]{1,8}:)?[0-9a-fA-F]{1,2}:[0-9a-fA-F]{1,2}(?:\.[0-7])?)"
    r"[^)]*\): *(?P<xid>\d+)(?:, *(?P<rest>.*))?",
    re.DOTALL,
)
# "pid=1234, name=python, text" / "pid='<unknown>', name=<unknown>, text" / "pid=982, text".
_PID_NAME_RE = re.compile(r"^pid=(?P<pid>[^,\s]*)(?:, *name=(?P<name>.*?))?(?:, *(?P<text>.*))?$", re.DOTALL)
_BDF = r"(?P<bus>(?:[0-9a-fA-F]{1,8}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7])"
_FALLEN_RE = re.compile(rf"NVRM: GPU (?:at )?(?:PCI:)?{_BDF}:? (?:GPU )?has fallen off the bus")
_FALLEN_MULTILINE_RE = re.compile(rf"NVRM: The NVIDIA GPU (?:PCI:)?{_BDF}\b.*?fallen off the bus", re.DOTALL)


@dataclass(frozen=True, slots=True)
class KernelXid:
    """One XID (or fallen-off-the-bus, as XID 79) found in a kernel log."""

    xid: int
    pci_bus_id: str  # "0000:9b:00.0"
    message: str  # the driver's text after pid and name
    pid: int | None
    process: str | None
    t: float | None  # Unix seconds: from the line, or boot_time + since_boot_seconds
    raw: str  # the record as read, continuation lines included
    since_boot_seconds: float | None = None  # the kernel's own timestamp, where the format has it


@dataclass(frozen=True, slots=True)
class _Record:
    """A log record with its printer's prefix taken off."""

    text: str
    t: float | None
    since_boot_seconds: float | None
    raw: str


def _local_timestamp(year: int, month: int, day: int, hms: str, fraction: str | None) -> float:
    hour, minute, second = (int(part) for part in hms.split(":"))
    # dmesg -T and journalctl print local time, so the line is read in this machine's zone.
    stamp = datetime(year, month, day, hour, minute, second).timestamp()
    return stamp + (float(fraction) if fraction else 0.0)


def _year_for(month: int, day: int, hms: str, now: float) -> int:
    """The year of a journalctl date: this year, unless that puts it in the future."""
    year = datetime.fromtimestamp(now).year
    for candidate in range(year, year - 8, -1):  # back to a leap year for Feb 29
        try:
            stamp = _local_timestamp(candidate, month, day, hms, None)
        except ValueError:
            continue
        if stamp <= now + _FUTURE_SLACK_SECONDS:
            return candidate
    return year - 1


def _iso_timestamp(text: str) -> float:
    # dmesg writes the fraction after a comma; Python wants a dot.
    return datetime.fromisoformat(text.replace(",", ".")).timestamp()


# (text, t, since_boot_seconds, is_kmsg) of a line with its printer's prefix taken off.
_Split = tuple[str, float | None, float | None, bool]


def _full_timestamp(date: str, hms: str, fraction: str | None, zone: str) -> float:
    """journalctl short-full's time: UTC/GMT and numeric offsets exactly; another zone name
    (CET, EST: ambiguous abbreviations) as this machine's local time, as journalctl printed it."""
    year, month, day = (int(part) for part in date.split("-"))
    if zone in ("UTC", "GMT", "Z") or re.fullmatch(r"[+-]\d\d:?\d\d", zone):
        offset = "+00:00" if zone in ("UTC", "GMT", "Z") else zone
        return _iso_timestamp(f"{date}T{hms}{fraction or ''}{offset}")
    return _local_timestamp(year, month, day, hms, fraction)


def _split_prefix(header: str, boot_time: float | None, year: int | None) -> _Split | None:
    """The text and times of one line, or None when the line is not the kernel's."""
    since_boot: float | None  # seconds since boot, where the line gives them
    if match := _KMSG_RE.match(header):
        if int(match["prio"]) >> 3 != _KERNEL_FACILITY:
            return None
        since_boot = int(match["usec"]) / 1e6
        t = boot_time + since_boot if boot_time is not None else None
        return match["text"], t, since_boot, True
    for pattern in (_DMESG_ISO_RE, _DMESG_CTIME_RE, _DMESG_RE):
        if match := pattern.match(header):
            if match["facility"] not in (None, "kern"):
                return None
            if pattern is _DMESG_ISO_RE:
                return match["text"], _iso_timestamp(match["iso"]), None, False
            if pattern is _DMESG_CTIME_RE:
                t = _local_timestamp(int(match["year"]), _MONTHS[match["mon"]], int(match["day"]), match["hms"], None)
                return match["text"], t, None, False
            since_boot = float(match["uptime"])
            text = match["text"]
            if kernel := _AFTER_STAMP_KERNEL_RE.match(text):
                text = kernel["text"]
            elif _AFTER_STAMP_PROGRAM_RE.match(text):
                return None
            return text, boot_time + since_boot if boot_time is not None else None, since_boot, False
    if match := _RFC5424_RE.match(header):
        if int(match["prio"]) >> 3 != _KERNEL_FACILITY:
            return None
        return match["text"], _iso_timestamp(match["iso"]), None, False
    text, t = header, None
    if match := _SYSLOG_RE.match(header):
        month = _MONTHS[match["mon"]]
        line_year = year if year is not None else _year_for(month, int(match["day"]), match["hms"], time.time())
        text = match["text"]
        t = _local_timestamp(line_year, month, int(match["day"]), match["hms"], match["frac"])
    elif match := _JOURNAL_ISO_RE.match(header):
        text, t = match["text"], _iso_timestamp(match["iso"])
    elif match := _JOURNAL_UNIX_RE.match(header):
        text, t = match["text"], float(match["unix"])
    elif match := _JOURNAL_FULL_RE.match(header):
        text, t = match["text"], _full_timestamp(match["date"], match["hms"], match["frac"], match["zone"])
    elif _NOT_KERNEL_RE.match(header):
        return None
    elif header.startswith("kernel: "):  # a grep of journalctl output cut before the host
        text = header[len("kernel: ") :]
    since_boot = None
    if match := _UPTIME_IN_TEXT_RE.match(text):
        text, since_boot = match["text"], float(match["uptime"])
        if t is None and boot_time is not None:
            t = boot_time + since_boot
    return text, t, since_boot, False


def _make_record(lines: list[str], boot_time: float | None, year: int | None) -> _Record | None:
    """One record from its header line and its continuation lines (those starting with a space)."""
    split = _split_prefix(lines[0], boot_time, year)
    if split is None:
        return None
    text, t, since_boot, is_kmsg = split
    if is_kmsg:
        # /dev/kmsg escapes non-printables (a multi-line message's newlines too) as \xNN, and its
        # continuation lines are KEY=value context, not text.
        text = _KMSG_ESCAPE_RE.sub(lambda m: chr(int(m.group(1), 16)), text)
    elif len(lines) > 1:
        # dmesg and journalctl print the further lines of a multi-line record indented.
        text = "\n".join([text, *(line.strip() for line in lines[1:])])
    return _Record(text, t, since_boot, "\n".join(lines))


def _parse_pid(value: str) -> int | None:
    value = value.strip().strip("'\"")
    return int(value) if value.isdigit() else None  # '<unknown>', <unknown>, N/A


def _parse_name(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip().strip("'\"")
    return None if not value or value in ("<unknown>", "N/A") else value


def _one_line(text: str) -> str:
    """A multi-line driver message as one sentence, without the repeated "NVRM:" prefixes."""
    parts = [part.strip() for part in text.splitlines()]
    return " ".join(part[len("NVRM:") :].strip() if part.startswith("NVRM:") else part for part in parts if part)


def _xid_from_record(record: _Record) -> tuple[KernelXid, bool] | None:
    """(the XID in the record, whether it is an explicit "Xid" line), or None."""
    text = record.text
    if match := _XID_RE.search(text):
        try:
            bus_id = normalize_pci_bus_id(match["bus"])
        except ValueError:
            return None
        rest = (match["rest"] or "").strip()
        pid = process = None
        message = rest
        if fields := _PID_NAME_RE.match(rest):
            pid, process = _parse_pid(fields["pid"]), _parse_name(fields["name"])
            message = (fields["text"] or "").strip()
        xid = KernelXid(
            int(match["xid"]), bus_id, _one_line(message), pid, process, record.t, record.raw, record.since_boot_seconds
        )
        return xid, True
    match = _FALLEN_RE.search(text) or _FALLEN_MULTILINE_RE.search(text)
    if match is None:
        return None
    try:
        bus_id = normalize_pci_bus_id(match["bus"])
    except ValueError:
        return None
    message = _one_line(text[match.start() :])
    xid = KernelXid(FALLEN_OFF_BUS_XID, bus_id, message, None, None, record.t, record.raw, record.since_boot_seconds)
    return xid, False


def parse_line(line: str, *, boot_time: float | None = None, year: int | None = None) -> KernelXid | None:
    """The XID in one kernel log line in any supported format, or None for any other line.

    `line` may carry its continuation lines after newlines (a /dev/kmsg record with its ` KEY=value`
    lines, or a multi-line dmesg record). `boot_time` (Unix seconds) places lines stamped in seconds
    since boot (dmesg, /dev/kmsg); `year` completes journalctl's year-less dates (default: the most
    recent year that does not put the line in the future). Stateless: a repeated fallen-off-the-bus
    line is returned each time; parse_lines() folds repeats.
    """
    lines = [part for part in line.splitlines() if part.strip()]
    if not lines:
        return None
    record = _make_record(lines, boot_time, year)
    if record is None:
        return None
    found = _xid_from_record(record)
    return found[0] if found is not None else None


class _FallenOffBusRepeats:
    """Folds the plain fallen-off-the-bus lines that repeat an XID 79 already found for that GPU."""

    def __init__(self) -> None:
        # bus id -> (clock kind, time) of the last XID 79 on it; "wall" and "boot" never compare.
        self._last: OrderedDict[str, tuple[str, float | None]] = OrderedDict()
        self._lock = threading.Lock()  # read_existing() and follow() may share one

    def keep(self, xid: KernelXid, explicit: bool) -> bool:
        if xid.xid != FALLEN_OFF_BUS_XID:
            return True
        kind, at = ("wall", xid.t) if xid.t is not None else ("boot", xid.since_boot_seconds)
        with self._lock:
            previous = self._last.get(xid.pci_bus_id)
            repeat = (
                not explicit
                and previous is not None
                and previous[0] == kind
                and (previous[1] is None or at is None or 0.0 <= at - previous[1] <= FALLEN_OFF_BUS_REPEAT_SECONDS)
            )
            if not repeat:
                self._last[xid.pci_bus_id] = (kind, at)
                self._last.move_to_end(xid.pci_bus_id)
                while len(self._last) > _MAX_TRACKED_BUS_IDS:
                    self._last.popitem(last=False)
        return not repeat


class _Assembler:
    """Groups lines into records (a header and its indented continuation lines) and finds XIDs."""

    def __init__(self, repeats: _FallenOffBusRepeats, boot_time: float | None, year: int | None = None) -> None:
        self.repeats = repeats
        self.boot_time = boot_time
        self.year = year
        self._pending: list[str] = []

    def push(self, line: str) -> list[KernelXid]:
        """Takes one line (no newline); returns the XIDs of the record this line completed."""
        if not line.strip():
            return self.flush()
        if line[0] in " \t" and self._pending:
            self._pending.append(line)
            return []
        found = self.flush()
        self._pending = [line]
        return found

    def flush(self) -> list[KernelXid]:
        """Ends the record in progress (at end of input, or when a kmsg read returned it whole)."""
        lines, self._pending = self._pending, []
        if not lines:
            return []
        record = _make_record(lines, self.boot_time, self.year)
        found = _xid_from_record(record) if record is not None else None
        if found is None or not self.repeats.keep(*found):
            return []
        return [found[0]]


def parse_lines(
    lines: Iterable[str], *, boot_time: float | None = None, year: int | None = None
) -> Iterator[KernelXid]:
    """Every XID in a kernel log, in order; repeats of an XID are kept, the plain fallen-off-the-bus
    lines that only restate an XID 79 on the same GPU (within FALLEN_OFF_BUS_REPEAT_SECONDS) are not."""
    assembler = _Assembler(_FallenOffBusRepeats(), boot_time, year)
    for chunk in lines:
        for line in chunk.splitlines():
            yield from assembler.push(line)
    yield from assembler.flush()


def replay_events(
    lines: Iterable[str],
    node: str,
    *,
    boot_time: float | None = None,
    year: int | None = None,
    bus_id_to_gpu: Mapping[str, int] | None = None,
) -> list[Event]:
    """The XIDs of a kernel log as replay events (`fleetwatchctl detect --kmsg`).

    t is the line's own time; for dmesg and /dev/kmsg lines, boot_time + seconds since boot, or the
    seconds since boot themselves when boot_time is unknown (a timeline starting at 0); a line with
    no time at all takes the time of the line before it. gpu stays None unless bus_id_to_gpu
    names the GPU.
    """
    gpu_of = _normalized_gpu_map(bus_id_to_gpu or {})
    events: list[Event] = []
    last_t = 0.0
    for found in parse_lines(lines, boot_time=boot_time, year=year):
        if found.t is not None:
            t = found.t
        elif found.since_boot_seconds is not None:
            t = found.since_boot_seconds
        else:
            t = last_t
        last_t = t
        events.append(
            Event(
                t=t,
                node=node,
                kind="xid",
                gpu=gpu_of.get(found.pci_bus_id),
                xid=found.xid,
                pci_bus_id=found.pci_bus_id,
                message=found.message,
                source="kmsg",
            )
        )
    return events


def _normalized_gpu_map(bus_id_to_gpu: Mapping[str, int]) -> dict[str, int]:
    normalized = {}
    for bus_id, index in bus_id_to_gpu.items():
        try:
            normalized[normalize_pci_bus_id(bus_id)] = int(index)
        except (ValueError, TypeError):
            log.warning("ignoring GPU %r with an unreadable PCI bus id %r", index, bus_id)
    return normalized


class _Reader:
    """Reads records from an open kernel log: /dev/kmsg (a record per read) or a regular file."""

    def __init__(
        self,
        fd: int,
        is_kmsg: bool,
        assembler: _Assembler,
        read: Callable[[int, int], bytes] = os.read,
    ) -> None:
        self.fd = fd
        self.is_kmsg = is_kmsg
        self.assembler = assembler
        self.read = read
        self.last_seq: int | None = None  # /dev/kmsg: the newest record seen
        self.skip_through_seq: int | None = None  # /dev/kmsg: records already read by an earlier pass
        self.offset = 0  # regular file: bytes consumed up to the last complete line
        self.records_lost = 0
        self._partial = b""
        self._overwritten = False

    def read_available(self) -> list[KernelXid]:
        """Everything readable now, without blocking; raises OSError on a failure other than
        EAGAIN (end of data), EPIPE (records overwritten: logged, then reading goes on) or EINTR."""
        return self._read_kmsg() if self.is_kmsg else self._read_file()

    def _read_kmsg(self) -> list[KernelXid]:
        found: list[KernelXid] = []
        while True:
            try:
                data = self.read(self.fd, _READ_SIZE_BYTES)
            except BlockingIOError:
                return found
            except BrokenPipeError:
                # The ring buffer overwrote records before we read them; the kernel has moved us
                # to the oldest record left, and the sequence gap tells how many went.
                self._overwritten = True
                continue
            except InterruptedError:
                continue
            if not data:
                return found
            text = data.decode("utf-8", errors="replace")
            match = _KMSG_RE.match(text.split("\n", 1)[0])
            if match is not None:
                seq = int(match["seq"])
                if self.skip_through_seq is not None and seq <= self.skip_through_seq:
                    continue
                lost = seq - self.last_seq - 1 if self.last_seq is not None else 0
                if lost > 0:
                    self.records_lost += lost
                    log.warning("kernel log overwritten before it was read: %d records lost", lost)
                elif self._overwritten:
                    log.warning("kernel log overwritten before it was read; reading on")
                self._overwritten = False
                self.last_seq = seq
            for line in text.splitlines():
                found += self.assembler.push(line)
            found += self.assembler.flush()  # a kmsg read returns one whole record

    def _read_file(self) -> list[KernelXid]:
        found: list[KernelXid] = []
        while True:
            try:
                data = self.read(self.fd, _READ_SIZE_BYTES)
            except InterruptedError:
                continue
            except BlockingIOError:  # a FIFO with nothing in it
                break
            if not data:
                info = os.fstat(self.fd)
                if stat.S_ISREG(info.st_mode) and info.st_size < self.offset:
                    # Truncated under us (logrotate's copytruncate): the new lines start at 0.
                    self.offset = os.lseek(self.fd, 0, os.SEEK_SET)
                    self._partial = b""
                    continue
                break
            *lines, self._partial = (self._partial + data).split(b"\n")
            for line in lines:
                self.offset += len(line) + 1
                found += self.assembler.push(line.decode("utf-8", errors="replace").rstrip("\r"))
        # No more data for now: a record's continuation lines are written with it, so it is whole.
        found += self.assembler.flush()
        return found


@dataclass(frozen=True, slots=True)
class _ResumePoint:
    """Where read_existing() stopped, so follow() neither misses nor repeats records."""

    is_kmsg: bool
    seq: int | None  # /dev/kmsg
    offset: int  # regular file
    inode: tuple[int, int]  # (st_dev, st_ino) of the file read


class KmsgSource:
    """Follows the kernel log for the agent and turns its XID lines into event dicts."""

    name = "kmsg"

    def __init__(
        self,
        path: str = "/dev/kmsg",
        *,
        bus_id_to_gpu: Mapping[str, int] = MappingProxyType({}),
        boot_time: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.clock = clock
        # /proc/stat's btime: whole seconds, so kmsg-derived times are within a second of true.
        self.boot_time = psutil.boot_time() if boot_time is None else boot_time
        self._gpu_of = _normalized_gpu_map(bus_id_to_gpu)
        self._repeats = _FallenOffBusRepeats()
        self._resume: _ResumePoint | None = None
        self._off_logged = False
        self.records_lost_total = 0
        # Set while follow() has the log open and positioned: records written from then on are seen.
        self.following = threading.Event()

    def event(self, found: KernelXid, t: float) -> dict[str, Any]:
        """The event dict the NVML source emits, for a kernel-log XID."""
        return {
            "t": t,
            "kind": "xid",
            "gpu": self._gpu_of.get(found.pci_bus_id),
            "uuid": None,
            "pci_bus_id": found.pci_bus_id,
            "xid": found.xid,
            "message": found.message,
            "source": "kmsg",
        }

    def _open(self) -> tuple[int, os.stat_result] | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if not self._off_logged:
                self._off_logged = True
                log.warning("kernel log XIDs off: cannot open %s: %s", self.path, exc.strerror or exc)
            return None
        return fd, os.fstat(fd)

    def read_existing(self) -> list[dict[str, Any]]:
        """The XIDs already in the log (since boot, for /dev/kmsg), read once without blocking.

        Their t is the record's own time (boot_time + the kernel's timestamp), stable from one agent
        start to the next. A later follow() carries on from where this stopped.
        """
        opened = self._open()
        if opened is None:
            return []
        fd, info = opened
        is_kmsg = stat.S_ISCHR(info.st_mode)
        reader = _Reader(fd, is_kmsg, _Assembler(self._repeats, self.boot_time))
        try:
            found = reader.read_available()
        except OSError as exc:
            log.warning("reading the kernel log %s failed: %s", self.path, exc)
            found = []
        finally:
            os.close(fd)
        self.records_lost_total += reader.records_lost
        self._resume = _ResumePoint(is_kmsg, reader.last_seq, reader.offset, (info.st_dev, info.st_ino))
        now = self.clock()
        return [self.event(x, x.t if x.t is not None else now) for x in found]

    def follow(
        self,
        stop: threading.Event,
        on_events: Callable[[list[dict[str, Any]]], None],
        poll_timeout_seconds: float = 1.0,
    ) -> None:
        """Blocks, calling on_events with the XIDs of each new record, until `stop` is set.

        Starts at the end of the log (or where read_existing() stopped). On /dev/kmsg it waits in
        poll(); a regular file is tailed every poll_timeout_seconds. A missing or unreadable log is
        logged once and the method returns; so does a read failure other than an overwritten record.
        """
        opened = self._open()
        if opened is None:
            return
        fd, info = opened
        is_kmsg = stat.S_ISCHR(info.st_mode)
        reader = _Reader(fd, is_kmsg, _Assembler(self._repeats, self.boot_time))
        try:
            self._position(reader, info)
            poller = None
            if is_kmsg:
                poller = select.poll()
                poller.register(fd, select.POLLIN)
            self.following.set()
            while not stop.is_set():
                try:
                    found = reader.read_available()
                except OSError as exc:
                    log.warning("kernel log XIDs off: reading %s failed: %s", self.path, exc)
                    return
                finally:
                    self.records_lost_total += reader.records_lost
                    reader.records_lost = 0
                if found:
                    # A record read now was written moments ago; the kernel's own stamp would put
                    # it off by the time spent in suspend, which that clock does not count.
                    now = self.clock()
                    try:
                        on_events([self.event(x, now) for x in found])
                    except Exception:  # a failing consumer must not end XID watching
                        log.exception("handling kernel-log XIDs failed")
                if poller is not None:
                    poller.poll(max(0, int(poll_timeout_seconds * 1000)))
                else:
                    stop.wait(poll_timeout_seconds)
        finally:
            self.following.clear()
            os.close(fd)

    def _position(self, reader: _Reader, info: os.stat_result) -> None:
        if stat.S_ISFIFO(info.st_mode):
            return  # a pipe has no position: what it delivers is new anyway
        resume = self._resume
        if reader.is_kmsg:
            if resume is not None and resume.is_kmsg and resume.seq is not None:
                # The first read after open() returns the oldest record; skip what was read.
                reader.skip_through_seq = resume.seq
                reader.last_seq = resume.seq
            else:
                os.lseek(reader.fd, 0, os.SEEK_END)  # on /dev/kmsg: only records from now on
            return
        same_file = resume is not None and resume.inode == (info.st_dev, info.st_ino)
        if resume is not None and same_file and not resume.is_kmsg and resume.offset <= info.st_size:
            reader.offset = os.lseek(reader.fd, resume.offset, os.SEEK_SET)
        else:
            reader.offset = os.lseek(reader.fd, 0, os.SEEK_END)
