"""Property-based fuzzing of the collector's edge: hostile agent streams over real gRPC beside a good agent.

Hypothesis writes whole agent streams: a Hello (or not), batches that are well-formed but odd (NaN
and NVML's all-ones values, the longest names, the largest GPU index, seqs near 2**63, repeats
of other streams' seqs), then maybe one hostile message (huge, negative, NaN and infinite
numbers, long and control-character strings, a batch before the Hello, a repeated or falling seq,
oversized lists and messages). They run in parallel against one real collector (SQLite, and a
shorter run on PostgreSQL) while a well-behaved agent streams seqs 1..N beside them. Every stream
must end OK, INVALID_ARGUMENT or RESOURCE_EXHAUSTED (never UNAVAILABLE, INTERNAL or UNKNOWN), a
stream of well-formed messages only must be acked whole, and the good agent must lose nothing.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetwatch import limits
from fleetwatch.collector.app import CollectorApp
from fleetwatch.v1 import telemetry_pb2 as pb
from tests.collector.test_ingest_validation import SQL_WORDS, Outcome, collector_config, run_stream

T = TypeVar("T")

# The must-show count: hostile messages the collector read and answered (ack or refusal) on SQLite.
HOSTILE_MESSAGES = 10_000
# The PostgreSQL run: the same properties, fewer messages (each commit is a network round trip).
HOSTILE_MESSAGES_POSTGRES = 1_000
# Streams per Hypothesis example, run at once; a few dozen messages each at most keeps an
# example within Hypothesis' data budget.
STREAMS_PER_EXAMPLE = 12
# gRPC's own limit for the fuzzed collector: big enough for every valid message generated here,
# small enough that the oversized ones below are refused by gRPC (RESOURCE_EXHAUSTED) cheaply.
MAX_MESSAGE_BYTES = 1024 * 1024
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
GOOD_NODE, GOOD_BOOT = "good-agent", "good-boot"

U32_MAX, U64_MAX = 2**32 - 1, 2**64 - 1
NOW = time.time()

# -- values ---------------------------------------------------------------------------------------

# Numbers that break things: NaN, infinities, signed zero, the extremes of every width.
EVIL_DOUBLES = [math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.7976931348623157e308, -1e300, 1.8446744073709552e19]
EVIL_UINT32 = [0, 1, 63, 64, 255, 256, 999, 1000, 1_000_001, 2**31, U32_MAX]
EVIL_UINT64 = [0, 1, 2**32 - 1, 2**63 - 1, 2**63, U64_MAX - 1, U64_MAX]
# Text that broke things: NUL (PostgreSQL), newlines (forged log lines), escapes, bidi overrides,
# SQL, the longest and one past, huge.
EVIL_TEXT = [
    "",
    "\x00",
    "job\x00x",
    "n01\nERROR forged line",
    "\r\n",
    "\x1b[31mred",
    "a\u202eb",
    "\u2028",
    "'; DROP TABLE batches; --",
    "x" * 253,
    "x" * 254,
    "x" * 4097,
    "é" * 300,
    "x" * 100_000,
]

# Hypothesis pays per choice, so each message is a few draws: a template of odd but valid content
# (below) and a handful of random values. Short random text keeps the choices few.
any_uint32 = st.one_of(st.sampled_from(EVIL_UINT32), st.integers(0, U32_MAX))
any_uint64 = st.one_of(st.sampled_from(EVIL_UINT64), st.integers(0, U64_MAX))
any_double = st.one_of(st.sampled_from(EVIL_DOUBLES), st.floats())
any_time = st.one_of(st.sampled_from([0.0, -1.0, 1.0, 4e9, NOW + 3600, NOW - 400 * 86400]), any_double)
any_text = st.one_of(st.sampled_from(EVIL_TEXT), st.text(max_size=6))
# Offsets from now a well-formed batch may carry: a little ahead (clock skew) to months behind (a
# spool); a template's own times go 30 days further back at most, within max_data_age_seconds.
good_offset = st.sampled_from([0.0, -0.5, 59.0, -3600.0, -7 * 86400.0, -300 * 86400.0])

GPU_METRICS = {f.name: f.type for f in pb.GpuMetrics.DESCRIPTOR.fields}


def _metric_value(field_type: int) -> st.SearchStrategy[float] | st.SearchStrategy[int]:
    if field_type == FieldDescriptor.TYPE_UINT32:
        return any_uint32
    if field_type == FieldDescriptor.TYPE_UINT64:
        return any_uint64
    return any_double


def _fill(metrics: Any, value: float) -> None:
    """Every metric of `metrics` as no GPU reports it: doubles `value`, integers NVML's all ones."""
    for f in metrics.DESCRIPTOR.fields:
        if f.type == FieldDescriptor.TYPE_DOUBLE:
            setattr(metrics, f.name, value)
        elif f.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64) and f.name != "port":
            setattr(metrics, f.name, U32_MAX if f.type == FieldDescriptor.TYPE_UINT32 else U64_MAX)


