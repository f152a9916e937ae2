"""Delivers alert transitions from the database outbox on each target's own threads, retrying with backoff.

An alert change and its delivery rows commit together, so a collector that dies between the two
still sends the notification after it restarts.

Sends never touch the event loop's default executor, which ingest, the gRPC Hello and the HTTP API
use: each target (the log, each webhook) has a lane of its own, a few threads of its own, so a
receiver that hangs holds only its own lane's threads, for at most webhook_timeout_seconds a try,
and neither ingest, alert recording nor the other targets wait for it. The outbox's own queries
run on one thread of their own too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from fleetwatch.asyncwait import wait_any
from fleetwatch.backoff import backoff_seconds
from fleetwatch.collector.notify import Notifiers, NotifyError, target_for_log
from fleetwatch.collector.notify.log import LogNotifier
from fleetwatch.collector.storage.store import Store, silence_matches

log = logging.getLogger(__name__)

# Sends in flight to one target at once; a hanging receiver holds at most this many threads.
SENDS_PER_TARGET = 4
# Due deliveries read per query.
DUE_PER_QUERY = 100
# Alert transitions in one webhook body at most (Alertmanager's own bodies are unbounded; a
# receiver's request size limit is not).
GROUP_MAX_ALERTS = 100
IDLE_POLL_SECONDS = 5.0
# While another collector holds the alerts lease: how often to look whether this one took it.
INACTIVE_POLL_SECONDS = 1.0
# A delivery whose outcome could not be written (the database failed) waits this long before it is
# sent again: it stays pending, and re-sending it at once would flood the receiver.
UNRECORDED_HOLD_SECONDS = 5.0

Outcome = Literal["sent", "retry", "failed", "silenced", "unrecorded"]
T = TypeVar("T")


@dataclass
class _Lane:
    """One target's sends: its own threads and the deliveries in flight on them."""

    executor: ThreadPoolExecutor
    capacity: int
    sends: int = 0
    in_flight: set[int] = field(default_factory=set)
    # The stored targets sent on this lane (an old row's whole URL shares its webhook's lane).
    targets: set[str] = field(default_factory=set)

    @property
    def full(self) -> bool:
        return self.sends >= self.capacity


