"""Which collector the agent streams to: its configured list in turn, each DNS name's addresses expanded.

One collector at a time. The agent asks `CollectorRotation.next()` before every connection (the
first, and after each failure or drain), so a collector that is down costs one attempt and the
next one is tried, instead of the agent hammering the one that is gone. Names are resolved at
every pick (in a worker thread: getaddrinfo blocks), so a collector added to a DNS name is used
without a restart. The walk starts at an offset hashed from the node name: a fleet configured
with the same list spreads over its collectors, and a restarted agent goes back where it was.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fleetwatch.addresses import join_host_port, parse_host_port

log = logging.getLogger(__name__)

# (host, port) -> the host's addresses; getaddrinfo in production, a dict in tests.
Resolver = Callable[[str, int], Sequence[str]]


@dataclass(frozen=True)
class CollectorTarget:
    """One collector to dial: the configured entry and the address dialed for it."""

    entry: str  # as configured, e.g. "collectors.example.internal:9470"
    address: str  # dialed: the entry itself, or one address its name resolved to
    host: str  # the entry's host: the name the collector's certificate is checked against

    @classmethod
    def of(cls, entry: str) -> CollectorTarget:
        """The entry dialed as configured (gRPC resolves a name itself)."""
        host, _ = parse_host_port(entry)
        return cls(entry, entry, host)

    @property
    def resolved(self) -> bool:
        """Whether the agent dials an address of the entry's name rather than the entry."""
        return self.address != self.entry

    def __str__(self) -> str:
        return f"{self.entry} ({self.address})" if self.resolved else self.entry


def resolve_addresses(host: str, port: int) -> list[str]:
    """The host's TCP addresses (getaddrinfo; raises OSError)."""
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _address_order(address: str) -> tuple[int, bytes]:
    """Sorted by this, the walk keeps its order whatever order the DNS server answers in (round-robin
    DNS rotates its records): IPv4 first, then IPv6, each numerically."""
    ip = ipaddress.ip_address(address)
    return ip.version, ip.packed


def node_offset(node: str) -> int:
    """Where a node starts in the list: stable across restarts (unlike hash()), spread across nodes."""
    return zlib.crc32(node.encode())


def spread_step(start: int, count: int) -> int:
    """How far along the walk an agent moves from a collector it leaves: 1 to count - 1, hashed
    from the node like its start, so a drained or dead collector's agents spread over the others
    instead of all landing on the one after it. A step that shares a factor with `count` would
    skip collectors for ever, so such a node takes 1."""
    if count < 3:
        return 1
    step = 1 + start % (count - 1)
    return step if math.gcd(step, count) == 1 else 1


class CollectorRotation:
    """Round robin over the collectors of `entries` (HOST:PORT each, checked by the config)."""

    def __init__(self, entries: Sequence[str], *, start: int = 0, resolve: Resolver = resolve_addresses) -> None:
        if not entries:
            raise ValueError("no collector addresses")
        self.entries = list(entries)
        self._start = start
        self._resolve = resolve
        self._last: CollectorTarget | None = None
        self._last_index = 0

    def targets(self) -> list[CollectorTarget]:
        """Every collector to walk over now, in order: each entry, a name as its addresses (blocking).

        A name that does not resolve stays in the walk as the name: gRPC resolves it again when it
        dials, and its error (logged by the send loop) says why it failed. A name of one address is
        dialed by name too; only a name of several is dialed address by address.
        """
        out: list[CollectorTarget] = []
        for entry in self.entries:
            host, port = parse_host_port(entry)
            if _is_address(host):
                out.append(CollectorTarget.of(entry))
                continue
            try:
                addresses = sorted(set(self._resolve(host, port)), key=_address_order)
            except (OSError, ValueError) as exc:  # ValueError: not an address (a resolver's bug)
                log.warning("collector %s: cannot resolve %s (%s); dialing the name", entry, host, exc)
                addresses = []
            if len(addresses) < 2:
                # One collector behind the name (or none found): dialed by name, as before 0.3.
                out.append(CollectorTarget.of(entry))
                continue
            out.extend(CollectorTarget(entry, join_host_port(address, port), host) for address in addresses)
        return out

    def next(self) -> CollectorTarget:
        """The collector after the one picked last (blocking: resolves names).

        "After" in today's walk: a name that gained or lost addresses since the last pick shifts
        the positions, so the last pick is looked up, not counted to; where it is gone, the one now
        in its place is next.
        """
        targets = self.targets()
        if self._last is None:
            index = self._start
        elif self._last in targets:
            index = targets.index(self._last) + spread_step(self._start, len(targets))
        else:
            index = self._last_index
        self._last_index = index % len(targets)
        self._last = targets[self._last_index]
        return self._last