def _templates() -> list[pb.Batch]:
    """Batches within every documented limit, however odd; times are offsets from the batch's `t`."""
    empty = pb.Batch()
    extremes = pb.Batch()
    g = extremes.gpus.add(gpu=63, uuid="u" * limits.GPU_UUID_MAX_CHARS, job="j" * limits.JOB_MAX_CHARS)
    g.rank = limits.MAX_RANK
    for f in pb.GpuMetrics.DESCRIPTOR.fields:  # the largest value each field can store
        if f.type == FieldDescriptor.TYPE_DOUBLE:
            setattr(g.metrics, f.name, 1.7976931348623157e308)
        else:
            setattr(g.metrics, f.name, U32_MAX - 1 if f.type == FieldDescriptor.TYPE_UINT32 else 2**63 - 1)
    sentinels = pb.Batch()
    _fill(sentinels.gpus.add(gpu=0).metrics, math.nan)  # every value no GPU reports: all dropped
    _fill(sentinels.host.metrics, math.inf)
    _fill(sentinels.host.ib_ports.add(device="mlx5_0", port=1), -math.inf)
    full = pb.Batch(spool_bytes=U64_MAX, spool_batches=U32_MAX, boot_id="b" * limits.BOOT_ID_MAX_CHARS)
    for i in range(limits.MAX_GPU_SAMPLES_PER_BATCH):
        full.gpus.add(gpu=i, t=-float(i), job="pretrain 70b / run #3 — ünïcödé ✓").metrics.power_watts = -0.0
    for i in range(limits.MAX_IB_PORTS_PER_BATCH):
        full.host.ib_ports.add(device="d" * limits.IB_DEVICE_MAX_CHARS, port=i % 256, ib_state="s" * 32)
    events = pb.Batch()
    for i in range(limits.MAX_EVENTS_PER_BATCH):
        e = events.events.add(t=-30 * 86400.0, kind=("xid", "gpu_lost")[i % 2], source="kmsg", gpu=i % 64)
        if i % 2 == 0 or i % 3 == 0:
            e.xid = (limits.XID_MIN, limits.XID_MAX, 79)[i % 3]
    events.events[0].message = "m" * limits.EVENT_MESSAGE_MAX_CHARS
    steps = pb.Batch()
    for i in range(500):
        steps.steps.add(
            t=-float(i),
            job=("é" * limits.STEP_JOB_MAX_CHARS, "4242", "x")[i % 3],
            rank=(0, limits.MAX_RANK)[i % 2],
            step=(0, limits.MAX_STEP)[i % 2],
            seconds=(5e-324, limits.MAX_STEP_SECONDS - 1e-6)[i % 2],
            gpu=i % 64,
        )
    return [empty, extremes, sentinels, full, events, steps]


TEMPLATES = _templates()
# Mostly the small ones: the big ones (64 GPUs, 1,024 events, 500 steps) cost the database more
# than they teach after their first few times.
TEMPLATE_CHOICE = st.sampled_from([0] * 30 + [1, 1, 1, 2, 2, 2, 3, 4, 5])


