"""Writes checked agent batches from one thread, many batches per commit, never one stream's out of order."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from fleetwatch.collector.storage.store import BatchRefused, IngestBatch, Store, StoreError
from fleetwatch.collector.validate import InvalidMessage

log = logging.getLogger(__name__)

# After a failed commit the writer waits this long before the next: a sick database is not spun on.
FAILED_COMMIT_PAUSE_SECONDS = 0.5


class IngestStream:
    """One agent stream's place in the writer's queue.

    Once a batch of the stream is not stored (refused, or the database failed), the stream's later
    batches are not stored either: the stream acks in order and ends at the failed one, and a
    stored later seq would make the agent's next Welcome (the highest stored seq) pass over it.
    """

    __slots__ = ("broken",)

    def __init__(self) -> None:
        self.broken = False  # written by the writer thread only


class StreamBroken(Exception):
    """A batch not stored because an earlier batch of its stream was not."""


# What a queued batch comes to: True stored, False already held, or why it was not stored.
Outcome = bool | BaseException


def _retrieve(future: asyncio.Future[bool]) -> None:
    # A stream that ended early never awaits its later futures; reading the exception here keeps
    # asyncio from logging "exception was never retrieved" for each.
    if not future.cancelled():
        future.exception()


class IngestWriter:
    """Batches from every agent stream queue here; one thread commits them in groups.

    `submit` returns a future that resolves True (stored) / False (already stored) after the
    commit, so the stream acks only what is durable. A group the database refuses for one batch's
    values is stored again batch by batch, so no other stream's batch fails with it.
    """

    def __init__(
        self,
        store: Store,
        on_stored: Callable[[Sequence[IngestBatch], Sequence[bool]], None],
        max_batches_per_commit: int = 256,
        commit_wait_seconds: float = 0.0,
        max_queued: int = 10_000,
    ) -> None:
        self.store = store
        self.on_stored = on_stored
        self.max_batches_per_commit = max_batches_per_commit
        # A commit costs about the same for one batch as for dozens: gathering what arrives in a
        # few ms turns hundreds of commits a second into tens.
        self.commit_wait_seconds = commit_wait_seconds
        self._arrived = 0  # batches taken from the queue since _rate_since (writer thread only)
        self._rate_since = time.monotonic()
        self._rate = 0.0  # batches a second over the last whole second
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.commits = 0
        self.errors = 0
        self._pause = False  # the last group failed: wait before the next (writer thread only)
        # Read by /readyz (collector/health.py), written by the writer thread only; time.monotonic().
        self.commit_started_at: float | None = None  # the store.ingest call now running began
        self.last_commit_at: float | None = None
        self.last_error_at: float | None = None
        self.failing_since: float | None = None  # first failure since the last commit

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="ingest-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout_seconds: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_seconds)

    @property
    def alive(self) -> bool:
        """Whether the writer thread runs (it never exits before stop() on its own)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def submit(self, item: IngestBatch, stream: IngestStream) -> asyncio.Future[bool]:
        """Queue a checked batch of `stream` (in seq order); the future resolves after its commit.

        True: stored; False: already held. It raises InvalidMessage when the database refused the
        batch for its values, StoreError (or another exception) when the database failed, and
        StreamBroken when an earlier batch of the stream was not stored.
        """
        assert self._loop is not None
        future: asyncio.Future[bool] = self._loop.create_future()
        future.add_done_callback(_retrieve)
        while True:
            try:
                self._queue.put_nowait((item, future, stream))
                return future
            except queue.Full:  # back-pressure onto the agent's stream instead of growing without bound
                await asyncio.sleep(0.05)

    def _resolve(self, entries: list, outcomes: Sequence[Outcome]) -> None:
        stored = [(item, outcome) for (item, _, _), outcome in zip(entries, outcomes) if isinstance(outcome, bool)]
        if stored:
            try:
                self.on_stored([item for item, _ in stored], [flag for _, flag in stored])
            except Exception:  # live detection's bookkeeping must not keep acks from the agents
                log.exception("handing %d stored batches to detection failed", len(stored))
        for (_, future, _), outcome in zip(entries, outcomes):
            if future.done():
                continue
            if isinstance(outcome, bool):
                future.set_result(outcome)
            else:
                future.set_exception(outcome)

    def _ingest_timed(self, items: list[IngestBatch]) -> list[bool]:
        """store.ingest, keeping the times that tell /readyz whether ingest is progressing."""
        self.commit_started_at = time.monotonic()
        try:
            flags = self.store.ingest(items)
        except BatchRefused:
            self.last_commit_at = time.monotonic()  # the database answered: refusing data is not failing
            raise
        except Exception:
            self.last_error_at = time.monotonic()
            if self.failing_since is None:
                self.failing_since = self.last_error_at
            raise
        finally:
            self.commit_started_at = None
        self.last_commit_at = time.monotonic()
        self.failing_since = None
        return flags

    def _store(self, entries: list) -> list[Outcome]:
        """Each entry's outcome: the whole group in one commit, item by item when the database refuses one."""
        outcomes: list[Outcome | None] = [None] * len(entries)
        live: list[int] = []
        for i, (_, _, stream) in enumerate(entries):
            if stream.broken:
                outcomes[i] = StreamBroken("an earlier batch of this stream was not stored")
            else:
                live.append(i)
        if not live:
            return outcomes  # type: ignore[return-value]
        try:
            flags = self._ingest_timed([entries[i][0] for i in live])
        except BatchRefused as exc:
            # One batch's values broke the database's limits (a check is missing: the log says
            # which): store the others one by one, so only that batch and its stream's later ones
            # fail, and the rest of the group is acked.
            self._store_one_by_one(entries, live, outcomes, exc.stored)
        except Exception as exc:
            self._fail(entries, live, outcomes, exc)
        else:
            self.commits += 1
            for i, flag in zip(live, flags):
                outcomes[i] = flag
        return outcomes  # type: ignore[return-value]

    def _store_one_by_one(
        self, entries: list, live: list[int], outcomes: list[Outcome | None], stored: frozenset[tuple[str, str, int]]
    ) -> None:
        for n, i in enumerate(live):
            item, _, stream = entries[i]
            if item.key in stored:  # committed by the store's own item-by-item pass: new, not a duplicate
                outcomes[i] = True
                continue
            if stream.broken:
                outcomes[i] = StreamBroken("an earlier batch of this stream was not stored")
                continue
            try:
                (outcomes[i],) = self._ingest_timed([item])
                self.commits += 1
            except BatchRefused as exc:
                stream.broken = True
                outcomes[i] = InvalidMessage(
                    "batch",
                    "values",
                    "refused by the database (a value beyond its column's limits); not stored",
                    seq=item.seq,
                    detail=exc.reason,
                )
            except Exception as exc:  # the database failed mid-way: the rest waits for the agents' resend
                self._fail(entries, live[n:], outcomes, exc)
                return

    def _fail(self, entries: list, failed: list[int], outcomes: list[Outcome | None], exc: Exception) -> None:
        self.errors += 1
        if isinstance(exc, StoreError):
            log.error("storing %d batches failed: %s (agents keep them spooled and resend)", len(failed), exc)
        else:  # never let the writer thread die silently
            log.exception("unexpected error storing %d batches", len(failed))
        for i in failed:
            entries[i][2].broken = True
            outcomes[i] = exc
        self._pause = True

    def _commit_wait(self) -> float:
        """commit_wait_seconds while batches arrive fast enough that waiting gathers some (two or
        more in the wait, at the last second's rate); 0 otherwise, so a quiet fleet's acks never wait."""
        now = time.monotonic()
        if now - self._rate_since >= 1.0:
            self._rate = self._arrived / (now - self._rate_since)
            self._arrived, self._rate_since = 0, now
        return self.commit_wait_seconds if self._rate * self.commit_wait_seconds >= 2.0 else 0.0

    def _run(self) -> None:
        assert self._loop is not None
        while not (self._stop.is_set() and self._queue.empty()):
            try:
                entries = [self._queue.get(timeout=0.2)]
            except queue.Empty:
                continue
            # Sleep through the gathering wait, then take what came: a get() with a timeout would
            # be woken by every batch put meanwhile, a thread switch each (most of the event
            # loop's cost of handing over a batch was waking this thread).
            wait_seconds = self._commit_wait()
            if wait_seconds > 0 and self._queue.qsize() < self.max_batches_per_commit - 1:
                self._stop.wait(wait_seconds)
            while len(entries) < self.max_batches_per_commit:
                try:
                    entries.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._arrived += len(entries)
            self._pause = False
            outcomes = self._store(entries)
            self._loop.call_soon_threadsafe(self._resolve, entries, outcomes)
            if self._pause:
                self._stop.wait(FAILED_COMMIT_PAUSE_SECONDS)  # a sick database: don't spin
