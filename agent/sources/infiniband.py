"""InfiniBand source: state, rate and error counters of every RDMA port under a movable sysfs root.

Reads `<sysfs_root>/class/infiniband/<device>/ports/<port>/` as the kernel documents it
(Documentation/ABI/stable/sysfs-class-infiniband) and as node_exporter's infiniband collector
reads it. RoCE ports (`link_layer` "Ethernet") live in the same tree and are reported too.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_SYSFS_ROOT = "/sys"
# Ports only come and go with hot-plug or a driver reload; listing every cycle would cost a
# directory scan per device for nothing, and a minute is soon enough to pick up a new HCA.
DEFAULT_RELIST_INTERVAL_SECONDS = 60.0

# counters/<file> -> canonical field. The kernel prints these from the PortCounters attribute,
# whose fields are narrow (symbol_error and port_rcv_errors 16 bits, link_error_recovery and
# link_downed 8 bits) and saturate at their maximum instead of wrapping: we report what we read.
_COUNTER_FIELDS: tuple[tuple[str, str], ...] = (
    ("link_downed", "ib_link_downed_total"),
    ("symbol_error", "ib_symbol_error_total"),
    ("port_rcv_errors", "ib_rcv_errors_total"),
    ("link_error_recovery", "ib_link_error_recovery_total"),
)
# "400 Gb/sec (4X NDR)", "2.5 Gb/sec (1X SDR)", and on older kernels "10 Gb/sec (4X)".
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*Gb/sec", re.IGNORECASE)


@dataclass(frozen=True)
class _Port:
    """One listed port, with its file paths joined once at listing time rather than per cycle."""

    device: str
    port: int
    link_layer: str | None  # fixed for the port's lifetime; read when listed
    state_path: str
    phys_state_path: str
    rate_path: str
    counter_paths: tuple[tuple[str, str], ...]  # (canonical field, path)


def parse_state(text: str) -> str:
    """`state` / `phys_state` content ("4: ACTIVE", "5: LinkUp") -> its name ("ACTIVE", "LinkUp")."""
    number, sep, name = text.strip().partition(":")
    # Without the "N:" prefix (not a format the kernel writes) the whole text is the name.
    return name.strip() if sep else number.strip()


def parse_rate_gbps(text: str) -> float | None:
    """`rate` content ("400 Gb/sec (4X NDR)") -> 400.0; None if it does not read as a rate."""
    match = _RATE_RE.match(text)
    return float(match.group(1)) if match else None


def parse_counter(text: str) -> int | None:
    """A counters/ file's content -> int; None for "N/A (no PMA)" (no performance agent)."""
    value = text.strip()
    return int(value) if value.isdigit() else None


