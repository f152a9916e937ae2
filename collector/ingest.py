"""Turns agent batches into store rows and writes them from one thread, many batches per commit."""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
from collections.abc import Callable, Sequence

from fleetwatch.collector.storage.store import IngestBatch, Store, StoreError
from fleetwatch.records import Event, GpuSample, HostSample, Step
from fleetwatch.v1 import telemetry_pb2 as pb
from fleetwatch.wire import IB_FIELDS, metrics_to_dict

log = logging.getLogger(__name__)

MAX_GPUS_PER_BATCH = 64
MAX_EVENTS_PER_BATCH = 1024
MAX_STEPS_PER_BATCH = 10_000


class BatchRejected(ValueError):
    """A batch that cannot be stored as sent (the message says why)."""


def _finite(metrics: dict) -> dict:
    """NaN/inf is not a measurement; dropping it keeps 'absent means unknown'."""
    return {k: v for k, v in metrics.items() if not (isinstance(v, float) and not math.isfinite(v))}


def to_ingest_batch(node: str, boot_id: str, batch: pb.Batch, received_at: float) -> IngestBatch:
    if batch.seq == 0:
        raise BatchRejected("batch seq must be 1 or more")
    if (
        len(batch.gpus) > MAX_GPUS_PER_BATCH
        or len(batch.events) > MAX_EVENTS_PER_BATCH
        or len(batch.steps) > MAX_STEPS_PER_BATCH
    ):
        raise BatchRejected(
            f"batch {batch.seq} over limits ({len(batch.gpus)} GPU samples, "
            f"{len(batch.events)} events, {len(batch.steps)} steps)"
        )
    gpu_samples = [
        GpuSample(
            t=g.t,
            node=node,
            gpu=g.gpu,
            metrics=_finite(metrics_to_dict(g.metrics)),
            uuid=g.uuid or None,
            job=g.job or None,
            rank=g.rank if g.HasField("rank") else None,
        )
        for g in batch.gpus
    ]
    host_samples = []
    ib_ports = []
    if batch.HasField("host"):
        host_samples.append(HostSample(t=batch.host.t, node=node, metrics=_finite(metrics_to_dict(batch.host.metrics))))
        for port in batch.host.ib_ports:
            row = {"t": batch.host.t, "device": port.device, "port": port.port, "ib_state": port.ib_state or None}
            row.update({k: getattr(port, k) for k in IB_FIELDS if k != "ib_state" and port.HasField(k)})
            ib_ports.append(row)
    events = [
        Event(
            t=e.t,
            node=node,
            kind=e.kind,
            gpu=e.gpu if e.HasField("gpu") else None,
            xid=e.xid if e.HasField("xid") else None,
            pci_bus_id=e.pci_bus_id or None,
            uuid=e.uuid or None,
            message=e.message,
            source=e.source or None,
        )
        for e in batch.events
    ]
    steps = [
        Step(
            t=s.t,
            job=s.job,
            rank=s.rank,
            node=node,
            step=s.step,
            seconds=s.seconds,
            gpu=s.gpu if s.HasField("gpu") else None,
        )
        for s in batch.steps
    ]
    return IngestBatch(
        node=node,
        boot_id=boot_id,
        seq=batch.seq,
        received_at=received_at,
        gpu_samples=gpu_samples,
        host_samples=host_samples,
        ib_ports=ib_ports,
        events=events,
        steps=steps,
    )


class IngestWriter:
    """Batches from every agent stream queue here; one thread commits them in groups.

    `submit` returns a future that resolves True (stored) / False (already stored) after the
    commit, so the stream acks only what is durable.
    """

    def __init__(
        self,
        store: Store,
        on_stored: Callable[[Sequence[IngestBatch], Sequence[bool]], None],
        max_batches_per_commit: int = 256,
        max_queued: int = 10_000,
    ) -> None:
        self.store = store
        self.on_stored = on_stored
        self.max_batches_per_commit = max_batches_per_commit
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.commits = 0
        self.errors = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="ingest-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout_seconds: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_seconds)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def submit(self, item: IngestBatch) -> asyncio.Future[bool]:
        assert self._loop is not None
        future: asyncio.Future[bool] = self._loop.create_future()
        while True:
            try:
                self._queue.put_nowait((item, future))
                return future
            except queue.Full:  # back-pressure onto the agent's stream instead of growing without bound
                await asyncio.sleep(0.05)

    def _resolve(self, entries: list, flags: Sequence[bool] | None, error: Exception | None) -> None:
        if error is None:
            self.on_stored([item for item, _ in entries], flags or [])
        for i, (_, future) in enumerate(entries):
            if future.done():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(flags[i])  # type: ignore[index]

    def _run(self) -> None:
        assert self._loop is not None
        while not (self._stop.is_set() and self._queue.empty()):
            try:
                entries = [self._queue.get(timeout=0.2)]
            except queue.Empty:
                continue
            while len(entries) < self.max_batches_per_commit:
                try:
                    entries.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                flags = self.store.ingest([item for item, _ in entries])
                self.commits += 1
                self._loop.call_soon_threadsafe(self._resolve, entries, flags, None)
            except StoreError as exc:
                self.errors += 1
                log.error("storing %d batches failed: %s (agents keep them spooled and resend)", len(entries), exc)
                self._loop.call_soon_threadsafe(self._resolve, entries, None, exc)
                self._stop.wait(0.5)  # a sick database: don't spin
            except Exception as exc:  # never let the writer thread die silently
                self.errors += 1
                log.exception("unexpected error storing %d batches", len(entries))
                self._loop.call_soon_threadsafe(self._resolve, entries, None, exc)
