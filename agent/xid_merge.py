"""XID de-duplication: an XID seen through both NVML events and the kernel log is reported once."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fleetwatch.inventory import normalize_pci_bus_id

# Unmatched XIDs kept at most; a storm of a few thousand XIDs in one window is already far past
# what either path reports in practice (a burst of XID 13 is tens of lines), so this only bounds
# memory against a runaway source.
DEFAULT_MAX_PENDING = 4096


@dataclass(frozen=True, slots=True)
class _Seen:
    """An admitted XID not yet matched by the other path."""

    arrived: float  # clock() seconds
    xid: int
    source: str
    identity: frozenset[tuple[str, Any]]  # ("gpu", index) and/or ("bus", "0000:9b:00.0")


def _identity(event: Mapping[str, Any]) -> frozenset[tuple[str, Any]]:
    """What names the GPU: its index, its PCI bus id, or both (either one matching is enough,
    since the kernel log knows only the bus id when the agent could not map it to an index)."""
    keys: set[tuple[str, Any]] = set()
    gpu = event.get("gpu")
    if gpu is not None:
        keys.add(("gpu", int(gpu)))
    bus_id = event.get("pci_bus_id")
    if bus_id:
        try:
            keys.add(("bus", normalize_pci_bus_id(str(bus_id))))
        except ValueError:
            keys.add(("bus", str(bus_id).strip().lower()))
    return frozenset(keys)


class XidMerger:
    """Decides which XID events to send when NVML and the kernel log both report them.

    An event is a duplicate when an unmatched event from another source with the same XID on the
    same GPU (index or PCI bus id) was admitted at most window_seconds before; the two are then
    matched and neither matches again. So N repeats of an XID seen on both paths are sent N times.
    Time is the arrival time on `clock`, not the events' own t: the two paths stamp differently.
    Thread-safe: the NVML and kernel-log threads both call admit().
    """

    def __init__(
        self,
        window_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        if window_seconds < 0:
            raise ValueError(f"window_seconds must not be negative, got {window_seconds!r}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending!r}")
        self.window_seconds = window_seconds
        self.clock = clock
        self.max_pending = max_pending
        self.duplicates_total = 0  # events suppressed as seen through the other path
        self.evicted_total = 0  # unmatched events forgotten early because max_pending was reached
        self._pending: deque[_Seen] = deque()  # oldest first
        self._lock = threading.Lock()

    def admit(self, event: Mapping[str, Any]) -> bool:
        """True if `event` should be sent; False if it repeats one the other path already sent."""
        xid = event.get("xid")
        if event.get("kind", "xid") != "xid" or xid is None:
            return True
        identity = _identity(event)
        source = str(event.get("source") or "")
        now = self.clock()
        with self._lock:
            self._expire(now)
            if not identity:
                return True  # nothing to match on: never a duplicate, and nothing to keep
            for index, seen in enumerate(self._pending):
                if seen.xid == int(xid) and seen.source != source and seen.identity & identity:
                    del self._pending[index]
                    self.duplicates_total += 1
                    return False
            self._pending.append(_Seen(now, int(xid), source, identity))
            if len(self._pending) > self.max_pending:
                self._pending.popleft()
                self.evicted_total += 1
            return True

    def pending(self) -> int:
        """Admitted events still waiting for their twin from the other path."""
        with self._lock:
            self._expire(self.clock())
            return len(self._pending)

    def _expire(self, now: float) -> None:
        while self._pending and now - self._pending[0].arrived > self.window_seconds:
            self._pending.popleft()
