"""The live detection loop: detectors over recent data every interval and at once when events arrive."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np

from fleetwatch.asyncwait import wait_any
from fleetwatch.collector.storage.store import GpuRows, IngestBatch, Store, Targets
from fleetwatch.detectors.engine import RecentData, Tracker
from fleetwatch.records import Finding, GpuSample, IbSample
from fleetwatch.systemd import notify, watchdog_interval_seconds
from fleetwatch.wire import GPU_FIELDS

log = logging.getLogger(__name__)

T = TypeVar("T")


def finding_from_alert(alert: dict) -> Finding:
    """A firing alert reloaded after a restart, so the tracker neither re-opens nor forgets it."""
    return Finding(
        detector=alert["detector"],
        severity=alert["severity"],
        action=alert["action"],
        summary=alert["summary"],
        start=alert["starts_at"],
        node=alert["node"],
        gpu=alert["gpu"],
        job=alert["job"],
        rank=alert["rank"],
        evidence=alert.get("evidence") or {},
        key=alert["key"],
    )


# What ingest stored, as detection's records (feed_recent), in the detection thread.
_FIELD_INDEX = {name: i for i, name in enumerate(GPU_FIELDS)}
_FIELD_COUNT = len(GPU_FIELDS)


def feed_recent(recent: RecentData, items: Sequence[IngestBatch], stored: Sequence[bool]) -> None:
    """Stored batches into detection's recent data (in the detection thread)."""
    dense: list[tuple[str, GpuRows]] = []
    for item, new in zip(items, stored):
        recent.note_node(item.node, item.received_at)
        if not new:
            continue
        _add_gpu_samples(recent, item.node, item.gpu_samples)
        if item.gpu_rows is not None and len(item.gpu_rows):
            dense.append((item.node, item.gpu_rows))
        for h in item.host_samples:
            recent.add_host(h)
        for e in item.events:
            recent.add_event(e)
        for st in item.steps:
            recent.add_step(st)
        for port in item.ib_ports:
            recent.add_ib(ib_sample(item.node, port))
    if dense:
        _add_gpu_rows(recent, dense)


def _add_gpu_rows(recent: RecentData, batches: Sequence[tuple[str, GpuRows]]) -> None:
    """Dense batches' rows of every node in one write: detection's cost is per write, not per value."""
    labels = [rows.labels[i] for _, rows in batches for i in rows.label.tolist()]
    recent.add_gpu_rows_timed(
        [node for node, rows in batches for _ in range(len(rows))],
        np.concatenate([rows.t for _, rows in batches]),
        np.concatenate([rows.gpu for _, rows in batches]).tolist(),
        np.concatenate([rows.values for _, rows in batches]),
        [label[0] for label in labels],
        [label[1] for label in labels],
        [label[2] for label in labels],
    )


def _add_gpu_samples(recent: RecentData, node: str, samples: Sequence[GpuSample]) -> None:
    """A batch's GPU samples as rows, one add_gpu_rows per sampling time (one for an agent's batch)."""
    by_time: dict[float, list[GpuSample]] = {}
    for sample in samples:
        by_time.setdefault(sample.t, []).append(sample)
    for t, group in by_time.items():
        rows = [[math.nan] * _FIELD_COUNT for _ in group]
        for row, sample in zip(rows, group):
            for name, value in sample.metrics.items():
                row[_FIELD_INDEX[name]] = value  # check_batch kept canonical fields only
        recent.add_gpu_rows(
            node,
            t,
            [s.gpu for s in group],
            np.array(rows, dtype=np.float64),
            [s.uuid for s in group],
            [s.job for s in group],
            [s.rank for s in group],
        )


def ib_sample(node: str, port: Mapping[str, Any]) -> IbSample:
    """An ingested (or stored) InfiniBand port row as the detectors' record."""
    metrics = {k: v for k, v in port.items() if k.startswith("ib_") and v is not None}
    return IbSample(t=port["t"], node=node, device=port["device"], port=int(port["port"]), metrics=metrics)


# A pass that has not finished in this many intervals (at least this many seconds) stops the
# systemd watchdog pings, so a wedged detection thread gets the collector restarted.
WATCHDOG_PASS_INTERVALS = 5
WATCHDOG_MIN_SECONDS = 30.0


