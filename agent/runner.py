"""The agent's loops: sample on a timer, send events the moment they are seen, spool, stream, resend.

Every batch goes to the on-disk spool before it is sent and leaves it only when the collector
acks that batch's own seq, so a collector restart, a network cut or an agent restart loses
nothing: after reconnecting, the agent resends every un-acked batch in order. What a collector
claims beyond that (a Welcome or an ack for seqs this agent never sent) removes nothing. With
several collectors the agent streams to one at a time and, when it fails or sends a Drain, moves
to the next (fleetwatch.agent.collectors), where the un-acked batches are resent the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from fleetwatch import __version__, limits
from fleetwatch.agent.collectors import CollectorRotation, CollectorTarget, node_offset
from fleetwatch.agent.config import AgentConfig
from fleetwatch.agent.liveness import Heartbeats, WatchdogFeeder
from fleetwatch.agent.sampler import Cycle, Sampler
from fleetwatch.agent.sources.kmsg import KmsgSource
from fleetwatch.agent.sources.steps import StepReceiver
from fleetwatch.agent.spool import Spool
from fleetwatch.agent.tls import open_channel
from fleetwatch.asyncwait import wait_any
from fleetwatch.backoff import backoff_seconds
from fleetwatch.limits import printable
from fleetwatch.systemd import notify, watchdog_interval_seconds
from fleetwatch.v1 import telemetry_pb2 as pb
from fleetwatch.wire import IB_FIELDS, event_from_dict, fill_metrics, gpu_columns_message

log = logging.getLogger(__name__)

STREAM_METHOD = "/fleetwatch.v1.Telemetry/Stream"
# Covers the Hello's write (which waits for the connection) and the Welcome's read.
WELCOME_TIMEOUT_SECONDS = 10.0
# A write held this long (the collector stopped reading and HTTP/2 flow control holds us) ends
# the stream, so the sender reconnects instead of hanging where no watchdog ping would come.
WRITE_TIMEOUT_SECONDS = 30.0
# Batches in flight and not one of them acked for this long: the stream is treated as dead (a
# collector whose ingest hangs, or one that acks only seqs we never sent); keepalive only
# catches a dead TCP peer.
ACK_STALL_SECONDS = 120.0
# After a write fails because the RPC already ended, how long the reader gets to hand over the
# acks that came before the end, and the status.
READER_DRAIN_SECONDS = 2.0
# Streams ended with INVALID_ARGUMENT while the same batch was the oldest unacked before that
# batch is quarantined: the collector will never take it, and resending it forever would block
# every batch behind it until the spool bound dropped them.
REJECTIONS_BEFORE_QUARANTINE = 3
# A collector's bogus claims are logged at most this often (it may repeat one on every ack).
CLAIM_WARNING_INTERVAL_SECONDS = 60.0
# On a Drain, how long the agent waits for the acks of the batches it has in flight before it
# leaves: as long as a stopping collector keeps acking (CollectorApp.stop's grace, 2 s by default).
# A batch not acked by then stays spooled and goes to the next collector (ingest is idempotent).
DRAIN_ACK_WAIT_SECONDS = 2.0
# Half-closing the stream is one small frame; a collector that does not take it is left anyway.
HALF_CLOSE_SECONDS = 1.0
# Picking the next collector resolves its name: glibc's resolver gives up after 2 tries of 5 s
# (resolv.conf(5) defaults), so this bounds a hung lookup without cutting a slow one short.
RESOLVE_TIMEOUT_SECONDS = 12.0
# The loops whose progress feeds the systemd watchdog.
SAMPLE_LOOP = "sample"
SEND_LOOP = "send"


class CollectorDraining(Exception):
    """The collector said it is shutting down (a Drain): the agent moves to its next collector."""


def batch_problem(seq: int, payload: bytes) -> str | None:
    """Why a spooled payload cannot be sent as batch ``seq`` (None when it can).

    Checked before every send: a payload that does not decode would only make the collector
    end the stream, again on every reconnect, and nothing behind it would ever be delivered.
    """
    try:
        message = pb.AgentMessage.FromString(payload)
    except Exception as exc:  # DecodeError, or whatever else arbitrary bytes make the parser raise
        return f"does not decode as a batch ({exc or type(exc).__name__})"
    if message.WhichOneof("body") != "batch":
        return "decodes, but holds no batch"
    if message.batch.seq != seq:
        return f"holds batch seq {message.batch.seq}, not the {seq} its file name says"
    return None


class _RateLimitedLog:
    """At most one warning per key per interval; the next one says how many were held back."""

    def __init__(self, interval_seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_seconds = interval_seconds
        self._clock = clock
        self._last_at: dict[str, float] = {}
        self._held_back: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        now = self._clock()
        last_at = self._last_at.get(key)
        if last_at is not None and now - last_at < self.interval_seconds:
            self._held_back[key] = self._held_back.get(key, 0) + 1
            return
        self._last_at[key] = now
        held_back = self._held_back.pop(key, 0)
        if held_back:
            message += " (and %d more like it in the last %.0f s)"
            args = (*args, held_back, self.interval_seconds)
        log.warning(message, *args)


def storable_event(event: dict[str, Any]) -> dict[str, Any] | None:
    """The event as the collector accepts it, or None for an XID number no driver prints.

    The collector refuses a whole batch over one bad field, so values from the kernel log and
    NVML are brought inside fleetwatch.limits here, before the batch is spooled.
    """
    xid = event.get("xid")
    if xid is not None and not limits.XID_MIN <= int(xid) <= limits.XID_MAX:
        log.warning(
            "dropping an XID %s event on GPU %s: outside %d-%d", xid, event.get("gpu"), limits.XID_MIN, limits.XID_MAX
        )
        return None
    text_limits = {
        "message": limits.EVENT_MESSAGE_MAX_CHARS,
        "uuid": limits.GPU_UUID_MAX_CHARS,
        "pci_bus_id": limits.PCI_BUS_ID_MAX_CHARS,
    }
    return event | {key: printable(str(event[key]), most) for key, most in text_limits.items() if event.get(key)}


def ib_port_message(port: dict[str, Any]) -> pb.IbPortMetrics:
    msg = pb.IbPortMetrics(device=port["device"], port=int(port["port"]), ib_state=port.get("ib_state") or "")
    fill_metrics(msg, {k: v for k, v in port.items() if k in IB_FIELDS and k != "ib_state"})
    return msg


# Text a GPU sample names its owner with, and the collector's bound for each.
_LABEL_LIMITS = {
    "job": limits.JOB_MAX_CHARS,
    "k8s_namespace": limits.K8S_NAMESPACE_MAX_CHARS,
    "k8s_pod": limits.K8S_POD_MAX_CHARS,
    "k8s_container": limits.K8S_CONTAINER_MAX_CHARS,
}


def gpu_sample_labels(sample: dict[str, Any]) -> dict[str, Any]:
    """The sample with its job and pod names as the collector takes them: from the environment and
    cgroup paths of the GPU's processes and from the kubelet, so printable and cut to the limits here."""
    cut = {key: printable(str(sample[key]), most) for key, most in _LABEL_LIMITS.items() if sample.get(key)}
    return sample | cut if cut else sample


