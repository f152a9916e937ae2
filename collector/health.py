"""Readiness for /readyz and /healthz: the database takes a write now, and ingest is progressing."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from fleetwatch.collector.ingest import IngestWriter
from fleetwatch.collector.storage.store import Store

# How long /readyz waits for the write probe; with the cache below it answers within 5 s of the
# database going away. The probe itself waits for locks a little less, so that a locked database
# says so in the answer instead of timing out.
PROBE_TIMEOUT_SECONDS = 2.0
PROBE_LOCK_WAIT_SECONDS = 1.5
# A probe this recent is reused: a scrape every second must not write every time it asks.
PROBE_FRESH_SECONDS = 1.0
# One ingest commit running longer than this means the writer is stuck (a lock, a server gone quiet);
# a commit of the largest group takes well under a second on a healthy database.
INGEST_STALL_SECONDS = 3.0
# Ingest is failing when nothing was committed since a failure that began this long ago...
INGEST_FAILING_SECONDS = 2.0
# ...and its latest failure is this recent: with no data coming in, the probe alone decides again.
INGEST_ERROR_RECENT_SECONDS = 10.0
# SQLite: less free space than this on the database's filesystem is "the disk is full". A commit of
# ingest_max_batches_per_commit batches needs a few MiB; an update of the probe row may still fit.
MIN_FREE_DISK_BYTES = 32 * 1024 * 1024


def sqlite_file(database_url: str) -> str | None:
    """The file of an SQLite database URL; None for PostgreSQL, an in-memory database or a bad URL."""
    try:
        url = make_url(database_url)
    except (ArgumentError, ValueError):
        return None
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return url.database


@dataclass(frozen=True)
class ProbeResult:
    error: str | None  # None: the write committed
    duration_seconds: float
    finished_at: float  # time.monotonic()
    disk_free_bytes: int | None  # SQLite only


class Readiness:
    """Answers whether the collector can take data now, from a write probe and the ingest writer's times.

    The probe runs on a thread of its own, so a database that hangs holds that thread only: the
    answer says "no answer within PROBE_TIMEOUT_SECONDS" while it hangs.
    """

    def __init__(
        self,
        store: Store,
        writer: IngestWriter,
        *,
        sqlite_path: str | None = None,
        probe_timeout_seconds: float = PROBE_TIMEOUT_SECONDS,
        probe_lock_wait_seconds: float = PROBE_LOCK_WAIT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.writer = writer
        self.sqlite_path = sqlite_path
        self.probe_timeout_seconds = probe_timeout_seconds
        self.probe_lock_wait_seconds = probe_lock_wait_seconds
        self.clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="readiness-probe")
        self._last: ProbeResult | None = None
        self._running: asyncio.Future[ProbeResult] | None = None
        self._running_since = 0.0

    # -- the probe ------------------------------------------------------------------------------

    def _probe_blocking(self) -> ProbeResult:
        started = self.clock()
        error: str | None = None
        free: int | None = None
        try:
            if self.sqlite_path is not None:
                stat = os.statvfs(os.path.dirname(os.path.abspath(self.sqlite_path)))
                free = stat.f_bavail * stat.f_frsize
            self.store.probe_write(time.time(), self.probe_lock_wait_seconds)
        except Exception as exc:  # StoreError names the database redacted; anything else is a failure too
            error = str(exc) or type(exc).__name__
        finished = self.clock()
        return ProbeResult(error, finished - started, finished, free)

    def _start_probe(self) -> asyncio.Future[ProbeResult]:
        """The probe in flight, or a new one when the last result is stale."""
        if self._running is None:
            running = asyncio.get_running_loop().run_in_executor(self._executor, self._probe_blocking)
            self._running, self._running_since = running, self.clock()

            def done(future: asyncio.Future[ProbeResult]) -> None:
                if not future.cancelled() and future.exception() is None:
                    self._last = future.result()
                self._running = None

            running.add_done_callback(done)
        return self._running

    def _fresh(self) -> ProbeResult | None:
        last = self._last
        if last is not None and self.clock() - last.finished_at < PROBE_FRESH_SECONDS:
            return last
        return None

    async def _probe(self) -> ProbeResult | None:
        """A fresh probe result, waiting for it up to the probe timeout; None when it did not come."""
        fresh = self._fresh()
        if fresh is not None:
            return fresh
        running = self._start_probe()
        remaining = self.probe_timeout_seconds - (self.clock() - self._running_since)
        if remaining > 0:
            try:
                return await asyncio.wait_for(asyncio.shield(running), remaining)
            except TimeoutError:
                pass
        return None

    # -- the answer -----------------------------------------------------------------------------

    def _report(self, probe: ProbeResult | None, *, waited: bool) -> dict[str, Any]:
        now = self.clock()
        problems: list[str] = []
        database: dict[str, Any] = {"writable": None, "error": None, "probe_seconds": None, "probe_age_seconds": None}
        hung_seconds = now - self._running_since if self._running is not None else 0.0
        if (probe is None and waited) or hung_seconds > self.probe_timeout_seconds:
            # A stale success must not speak for a database that has stopped answering since.
            database["writable"] = False
            database["error"] = f"no answer to a write for {max(hung_seconds, self.probe_timeout_seconds):.1f} s"
            problems.append(f"database: no answer to a write within {self.probe_timeout_seconds:g} s")
        elif probe is not None:
            database.update(
                writable=probe.error is None,
                error=probe.error,
                probe_seconds=round(probe.duration_seconds, 3),
                probe_age_seconds=round(now - probe.finished_at, 3),
            )
            if probe.error is not None:
                problems.append(f"database not writable: {probe.error}")
        if probe is not None and probe.disk_free_bytes is not None:
            database["disk_free_bytes"] = probe.disk_free_bytes
            if probe.disk_free_bytes < MIN_FREE_DISK_BYTES:
                problems.append(
                    f"disk: {probe.disk_free_bytes} bytes free where the database is "
                    f"(below {MIN_FREE_DISK_BYTES}); free space or shorten retention"
                )
        ingest = self._ingest_facts(now, problems)
        # Unknown (None) only before the first probe has answered, and only where nothing waited for it.
        ready = not problems if database["writable"] is not None else (False if problems else None)
        return {"ready": ready, "problems": problems, "database": database, "ingest": ingest}

    def _ingest_facts(self, now: float, problems: list[str]) -> dict[str, Any]:
        writer = self.writer
        # One read of each: the writer thread changes them between lines.
        started, failing_since, last_error_at, last_commit_at = (
            writer.commit_started_at,
            writer.failing_since,
            writer.last_error_at,
            writer.last_commit_at,
        )

        def age(t: float | None) -> float | None:
            return None if t is None else round(now - t, 3)

        if not writer.alive:
            problems.append("ingest: the database writer thread is not running")
        if started is not None and now - started > INGEST_STALL_SECONDS:
            problems.append(f"ingest: one commit has been running for {now - started:.1f} s")
        if (
            failing_since is not None
            and now - failing_since > INGEST_FAILING_SECONDS
            and last_error_at is not None
            and now - last_error_at < INGEST_ERROR_RECENT_SECONDS
        ):
            problems.append(f"ingest: storing batches has failed for {now - failing_since:.1f} s")
        return {
            "writer_running": writer.alive,
            "queued_batches": writer.queued,
            "commit_running_seconds": age(started),
            "failing_seconds": age(failing_since),
            "last_commit_age_seconds": age(last_commit_at),
            "last_error_age_seconds": age(last_error_at),
        }

    async def check(self) -> dict[str, Any]:
        """/readyz: probes the database (or reuses a probe under a second old), at most the probe timeout."""
        return self._report(await self._probe(), waited=True)

    def snapshot(self) -> dict[str, Any]:
        """/healthz: the facts as last known, without waiting; starts a probe when the last one is stale."""
        probe = self._fresh()
        if probe is None:
            self._start_probe()
            probe = self._last  # stale, and shown with its age
        return self._report(probe, waited=False)

    def close(self) -> None:
        """A probe in progress finishes (it waits at most its lock timeout): the store closes next."""
        self._executor.shutdown(wait=True, cancel_futures=True)
