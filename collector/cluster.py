"""Several collectors on one database: who is alive, who does the fleet-wide work, who holds a node.

Agents spread over any number of collectors that share one PostgreSQL database. Ingest needs no
coordination (it is idempotent on (node, boot_id, seq)), and node-level detection runs where the
node's stream is. Work that must happen once for the whole fleet is a *lease*, a row in `leases`
that one collector holds and renews:

- ``alerts``: sending deliveries from the outbox and the feed to Alertmanager, so each webhook
  delivery is sent once;
- ``fleet_detection``: the job-level detectors (stragglers need every rank of a job, and a job's
  nodes may stream to different collectors) with the clock detectors their findings fold into;
- ``retention``: purging rows past retention.

A lease is taken or renewed by one conditional UPDATE (Store.acquire_lease), so two collectors
racing for an expired lease cannot both win. The holder renews every RENEW_EVERY_SECONDS for
LEASE_TTL_SECONDS; a collector that dies (SIGKILL, a lost host) stops renewing, and another takes
its duties at its next renewal after the lease expires: within TTL + RENEW = 13 s. A holder that
cannot renew (its database unreachable) stops acting on the duty STOP_MARGIN_SECONDS before the
lease runs out, so two collectors never act on one duty at once for longer than a clock skew. A
collector stopped cleanly drops its row and leases at once.

Every collector also beats in `collectors` (its addresses and open streams) and records which
nodes stream to it (`nodes.collector`): `fleetwatchctl status` and /metrics show both.
With SQLite there is one collector, which takes every lease at start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Collection
from typing import Any

from fleetwatch import __version__
from fleetwatch.asyncwait import wait_any
from fleetwatch.collector.storage.store import Store

log = logging.getLogger(__name__)

ALERTS = "alerts"
FLEET_DETECTION = "fleet_detection"
RETENTION = "retention"
DUTIES = (ALERTS, FLEET_DETECTION, RETENTION)

# A dead holder's duties move within LEASE_TTL_SECONDS + RENEW_EVERY_SECONDS (13 s): the issue asks
# for 15. Renewing three times per TTL rides out one slow commit.
LEASE_TTL_SECONDS = 10.0
RENEW_EVERY_SECONDS = 3.0
# A holder whose renewals fail stops acting this long before its lease can expire elsewhere.
STOP_MARGIN_SECONDS = 2.0
# A collector that has not beaten for this long is shown dead; after FORGET_AFTER_SECONDS its row goes.
DEAD_AFTER_SECONDS = 15.0
FORGET_AFTER_SECONDS = 24 * 3600.0


def make_collector_id() -> str:
    """host:pid:random, unique across restarts (a pid is reused; a restarted collector is a new one)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Cluster:
    """This collector's membership: its heartbeat, the leases it holds, the nodes streaming to it."""

    def __init__(
        self,
        store: Store,
        *,
        collector_id: str | None = None,
        clock: Callable[[], float] = time.time,
        ttl_seconds: float = LEASE_TTL_SECONDS,
        renew_seconds: float = RENEW_EVERY_SECONDS,
    ) -> None:
        self.store = store
        self.id = collector_id or make_collector_id()
        # Wall time shared by every collector (leases expire by it), not a test's moved app clock.
        self.clock = clock
        self.ttl_seconds = ttl_seconds
        self.renew_seconds = renew_seconds
        self.started_at = clock()
        self.grpc_address = ""
        self.http_address = ""
        # duty -> until when this collector may act on it (the lease's expiry less the margin).
        self._held_until: dict[str, float] = {}
        self.lease_changes: dict[str, int] = dict.fromkeys(DUTIES, 0)  # times each was taken here
        self.renew_failures = 0
        self._renew_ok = True
        self.on_lease_change: Callable[[str, bool], None] | None = None

    def holds(self, duty: str) -> bool:
        return self._held_until.get(duty, 0.0) > self.clock()

    def tick(self, streams: int, nodes: Collection[str]) -> None:
        """Beat, take or renew every lease, record the nodes streaming here (blocking: a thread)."""
        now = self.clock()
        try:
            self.store.beat(
                {
                    "id": self.id,
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "version": __version__,
                    "grpc_address": self.grpc_address,
                    "http_address": self.http_address,
                    "started_at": self.started_at,
                    "heartbeat_at": now,
                    "streams": streams,
                }
            )
            for duty in DUTIES:
                was = self.holds(duty)
                if self.store.acquire_lease(duty, self.id, now, self.ttl_seconds):
                    self._held_until[duty] = now + self.ttl_seconds - STOP_MARGIN_SECONDS
                    if not was:
                        self.lease_changes[duty] += 1
                        log.info("took the %s lease: this collector does the fleet's %s now", duty, duty)
                        self._changed(duty, True)
                else:
                    self._held_until.pop(duty, None)
                    if was:
                        log.warning("lost the %s lease to another collector", duty)
                        self._changed(duty, False)
            self.store.claim_nodes(nodes, self.id)
            if not self._renew_ok:
                log.info("collector heartbeat and leases renewed again")
            self._renew_ok = True
        except Exception as exc:
            self.renew_failures += 1
            if self._renew_ok:
                log.error("collector heartbeat failed (%s); leases lapse unless it recovers", exc)
            self._renew_ok = False
            for duty in [d for d in DUTIES if not self.holds(d) and d in self._held_until]:
                self._held_until.pop(duty, None)
                log.warning("stopped acting on the %s lease: it could not be renewed", duty)
                self._changed(duty, False)

    def _changed(self, duty: str, held: bool) -> None:
        if self.on_lease_change is not None:
            self.on_lease_change(duty, held)

    async def run(self, stop: asyncio.Event, streams: Callable[[], tuple[int, Collection[str]]]) -> None:
        """Ticks every renew_seconds until stopped; then drops this collector's row and leases."""
        next_forget = self.clock()
        while not stop.is_set():
            count, nodes = streams()
            await asyncio.to_thread(self.tick, count, nodes)
            if self.clock() >= next_forget:
                next_forget = self.clock() + 600.0
                try:
                    await asyncio.to_thread(self.store.forget_dead_collectors, self.clock() - FORGET_AFTER_SECONDS)
                except Exception:
                    log.debug("could not forget dead collectors", exc_info=True)
            await wait_any(stop, timeout_seconds=self.renew_seconds)

    def leave(self) -> None:
        """A clean stop: the row and leases go now, so the duties move at the others' next renewal."""
        self._held_until.clear()
        try:
            self.store.forget_collector(self.id)
        except Exception as exc:
            log.warning("could not remove this collector's row and leases (%s); they expire by themselves", exc)

    def state(self) -> dict[str, Any]:
        """Every collector with whether it is alive and what it holds, for the status API (blocking)."""
        now = self.clock()
        leases = self.store.leases()
        holders = self.store.node_holders()
        nodes_by: dict[str, int] = {}
        for holder in holders.values():
            if holder is not None:
                nodes_by[holder] = nodes_by.get(holder, 0) + 1
        held_by: dict[str, list[str]] = {}
        for lease in leases:
            if lease["expires_at"] >= now:
                held_by.setdefault(lease["holder"], []).append(lease["name"])
        collectors = []
        for row in self.store.collectors():
            collectors.append(
                {
                    "id": row["id"],
                    "host": row["host"],
                    "version": row["version"],
                    "grpc_address": row["grpc_address"],
                    "http_address": row["http_address"],
                    "started_at": row["started_at"],
                    "heartbeat_at": row["heartbeat_at"],
                    "alive": now - row["heartbeat_at"] <= DEAD_AFTER_SECONDS,
                    "streams": row["streams"],
                    "nodes": nodes_by.get(row["id"], 0),
                    "leases": sorted(held_by.get(row["id"], [])),
                    "self": row["id"] == self.id,
                }
            )
        return {
            "self": self.id,
            "collectors": collectors,
            "leases": [{**le, "expired": le["expires_at"] < now} for le in leases],
            "node_collectors": holders,
        }