def gpu_sample_message(sample: dict[str, Any]) -> pb.GpuSample:
    sample = gpu_sample_labels(sample)
    msg = pb.GpuSample(gpu=int(sample["gpu"]), t=float(sample["t"]), uuid=sample.get("uuid") or "")
    for key in _LABEL_LIMITS:
        if sample.get(key):
            setattr(msg, key, sample[key])
    if sample.get("rank") is not None:
        msg.rank = int(sample["rank"])
    fill_metrics(msg.metrics, sample["metrics"])
    return msg


def fill_host_sample(msg: pb.HostSample, cycle: Cycle) -> None:
    msg.t = cycle.t
    fill_metrics(msg.metrics, cycle.host or {})
    for port in cycle.ib_ports:
        msg.ib_ports.append(ib_port_message(port))


def batch_message(cycles: list[Cycle], boot_id: str, dense: bool) -> pb.Batch:
    """One batch of `cycles`: the dense form (gpu_columns, hosts) or, for one cycle, the 0.1.0 form."""
    batch = pb.Batch(t=cycles[-1].t, boot_id=boot_id)
    if dense:
        gpus = [gpu_sample_labels(sample) for cycle in cycles for sample in cycle.gpus]
        if gpus:
            batch.gpu_columns.CopyFrom(gpu_columns_message(gpus))
        for cycle in cycles:
            if cycle.host is not None:
                fill_host_sample(batch.hosts.add(), cycle)
    else:
        (cycle,) = cycles
        batch.gpus.extend(gpu_sample_message(s) for s in cycle.gpus)
        if cycle.host is not None:
            fill_host_sample(batch.host, cycle)
    for cycle in cycles:
        batch.events.extend(event_from_dict(e) for e in map(storable_event, cycle.events) if e is not None)
        for step in cycle.steps:
            report = batch.steps.add(
                t=step["t"], job=step["job"], rank=step["rank"], step=step["step"], seconds=step["seconds"]
            )
            for key in ("gpu", "dp_rank", "pp_stage", "tp_rank", "wall_seconds"):
                if step.get(key) is not None:
                    setattr(report, key, step[key])
    return batch


