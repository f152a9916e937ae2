"""The agent's loops: sample on a timer, send events the moment they are seen, spool, stream, resend.

Every batch goes to the on-disk spool before it is sent and leaves it only when the collector
acks it, so a collector restart, a network cut or an agent restart loses nothing: after
reconnecting, the agent resends every un-acked batch in order.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from fleetwatch import __version__
from fleetwatch.agent.config import AgentConfig
from fleetwatch.agent.sampler import Cycle, Sampler
from fleetwatch.agent.sources.kmsg import KmsgSource
from fleetwatch.agent.sources.steps import StepReceiver
from fleetwatch.agent.spool import Spool
from fleetwatch.asyncwait import wait_any
from fleetwatch.backoff import backoff_seconds
from fleetwatch.systemd import notify, watchdog_interval_seconds
from fleetwatch.v1 import telemetry_pb2 as pb
from fleetwatch.wire import IB_FIELDS, event_from_dict, fill_metrics

log = logging.getLogger(__name__)

STREAM_METHOD = "/fleetwatch.v1.Telemetry/Stream"
WELCOME_TIMEOUT_SECONDS = 10.0


def ib_port_message(port: dict[str, Any]) -> pb.IbPortMetrics:
    msg = pb.IbPortMetrics(device=port["device"], port=int(port["port"]), ib_state=port.get("ib_state") or "")
    fill_metrics(msg, {k: v for k, v in port.items() if k in IB_FIELDS and k != "ib_state"})
    return msg


def gpu_sample_message(sample: dict[str, Any]) -> pb.GpuSample:
    msg = pb.GpuSample(gpu=int(sample["gpu"]), t=float(sample["t"]), uuid=sample.get("uuid") or "")
    if sample.get("job"):
        msg.job = str(sample["job"])
    if sample.get("rank") is not None:
        msg.rank = int(sample["rank"])
    fill_metrics(msg.metrics, sample["metrics"])
    return msg


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
        self.acked_seq = 0
        self.batches_made = 0
        self._spool_lock = threading.Lock()  # the sampler and the event threads all append
        self._stopping = threading.Event()
        self._rng = random.Random()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_sender: asyncio.Event | None = None
        self._acked: asyncio.Event | None = None
        self._reschedule: asyncio.Event | None = None  # set when the sampling interval changes
        self._threads: list[threading.Thread] = []
        self._kernel_sent_until = 0.0

    # -- producing batches -------------------------------------------------------------------

    def _spool_batch(self, cycle: Cycle) -> int:
        batch = pb.Batch(t=cycle.t, boot_id=self.boot_id)
        batch.gpus.extend(gpu_sample_message(s) for s in cycle.gpus)
        if cycle.host is not None:
            batch.host.t = cycle.t
            fill_metrics(batch.host.metrics, cycle.host)
            for port in cycle.ib_ports:
                batch.host.ib_ports.append(ib_port_message(port))
        batch.events.extend(event_from_dict(e) for e in cycle.events)
        for step in cycle.steps:
            report = batch.steps.add(
                t=step["t"], job=step["job"], rank=step["rank"], step=step["step"], seconds=step["seconds"]
            )
            if step.get("gpu") is not None:
                report.gpu = step["gpu"]
        with self._spool_lock:
            seq = self.spool.next_seq()
            batch.seq = seq
            batch.spool_bytes = self.spool.bytes
            batch.spool_batches = self.spool.count
            self.spool.append(seq, pb.AgentMessage(batch=batch).SerializeToString())
            self.batches_made += 1
            with self.state.lock:
                self.state.spool_bytes = self.spool.bytes
                self.state.spool_batches = self.spool.count
                self.state.spool_dropped_batches_total = self.spool.dropped_batches
        if self._loop is not None and self._wake_sender is not None:
            self._loop.call_soon_threadsafe(self._wake_sender.set)
        return seq

    def sample_once(self) -> int:
        """One sampling cycle (blocking: NVML, psutil and sysfs reads); returns the batch's seq."""
        return self._spool_batch(self.sampler.sample())

    def send_events(self, events: list[dict]) -> int | None:
        """Events go out at once, in a batch of their own, not at the next sampling tick."""
        events = self.sampler.admit_events(events)
        if not events:
            return None
        return self._spool_batch(Cycle(t=self.clock(), events=events))

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
        watchdog = watchdog_interval_seconds()
        last_tick = loop.time()
        while not stop.is_set():
            last_tick = loop.time()
            try:
                await asyncio.to_thread(self.sample_once)
            except Exception:  # e.g. a full disk under the spool: keep the loop alive and say so
                log.exception("sampling cycle failed")
            if watchdog is not None:
                notify("WATCHDOG=1")
            # Sleep until the next tick; a new interval from the collector re-plans it at once.
            while not stop.is_set():
                self._reschedule.clear()
                remaining = last_tick + self.sampling_interval_seconds - loop.time()
                if remaining <= 0:
                    break
                await wait_any(stop, self._reschedule, timeout_seconds=remaining)

    # -- streaming ---------------------------------------------------------------------------

    def _hello(self) -> bytes:
        hello = pb.Hello(
            node=self.node,
            boot_id=self.boot_id,
            agent_version=__version__,
            sampling_interval_seconds=self.sampling_interval_seconds,
            t=self.clock(),
            nvml_available=self.nvml is not None,
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

    def _on_ack(self, seq: int) -> None:
        with self._spool_lock:
            self.spool.ack(seq)
        self.acked_seq = max(self.acked_seq, seq)

    async def _read_replies(self, call: Any) -> None:
        assert self._acked is not None
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                raise ConnectionError("collector closed the stream")
            body = msg.WhichOneof("body")
            if body == "ack":
                self._on_ack(msg.ack.seq)
                self._acked.set()
            elif body == "settings":
                interval = msg.settings.sampling_interval_seconds
                if interval > 0 and interval != self.sampling_interval_seconds:
                    log.info("collector set the sampling interval to %.3g s", interval)
                    self.sampling_interval_seconds = interval
                    assert self._reschedule is not None
                    self._reschedule.set()

    async def _stream_once(self, channel: grpc.aio.Channel, stop_sending: asyncio.Event) -> None:
        assert self._wake_sender is not None and self._acked is not None
        call = channel.stream_stream(
            STREAM_METHOD, request_serializer=None, response_deserializer=pb.CollectorMessage.FromString
        )()
        try:
            await call.write(self._hello())
            first = await asyncio.wait_for(call.read(), WELCOME_TIMEOUT_SECONDS)
            if first is grpc.aio.EOF or first.WhichOneof("body") != "welcome":
                raise ConnectionError("collector did not answer the hello with a welcome")
            held = first.welcome.last_seq
            with self._spool_lock:
                self.spool.ensure_seq_above(held)
            self._on_ack(held)
            self.connected = self.state.collector_connected = True
            self._welcomed = True
            log.info(
                "connected to collector %s (it holds up to seq %d; %d batches to send)",
                self.config.collector_address,
                held,
                self.spool.count,
            )
            reader = asyncio.create_task(self._read_replies(call))
            sent = self.acked_seq
            try:
                while True:
                    if reader.done():
                        reader.result()  # raises why the stream ended
                    self._wake_sender.clear()
                    room = self.config.max_in_flight_batches - (sent - self.acked_seq)
                    if room > 0:
                        with self._spool_lock:
                            pending = self.spool.pending(after_seq=sent)[:room]
                        for seq, payload in pending:
                            await call.write(payload)
                            sent = seq
                    if stop_sending.is_set() and self.spool.count == 0:
                        return
                    self._acked.clear()
                    await wait_any(self._wake_sender, self._acked, reader, timeout_seconds=1.0)
            finally:
                reader.cancel()
        finally:
            self.connected = self.state.collector_connected = False
            call.cancel()

    async def _send_loop(self, stop_sending: asyncio.Event) -> None:
        attempt = 0
        options = [("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000)]
        while True:
            try:
                async with grpc.aio.insecure_channel(self.config.collector_address, options=options) as channel:
                    await self._stream_once(channel, stop_sending)
                    return  # drained after stop
            except asyncio.CancelledError:
                raise
            except (grpc.aio.AioRpcError, ConnectionError, TimeoutError, OSError) as exc:
                detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                attempt = 0 if self._welcomed else attempt + 1
                self._welcomed = False
                delay = backoff_seconds(
                    attempt, self.config.reconnect_min_seconds, self.config.reconnect_max_seconds, self._rng
                )
                log.warning(
                    "collector %s: %s; %d batches spooled; reconnecting in %.1f s",
                    self.config.collector_address,
                    detail,
                    self.spool.count,
                    delay,
                )
            if stop_sending.is_set() and self.spool.count == 0:
                return
            await asyncio.sleep(delay)

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake_sender = asyncio.Event()
        self._acked = asyncio.Event()
        self._reschedule = asyncio.Event()
        self._stopping.clear()
        stop_sending = asyncio.Event()
        await asyncio.to_thread(self._start_threads)
        sampler = asyncio.create_task(self._sample_loop(stop))
        sender = asyncio.create_task(self._send_loop(stop_sending))
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
            await asyncio.gather(sampler, return_exceptions=True)
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