def instantiate(template: pb.Batch, seq: int, t: float) -> pb.AgentMessage:
    b = pb.Batch()
    b.CopyFrom(template)
    b.seq, b.t = seq, t
    for item in (*b.gpus, *b.events, *b.steps):
        item.t += t
    if b.HasField("host"):
        b.host.t = t
    return pb.AgentMessage(batch=b)


@st.composite
def good_batch(draw: st.DrawFn, seq: int) -> pb.AgentMessage:
    """A batch within every documented limit: a template, a time, and one random metric value."""
    msg = instantiate(TEMPLATES[draw(TEMPLATE_CHOICE)], seq, time.time() + draw(good_offset))
    field = draw(st.sampled_from(sorted(GPU_METRICS)))
    sample = msg.batch.gpus.add(gpu=draw(st.integers(0, limits.MAX_GPUS_PER_NODE - 1)), t=msg.batch.t)
    if len(msg.batch.gpus) > limits.MAX_GPU_SAMPLES_PER_BATCH:
        del msg.batch.gpus[-1]
    else:
        setattr(sample.metrics, field, draw(_metric_value(GPU_METRICS[field])))  # dropped if no measurement
    return msg


@st.composite
def good_hello(draw: st.DrawFn) -> pb.AgentMessage:
    h = pb.Hello(
        node="h-" + draw(st.sampled_from("abcdefghij")) + str(draw(st.integers(0, 30))),  # never the good agent
        boot_id=draw(st.sampled_from(["boot-1", "boot-2", "b" * limits.BOOT_ID_MAX_CHARS])),
        agent_version=draw(st.sampled_from(["", "0.2.0", "v" * limits.VERSION_MAX_CHARS])),
        sampling_interval_seconds=draw(st.sampled_from([0.0, limits.SAMPLING_INTERVAL_MIN_SECONDS, 1.0, 3600.0])),
        t=NOW,
        nvml_available=True,
    )
    for index in range(draw(st.sampled_from([0, 1, 8, limits.MAX_GPUS_PER_NODE]))):
        g = h.gpus.add(index=index, name="n" * limits.GPU_NAME_MAX_CHARS, uuid=f"GPU-{index}")
        g.memory_total_bytes = U64_MAX  # NVML's "not available": absent, not refused
        g.power_limit_watts = math.nan
    return pb.AgentMessage(hello=h)