class Outbox:
    def __init__(
        self,
        store: Store,
        notifiers: Notifiers,
        *,
        max_attempts: int = 12,
        backoff_min_seconds: float = 1.0,
        backoff_max_seconds: float = 300.0,
        sends_per_target: int = SENDS_PER_TARGET,
        clock: Callable[[], float] = time.time,
        active: Callable[[], bool] = lambda: True,
    ) -> None:
        """`active`: whether this collector sends now (it holds the alerts lease, collector/cluster.py)."""
        self.store = store
        self.notifiers = notifiers
        self.active = active
        self.max_attempts = max_attempts
        self.backoff_min_seconds = backoff_min_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self.sends_per_target = sends_per_target
        self.clock = clock
        # (target as logs show it, outcome) -> deliveries, for /metrics.
        self.counts: Counter[tuple[str, str]] = Counter()
        self._counts_lock = threading.Lock()  # the lanes' threads count outcomes
        self._wake = asyncio.Event()
        self._rng = random.Random()
        self._lanes: dict[str, _Lane] = {}
        # Delivery id -> clock time before which it is not sent again (its outcome was not recorded).
        self._held: dict[int, float] = {}
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox-db")
        self._loop: asyncio.AbstractEventLoop | None = None

    def wake(self) -> None:
        self._wake.set()

    # -- one delivery (a lane's thread) -------------------------------------------------------

    def _count(self, target: str, outcome: Outcome, deliveries: int) -> None:
        with self._counts_lock:
            self.counts[(target, "retried" if outcome == "retry" else outcome)] += deliveries

    def total(self, outcome: str) -> int:
        """Deliveries with this outcome (sent, retried, failed, silenced) over every target."""
        with self._counts_lock:
            return sum(n for (_, result), n in self.counts.items() if result == outcome)

    @property
    def sent(self) -> int:
        return self.total("sent")

    @property
    def retried(self) -> int:
        return self.total("retried")

    @property
    def failed(self) -> int:
        return self.total("failed")

    def _deliver(self, group: list[dict[str, Any]]) -> Outcome:
        """Blocking: one send of a group and its bookkeeping. Logs name the target by its reference, never a token."""
        target = target_for_log(group[0]["target"])
        try:
            group = self._drop_silenced(group, target)
            if not group:
                return "silenced"
            outcome = self._send_and_record(group, target)
        except Exception as exc:  # the database failed us: the deliveries stay pending
            log.error("cannot record the delivery to %s (it will be sent again): %s", target, exc)
            return "unrecorded"
        self._count(target, outcome, len(group))
        return outcome

    def _drop_silenced(self, group: list[dict[str, Any]], target: str) -> list[dict[str, Any]]:
        """The group without the deliveries an active silence covers (those are marked silenced)."""
        silences = [s for s in self.store.silences(self.clock()) if s["state"] == "active"]
        if not silences:
            return group
        caught: dict[int, list[int]] = {}
        rest = []
        for delivery in group:
            silence = next((s for s in silences if silence_matches(s, delivery)), None)
            if silence is None:
                rest.append(delivery)
            else:
                caught.setdefault(int(silence["id"]), []).append(int(delivery["id"]))
        for silence_id, ids in caught.items():
            self.store.mark_silenced(ids, silence_id)
            self._count(target, "silenced", len(ids))
            log.info("silence %d held back %d alert transition(s) to %s", silence_id, len(ids), target)
        return rest

    def _send_and_record(self, group: list[dict[str, Any]], target: str) -> Outcome:
        now = self.clock()
        try:
            self.notifiers.for_target(group[0]["target"]).send(group)
        except NotifyError as exc:
            # The notifier's message (logged and stored as last_error) is redacted by the notifier.
            attempts = max(delivery["attempts"] for delivery in group) + 1
            if exc.permanent or attempts >= self.max_attempts:
                why = "the receiver refused it" if exc.permanent else f"{attempts} attempts"
                log.error("giving up on %d alert transition(s) to %s after %s: %s", len(group), target, why, exc)
                for delivery in group:
                    self.store.mark_failed(delivery["id"], str(exc))
                return "failed"
            # attempts counts the failed sends, so the first retry (backoff's retry 0) follows 1.
            delay = backoff_seconds(attempts - 1, self.backoff_min_seconds, self.backoff_max_seconds, self._rng)
            log.warning("delivery to %s failed (%s); retry %d in %.1f s", target, exc, attempts, delay)
            for delivery in group:
                self.store.mark_retry(delivery["id"], str(exc), now + delay)
            return "retry"
        sent_at = self.clock()
        for delivery in group:
            self.store.mark_delivered(delivery["id"], sent_at)
        return "sent"

    # -- the loop -----------------------------------------------------------------------------

    def _lane(self, target: str) -> _Lane:
        name = self.notifiers.lane(target)
        lane = self._lanes.get(name)
        if lane is None:
            scheme = name.partition(":")[0]
            executor = ThreadPoolExecutor(max_workers=self.sends_per_target, thread_name_prefix=f"notify-{scheme}")
            lane = self._lanes[name] = _Lane(executor, self.sends_per_target)
        lane.targets.add(target)
        return lane

    def _skips(self) -> tuple[set[int], set[str]]:
        """Deliveries not to read now: those in flight, those held, and every one of a full lane's targets."""
        now = self.clock()
        for delivery_id in [i for i, until in self._held.items() if until <= now]:
            del self._held[delivery_id]
        ids = set(self._held)
        targets: set[str] = set()
        for lane in self._lanes.values():
            ids |= lane.in_flight
            if lane.full:
                targets |= lane.targets
        return ids, targets

    def _dispatch(self, group: list[dict[str, Any]]) -> bool:
        """Start sending a group on its lane; False when the lane has no room (it is read again later)."""
        assert self._loop is not None
        lane = self._lane(group[0]["target"])
        ids = {int(delivery["id"]) for delivery in group}
        if lane.full or ids & lane.in_flight:
            return False
        lane.sends += 1
        lane.in_flight |= ids
        future = lane.executor.submit(self._deliver, group)
        loop = self._loop

        def finished(done: Future[Outcome]) -> None:
            # RuntimeError: the loop closed during shutdown, nothing is left to tell.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._finished, lane, ids, done)

        future.add_done_callback(finished)
        return True

    def _finished(self, lane: _Lane, ids: set[int], done: Future[Outcome]) -> None:
        lane.sends -= 1
        lane.in_flight -= ids
        if done.cancelled() or done.exception() is not None or done.result() == "unrecorded":
            until = self.clock() + UNRECORDED_HOLD_SECONDS
            self._held.update(dict.fromkeys(ids, until))
        self._wake.set()  # the lane has room, and the next delivery of those alerts may be due

    async def _query(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        assert self._loop is not None
        return await self._loop.run_in_executor(self._db, lambda: call(*args, **kwargs))

    async def _dispatch_groups(self, due: list[dict[str, Any]]) -> None:
        """Send the due deliveries a group per lane and node, each joined by the node's others still waiting."""
        groups: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
        for delivery in due:
            groups.setdefault((self.notifiers.lane(delivery["target"]), delivery["node"]), []).append(delivery)
        for (lane_name, node), group in groups.items():
            lane = self._lane(group[0]["target"])
            if lane.full:
                continue
            room = GROUP_MAX_ALERTS - len(group)
            if room > 0 and lane_name != LogNotifier.scheme:  # the log writes a line each, at once
                skip_ids, _ = self._skips()
                mates = await self._query(
                    self.store.group_mates,
                    {delivery["target"] for delivery in group},
                    node,
                    self.clock(),
                    room,
                    skip_ids=skip_ids | {int(delivery["id"]) for delivery in group},
                )
                group += mates
            self._dispatch(group[:GROUP_MAX_ALERTS])

    async def _pass(self) -> float | None:
        """Start every due delivery there is room for; when the next one falls due (None: none pends)."""
        while True:
            skip_ids, skip_targets = self._skips()
            due = await self._query(
                self.store.due_deliveries,
                self.clock(),
                DUE_PER_QUERY,
                skip_ids=skip_ids,
                skip_targets=skip_targets,
            )
            await self._dispatch_groups(due)
            if len(due) < DUE_PER_QUERY:
                break  # else there may be more due right away (full lanes are skipped from now on)
        skip_ids, skip_targets = self._skips()
        next_due = await self._query(self.store.next_delivery_due, skip_ids=skip_ids, skip_targets=skip_targets)
        if self._held:
            held_until = min(self._held.values())
            next_due = held_until if next_due is None else min(next_due, held_until)
        return next_due

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        while not stop.is_set():
            self._wake.clear()
            if not self.active():  # another collector sends the fleet's deliveries
                await wait_any(self._wake, stop, timeout_seconds=INACTIVE_POLL_SECONDS)
                continue
            try:
                next_due = await self._pass()
            except Exception:
                log.exception("outbox pass failed; retrying")
                next_due = None
            wait = IDLE_POLL_SECONDS if next_due is None else min(IDLE_POLL_SECONDS, max(0.0, next_due - self.clock()))
            await wait_any(self._wake, stop, timeout_seconds=wait)

    def close(self) -> None:
        """Stop taking work; sends in flight end by their own timeout (their threads are not waited
        for), while a database step in progress finishes, since the store closes next."""
        for lane in self._lanes.values():
            lane.executor.shutdown(wait=False, cancel_futures=True)
        self._db.shutdown(wait=True, cancel_futures=True)
