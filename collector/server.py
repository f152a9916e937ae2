"""The gRPC side of the collector: one bidirectional stream per agent, acks after commit."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from fleetwatch.collector.ingest import BatchRejected, IngestWriter, to_ingest_batch
from fleetwatch.collector.storage.store import Store
from fleetwatch.v1 import telemetry_pb2 as pb
from fleetwatch.v1 import telemetry_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

HELLO_TIMEOUT_SECONDS = 10.0
# Batches read ahead of their commit per stream; bounds memory per agent.
MAX_UNACKED_PER_STREAM = 512


@dataclass
class NodeLink:
    """What the collector knows about one agent's stream, for /metrics and the status API."""

    node: str
    boot_id: str
    peer: str
    connected: bool = True
    connected_at: float = 0.0
    last_batch_t: float | None = None
    last_received_at: float | None = None
    ingest_lag_seconds: float | None = None  # sampled-at to stored-at of the newest batch
    spool_bytes: int = 0
    spool_batches: int = 0


@dataclass
class IngestStats:
    batches: int = 0
    duplicates: int = 0
    gpu_samples: int = 0
    host_samples: int = 0
    events: int = 0
    rejected: int = 0
    streams_failed: int = 0
    links: dict[str, NodeLink] = field(default_factory=dict)

    @property
    def agents_connected(self) -> int:
        return sum(1 for link in self.links.values() if link.connected)


class TelemetryService(pb_grpc.TelemetryServicer):
    def __init__(
        self,
        store: Store,
        writer: IngestWriter,
        stats: IngestStats,
        *,
        sampling_interval_seconds: float = 0.0,
        on_hello: Callable[[pb.Hello, float], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.writer = writer
        self.stats = stats
        self.sampling_interval_seconds = sampling_interval_seconds
        self.on_hello = on_hello
        self.clock = clock

    async def Stream(self, request_iterator: AsyncIterator[pb.AgentMessage], context: grpc.aio.ServicerContext):
        peer = context.peer()
        try:
            first = await asyncio.wait_for(anext(request_iterator), HELLO_TIMEOUT_SECONDS)
        except (StopAsyncIteration, TimeoutError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "expected a Hello as the first message")
        if first.WhichOneof("body") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be a Hello")
        hello = first.hello
        if not hello.node or not hello.boot_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Hello needs a node name and a boot id")
        node, boot_id = hello.node, hello.boot_id
        now = self.clock()
        gpus = [
            {
                "index": g.index,
                "uuid": g.uuid or None,
                "name": g.name or None,
                "pci_bus_id": g.pci_bus_id or None,
                "serial": g.serial or None,
                "memory_total_bytes": g.memory_total_bytes if g.HasField("memory_total_bytes") else None,
                "driver_version": g.driver_version or None,
                "cuda_version": g.cuda_version or None,
                "power_limit_watts": g.power_limit_watts if g.HasField("power_limit_watts") else None,
                "sm_clock_max_mhz": g.sm_clock_max_mhz if g.HasField("sm_clock_max_mhz") else None,
                "mem_clock_max_mhz": g.mem_clock_max_mhz if g.HasField("mem_clock_max_mhz") else None,
            }
            for g in hello.gpus
        ]
        interval = self.sampling_interval_seconds or hello.sampling_interval_seconds or 1.0
        try:
            await asyncio.to_thread(
                self.store.upsert_node, node, boot_id, hello.agent_version, hello.nvml_available, interval, gpus, now
            )
            last_seq = await asyncio.to_thread(self.store.last_seq, node, boot_id)
        except Exception as exc:
            log.error("agent %s: cannot record its hello: %s", node, exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"collector storage unavailable: {exc}")
        if self.on_hello is not None:
            self.on_hello(hello, now)
        previous = self.stats.links.get(node)
        if previous is not None and previous.connected:
            log.warning("node %s connected again from %s while its stream from %s is open", node, peer, previous.peer)
        link = NodeLink(node=node, boot_id=boot_id, peer=peer, connected_at=now)
        self.stats.links[node] = link
        log.info(
            "agent %s connected from %s (boot %s, %d GPUs, holds up to seq %d)",
            node,
            peer,
            boot_id[:8],
            len(gpus),
            last_seq,
        )

        yield pb.CollectorMessage(welcome=pb.Welcome(last_seq=last_seq))
        if self.sampling_interval_seconds:
            yield pb.CollectorMessage(settings=pb.Settings(sampling_interval_seconds=self.sampling_interval_seconds))

        pending: asyncio.Queue = asyncio.Queue(maxsize=MAX_UNACKED_PER_STREAM)

        async def read_batches() -> None:
            try:
                async for msg in request_iterator:
                    if msg.WhichOneof("body") != "batch":
                        raise BatchRejected("only batches may follow the Hello")
                    received_at = self.clock()
                    item = to_ingest_batch(node, msg.batch.boot_id or boot_id, msg.batch, received_at)
                    future = await self.writer.submit(item)
                    await pending.put((msg.batch, received_at, future))
                await pending.put(None)
            except BatchRejected as exc:
                await pending.put(exc)
            except Exception as exc:  # the agent went away mid-stream: end this stream quietly
                log.debug("agent %s stream ended: %r", node, exc)
                await pending.put(None)

        reader = asyncio.create_task(read_batches())
        try:
            while True:
                entry = await pending.get()
                if entry is None:
                    break
                if isinstance(entry, BatchRejected):
                    self.stats.rejected += 1
                    log.warning("agent %s sent a bad message: %s", node, entry)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(entry))
                batch, received_at, future = entry
                try:
                    stored = await future
                except Exception as exc:
                    self.stats.streams_failed += 1
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"collector storage unavailable: {exc}")
                if not stored:
                    self.stats.duplicates += 1
                link.last_batch_t = batch.t
                link.last_received_at = received_at
                link.ingest_lag_seconds = max(0.0, self.clock() - batch.t)
                link.spool_bytes = batch.spool_bytes
                link.spool_batches = batch.spool_batches
                yield pb.CollectorMessage(ack=pb.Ack(seq=batch.seq))
        finally:
            reader.cancel()
            link.connected = False
            log.info("agent %s disconnected", node)