@st.composite
def hostile(draw: st.DrawFn, seq: int) -> pb.AgentMessage:
    """A message that is probably not allowed (not certainly: a random value may happen to be fine)."""
    kind = draw(st.sampled_from(["hello", "empty", "seq", "time", "index", "text", "number", "lists", "oversized"]))
    if kind == "hello":  # a Hello with one field gone wrong (or a second Hello, which is wrong anyway)
        h = draw(good_hello()).hello
        what = draw(
            st.sampled_from(["node", "boot_id", "agent_version", "interval", "t", "gpus", "index", "dup", "gtext"])
        )
        if what in ("node", "boot_id", "agent_version"):
            setattr(h, what, draw(any_text))
        elif what == "interval":
            h.sampling_interval_seconds = draw(any_double)
        elif what == "t":
            h.t = draw(any_double)
        elif what == "gpus":
            h.gpus.extend([pb.GpuInfo(index=i % 64) for i in range(draw(st.sampled_from([65, 1000, 10_000])))])
        elif what == "index":
            h.gpus.add(index=draw(any_uint32))
        elif what == "dup":
            h.gpus.add(index=5)
            h.gpus.add(index=5)
        else:
            setattr(
                h.gpus.add(index=9), draw(st.sampled_from(["uuid", "name", "pci_bus_id", "serial"])), draw(any_text)
            )
        return pb.AgentMessage(hello=h)
    if kind == "empty":
        return pb.AgentMessage()
    msg = instantiate(TEMPLATES[0], seq, time.time())
    b = msg.batch
    if kind == "seq":
        b.seq = draw(st.one_of(st.sampled_from([0, seq - 1, 2**63, U64_MAX]), any_uint64))
    elif kind == "time":
        value = draw(any_time)
        target = draw(st.sampled_from(["batch", "gpu", "host", "event", "step"]))
        if target == "batch":
            b.t = value
        elif target == "gpu":
            b.gpus.add(gpu=0, t=value)
        elif target == "host":
            b.host.t = value
        elif target == "event":
            b.events.add(t=value, kind="gpu_lost")
        else:
            b.steps.add(t=value, job="j", rank=0, step=1, seconds=1.0)
    elif kind == "index":
        value32 = draw(any_uint32)
        where = draw(st.sampled_from(["gpu", "event", "step", "xid", "port", "rank", "step_rank"]))
        if where == "gpu":
            b.gpus.add(gpu=value32, t=b.t)
        elif where == "event":
            b.events.add(t=b.t, kind="gpu_lost", gpu=value32)
        elif where == "step":
            b.steps.add(t=b.t, job="j", rank=0, step=1, seconds=1.0, gpu=value32)
        elif where == "xid":
            b.events.add(t=b.t, kind="xid", xid=value32)
        elif where == "port":
            b.host.t = b.t
            b.host.ib_ports.add(device="mlx5_0", port=value32)
        elif where == "rank":
            b.gpus.add(gpu=0, t=b.t, rank=value32)
        else:
            b.steps.add(t=b.t, job="j", rank=value32, step=1, seconds=1.0)
    elif kind == "text":
        value_text = draw(any_text)
        where = draw(
            st.sampled_from(["job", "step_job", "uuid", "kind", "source", "message", "pci", "device", "state", "boot"])
        )
        if where == "job":
            b.gpus.add(gpu=0, t=b.t, job=value_text)
        elif where == "step_job":
            b.steps.add(t=b.t, job=value_text, rank=0, step=1, seconds=1.0)
        elif where == "uuid":
            b.gpus.add(gpu=0, t=b.t, uuid=value_text)
        elif where == "kind":
            b.events.add(t=b.t, kind=value_text, xid=79)
        elif where == "source":
            b.events.add(t=b.t, kind="xid", xid=79, source=value_text)
        elif where == "message":
            b.events.add(t=b.t, kind="xid", xid=79, message=value_text)
        elif where == "pci":
            b.events.add(t=b.t, kind="xid", xid=79, pci_bus_id=value_text)
        elif where == "device":
            b.host.t = b.t
            b.host.ib_ports.add(device=value_text, port=1)
        elif where == "state":
            b.host.t = b.t
            b.host.ib_ports.add(device="mlx5_0", port=1, ib_state=value_text)
        else:
            b.boot_id = value_text
    elif kind == "number":
        if draw(st.booleans()):
            b.steps.add(t=b.t, job="j", rank=0, step=1, seconds=draw(any_double))
        else:
            b.steps.add(t=b.t, job="j", rank=0, step=draw(any_uint64), seconds=1.0)
    elif kind == "lists":
        where = draw(st.sampled_from(["gpus", "events", "steps", "ib_ports"]))
        if where == "gpus":
            b.gpus.extend([pb.GpuSample(gpu=i % 64, t=b.t) for i in range(limits.MAX_GPU_SAMPLES_PER_BATCH + 1)])
        elif where == "events":
            b.events.extend([pb.Event(t=b.t, kind="gpu_lost")] * (limits.MAX_EVENTS_PER_BATCH + 1))
        elif where == "steps":
            step = pb.StepReport(t=b.t, job="j", rank=0, step=1, seconds=1.0)
            b.steps.extend([step] * (limits.MAX_STEPS_PER_BATCH + 1))
        else:
            b.host.t = b.t
            b.host.ib_ports.extend([pb.IbPortMetrics(device="mlx5_0", port=1)] * (limits.MAX_IB_PORTS_PER_BATCH + 1))
    else:  # past gRPC's message limit: refused by gRPC itself
        b.events.add(t=b.t, kind="xid", xid=79, message="m" * (MAX_MESSAGE_BYTES + 1))
    return msg


@dataclass
class Script:
    """One hostile stream: its messages, and whether all of them are within the limits."""

    messages: list[pb.AgentMessage]
    well_formed: bool


