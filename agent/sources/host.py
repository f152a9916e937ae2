"""Host source: the node's CPU, load, memory, disk and network, read under a movable procfs root.

The procfs root can point at a host's /proc mounted elsewhere (an agent in a container reading
the node's /host/proc) or at a fixture tree in tests. psutil reads its root from the
process-global ``psutil.PROCFS_PATH``, so each read swaps it in under a lock and puts it back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psutil

log = logging.getLogger(__name__)

DEFAULT_PROCFS_ROOT = "/proc"
# uuid5 namespace for the boot-time fallback boot id; any fixed UUID works, this one is ours.
_BOOT_ID_NAMESPACE = uuid.UUID("5a1c3f3e-9b7d-4f0e-8d7a-6f6c65657477")
# Serialises HostSource reads through psutil, whose procfs root is one process-global setting.
_PROCFS_LOCK = threading.Lock()
# psutil's scputimes namedtuple; its fields differ by platform (iowait, guest are Linux only).
_CpuTimes = Any


@contextlib.contextmanager
def _psutil_procfs(procfs_root: str) -> Iterator[None]:
    """Point psutil at ``procfs_root`` for the duration of the block (Linux only)."""
    if not hasattr(psutil, "PROCFS_PATH"):
        # Platforms without procfs ignore the root.
        yield
        return
    # Held even when no swap is needed, so no read runs while another source's root is in.
    with _PROCFS_LOCK:
        previous = psutil.PROCFS_PATH
        psutil.PROCFS_PATH = procfs_root
        try:
            yield
        finally:
            psutil.PROCFS_PATH = previous


def _is_loopback(interface: str) -> bool:
    # Linux names it "lo"; the BSDs and macOS "lo0".
    return interface == "lo" or (interface.startswith("lo") and interface[2:].isdigit())


class HostSource:
    """Samples the canonical host fields (see HostMetrics in telemetry.proto)."""

    def __init__(self, procfs_root: str = DEFAULT_PROCFS_ROOT, disk_path: str = "/") -> None:
        self.procfs_root = procfs_root.rstrip("/") or "/"
        self.disk_path = disk_path
        self._boot_id: str | None = None
        self._unavailable_logged: set[str] = set()
        # Our own CPU-times baseline rather than psutil.cpu_percent(interval=None): psutil 7
        # keys that baseline by thread, so a sampler run on executor threads would measure
        # from the wrong moment (or report a meaningless 0.0), and any other caller in the
        # process would shorten our interval. Taken now so the first sample() has a window.
        self._last_cpu_times = self._read_cpu_times()

    def sample(self) -> dict[str, float | int]:
        """Return the host fields that could be read; an unreadable field is absent, never 0."""
        readers: tuple[tuple[str, Callable[[], dict[str, float | int]]], ...] = (
            ("cpu_percent", self._cpu),
            ("load1", self._load),
            ("mem_used_bytes/mem_total_bytes", self._memory),
            ("disk_used_bytes/disk_total_bytes", self._disk),
            ("net_rx_bytes_total/net_tx_bytes_total", self._network),
        )
        values: dict[str, float | int] = {}
        for fields, read in readers:
            try:
                values.update(read())
            except Exception as exc:
                self._note_unavailable(fields, exc)
        return values

    def boot_id(self) -> str:
        """The kernel's boot id (a UUID that changes on every boot), read once and cached.

        Batches are keyed by (node, boot_id, seq), so the id must stay the same across agent
        restarts within one boot and change on reboot. When
        <procfs_root>/sys/kernel/random/boot_id cannot be read (not Linux, or a procfs without
        it), a UUID is derived from the boot time in whole seconds, which has both properties.
        Raises (OSError, or RuntimeError from psutil) if neither can be read.
        """
        if self._boot_id is None:
            path = os.path.join(self.procfs_root, "sys", "kernel", "random", "boot_id")
            try:
                with open(path, encoding="ascii") as f:
                    boot_id = f.read().strip()
                if not boot_id:
                    raise ValueError(f"{path} is empty")
            except (OSError, ValueError) as exc:
                with _psutil_procfs(self.procfs_root):
                    boot_time_seconds = int(psutil.boot_time())
                boot_id = str(uuid.uuid5(_BOOT_ID_NAMESPACE, f"boot_time:{boot_time_seconds}"))
                log.info("boot id unreadable (%s); using %s derived from boot time", exc, boot_id)
            self._boot_id = boot_id
        return self._boot_id

    # -- readers: each returns the fields it owns or raises --------------------------------

    def _read_cpu_times(self) -> _CpuTimes | None:
        try:
            with _psutil_procfs(self.procfs_root):
                return psutil.cpu_times()
        except Exception as exc:
            self._note_unavailable("cpu_percent", exc)
            return None

    def _cpu(self) -> dict[str, float | int]:
        previous = self._last_cpu_times
        with _psutil_procfs(self.procfs_root):
            current = psutil.cpu_times()
        if previous is None:
            self._last_cpu_times = current
            raise RuntimeError("no earlier CPU times to measure from (first successful read)")
        total_seconds, idle_seconds = _cpu_total_and_idle(current)
        prev_total_seconds, prev_idle_seconds = _cpu_total_and_idle(previous)
        elapsed_seconds = total_seconds - prev_total_seconds
        if elapsed_seconds <= 0:
            # Called again within one clock tick: no window to measure; keep the old baseline.
            raise RuntimeError("no CPU time elapsed since the previous sample")
        self._last_cpu_times = current
        busy_seconds = elapsed_seconds - max(0.0, idle_seconds - prev_idle_seconds)
        return {"cpu_percent": min(100.0, max(0.0, 100.0 * busy_seconds / elapsed_seconds))}

    def _load(self) -> dict[str, float | int]:
        try:
            with open(os.path.join(self.procfs_root, "loadavg"), encoding="ascii") as f:
                return {"load1": float(f.read().split()[0])}
        except OSError:
            # os.getloadavg describes the machine we run on, which is only right for the
            # default root (and is how non-Linux systems report load at all).
            if self.procfs_root != DEFAULT_PROCFS_ROOT:
                raise
            return {"load1": float(psutil.getloadavg()[0])}

    def _memory(self) -> dict[str, float | int]:
        with _psutil_procfs(self.procfs_root):
            memory = psutil.virtual_memory()
        # psutil's used is total - MemAvailable: page cache the kernel can reclaim is not "used".
        return {"mem_used_bytes": int(memory.used), "mem_total_bytes": int(memory.total)}

    def _disk(self) -> dict[str, float | int]:
        usage = psutil.disk_usage(self.disk_path)
        return {"disk_used_bytes": int(usage.used), "disk_total_bytes": int(usage.total)}

    def _network(self) -> dict[str, float | int]:
        # nowrap=False: psutil's wrap correction keeps process-global state keyed by interface
        # name, which mixes roots and turns a re-created interface's reset into a bogus jump;
        # /proc/net/dev counters are 64-bit on the 64-bit kernels GPU nodes run.
        with _psutil_procfs(self.procfs_root):
            per_interface = psutil.net_io_counters(pernic=True, nowrap=False)
        counters = [c for name, c in per_interface.items() if not _is_loopback(name)]
        if not counters:
            raise RuntimeError("no non-loopback network interfaces")
        return {
            "net_rx_bytes_total": sum(c.bytes_recv for c in counters),
            "net_tx_bytes_total": sum(c.bytes_sent for c in counters),
        }

    def _note_unavailable(self, fields: str, exc: BaseException) -> None:
        # Once per field per source: a missing file stays missing, and debug is enough because
        # the absence itself is visible downstream.
        if fields not in self._unavailable_logged:
            self._unavailable_logged.add(fields)
            log.debug("host %s unavailable under %s: %r", fields, self.procfs_root, exc)


def _cpu_total_and_idle(times: _CpuTimes) -> tuple[float, float]:
    """Total and idle CPU seconds, counted as psutil.cpu_percent and htop count them."""
    total_seconds: float = sum(times)
    # On Linux guest time is already included in user and nice.
    total_seconds -= getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)
    # iowait is time a CPU sat idle waiting for I/O; Linux does not include it in idle.
    idle_seconds = times.idle + getattr(times, "iowait", 0.0)
    return total_seconds, idle_seconds