class Agent:
    """One node's agent. `run(stop)` returns after `stop` is set and the spool is drained (bounded)."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        node: str,
        sampler: Sampler,
        spool: Spool,
        boot_id: str,
        kmsg: KmsgSource | None = None,
        steps: StepReceiver | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.node = node
        self.sampler = sampler
        self.state = sampler.state
        self.nvml = sampler.nvml
        self.spool = spool
        self.boot_id = boot_id
        self.kmsg = kmsg
        self.steps = steps
        self.clock = clock
        self.sampling_interval_seconds = config.sampling_interval_seconds
        self.connected = False
        self._welcomed = False  # set once per connection, when the collector answered the hello
        # One collector at a time, the next one after each failure or drain (fleetwatch.agent.collectors).
        self.collectors = CollectorRotation(config.collector_address, start=node_offset(node))
        self.collector = CollectorTarget.of(config.collector_address[0])  # streamed to, or last tried
        self.acks_received = 0  # batches acked, on any stream
        self._acks_at_drain: int | None = None  # acks_received when a collector last drained us
        self.highest_sent_seq = 0  # the highest seq this process wrote to any stream
        self.batches_made = 0
        self._claims = _RateLimitedLog(CLAIM_WARNING_INTERVAL_SECONDS)
        self._last_ack_at = 0.0  # monotonic; when the stream last acked a batch we sent on it
        self._rejected_seq = 0  # the oldest unacked batch when the collector last said INVALID_ARGUMENT
        self._rejections = 0  # how many streams in a row ended so with that batch oldest
        self.heartbeats = Heartbeats((SAMPLE_LOOP, SEND_LOOP))
        self._spool_lock = threading.Lock()  # the sampler and the event threads all append
        self._stopping = threading.Event()
        self._rng = random.Random()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_sender: asyncio.Event | None = None
        self._acked: asyncio.Event | None = None
        self._reschedule: asyncio.Event | None = None  # set when the sampling interval changes
        self._threads: list[threading.Thread] = []
        self._kernel_sent_until = 0.0
        # Set from each Welcome: whether the collector takes several cycles a batch (Batch.gpu_columns).
        self.collector_accepts_columns = False
        self._pending: list[Cycle] = []  # cycles sampled, not spooled yet (cycles_per_batch)
        self._pending_lock = threading.Lock()

    # -- producing batches -------------------------------------------------------------------

    def _spool_batch(self, cycles: list[Cycle], dense: bool = False) -> int:
        batch = batch_message(cycles, self.boot_id, dense)
        with self._spool_lock:
            seq = self.spool.next_seq()
            batch.seq = seq
            batch.spool_bytes = self.spool.bytes
            batch.spool_batches = self.spool.count
            self.spool.append(seq, pb.AgentMessage(batch=batch).SerializeToString())
            self.batches_made += 1
            self._publish_spool_state()
        if self._loop is not None and self._wake_sender is not None:
            self._loop.call_soon_threadsafe(self._wake_sender.set)
        return seq

    @property
    def cycles_per_batch(self) -> int:
        """Sampling cycles sent together: batch_interval_seconds of them, once the collector takes them."""
        if not self.collector_accepts_columns or not self.config.batch_interval_seconds:
            return 1
        cycles = round(self.config.batch_interval_seconds / self.sampling_interval_seconds)
        return max(1, min(cycles, limits.MAX_CYCLES_PER_BATCH))

    def _add_cycle(self, cycle: Cycle) -> int | None:
        """Spool the cycle, alone or with the ones gathered before it; the batch's seq, or None while gathering."""
        with self._pending_lock:
            per_batch = self.cycles_per_batch
            if per_batch == 1 and not self._pending:
                return self._spool_batch([cycle])
            self._pending.append(cycle)
            # Events (and a GPU that vanished) go out at once, not at the end of the interval.
            if len(self._pending) < per_batch and not cycle.events:
                return None
            return self._flush_pending()

    def _flush_pending(self) -> int | None:
        """Spool the gathered cycles (pending lock held): one dense batch, or one batch each for a
        collector that no longer takes the dense form."""
        cycles, self._pending = self._pending, []
        if not cycles:
            return None
        if self.collector_accepts_columns:
            return self._spool_batch(cycles, dense=True)
        return [self._spool_batch([cycle]) for cycle in cycles][-1]

    def flush(self) -> int | None:
        """Spool what was gathered now (on stop); the batch's seq, or None when nothing was."""
        with self._pending_lock:
            return self._flush_pending()

    def _publish_spool_state(self) -> None:
        """Copy the spool's gauges and counters into the state /metrics reads (spool lock held)."""
        with self.state.lock:
            self.state.spool_bytes = self.spool.bytes
            self.state.spool_batches = self.spool.count
            self.state.spool_dropped_batches_total = self.spool.dropped_batches
            self.state.spool_quarantined_batches_total = self.spool.quarantined_batches

    def sample_once(self) -> int | None:
        """One sampling cycle (blocking: NVML, psutil and sysfs reads); the seq of the batch it
        completed, or None while the cycle waits for the rest of its batch (cycles_per_batch)."""
        return self._add_cycle(self.sampler.sample())

    def send_events(self, events: list[dict]) -> int | None:
        """Events go out at once, in a batch of their own, not at the next sampling tick."""
        events = self.sampler.admit_events(events)
        if not events:
            return None
        return self._spool_batch([Cycle(t=self.clock(), events=events)])

    def _nvml_event_thread(self) -> None:
        assert self.nvml is not None
        while not self._stopping.is_set():
            try:
                events = self.nvml.wait_events(1.0)
            except Exception:  # a driver hiccup must not end XID watching for good
                log.exception("waiting for NVML events failed; retrying in 5 s")
                self._stopping.wait(5.0)
                continue
            if events:
                self.send_events(events)

    def _kmsg_thread(self) -> None:
        assert self.kmsg is not None
        self.kmsg.follow(self._stopping, self._send_kernel_events)

    def _send_kernel_events(self, events: list[dict]) -> None:
        self.send_events(events)
        self._mark_kernel_xids_sent(events)

    def _steps_thread(self) -> None:
        assert self.steps is not None
        while not self._stopping.is_set():
            try:
                steps = self.steps.receive(1.0)
            except OSError:
                log.exception("step-report socket failed; step reports are off")
                return
            if steps:
                self.sampler.add_steps(steps)

    @property
    def _kernel_mark_path(self) -> Path:
        return self.spool.directory / "kmsg.sent"

    def _kernel_mark(self) -> float:
        """Time of the newest kernel-log XID an earlier run sent in this boot (0 for none)."""
        try:
            boot_id, sent_until = self._kernel_mark_path.read_text().split()
            return float(sent_until) if boot_id == self.boot_id else 0.0
        except (OSError, ValueError):
            return 0.0

    def _mark_kernel_xids_sent(self, events: list[dict]) -> None:
        newest = max((e.get("t") or 0.0 for e in events), default=0.0)
        if newest <= self._kernel_sent_until:
            return
        self._kernel_sent_until = newest
        try:
            self._kernel_mark_path.write_text(f"{self.boot_id} {newest}\n")
        except OSError as exc:
            log.warning("cannot record kernel-log progress in %s: %s", self._kernel_mark_path, exc)

    def _send_existing_kernel_xids(self) -> None:
        """XIDs already in the kernel log at start, minus those an earlier run of the agent sent.

        Without the mark every agent restart would report the boot's old XIDs again."""
        assert self.kmsg is not None
        self._kernel_sent_until = self._kernel_mark()
        events = [e for e in self.kmsg.read_existing() if (e.get("t") or 0.0) > self._kernel_sent_until]
        if events:
            log.info("%d XIDs in the kernel log since boot that were not sent yet", len(events))
            self._send_kernel_events(events)

    def _start_threads(self) -> None:
        targets = []
        if self.nvml is not None:
            targets.append(("nvml-events", self._nvml_event_thread))
        if self.kmsg is not None:
            self._send_existing_kernel_xids()
            targets.append(("kmsg", self._kmsg_thread))
        if self.steps is not None:
            targets.append(("steps", self._steps_thread))
        for name, target in targets:
            thread = threading.Thread(target=target, name=f"{name}-{self.node}", daemon=True)
            thread.start()
            self._threads.append(thread)

    async def _sample_loop(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        assert self._reschedule is not None
        last_tick = loop.time()
        while not stop.is_set():
            last_tick = loop.time()
            # No grace for the cycle itself: NVML, psutil and sysfs reads that hang past the
            # watchdog interval are what the watchdog is there to catch.
            self.heartbeats.beat(SAMPLE_LOOP)
            try:
                await asyncio.to_thread(self.sample_once)
            except Exception:  # e.g. a full disk under the spool: keep the loop alive and say so
                log.exception("sampling cycle failed")
            # Sleep until the next tick; a new interval from the collector re-plans it at once.
            while not stop.is_set():
                self._reschedule.clear()
                remaining = last_tick + self.sampling_interval_seconds - loop.time()
                if remaining <= 0:
                    break
                self.heartbeats.beat(SAMPLE_LOOP, grace_seconds=remaining)
                await wait_any(stop, self._reschedule, timeout_seconds=remaining)

    async def _watchdog_loop(self, stop: asyncio.Event, interval_seconds: float) -> None:
        """Feed systemd's watchdog while both loops make progress (see WatchdogFeeder)."""
        feeder = WatchdogFeeder(self.heartbeats, interval_seconds)
        while not stop.is_set():
            feeder.tick()
            await wait_any(stop, timeout_seconds=interval_seconds / 2)

    # -- streaming ---------------------------------------------------------------------------

    def _hello(self) -> bytes:
        hello = pb.Hello(
            node=self.node,
            boot_id=self.boot_id,
            agent_version=__version__,
            sampling_interval_seconds=self.sampling_interval_seconds,
            t=self.clock(),
            nvml_available=self.nvml is not None,
            batch_interval_seconds=self.config.batch_interval_seconds,
        )
        for info in self.nvml.inventory if self.nvml is not None else []:
            gpu = hello.gpus.add(
                index=info["index"],
                uuid=info.get("uuid") or "",
                name=info.get("name") or "",
                pci_bus_id=info.get("pci_bus_id") or "",
                serial=info.get("serial") or "",
                driver_version=info.get("driver_version") or "",
                cuda_version=info.get("cuda_version") or "",
            )
            for key in ("memory_total_bytes", "power_limit_watts", "sm_clock_max_mhz", "mem_clock_max_mhz"):
                if info.get(key) is not None:
                    setattr(gpu, key, type(getattr(gpu, key))(info[key]))
        return pb.AgentMessage(hello=hello).SerializeToString()

    def _on_welcome(self, held: int) -> None:
        """The collector says it holds up to ``held`` for this (node, boot_id)."""
        # held is the highest seq the collector stored for this boot: a maximum, not a promise
        # that every lower seq arrived (batches the spool dropped or quarantined leave holes, and
        # a stream posing as this node can store any seq it likes under our name). So it never
        # removes a spooled batch: every batch still spooled is sent again under its own seq and
        # leaves the spool only on its own ack. Ingest is idempotent on (node, boot_id, seq), so a
        # batch the collector already had costs one duplicate, never a loss.
        #
        # New batches are still numbered above held. If seq.state was lost, this agent would
        # otherwise hand out seqs the collector already holds for this boot and ingest would drop
        # the new batches as duplicates. If instead held is a spoofer's seq 1000, numbering above
        # it costs nothing: our spooled seq 45 is a seq the collector does not hold, so it is
        # stored when sent (unless the collector acks past it, which it must not), and new
        # batches from 1001 on are new too.
        with self._spool_lock:
            newest = self.spool.last_seq
            if held > newest:
                self._claims.warning(
                    "welcome",
                    "collector %s says it holds seq %d for this boot, ahead of any seq this agent allocated "
                    "(%d): another stream may be posing as node %s, or this spool's state was lost; "
                    "resending all %d spooled batches under their own seqs and numbering new ones above %d",
                    self.collector,
                    held,
                    newest,
                    self.node,
                    self.spool.count,
                    held,
                )
                self.spool.ensure_seq_above(held)

    def _on_ack(self, seq: int, in_flight: set[int]) -> None:
        """Remove the acked batch from the spool, if it is one this stream sent and still waits for."""
        if seq in in_flight:
            in_flight.discard(seq)
            with self._spool_lock:
                self.spool.ack(seq)
                self._publish_spool_state()
            self._last_ack_at = time.monotonic()
            self.acks_received += 1
            if seq == self._rejected_seq:
                self._rejected_seq = self._rejections = 0
            return
        if seq > self.highest_sent_seq:
            self._claims.warning(
                "ack",
                "collector %s acked seq %d, ahead of any seq this agent sent (%d); ignored, nothing removed",
                self.collector,
                seq,
                self.highest_sent_seq,
            )
        else:
            # A batch acked twice, or one sent on an earlier stream: it was removed, or is resent.
            log.debug("collector acked seq %d, which is not in flight on this stream; ignored", seq)

    def _quarantine(self, seq: int, reason: str) -> None:
        with self._spool_lock:
            self.spool.quarantine(seq, reason)
            self._publish_spool_state()

    def _note_rejection(self, in_flight: set[int], details: str) -> None:
        """The collector ended the stream with INVALID_ARGUMENT: blame the oldest unacked batch.

        The collector acks in order and ends the stream at the batch it cannot store, so by the
        time its status arrives every batch before that one has been acked; the oldest still in
        flight is the one it refused. Only the same batch refused several streams in a row is
        quarantined, so a transient refusal costs nothing.
        """
        if not in_flight:
            return
        suspect = min(in_flight)
        if suspect == self._rejected_seq:
            self._rejections += 1
        else:
            self._rejected_seq, self._rejections = suspect, 1
        if self._rejections >= REJECTIONS_BEFORE_QUARANTINE:
            self._quarantine(suspect, f"the collector refused it {self._rejections} times: {details}")
            self._rejected_seq = self._rejections = 0

    async def _read_replies(self, call: Any, in_flight: set[int], draining: asyncio.Event) -> None:
        assert self._acked is not None and self._wake_sender is not None
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                raise ConnectionError("collector closed the stream")
            body = msg.WhichOneof("body")
            if body == "ack":
                self._on_ack(msg.ack.seq, in_flight)
                self._acked.set()
            elif body == "settings":
                interval = msg.settings.sampling_interval_seconds
                if interval > 0 and interval != self.sampling_interval_seconds:
                    log.info("collector set the sampling interval to %.3g s", interval)
                    self.sampling_interval_seconds = interval
                    assert self._reschedule is not None
                    self._reschedule.set()
            elif body == "drain":
                log.info("collector %s is shutting down (%s)", self.collector, msg.drain.reason or "no reason given")
                draining.set()
                self._wake_sender.set()

    async def _handshake(self, call: Any) -> int:
        """Hello, then the collector's Welcome; returns the seq it says it holds."""
        await call.write(self._hello())
        first = await call.read()
        if first is grpc.aio.EOF or first.WhichOneof("body") != "welcome":
            raise ConnectionError("collector did not answer the hello with a welcome")
        accepts = first.welcome.accepts_columns
        if accepts != self.collector_accepts_columns:
            log.info(
                "collector %s %s",
                self.collector,
                f"takes several sampling cycles a batch: sending every {self.config.batch_interval_seconds:g} s"
                if accepts
                else "takes one sampling cycle a batch (fleetwatch 0.1.0): sending every cycle",
            )
            self.collector_accepts_columns = accepts
        return int(first.welcome.last_seq)

    async def _write(self, call: Any, reader: asyncio.Task[None], payload: bytes) -> None:
        self.heartbeats.beat(SEND_LOOP, grace_seconds=WRITE_TIMEOUT_SECONDS)
        try:
            await asyncio.wait_for(call.write(payload), WRITE_TIMEOUT_SECONDS)
        except TimeoutError:
            raise ConnectionError(f"a batch could not be written for {WRITE_TIMEOUT_SECONDS:.0f} s") from None
        except asyncio.InvalidStateError:
            # grpc's answer to a write after the RPC ended (the collector closed or aborted it
            # during a burst). The reader still holds the acks sent before the end, then the
            # status that says why: let it hand both over.
            await asyncio.wait([reader], timeout=READER_DRAIN_SECONDS)
            if reader.done() and not reader.cancelled():
                reader.result()  # raises the stream's status
            raise ConnectionError("the stream ended while a batch was being written") from None

    async def _stream_once(self, channel: grpc.aio.Channel, stop_sending: asyncio.Event) -> None:
        assert self._wake_sender is not None and self._acked is not None
        call = channel.stream_stream(
            STREAM_METHOD, request_serializer=None, response_deserializer=pb.CollectorMessage.FromString
        )()
        in_flight: set[int] = set()  # sent on this stream, not yet acked on it
        draining = asyncio.Event()  # the collector sent a Drain
        try:
            self.heartbeats.beat(SEND_LOOP, grace_seconds=WELCOME_TIMEOUT_SECONDS)
            held = await asyncio.wait_for(self._handshake(call), WELCOME_TIMEOUT_SECONDS)
            self._on_welcome(held)
            self.connected = self.state.collector_connected = True
            self._welcomed = True
            self._last_ack_at = time.monotonic()
            log.info(
                "connected to collector %s (it holds up to seq %d; %d batches to send)",
                self.collector,
                held,
                self.spool.count,
            )
            reader = asyncio.create_task(self._read_replies(call, in_flight, draining))
            try:
                await self._send_spooled(call, reader, in_flight, stop_sending, draining)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    self._note_rejection(in_flight, exc.details() or "")
                raise
            finally:
                reader.cancel()
        finally:
            self.connected = self.state.collector_connected = False
            call.cancel()

    async def _send_spooled(
        self,
        call: Any,
        reader: asyncio.Task[None],
        in_flight: set[int],
        stop_sending: asyncio.Event,
        draining: asyncio.Event,
    ) -> None:
        """Send every spooled batch, oldest first, then each new one, until the stream ends or drains."""
        assert self._wake_sender is not None and self._acked is not None
        # Every stream starts from the oldest spooled batch, whatever the Welcome said: see
        # _on_welcome. cursor is the highest seq this stream has sent or quarantined.
        cursor = 0
        while True:
            if draining.is_set():
                await self._leave_draining(call, reader, in_flight)
            if reader.done():
                reader.result()  # raises why the stream ended
                raise ConnectionError("collector stopped answering")
            # Cleared before looking, so a wake or an ack that comes while we send is not lost.
            self._wake_sender.clear()
            self._acked.clear()
            quarantined = False
            room = self.config.max_in_flight_batches - len(in_flight)
            if room > 0:
                with self._spool_lock:
                    pending = self.spool.pending(after_seq=cursor, max_batches=room)
                for seq, payload in pending:
                    if draining.is_set():
                        break  # nothing more to a collector that is leaving
                    cursor = seq
                    problem = batch_problem(seq, payload)
                    if problem is not None:
                        self._quarantine(seq, problem)
                        quarantined = True
                        continue
                    # Both before the write: its ack can be read before the write returns.
                    in_flight.add(seq)
                    self.highest_sent_seq = max(self.highest_sent_seq, seq)
                    await self._write(call, reader, payload)
            if stop_sending.is_set() and self.spool.count == 0:
                return
            if in_flight and time.monotonic() - self._last_ack_at > ACK_STALL_SECONDS:
                raise ConnectionError(f"no ack for {ACK_STALL_SECONDS:.0f} s with {len(in_flight)} batches in flight")
            if quarantined:
                continue  # what took the quarantined batches' room is free now: fill it at once
            self.heartbeats.beat(SEND_LOOP, grace_seconds=1.0)
            await wait_any(self._wake_sender, self._acked, reader, timeout_seconds=1.0)

    async def _leave_draining(self, call: Any, reader: asyncio.Task[None], in_flight: set[int]) -> None:
        """The collector drains: wait (bounded) for the acks of what is in flight, half-close, move on.

        Raises CollectorDraining; what was not acked stays spooled and goes to the next collector.
        """
        assert self._acked is not None
        deadline = time.monotonic() + DRAIN_ACK_WAIT_SECONDS
        while in_flight and not reader.done() and (remaining := deadline - time.monotonic()) > 0:
            self._acked.clear()
            self.heartbeats.beat(SEND_LOOP, grace_seconds=remaining)
            await wait_any(self._acked, reader, timeout_seconds=remaining)
        # The collector's read of this stream ends: it knows the agent left and stops waiting. A
        # stream that ended already is cancelled on the way out either way.
        with contextlib.suppress(TimeoutError, asyncio.InvalidStateError, grpc.aio.AioRpcError):
            await asyncio.wait_for(call.done_writing(), HALF_CLOSE_SECONDS)
        raise CollectorDraining(f"{len(in_flight)} batches in flight not acked" if in_flight else "all acked")

    async def _next_collector(self) -> CollectorTarget:
        """The next collector in the rotation; its name is resolved off the event loop (getaddrinfo blocks)."""
        self.heartbeats.beat(SEND_LOOP, grace_seconds=RESOLVE_TIMEOUT_SECONDS)
        target = await asyncio.wait_for(asyncio.to_thread(self.collectors.next), RESOLVE_TIMEOUT_SECONDS)
        self.heartbeats.beat(SEND_LOOP)  # done: the lookup's grace must not cover what comes next
        with self.state.lock:
            self.state.collector_entry, self.state.collector_address = target.entry, target.address
        return target

    async def _send_loop(self, stop_sending: asyncio.Event) -> None:
        """Stream until drained after stop; supervised: no exception ends it, each is retried with backoff."""
        attempt = 0
        options = [("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000)]
        while True:
            self.heartbeats.beat(SEND_LOOP)
            try:
                self.collector = await self._next_collector()
                async with open_channel(self.config, options, self.collector) as channel:
                    await self._stream_once(channel, stop_sending)
                    return  # drained after stop
            except asyncio.CancelledError:
                raise
            except CollectorDraining as exc:
                self._welcomed = False
                # Straight to the next collector; but collectors that drain us again and again with
                # nothing acked in between (all of them restarting, or one that drains every stream)
                # are retried with the backoff, as failures are.
                if self._acks_at_drain is None or self.acks_received > self._acks_at_drain:
                    attempt, delay = 0, 0.0
                else:
                    attempt += 1
                    delay = backoff_seconds(
                        attempt, self.config.reconnect_min_seconds, self.config.reconnect_max_seconds, self._rng
                    )
                self._acks_at_drain = self.acks_received
                log.info(
                    "left collector %s as it asked (%s); %d batches spooled; next collector in %.1f s",
                    self.collector,
                    exc,
                    self.spool.count,
                    delay,
                )
            except (grpc.aio.AioRpcError, ConnectionError, TimeoutError, OSError) as exc:
                detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                attempt = 0 if self._welcomed else attempt + 1
                self._welcomed = False
                delay = backoff_seconds(
                    attempt, self.config.reconnect_min_seconds, self.config.reconnect_max_seconds, self._rng
                )
                log.warning(
                    "collector %s: %s; %d batches spooled; reconnecting in %.1f s",
                    self.collector,
                    detail,
                    self.spool.count,
                    delay,
                )
            except Exception:
                # Not the network: a bug or a local failure (a spool read, a TLS file). Logged
                # with its traceback, and sending starts over after a backoff that grows while it
                # repeats, so one bad moment never leaves the node silent until a restart.
                attempt += 1
                self._welcomed = False
                delay = backoff_seconds(
                    attempt, self.config.reconnect_min_seconds, self.config.reconnect_max_seconds, self._rng
                )
                log.exception(
                    "the send loop failed; %d batches spooled; restarting it in %.1f s", self.spool.count, delay
                )
            if stop_sending.is_set() and self.spool.count == 0:
                return
            self.heartbeats.beat(SEND_LOOP, grace_seconds=delay)  # a backoff is progress, not a hang
            await asyncio.sleep(delay)

    def _sender_ended(self, task: asyncio.Task[None]) -> None:
        """The send loop catches every Exception; should anything still end it, say so at once."""
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("the send loop ended: %r; the watchdog stops being fed", exc, exc_info=exc)

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake_sender = asyncio.Event()
        self._acked = asyncio.Event()
        self._reschedule = asyncio.Event()
        self._stopping.clear()
        stop_sending = asyncio.Event()
        await asyncio.to_thread(self._start_threads)
        # Fresh heartbeats: the time spent starting the threads is no loop's silence.
        self.heartbeats = Heartbeats((SAMPLE_LOOP, SEND_LOOP))
        sampler = asyncio.create_task(self._sample_loop(stop))
        sender = asyncio.create_task(self._send_loop(stop_sending))
        sender.add_done_callback(self._sender_ended)
        watchdog_seconds = watchdog_interval_seconds()
        watchdog = (
            asyncio.create_task(self._watchdog_loop(stop, watchdog_seconds)) if watchdog_seconds is not None else None
        )
        notify("READY=1")
        log.info(
            "agent for node %s sampling every %.3g s (%s)",
            self.node,
            self.sampling_interval_seconds,
            f"{len(self.nvml.inventory)} GPUs" if self.nvml is not None else "host only, no NVML",
        )
        try:
            await stop.wait()
        finally:
            notify("STOPPING=1")
            self._stopping.set()
            await asyncio.gather(sampler, *([watchdog] if watchdog is not None else []), return_exceptions=True)
            if self._pending:  # the cycles gathered for the next batch go out with the rest
                await asyncio.to_thread(self.flush)
            stop_sending.set()
            self._wake_sender.set()
            try:
                await asyncio.wait_for(asyncio.shield(sender), self.config.stop_drain_seconds)
            except TimeoutError:
                log.warning("stopping with %d batches still spooled; they are sent on the next start", self.spool.count)
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            for thread in self._threads:
                thread.join(timeout=2.0)
            self._threads.clear()
