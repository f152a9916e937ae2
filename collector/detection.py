"""The live detection loop: detectors over recent data every interval and at once when events arrive."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from fleetwatch.asyncwait import wait_any
from fleetwatch.collector.storage.store import Store, Targets
from fleetwatch.detectors.engine import RecentData, Tracker
from fleetwatch.records import Finding
from fleetwatch.systemd import notify, watchdog_interval_seconds

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
    ) -> None:
        self.store = store
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
        self._thread = threading.Thread(target=self._run, name="detection", daemon=True)
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