class InfinibandSource:
    """Samples every InfiniBand/RoCE port: one dict per port (see IbPortMetrics in telemetry.proto).

    Besides the canonical fields each dict carries `device`, `port`, and the informational
    `ib_phys_state` and `link_layer`, which are not on the wire: senders keep `device`, `port`
    and the IB_FIELDS of fleetwatch.wire. A value that cannot be read is absent, never 0.
    """

    name = "infiniband"

    def __init__(
        self,
        sysfs_root: str = DEFAULT_SYSFS_ROOT,
        *,
        clock: Callable[[], float] = time.monotonic,
        relist_interval_seconds: float = DEFAULT_RELIST_INTERVAL_SECONDS,
    ) -> None:
        self.sysfs_root = sysfs_root.rstrip("/") or "/"
        self.class_dir = os.path.join(self.sysfs_root, "class", "infiniband")
        self.relist_interval_seconds = relist_interval_seconds
        self._clock = clock
        self._ports: list[_Port] = []
        self._listed_at: float | None = None
        self._relist_now = False
        self._problems_logged: set[str] = set()

    def sample(self) -> list[dict[str, Any]]:
        """Read every listed port; re-list first when the listing is older than the interval."""
        now = self._clock()
        if (
            self._relist_now
            or self._listed_at is None
            or now - self._listed_at >= self.relist_interval_seconds
            or now < self._listed_at  # a clock that stepped back: do not trust the age
        ):
            self._set_ports(self._list_ports())
            self._listed_at = now
            self._relist_now = False
        samples = []
        for port in self._ports:
            values = self._read_port(port)
            if values is None:
                # The port's directory went away (HCA removed, driver unloaded): drop it from
                # this cycle and list again next cycle instead of waiting out the interval.
                self._relist_now = True
                continue
            samples.append(values)
        return samples

    # -- listing -----------------------------------------------------------------------------

    def _list_ports(self) -> list[_Port]:
        try:
            devices = sorted(entry.name for entry in os.scandir(self.class_dir) if entry.is_dir())
        except OSError as exc:
            # No InfiniBand driver loaded (most machines, and any container without /sys/class):
            # nothing to report, and nothing worth more than one debug line.
            self._note_problem(self.class_dir, "no InfiniBand devices: %s", exc)
            return []
        ports: list[_Port] = []
        for device in devices:
            ports_dir = os.path.join(self.class_dir, device, "ports")
            try:
                numbers = sorted(int(entry.name) for entry in os.scandir(ports_dir) if entry.name.isdigit())
            except OSError as exc:
                self._note_problem(ports_dir, "InfiniBand device %s has no readable ports: %s", device, exc)
                continue
            for number in numbers:
                ports.append(self._describe_port(device, number, os.path.join(ports_dir, str(number))))
        return ports

    def _describe_port(self, device: str, number: int, port_dir: str) -> _Port:
        link_layer_path = os.path.join(port_dir, "link_layer")
        try:
            link_layer: str | None = _read(link_layer_path).strip() or None
        except OSError as exc:
            # Kernels before 2.6.37 have no link_layer; leave it out rather than guess.
            self._note_problem(link_layer_path, "%s unreadable: %s", link_layer_path, exc)
            link_layer = None
        counters_dir = os.path.join(port_dir, "counters")
        return _Port(
            device=device,
            port=number,
            link_layer=link_layer,
            state_path=os.path.join(port_dir, "state"),
            phys_state_path=os.path.join(port_dir, "phys_state"),
            rate_path=os.path.join(port_dir, "rate"),
            counter_paths=tuple((field, os.path.join(counters_dir, file_name)) for file_name, field in _COUNTER_FIELDS),
        )

    def _set_ports(self, ports: list[_Port]) -> None:
        before = {(p.device, p.port) for p in self._ports}
        after = {(p.device, p.port) for p in ports}
        if after != before:
            # Rare (boot, hot-plug, driver reload) and worth a line when it happens.
            log.info(
                "InfiniBand ports under %s: %s",
                self.class_dir,
                ", ".join(f"{device}/{port}" for device, port in sorted(after)) or "none",
            )
        self._ports = ports

    # -- reading -----------------------------------------------------------------------------

    def _read_port(self, port: _Port) -> dict[str, Any] | None:
        """The port's dict, or None when its directory no longer exists."""
        values: dict[str, Any] = {"device": port.device, "port": port.port}
        try:
            values["ib_state"] = parse_state(_read(port.state_path))
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._note_problem(port.state_path, "%s unreadable: %s", port.state_path, exc)
        try:
            values["ib_phys_state"] = parse_state(_read(port.phys_state_path))
        except OSError as exc:
            self._note_problem(port.phys_state_path, "%s unreadable: %s", port.phys_state_path, exc)
        if port.link_layer is not None:
            values["link_layer"] = port.link_layer
        try:
            rate_text = _read(port.rate_path)
        except OSError as exc:
            # The kernel answers EINVAL here when the driver cannot report the link width.
            self._note_problem(port.rate_path, "%s unreadable: %s", port.rate_path, exc)
        else:
            rate_gbps = parse_rate_gbps(rate_text)
            if rate_gbps is None:
                self._note_problem(port.rate_path, "%s not a rate: %r", port.rate_path, rate_text)
            else:
                values["ib_rate_gbps"] = rate_gbps
        for field, path in port.counter_paths:
            try:
                text = _read(path)
            except OSError as exc:
                self._note_problem(path, "%s unreadable: %s", path, exc)
                continue
            count = parse_counter(text)
            if count is None:
                self._note_problem(path, "%s not a count: %r", path, text.strip())
                continue
            values[field] = count
        return values

    def _note_problem(self, key: str, message: str, *args: object) -> None:
        # Once per file per source: a missing file stays missing, and the absent field already
        # shows downstream, so debug is enough and the log does not grow with every cycle.
        if key not in self._problems_logged:
            self._problems_logged.add(key)
            log.debug(message, *args)


def _read(path: str) -> str:
    # sysfs attributes are one short ASCII line; a single read returns all of it.
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read()