class DetectionLoop:
    """Detection in a thread of its own: ingest and the HTTP API never wait on a pass.

    The event loop hands what it stored to `feed` (a callable applied to the RecentData); only
    this thread touches the RecentData and the Tracker's state. A pass runs every
    `interval_seconds`, and at once after `trigger()` (events must not wait for the interval).
    """

    def __init__(
        self,
        store: Store,
        recent: RecentData,
        tracker: Tracker,
        *,
        targets: Targets,
        interval_seconds: float,
        on_alerts_changed: Callable[[], None],
        clock: Callable[[], float] = time.time,
        active: Callable[[], bool] = lambda: True,
        name: str = "detection",
    ) -> None:
        """`active`: whether passes run now (fleet detection runs only on its lease's holder);
        while not, what is fed is still applied, so the data is there when it turns active."""
        self.store = store
        self.active = active
        self.name = name
        self.recent = recent
        self.tracker = tracker
        self.targets = targets
        self.interval_seconds = interval_seconds
        self.on_alerts_changed = on_alerts_changed
        self.clock = clock
        self.watching_since = clock()
        self.passes = 0
        self.last_pass_at: float | None = None  # time.monotonic() at the end of the last pass
        self._inbox: deque[Callable[[RecentData], None]] = deque()
        self._trigger = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Transitions the database has not taken yet (it was down); retried on the next pass.
        self._unsaved: list[tuple[str, Finding]] = []

    def feed(self, change: Callable[[RecentData], None]) -> None:
        """Queue a change of the recent data (from any thread); applied before the next pass."""
        self._inbox.append(change)

    def trigger(self) -> None:
        """Run a pass now (events must not wait for the next interval)."""
        self._trigger.set()

    def inspect(self, read: Callable[[RecentData], T]) -> Future[T]:
        """`read(recent data)` in the detection thread, after what was fed before it (tools, tests)."""
        future: Future[T] = Future()

        def run(recent: RecentData) -> None:
            try:
                future.set_result(read(recent))
            except Exception as exc:
                future.set_exception(exc)

        self.feed(run)
        self.trigger()
        return future

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _save(self, transitions: list[tuple[str, Finding]], now: float) -> None:
        for i, (kind, finding) in enumerate(transitions):
            try:
                if kind == "open":
                    self.store.open_alert(finding, now, self.targets)
                else:
                    self.store.resolve_alert(finding.fingerprint, finding.end or now, now, self.targets)
            except Exception as exc:
                log.error("cannot record alert %s (%s): %s; will retry", finding.fingerprint, kind, exc)
                self._unsaved = transitions[i:]
                return
        self._unsaved = []

    def _drain(self) -> None:
        while True:
            try:
                change = self._inbox.popleft()
            except IndexError:
                return
            change(self.recent)

    def run_pass(self) -> tuple[list[Finding], list[Finding]]:
        """One pass (in the detection thread, or a test's): apply what was fed, detect, record transitions."""
        self._drain()
        now = self.clock()
        if not self.active():
            self.recent.window(now, self.watching_since)  # prunes what grew past retention meanwhile
            return [], []
        opened, closed = self.tracker.evaluate(self.recent.window(now, self.watching_since))
        self.passes += 1
        transitions = self._unsaved + [("open", f) for f in opened] + [("close", f) for f in closed]
        if transitions:
            self._save(transitions, now)
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self.on_alerts_changed)
        self.last_pass_at = time.monotonic()
        return opened, closed

    def _run(self) -> None:
        while not self._stop.is_set():
            self._trigger.clear()
            try:
                self.run_pass()
            except Exception:
                log.exception("detection pass failed")
            self._trigger.wait(self.interval_seconds)

    async def watchdog(self, stop: asyncio.Event) -> None:
        """Ping systemd's watchdog from the event loop while detection passes keep finishing."""
        if watchdog_interval_seconds() is None:
            return
        stale_after = max(WATCHDOG_MIN_SECONDS, WATCHDOG_PASS_INTERVALS * self.interval_seconds)
        while not stop.is_set():
            if self.last_pass_at is not None and time.monotonic() - self.last_pass_at < stale_after:
                notify("WATCHDOG=1")
            await wait_any(stop, timeout_seconds=min(self.interval_seconds, 1.0))

    def close(self) -> None:
        """Stop the thread; a pass (and its alert saves) in progress finishes before the store closes."""
        self._stop.set()
        self._trigger.set()
        if self._thread is not None:
            self._thread.join()
