"""The gRPC side of the collector: one bidirectional stream per agent, every message checked, acks after commit.

What an agent is told: INVALID_ARGUMENT for a message that breaks the wire contract's limits
(collector/validate.py; the details name the batch and field, and trailing metadata
`fleetwatch-rejected-seq` carries a refused batch's seq, so the agent can set that one batch
aside: resending it cannot succeed), UNAVAILABLE while the database cannot store (the agent keeps
its spool and resends), RESOURCE_EXHAUSTED at the stream limit; a Drain when the collector stops
(`drain`: the agent moves to its next collector; a stream opened meanwhile gets UNAVAILABLE).
Acks go out in seq order, each only when that batch and every earlier one of the stream is
stored; a batch that is not ends the stream with its own error, and none after it on that stream
is stored, so the Welcome's "highest stored seq" never passes over a batch the agent still holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from fleetwatch import limits
from fleetwatch.asyncwait import wait_any
from fleetwatch.collector.ingest import IngestStream, IngestWriter
from fleetwatch.collector.storage.store import Store
from fleetwatch.collector.tls import peer_identity
from fleetwatch.collector.validate import ClockWindow, InvalidMessage, check_batch, check_hello
from fleetwatch.v1 import telemetry_pb2 as pb
from fleetwatch.v1 import telemetry_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

HELLO_TIMEOUT_SECONDS = 10.0
# Batches read ahead of their commit per stream; bounds memory per agent.
MAX_UNACKED_PER_STREAM = 512
# Metric label of invalid messages from a node name that breaks the limits, and from a valid name
# of no node this database knows: the label set stays the fleet's nodes plus these two.
INVALID_NODE_LABEL = "_invalid"
UNKNOWN_NODE_LABEL = "_unknown"
# Log lines about refused messages and streams: one per node label this often, with a count of
# those not logged, so a hostile or broken agent cannot flood the log.
REFUSAL_LOG_INTERVAL_SECONDS = 10.0
# The agent's reply to a database outage; the cause (never SQL text) goes to the collector's log.
STORAGE_UNAVAILABLE = "collector storage unavailable; keep the batches spooled and resend them"
REJECTED_SEQ_METADATA_KEY = "fleetwatch-rejected-seq"
# What a stream that opens while the collector drains is told: its agent tries its next collector.
DRAINING = "collector shutting down; stream to another collector"
# Put in a stream's queue to wake it to send its Drain.
_WAKE = object()


def reporting_interval_seconds(hello: pb.Hello, sampling_override_seconds: float = 0.0) -> float:
    """Seconds between a node's reports as its stored interval and the detectors read it (how long
    silence is normal): its sampling interval, or its batch interval where it sends several
    sampling cycles a batch (Hello.batch_interval_seconds)."""
    sampling = sampling_override_seconds or hello.sampling_interval_seconds or 1.0
    return max(sampling, hello.batch_interval_seconds)


class RateLimitedLog:
    """Warnings keyed by a bounded label (a node): the first, then at most one per interval."""

    def __init__(
        self, logger: logging.Logger, interval_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.logger = logger
        self.interval_seconds = interval_seconds
        self.clock = clock
        self._state: dict[str, tuple[float, int]] = {}  # label -> (last logged at, suppressed since)

    def warning(self, key: str, message: str, *args: object) -> None:
        now = self.clock()
        state = self._state.get(key)
        if state is not None and now - state[0] < self.interval_seconds:
            self._state[key] = (state[0], state[1] + 1)
            return
        suppressed = state[1] if state is not None else 0
        if suppressed:
            message += " (and %d more not logged in the last %.0f s)"
            args = (*args, suppressed, now - state[0])  # type: ignore[index]
        self.logger.warning(message, *args)
        self._state[key] = (now, 0)


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
    streams_open: int = 0
    streams_refused: int = 0  # over max_agent_streams
    # Invalid messages by (node label, field label): the labels are bounded (see INVALID_NODE_LABEL).
    invalid: dict[tuple[str, str], int] = field(default_factory=dict)
    # Metric values dropped as no measurement (NaN, NVML's "not available"), by field name.
    dropped_values: Counter[str] = field(default_factory=Counter)
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
        authenticate_peers: bool = False,
        window: ClockWindow | None = None,
        max_streams: int = limits.DEFAULT_MAX_AGENT_STREAMS,
    ) -> None:
        """`authenticate_peers` (mTLS on): a stream may speak only for the node its client certificate names.

        `window`: how far sample times may be from the collector's clock; `max_streams`: open
        agent streams at most (more are refused with RESOURCE_EXHAUSTED).
        """
        self.store = store
        self.writer = writer
        self.stats = stats
        self.sampling_interval_seconds = sampling_interval_seconds
        self.on_hello = on_hello
        self.clock = clock
        self.authenticate_peers = authenticate_peers
        self.window = window if window is not None else ClockWindow()
        self.max_streams = max_streams
        self._warnings = RateLimitedLog(log, REFUSAL_LOG_INTERVAL_SECONDS)
        self.draining = False
        # Each stream past its Welcome, by the callback that wakes it to send its Drain.
        self._streams: set[Callable[[], None]] = set()
        self._streams_gone: asyncio.Event | None = None  # set once no stream is left while draining

    async def drain(self, timeout_seconds: float) -> int:
        """Refuse new streams, send every open one a Drain, and wait until their agents have left.

        The streams keep acking what arrives meanwhile; each agent half-closes once its batches in
        flight are acked (or after its own bound), which ends its stream. Returns how many streams
        were still open at `timeout_seconds` (the server's stop cuts them; their agents resend).
        """
        self.draining = True
        self._streams_gone = asyncio.Event()
        if not self._streams:
            return 0
        log.info("draining: asking %d agents to move to another collector", len(self._streams))
        for wake in list(self._streams):
            wake()
        await wait_any(self._streams_gone, timeout_seconds=timeout_seconds)
        return len(self._streams)

    def _stream_ended(self, wake: Callable[[], None]) -> None:
        self._streams.discard(wake)
        if not self._streams and self._streams_gone is not None:
            self._streams_gone.set()

    def _node_label(self, node: str, known: bool = False) -> str:
        if limits.node_name_problem(node) is not None:
            return INVALID_NODE_LABEL
        return node if known or node in self.stats.links else UNKNOWN_NODE_LABEL

    async def _refuse(self, context: grpc.aio.ServicerContext, label: str, peer: str, exc: InvalidMessage) -> None:
        """Count, log (rate-limited) and answer an invalid message: INVALID_ARGUMENT naming the field."""
        self.stats.rejected += 1
        key = (label, exc.field_label)
        self.stats.invalid[key] = self.stats.invalid.get(key, 0) + 1
        detail = f" (database: {exc.detail!a})" if exc.detail else ""
        self._warnings.warning(label, "refused a message from node %s at %s: %s%s", label, peer, exc, detail)
        trailer = ((REJECTED_SEQ_METADATA_KEY, str(exc.seq)),) if exc.seq is not None else ()
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc), trailing_metadata=trailer)

    def _stream_closed(self, _context: object) -> None:
        self.stats.streams_open -= 1

    async def Stream(self, request_iterator: AsyncIterator[pb.AgentMessage], context: grpc.aio.ServicerContext):
        peer = context.peer()
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING)
        if self.stats.streams_open >= self.max_streams:
            self.stats.streams_refused += 1
            self._warnings.warning(
                UNKNOWN_NODE_LABEL,
                "refused a stream from %s: %d streams open (max_agent_streams)",
                peer,
                self.max_streams,
            )
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the collector has its most agent streams open ({self.max_streams}); retry later",
            )
        self.stats.streams_open += 1
        context.add_done_callback(self._stream_closed)
        try:
            first = await asyncio.wait_for(anext(request_iterator), HELLO_TIMEOUT_SECONDS)
        except (StopAsyncIteration, TimeoutError):
            await self._refuse(
                context, UNKNOWN_NODE_LABEL, peer, InvalidMessage("stream", "hello", "expected a Hello first")
            )
        if first.WhichOneof("body") != "hello":
            await self._refuse(
                context,
                UNKNOWN_NODE_LABEL,
                peer,
                InvalidMessage("stream", "hello", f"the first message must be a Hello, not {first.WhichOneof('body')}"),
            )
        hello = first.hello
        try:
            gpus = check_hello(hello)
        except InvalidMessage as exc:
            await self._refuse(context, self._node_label(hello.node), peer, exc)
        node, boot_id = hello.node, hello.boot_id
        if self.authenticate_peers:
            # Checked before the Hello touches anything: a new boot id resolves the node's alerts.
            # Every batch after it is stored under this node (a Batch names no node of its own),
            # so this one check binds the whole stream to the certificate's node.
            identity = peer_identity(context)
            if identity is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
            elif not identity.allows(node):
                log.warning("refused %s: Hello for node %r with a certificate for %s", peer, node, identity)
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"this connection's certificate is for {identity}, not for node {node!r}; "
                    f"an agent may send only as the node its certificate names",
                )
        interval = reporting_interval_seconds(hello, self.sampling_interval_seconds)
        try:
            last_seq, known = await asyncio.to_thread(self._hello_state, node, boot_id)
        except Exception as exc:
            log.error("agent %s: cannot read what the database holds of it: %s", node, exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, STORAGE_UNAVAILABLE)
        label = self._node_label(node, known)
        log.debug("agent %s hello from %s (boot %s, holds up to seq %d)", node, peer, boot_id[:8], last_seq)

        yield pb.CollectorMessage(welcome=pb.Welcome(last_seq=last_seq, accepts_columns=True))
        if self.sampling_interval_seconds:
            yield pb.CollectorMessage(settings=pb.Settings(sampling_interval_seconds=self.sampling_interval_seconds))

        # A Hello alone leaves nothing behind: the node's row, its GPU inventory, its link in
        # /metrics and its place in detection (node_silent) come with the stream's first valid
        # batch, so streams that never send one cannot fill the inventory or raise alerts.
        link: NodeLink | None = None
        stream = IngestStream()
        pending: asyncio.Queue = asyncio.Queue(maxsize=MAX_UNACKED_PER_STREAM)
        drain_sent = False

        def wake() -> None:
            # A full queue has entries for the loop below to take, and it looks at self.draining before each.
            if not pending.full():
                pending.put_nowait(_WAKE)

        self._streams.add(wake)

        async def register() -> None:
            nonlocal link, label
            now = self.clock()
            await asyncio.to_thread(
                self.store.upsert_node, node, boot_id, hello.agent_version, hello.nvml_available, interval, gpus, now
            )
            if self.on_hello is not None:
                self.on_hello(hello, now)
            previous = self.stats.links.get(node)
            if previous is not None and previous.connected:
                self._warnings.warning(
                    node, "node %s connected again from %s while its stream from %s is open", node, peer, previous.peer
                )
            link = NodeLink(node=node, boot_id=boot_id, peer=peer, connected_at=now)
            self.stats.links[node] = link
            label = node
            log.info(
                "agent %s connected from %s (boot %s, %d GPUs, holds up to seq %d)",
                node,
                peer,
                boot_id[:8],
                len(gpus),
                last_seq,
            )

        async def read_batches() -> None:
            previous_seq = 0
            try:
                while True:
                    try:
                        msg = await anext(request_iterator)
                    except StopAsyncIteration:
                        break
                    except Exception as exc:  # the agent went away mid-stream: end this stream quietly
                        log.debug("agent %s stream ended: %r", node, exc)
                        break
                    body = msg.WhichOneof("body")
                    if body != "batch":
                        raise InvalidMessage("stream", "batch", f"only batches may follow the Hello, not {body}")
                    received_at = self.clock()
                    dropped: Counter[str] = Counter()
                    # A seq above what the database held at the Welcome is new, unless another stream
                    # of this boot stored it meanwhile, which the batch row's unique key catches.
                    item = check_batch(node, boot_id, msg.batch, received_at, self.window, dropped, held_up_to=last_seq)
                    if item.seq <= previous_seq:
                        problem = f"does not follow {previous_seq}: seqs increase along a stream"
                        raise InvalidMessage("batch", "seq", problem, seq=item.seq)
                    previous_seq = item.seq
                    if dropped:
                        self.stats.dropped_values.update(dropped)
                    if link is None:
                        try:
                            await register()
                        except Exception as exc:
                            log.error("agent %s: cannot record its hello: %s", node, exc)
                            await pending.put(exc)
                            return
                    future = await self.writer.submit(item, stream)
                    await pending.put((msg.batch, received_at, future))
                await pending.put(None)
            except InvalidMessage as exc:
                await pending.put(exc)
            except Exception as exc:  # a bug here: the agent keeps its batches and resends them
                log.exception("agent %s: reading its stream failed", node)
                await pending.put(exc)

        reader = asyncio.create_task(read_batches())
        try:
            while True:
                if self.draining and not drain_sent:
                    # Acks go on after it: the agent waits for those of the batches it has in flight.
                    drain_sent = True
                    yield pb.CollectorMessage(drain=pb.Drain(reason="collector shutting down"))
                entry = await pending.get()
                if entry is _WAKE:
                    continue
                if entry is None:
                    break
                if isinstance(entry, InvalidMessage):
                    await self._refuse(context, label, peer, entry)
                if isinstance(entry, Exception):
                    self.stats.streams_failed += 1
                    await context.abort(grpc.StatusCode.UNAVAILABLE, STORAGE_UNAVAILABLE)
                batch, received_at, future = entry
                try:
                    stored = await future
                except InvalidMessage as exc:  # the database refused its values (a check is missing)
                    await self._refuse(context, label, peer, exc)
                except Exception:  # logged by the writer
                    self.stats.streams_failed += 1
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE, f"batch {batch.seq} not stored: {STORAGE_UNAVAILABLE}"
                    )
                if not stored:
                    self.stats.duplicates += 1
                assert link is not None  # registered before its first batch was queued
                link.last_batch_t = batch.t
                link.last_received_at = received_at
                link.ingest_lag_seconds = max(0.0, self.clock() - batch.t)
                link.spool_bytes = batch.spool_bytes
                link.spool_batches = batch.spool_batches
                yield pb.CollectorMessage(ack=pb.Ack(seq=batch.seq))
        finally:
            reader.cancel()
            self._stream_ended(wake)
            if link is not None:
                link.connected = False
                log.info("agent %s disconnected", node)

    def _hello_state(self, node: str, boot_id: str) -> tuple[int, bool]:
        """(highest stored seq of this boot, whether the node has a row): one worker thread, two reads."""
        return self.store.last_seq(node, boot_id), self.store.node_known(node)