@st.composite
def script(draw: st.DrawFn) -> Script:
    messages: list[pb.AgentMessage] = []
    opened = draw(st.integers(0, 9)) > 0  # most streams open properly
    messages.append(draw(good_hello()) if opened else draw(hostile(1)))
    seq = draw(st.one_of(st.integers(1, 50), st.just(limits.SEQ_MAX - 60)))
    for _ in range(draw(st.integers(0, 24))):
        messages.append(draw(good_batch(seq)))
        seq += draw(st.integers(1, 2))
    ends_badly = draw(st.booleans())
    if ends_badly:
        messages.append(draw(hostile(seq)))
    return Script(messages, well_formed=opened and not ends_badly)


# -- the harness: a collector and its clients on one event loop in a thread --------------------------


class LoopThread:
    """An event loop in a daemon thread: the collector, the good agent and the hostile streams run there
    while Hypothesis, which calls plain functions, drives the test from the main thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_seconds: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_seconds)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class GoodAgent:
    """A well-behaved agent: one stream, seqs 1, 2, 3, ... with a bounded number in flight."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sent = 0
        self.acked: list[int] = []
        self.stop = asyncio.Event()
        self.outcome: Outcome | None = None

    async def run(self) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            call = channel.stream_stream(
                "/fleetwatch.v1.Telemetry/Stream",
                request_serializer=pb.AgentMessage.SerializeToString,
                response_deserializer=pb.CollectorMessage.FromString,
            )()
            hello = pb.Hello(node=GOOD_NODE, boot_id=GOOD_BOOT, agent_version="good", sampling_interval_seconds=1.0)
            hello.gpus.add(index=0, uuid="GPU-good-0")
            await call.write(pb.AgentMessage(hello=hello))
            reader = asyncio.create_task(self._read(call))
            while not self.stop.is_set():
                if self.sent - len(self.acked) < 32:
                    self.sent += 1
                    b = pb.Batch(seq=self.sent, t=time.time())
                    b.gpus.add(gpu=0, t=b.t).metrics.power_watts = 400.0
                    await call.write(pb.AgentMessage(batch=b))
                await asyncio.sleep(0.02)
            await call.done_writing()
            await reader
            self.outcome = Outcome(code=await call.code(), details=await call.details() or "")

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        async for reply in call:
            if reply.WhichOneof("body") == "ack":
                self.acked.append(reply.ack.seq)


@dataclass
class Tally:
    judged: int = 0  # hostile messages the collector read and answered
    streams: int = 0
    statuses: dict[str, int] | None = None


def judged(outcome: Outcome) -> int:
    """Messages the collector answered on a stream: its Hello (welcomed), each acked batch, the refused one."""
    return (outcome.welcome is not None) + len(outcome.acks) + (outcome.code != grpc.StatusCode.OK)


def check(s: Script, outcome: Outcome) -> None:
    assert outcome.code in ALLOWED, (outcome.code, outcome.details)
    assert not any(word in outcome.details for word in SQL_WORDS), outcome.details
    sent = [m.batch.seq for m in s.messages if m.WhichOneof("body") == "batch"]
    assert outcome.acks == sent[: len(outcome.acks)], "acks in order, none skipped"
    if s.well_formed:
        assert outcome.code == grpc.StatusCode.OK, (outcome.code, outcome.details)
        assert outcome.acks == sent


