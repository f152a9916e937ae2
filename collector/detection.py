"""The live detection loop: detectors over recent data every interval and at once when events arrive."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from fleetwatch.asyncwait import wait_any
from fleetwatch.collector.storage.store import Store
from fleetwatch.detectors.engine import RecentData, Tracker
from fleetwatch.records import Finding
from fleetwatch.systemd import notify, watchdog_interval_seconds

log = logging.getLogger(__name__)


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


class DetectionLoop:
    def __init__(
        self,
        store: Store,
        recent: RecentData,
        tracker: Tracker,
        *,
        targets: Sequence[str],
        interval_seconds: float,
        on_alerts_changed: Callable[[], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.recent = recent
        self.tracker = tracker
        self.targets = list(targets)
        self.interval_seconds = interval_seconds
        self.on_alerts_changed = on_alerts_changed
        self.clock = clock
        self.watching_since = clock()
        self.passes = 0
        self._trigger = asyncio.Event()
        # Transitions the database has not taken yet (it was down); retried on the next pass.
        self._unsaved: list[tuple[str, Finding]] = []
        # Alert recording has a thread of its own: a burst of Hellos or API queries on the loop's
        # default executor must not hold a new alert back (one pass saves at a time anyway).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alert-recording")

    def trigger(self) -> None:
        """Run a pass now (events must not wait for the next interval)."""
        self._trigger.set()

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

    async def run_pass(self) -> tuple[list[Finding], list[Finding]]:
        now = self.clock()
        opened, closed = self.tracker.evaluate(self.recent.window(now, self.watching_since))
        self.passes += 1
        transitions = self._unsaved + [("open", f) for f in opened] + [("close", f) for f in closed]
        if transitions:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._save, transitions, now)
            self.on_alerts_changed()
        return opened, closed

    async def run(self, stop: asyncio.Event) -> None:
        watchdog = watchdog_interval_seconds() is not None
        while not stop.is_set():
            self._trigger.clear()
            try:
                await self.run_pass()
            except Exception:
                log.exception("detection pass failed")
            if watchdog:
                notify("WATCHDOG=1")
            await wait_any(self._trigger, stop, timeout_seconds=self.interval_seconds)

    def close(self) -> None:
        """After run() has ended: a save in progress finishes (the store closes next), nothing new starts."""
        self._executor.shutdown(wait=True, cancel_futures=True)
