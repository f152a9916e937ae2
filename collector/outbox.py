"""Delivers alert transitions from the database outbox, retrying with backoff until each is sent.

An alert change and its delivery rows commit together, so a collector that dies between the two
still sends the notification after it restarts.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from fleetwatch.asyncwait import wait_any
from fleetwatch.backoff import backoff_seconds
from fleetwatch.collector.notify import NotifyError, notifier_for, target_for_log
from fleetwatch.collector.storage.store import Store

log = logging.getLogger(__name__)

MAX_CONCURRENT_SENDS = 16
IDLE_POLL_SECONDS = 5.0


class Outbox:
    def __init__(
        self,
        store: Store,
        *,
        max_attempts: int = 12,
        backoff_min_seconds: float = 1.0,
        backoff_max_seconds: float = 300.0,
        timeout_seconds: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.max_attempts = max_attempts
        self.backoff_min_seconds = backoff_min_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self.timeout_seconds = timeout_seconds
        self.clock = clock
        self.sent = 0
        self.retried = 0
        self.failed = 0
        self._wake = asyncio.Event()
        self._rng = random.Random()

    def wake(self) -> None:
        self._wake.set()

    def _deliver(self, delivery: dict) -> None:
        """Blocking: one send and its bookkeeping (runs in a worker thread)."""
        now = self.clock()
        try:
            notifier_for(delivery["target"], timeout_seconds=self.timeout_seconds).send(
                delivery, delivery["transition"]
            )
        except NotifyError as exc:
            # The stored target holds the whole URL; logs get its redacted form, and the notifier's
            # message (logged and stored as last_error) is redacted by the notifier.
            target = target_for_log(delivery["target"])
            attempts = delivery["attempts"] + 1
            if attempts >= self.max_attempts:
                self.failed += 1
                log.error("giving up on %s after %d attempts: %s", target, attempts, exc)
                self.store.mark_failed(delivery["id"], str(exc))
                return
            # attempts counts the failed sends, so the first retry (backoff's retry 0) follows 1.
            delay = backoff_seconds(attempts - 1, self.backoff_min_seconds, self.backoff_max_seconds, self._rng)
            self.retried += 1
            log.warning("delivery to %s failed (%s); retry %d in %.1f s", target, exc, attempts, delay)
            self.store.mark_retry(delivery["id"], str(exc), now + delay)
            return
        self.sent += 1
        self.store.mark_delivered(delivery["id"], self.clock())

    async def run(self, stop: asyncio.Event) -> None:
        limit = asyncio.Semaphore(MAX_CONCURRENT_SENDS)

        async def deliver(d: dict) -> None:
            async with limit:
                await asyncio.to_thread(self._deliver, d)

        while not stop.is_set():
            self._wake.clear()
            try:
                due = await asyncio.to_thread(self.store.due_deliveries, self.clock(), 100)
                if due:
                    await asyncio.gather(*(deliver(d) for d in due), return_exceptions=False)
                    continue  # there may be more due right away
                next_due = await asyncio.to_thread(self.store.next_delivery_due)
            except Exception:
                log.exception("outbox pass failed; retrying")
                next_due = None
            wait = IDLE_POLL_SECONDS if next_due is None else min(IDLE_POLL_SECONDS, max(0.0, next_due - self.clock()))
            await wait_any(self._wake, stop, timeout_seconds=wait)