def fuzz(app: CollectorApp, harness: LoopThread, target: int) -> Tally:
    """Run hostile streams until the collector has answered `target` hostile messages."""
    tally = Tally(statuses={})
    channels = harness.run(_open_channels(app.grpc_port, 4))

    @settings(
        # A stream is answered about ten messages on average: enough examples a round to reach a
        # small target in one, at most 50 (Hypothesis' usual) so a large one takes a few rounds.
        max_examples=max(5, min(50, target // (10 * STREAMS_PER_EXAMPLE))),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
    @given(st.lists(script(), min_size=STREAMS_PER_EXAMPLE, max_size=STREAMS_PER_EXAMPLE))
    def round_of_streams(scripts: list[Script]) -> None:
        # Streams that may be refused go in lockstep (see run_stream); well-formed ones pipelined.
        outcomes = harness.run(
            _gather(
                *(
                    run_stream(channels[i % len(channels)], s.messages, lockstep=not s.well_formed)
                    for i, s in enumerate(scripts)
                )
            )
        )
        for s, outcome in zip(scripts, outcomes, strict=True):
            check(s, outcome)
            tally.judged += judged(outcome)
            tally.streams += 1
            assert tally.statuses is not None
            tally.statuses[outcome.code.name] = tally.statuses.get(outcome.code.name, 0) + 1

    try:
        while tally.judged < target:
            round_of_streams()
    finally:
        harness.run(_close_channels(channels))
    return tally


async def _gather(*coros: Coroutine[Any, Any, Outcome]) -> list[Outcome]:
    return list(await asyncio.gather(*coros))


async def _open_channels(port: int, n: int) -> list[grpc.aio.Channel]:
    return [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(n)]


async def _close_channels(channels: list[grpc.aio.Channel]) -> None:
    for channel in channels:
        await channel.close()


@pytest.fixture
def harness() -> Iterator[LoopThread]:
    loop_thread = LoopThread()
    yield loop_thread
    loop_thread.close()


def run_fuzz(harness: LoopThread, database_url: str, target: int) -> tuple[CollectorApp, Tally, GoodAgent, float]:
    # Each hostile stream waits for its answer before the next message: a commit that waits for
    # company (ingest_commit_wait_seconds, for agents that keep many batches in flight) would only
    # stretch the run.
    app = CollectorApp(
        collector_config(database_url, max_message_bytes=MAX_MESSAGE_BYTES, ingest_commit_wait_seconds=0.0)
    )
    harness.run(app.start())
    started = time.monotonic()
    try:
        good = GoodAgent(app.grpc_port)
        good_task = asyncio.run_coroutine_threadsafe(good.run(), harness.loop)
        tally = fuzz(app, harness, target)
        harness.loop.call_soon_threadsafe(good.stop.set)
        good_task.result(60)
    finally:
        harness.run(app.stop(grace_seconds=0.5))
    return app, tally, good, time.monotonic() - started


def assert_good_agent_lost_nothing(app: CollectorApp, good: GoodAgent, database_url: str) -> None:
    assert good.outcome is not None and good.outcome.code == grpc.StatusCode.OK, good.outcome
    assert good.sent > 0 and good.acked == list(range(1, good.sent + 1))  # every seq acked, in order
    from fleetwatch.collector.storage.store import Store

    store = Store(database_url)
    try:
        assert store.stored_seqs(GOOD_NODE, GOOD_BOOT) == list(range(1, good.sent + 1))  # each stored once
        assert len([s for s in store.gpu_samples_since(0) if s.node == GOOD_NODE]) == good.sent
    finally:
        store.close()


def test_10000_hostile_messages_never_hurt_the_collector_or_a_good_agent(
    harness: LoopThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'fuzz.db'}"
    app, tally, good, seconds = run_fuzz(harness, url, HOSTILE_MESSAGES)
    assert tally.judged >= HOSTILE_MESSAGES
    assert app.writer.errors == 0  # no hostile value reached the database as an error
    assert_good_agent_lost_nothing(app, good, url)
    with capsys.disabled():
        print(
            f"\nfuzz: {tally.judged} hostile messages in {tally.streams} streams, {seconds:.1f} s, "
            f"statuses {tally.statuses}; good agent {good.sent} batches"
        )


@pytest.mark.parametrize("database", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_hostile_messages_on_postgresql(harness: LoopThread, database, capsys: pytest.CaptureFixture[str]) -> None:
    app, tally, good, seconds = run_fuzz(harness, database.url, HOSTILE_MESSAGES_POSTGRES)
    assert tally.judged >= HOSTILE_MESSAGES_POSTGRES
    assert app.writer.errors == 0
    assert_good_agent_lost_nothing(app, good, database.url)
    with capsys.disabled():
        print(f"\nfuzz on PostgreSQL: {tally.judged} hostile messages in {tally.streams} streams, {seconds:.1f} s")
