"""Hostile and broken agents at the collector's edge: every field checked, bad input answered as such.

Each attack here worked once: bad values answered UNAVAILABLE (so the agent retried forever) with
SQL in the reply, failed other agents' batches in the same commit, forged log lines, stored 1 MB
names; a batch PostgreSQL refused was passed over by the next Welcome; idle streams made
permanent nodes and node_silent alerts; NVML's all-ones ECC value raised a live critical alert.
Real gRPC on loopback, a real database (SQLite; PostgreSQL where the database fixture says so).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleetwatch.collector.app import CollectorApp
from fleetwatch.collector.config import CollectorConfig
from fleetwatch.collector.ingest import IngestStream, IngestWriter, StreamBroken
from fleetwatch.collector.server import REFUSAL_LOG_INTERVAL_SECONDS, REJECTED_SEQ_METADATA_KEY
from fleetwatch.collector.storage.store import IngestBatch, Store, StoreError
from fleetwatch.collector.validate import InvalidMessage, check_batch, check_hello
from fleetwatch.records import GpuSample, Step
from fleetwatch.v1 import telemetry_pb2 as pb

METHOD = "/fleetwatch.v1.Telemetry/Stream"
U64_NOT_AVAILABLE = 2**64 - 1
# What no reply to an agent may contain: SQL text and its parameter dumps.
SQL_WORDS = ("INSERT", "SELECT", "[SQL", "parameters")


# -- a stream as an agent sees it ----------------------------------------------------------------


@dataclass
class Outcome:
    """How one stream ended: the replies before the end, its status, details and trailing metadata."""

    replies: list[pb.CollectorMessage] = field(default_factory=list)
    code: grpc.StatusCode | None = None
    details: str = ""
    trailers: dict[str, str] = field(default_factory=dict)

    @property
    def acks(self) -> list[int]:
        return [r.ack.seq for r in self.replies if r.WhichOneof("body") == "ack"]

    @property
    def welcome(self) -> int | None:
        return next((r.welcome.last_seq for r in self.replies if r.WhichOneof("body") == "welcome"), None)


async def run_stream(
    channel: grpc.aio.Channel,
    messages: Sequence[pb.AgentMessage] | Sequence[bytes],
    *,
    lockstep: bool = False,
    timeout_seconds: float = 30.0,
) -> Outcome:
    """Write every message (as far as the collector lets), close the sending side, read to the end.

    `lockstep` waits for each message's answer (the Welcome, an ack) before writing the next and
    stops writing once the stream has ended. Without it, messages written after one the collector
    refused race its end: gRPC's client then reports its own INTERNAL ("Internal error from Core")
    in place of the collector's status.
    """
    raw = bool(messages) and isinstance(messages[0], bytes)
    call = channel.stream_stream(
        METHOD,
        request_serializer=None if raw else pb.AgentMessage.SerializeToString,
        response_deserializer=pb.CollectorMessage.FromString,
    )(timeout=timeout_seconds)
    outcome = Outcome()
    answers: asyncio.Queue[pb.CollectorMessage | None] = asyncio.Queue()

    async def read() -> None:
        try:
            async for reply in call:
                outcome.replies.append(reply)
                answers.put_nowait(reply)
        except grpc.aio.AioRpcError:
            pass
        finally:
            answers.put_nowait(None)

    reader = asyncio.create_task(read())
    try:
        for m in messages:
            await call.write(m)
            if lockstep and await answers.get() is None:
                break  # the collector ended the stream: nothing more is written
        else:
            await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        pass  # the collector ended the stream early (as it does at the first invalid message)
    await reader
    outcome.code = await call.code()
    outcome.details = await call.details() or ""
    outcome.trailers = {k: v for k, v in (await call.trailing_metadata() or ()) if isinstance(v, str)}
    return outcome


def hello(node: str = "n01", boot_id: str = "boot-1", gpus: int = 2, **fields: object) -> pb.AgentMessage:
    msg = pb.Hello(node=node, boot_id=boot_id, agent_version="test", sampling_interval_seconds=1.0, t=time.time())
    msg.nvml_available = True
    for i in range(gpus):
        msg.gpus.add(
            index=i, uuid=f"GPU-{node}-{i}", name="NVIDIA H100 80GB HBM3", pci_bus_id=f"0000:{0x18 + i:02x}:00.0"
        )
    for key, value in fields.items():
        setattr(msg, key, value)
    return pb.AgentMessage(hello=msg)


def batch(seq: int, *, gpus: int = 2, t: float | None = None) -> pb.AgentMessage:
    t = time.time() if t is None else t
    b = pb.Batch(seq=seq, t=t)
    for i in range(gpus):
        sample = b.gpus.add(gpu=i, t=t, uuid=f"GPU-n01-{i}")
        sample.metrics.gpu_util_percent = 97.0
        sample.metrics.power_watts = 612.5
        sample.metrics.ecc_dbe_volatile_total = 0
    b.host.t = t
    b.host.metrics.cpu_percent = 12.5
    return pb.AgentMessage(batch=b)


def with_step(msg: pb.AgentMessage, job: str) -> pb.AgentMessage:
    msg.batch.steps.add(t=msg.batch.t, job=job, rank=0, step=1, seconds=0.5)
    return msg


def collector_config(database_url: str, **overrides: object) -> CollectorConfig:
    return CollectorConfig(
        grpc_listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        database_url=database_url,
        log_alerts=False,
        detect_interval_seconds=0.2,
        **overrides,  # type: ignore[arg-type]
    )


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[CollectorApp]:
    collector = CollectorApp(collector_config(f"sqlite:///{tmp_path / 'c.db'}"))
    await collector.start()
    yield collector
    await collector.stop(grace_seconds=0.2)


@pytest.fixture
async def app_on(database) -> AsyncIterator[CollectorApp]:
    """The collector on SQLite and on PostgreSQL (tests/collector/conftest.py's database)."""
    collector = CollectorApp(collector_config(database.url))
    await collector.start()
    yield collector
    await collector.stop(grace_seconds=0.2)


@pytest.fixture
async def channel(app: CollectorApp) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as ch:
        yield ch


def metrics_text(app: CollectorApp) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{app.http_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def assert_refused(outcome: Outcome, *fragments: str) -> None:
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (outcome.code, outcome.details)
    for fragment in fragments:
        assert fragment in outcome.details, outcome.details
    assert not any(word in outcome.details for word in SQL_WORDS), outcome.details
    assert len(outcome.details) < 400  # a quoted value is cut short


# -- bad input is INVALID_ARGUMENT naming the field, never a storage outage ----------------------


@pytest.mark.parametrize(
    ("messages", "fragments"),
    [
        pytest.param([hello(node="n" * 1_000_000), batch(1)], ["hello: node: is 1000000 characters"], id="1MB node"),
        pytest.param([hello(node="n01\nERROR forged"), batch(1)], ["hello: node:", "'\\n'"], id="newline in node"),
        pytest.param([hello(node="")], ["hello: node: is empty"], id="empty node"),
        pytest.param([hello(boot_id="b" * 65)], ["hello: boot_id:"], id="long boot id"),
        pytest.param([hello(gpus=10_000)], ["hello: gpus: 10000 entries, at most 64"], id="10000-GPU hello"),
        pytest.param([hello(sampling_interval_seconds=math.nan)], ["sampling_interval_seconds"], id="NaN interval"),
        pytest.param([batch(1)], ["stream: hello:", "must be a Hello"], id="batch before hello"),
        pytest.param([hello(), hello()], ["only batches may follow the Hello"], id="two hellos"),
        pytest.param([hello(), batch(2**64 - 1)], ["batch 18446744073709551615: seq:"], id="seq 2^64-1"),
        pytest.param([hello(), batch(0)], ["batch 0: seq:"], id="seq 0"),
        pytest.param([hello(), batch(1, t=math.nan)], ["batch 1: t: nan is not a time"], id="NaN time"),
        pytest.param([hello(), batch(1, t=math.inf)], ["batch 1: t: inf"], id="infinite time"),
        pytest.param([hello(), batch(1, t=time.time() + 86_400)], ["ahead of the collector's clock"], id="future"),
        pytest.param([hello(), batch(1, t=1.0)], ["batch 1: t:", "old"], id="1970"),
        pytest.param([hello(), with_step(batch(1), "job\x00x")], ["batch 1: steps[0].job:", "'\\x00'"], id="NUL job"),
        pytest.param([hello(), batch(2), batch(1)], ["batch 1: seq: does not follow 2"], id="seq going back"),
        pytest.param([hello(), batch(1), batch(1)], ["batch 1: seq: does not follow 1"], id="seq repeated"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    app: CollectorApp, channel: grpc.aio.Channel, messages: list[pb.AgentMessage], fragments: list[str]
) -> None:
    outcome = await run_stream(channel, messages, lockstep=True)
    assert_refused(outcome, *fragments)
    assert [n["node"] for n in app.store.nodes()] in ([], ["n01"])  # never the bad name


async def test_gpu_index_of_4e9_names_batch_and_field(app: CollectorApp, channel: grpc.aio.Channel) -> None:
    bad = batch(12, gpus=4)
    bad.batch.gpus[3].gpu = 4_000_000_000
    outcome = await run_stream(channel, [hello(), batch(11), bad])
    assert_refused(outcome, "batch 12: gpus[3].gpu: 4000000000 is not a GPU index (0-63)")
    assert outcome.acks == [11]  # everything before the bad batch is stored and acked first
    assert outcome.trailers[REJECTED_SEQ_METADATA_KEY] == "12"  # so the agent can set it aside
    assert app.store.count_rows("batches") == 1 and len(app.store.gpu_samples_since(0)) == 2


async def test_every_limit_has_a_message_naming_its_field() -> None:
    now = time.time()
    cases: list[tuple[str, pb.Batch]] = []

    def case(where: str) -> pb.Batch:
        b = batch(5, t=now).batch
        cases.append((where, b))
        return b

    case("gpus[0].uuid").gpus[0].uuid = "u" * 65
    case("gpus[1].job").gpus[1].job = "j" * 256
    case("gpus[0].rank").gpus[0].rank = 2_000_000
    case("gpus").gpus.extend([pb.GpuSample(gpu=0, t=now)] * 65)
    case("host.ib_ports[0].device").host.ib_ports.add(device="mlx5 0", port=1)
    case("host.ib_ports[0].port").host.ib_ports.add(device="mlx5_0", port=256)
    case("host.ib_ports[0].ib_state").host.ib_ports.add(device="mlx5_0", port=1, ib_state="ACTIVE\r\n")
    case("events[0].kind").events.add(t=now, kind="xid; DROP TABLE", xid=79)
    case("events[0].xid").events.add(t=now, kind="xid", xid=4_000_000)
    case("events[0].xid").events.add(t=now, kind="xid")
    case("events[0].message").events.add(t=now, kind="xid", xid=79, message="m" * 5000)
    case("events[0].source").events.add(t=now, kind="xid", xid=79, source="NVML!")
    case("events[0].gpu").events.add(t=now, kind="gpu_lost", gpu=64)
    case("events[0].t").events.add(t=math.nan, kind="gpu_lost")
    case("steps[0].seconds").steps.add(t=now, job="j", rank=0, step=1, seconds=math.inf)
    case("steps[0].job").steps.add(t=now, job="", rank=0, step=1, seconds=1.0)
    case("steps[0].job").steps.add(t=now, job="j" * 129, rank=0, step=1, seconds=1.0)
    case("steps[0].rank").steps.add(t=now, job="j", rank=1_000_001, step=1, seconds=1.0)
    case("steps[0].step").steps.add(t=now, job="j", rank=0, step=2**63, seconds=1.0)
    case("steps[0].dp_rank").steps.add(t=now, job="j", rank=0, step=1, seconds=1.0, dp_rank=1_000_001)
    case("steps[0].pp_stage").steps.add(t=now, job="j", rank=0, step=1, seconds=1.0, pp_stage=2**32 - 1)
    case("steps[0].tp_rank").steps.add(t=now, job="j", rank=0, step=1, seconds=1.0, tp_rank=1_000_001)
    case("steps[0].wall_seconds").steps.add(t=now, job="j", rank=0, step=1, seconds=1.0, wall_seconds=math.nan)
    case("steps[0].wall_seconds").steps.add(t=now, job="j", rank=0, step=1, seconds=1.0, wall_seconds=0.0)
    case("boot_id").boot_id = "boot\tid"
    for where, b in cases:
        with pytest.raises(InvalidMessage) as refused:
            check_batch("n01", "boot-1", b, now)
        assert refused.value.field == where, (where, str(refused.value))
        assert str(refused.value).startswith(f"batch 5: {where}: ")


def test_hello_gpu_list_is_checked() -> None:
    dup = hello(gpus=2).hello
    dup.gpus[1].index = 0
    with pytest.raises(InvalidMessage, match=r"gpus\[1\].index: GPU 0 is listed twice"):
        check_hello(dup)
    far = hello(gpus=1).hello
    far.gpus[0].index = 64
    with pytest.raises(InvalidMessage, match=r"gpus\[0\].index: 64 is not a GPU index"):
        check_hello(far)
    long_name = hello(gpus=1).hello
    long_name.gpus[0].name = "H" * 97
    with pytest.raises(InvalidMessage, match=r"gpus\[0\].name"):
        check_hello(long_name)
    sentinel = hello(gpus=1).hello
    sentinel.gpus[0].memory_total_bytes = U64_NOT_AVAILABLE
    sentinel.gpus[0].power_limit_watts = math.nan
    (gpu,) = check_hello(sentinel)  # measured values that are none are absent, as in samples
    assert gpu["memory_total_bytes"] is None and gpu["power_limit_watts"] is None


async def test_refusals_are_counted_per_node_with_bounded_labels_and_logged_rate_limited(
    app: CollectorApp, channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fleetwatch.collector.server")
    started = time.monotonic()
    assert (await run_stream(channel, [hello(), batch(1)])).acks == [1]  # n01 is a known node now
    for i in range(30):
        await run_stream(channel, [hello(node=f"bad\nnode{i}")])
        await run_stream(channel, [hello(node=f"stranger{i}"), batch(1, t=math.nan)])
        await run_stream(channel, [hello(), batch(2 + i, t=math.nan)])
    samples = await asyncio.to_thread(metrics_text, app)
    invalid = {
        labels: value
        for (name, labels), value in samples.items()
        if name == "fleetwatch_collector_invalid_messages_total"
    }
    assert invalid == {
        (("field", "hello.node"), ("node", "_invalid")): 30,
        (("field", "batch.t"), ("node", "_unknown")): 30,
        (("field", "batch.t"), ("node", "n01")): 30,
    }
    lines = [r.getMessage() for r in caplog.records if r.name == "fleetwatch.collector.server"]
    refusals = [line for line in lines if line.startswith("refused")]
    # One line per label per 10 s (three labels here), not one per message.
    periods = 1 + int((time.monotonic() - started) // REFUSAL_LOG_INTERVAL_SECONDS)
    assert 3 <= len(refusals) <= 3 * periods, refusals
    assert all("\n" not in line for line in lines)  # no forged lines
    assert "stranger" not in "".join(refusals)  # unknown names are not repeated into the log either


# -- one agent's bad batch never fails another's --------------------------------------------------


async def test_nul_job_is_refused_and_a_good_agent_beside_it_loses_nothing(app_on: CollectorApp) -> None:
    """On PostgreSQL a NUL in text made the whole commit fail, every stream in it UNAVAILABLE."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app_on.grpc_port}") as ch:
        good = [hello(node="good")] + [batch(seq) for seq in range(1, 41)]
        bad = [[hello(node=f"bad{i}"), batch(1), with_step(batch(2), "job\x00")] for i in range(8)]
        outcomes = await asyncio.gather(run_stream(ch, good), *(run_stream(ch, b) for b in bad))
    assert outcomes[0].code == grpc.StatusCode.OK and outcomes[0].acks == list(range(1, 41))
    for outcome in outcomes[1:]:
        assert_refused(outcome, "batch 2: steps[0].job:")
        assert outcome.acks == [1]
    assert app_on.store.last_seq("good", "boot-1") == 40
    assert app_on.store.count_rows("steps") == 0
    assert app_on.writer.errors == 0


def _store_batch(node: str, seq: int, *, job: str | None = "j") -> IngestBatch:
    t = time.time()
    steps = [Step(t=t, job=job, rank=0, node=node, step=seq, seconds=0.5)]  # type: ignore[arg-type]
    return IngestBatch(node=node, boot_id="boot-1", seq=seq, received_at=t, steps=steps)


@pytest.fixture
def writer(store: Store) -> IngestWriter:
    return IngestWriter(store, on_stored=lambda items, flags: None)


def test_a_batch_the_database_refuses_fails_alone_in_its_commit(writer: IngestWriter, store: Store, database) -> None:
    """What the checks miss and the database refuses (here NOT NULL, and PostgreSQL's NUL) fails only
    its own batch: the others of the commit are stored, and the refused stream's later ones are not."""
    a, b, c = IngestStream(), IngestStream(), IngestStream()
    bad_job = None if database.kind == "sqlite" else "nul\x00"  # SQLite keeps NUL bytes
    entries = [
        (_store_batch("a", 1), None, a),
        (_store_batch("b", 1), None, b),
        (_store_batch("b", 2, job=bad_job), None, b),
        (_store_batch("c", 1), None, c),
        (_store_batch("b", 3), None, b),
        (_store_batch("a", 2), None, a),
    ]
    outcomes = writer._store(entries)
    assert outcomes[0] is True and outcomes[1] is True and outcomes[3] is True and outcomes[5] is True
    refused = outcomes[2]
    assert isinstance(refused, InvalidMessage) and refused.seq == 2 and "refused by the database" in str(refused)
    assert not any(word in str(refused) for word in SQL_WORDS)
    assert isinstance(outcomes[4], StreamBroken)  # b's seq 3 waits: storing it would pass over seq 2
    assert store.last_seq("b", "boot-1") == 1  # what the next Welcome tells b's agent
    assert (store.last_seq("a", "boot-1"), store.last_seq("c", "boot-1")) == (2, 1)
    assert writer.errors == 0  # a refusal is not a database failure


def test_after_a_failed_commit_a_stream_stores_nothing_later(writer: IngestWriter, store: Store) -> None:
    """Acks never skip: once a stream's batch fails, its queued later batches are not stored."""
    s = IngestStream()
    real = store.ingest
    calls = {"n": 0}

    def failing_once(items: Sequence[IngestBatch]) -> list[bool]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise StoreError("database or disk is full")
        return real(items)

    store.ingest = failing_once  # type: ignore[method-assign]
    first = writer._store([(_store_batch("n", 1), None, s), (_store_batch("n", 2), None, s)])
    assert all(isinstance(o, StoreError) for o in first)
    later = writer._store([(_store_batch("n", 3), None, s)])
    assert isinstance(later[0], StreamBroken)
    assert store.last_seq("n", "boot-1") == 0  # the next Welcome: resend from 1, nothing passed over


async def test_storage_outage_mid_stream_never_lets_a_later_seq_pass_over_an_earlier(app: CollectorApp) -> None:
    real = app.store.ingest

    def failing_for_seq_2(items: Sequence[IngestBatch]) -> list[bool]:
        if any(item.seq == 2 for item in items):
            time.sleep(0.5)  # (writer thread) the agent has written every batch by now: they queue behind
            raise StoreError("database or disk is full")
        return real(items)

    app.store.ingest = failing_for_seq_2  # type: ignore[method-assign]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as ch:
        outcome = await run_stream(ch, [hello(), *(batch(seq) for seq in range(1, 30))])
        # Seq 1 may share seq 2's commit; either way the stream ends at the first batch not stored.
        assert outcome.code == grpc.StatusCode.UNAVAILABLE
        assert outcome.details.startswith(f"batch {len(outcome.acks) + 1} not stored")
        assert not any(word in outcome.details for word in SQL_WORDS)
        assert outcome.acks in ([], [1])
        await asyncio.sleep(0.3)  # whatever was queued behind seq 2 has been through the writer
        app.store.ingest = real  # type: ignore[method-assign]
        again = await run_stream(ch, [hello()])
    assert again.welcome == app.store.last_seq("n01", "boot-1") <= 1


# -- nothing permanent from a Hello alone ---------------------------------------------------------


async def test_idle_streams_leave_no_nodes_and_raise_no_alerts(app: CollectorApp, channel: grpc.aio.Channel) -> None:
    async def idle(i: int) -> grpc.aio.StreamStreamCall:
        call = channel.stream_stream(
            METHOD,
            request_serializer=pb.AgentMessage.SerializeToString,
            response_deserializer=pb.CollectorMessage.FromString,
        )()
        await call.write(hello(node=f"idle{i}"))
        assert (await call.read()).WhichOneof("body") == "welcome"
        return call

    calls = await asyncio.gather(*(idle(i) for i in range(60)))
    assert app.stats.streams_open == 60
    assert app.store.nodes() == [] and app.store.gpus() == []
    assert app.stats.links == {}
    nodes = await asyncio.wrap_future(app.detection.inspect(lambda recent: recent.window(time.time(), 0.0).nodes))
    assert nodes == {}  # node_silent has nothing to watch
    for call in calls:
        call.cancel()
    # The first stored batch makes the node: row, GPUs, link and detection.
    assert (await run_stream(channel, [hello(), batch(1)])).acks == [1]
    assert [n["node"] for n in app.store.nodes()] == ["n01"] and len(app.store.gpus()) == 2
    nodes = await asyncio.wrap_future(app.detection.inspect(lambda recent: recent.window(time.time(), 0.0).nodes))
    assert set(nodes) == {"n01"}


async def test_streams_past_the_limit_are_resource_exhausted(tmp_path: Path) -> None:
    app = CollectorApp(collector_config(f"sqlite:///{tmp_path / 'c.db'}", max_agent_streams=3))
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as ch:
            held = []
            for i in range(3):
                call = ch.stream_stream(
                    METHOD,
                    request_serializer=pb.AgentMessage.SerializeToString,
                    response_deserializer=pb.CollectorMessage.FromString,
                )()
                await call.write(hello(node=f"n{i}"))
                await call.read()
                held.append(call)
            outcome = await run_stream(ch, [hello(node="n9"), batch(1)], lockstep=True)
            assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            held.pop().cancel()
            deadline = time.monotonic() + 5
            while app.stats.streams_open >= 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert (await run_stream(ch, [hello(node="n9"), batch(1)])).acks == [1]
            for call in held:
                call.cancel()
    finally:
        await app.stop(grace_seconds=0.2)


# -- NVML's "not available" never reaches live detection --------------------------------------------


async def test_not_available_ecc_value_is_dropped_before_detection_and_storage(
    app: CollectorApp, channel: grpc.aio.Channel
) -> None:
    msg = batch(1, gpus=2)
    msg.batch.gpus[1].metrics.ecc_dbe_volatile_total = U64_NOT_AVAILABLE
    msg.batch.gpus[1].metrics.pcie_link_gen = 2**32 - 1
    msg.batch.gpus[1].metrics.temp_gpu_celsius = math.nan
    assert (await run_stream(channel, [hello(), msg])).acks == [1]
    await asyncio.sleep(0.6)  # detection ran (every 0.2 s)
    assert not [f for f in app.tracker.open.values() if f.detector == "ecc"]
    live = await asyncio.wrap_future(
        app.detection.inspect(lambda recent: dict(recent.window(time.time(), 0.0).gpu[("n01", 1)][-1].metrics))
    )
    assert "ecc_dbe_volatile_total" not in live and "pcie_link_gen" not in live and "temp_gpu_celsius" not in live
    stored = app.store.latest_gpu_samples()[("n01", 1)].metrics
    assert set(stored) == set(live)  # live detection and the database agree
    assert app.stats.dropped_values == {"ecc_dbe_volatile_total": 1, "pcie_link_gen": 1, "temp_gpu_celsius": 1}


def test_check_batch_keeps_good_values_exact() -> None:
    now = time.time()
    b = batch(3, t=now).batch
    b.gpus[0].metrics.ecc_sbe_volatile_total = 2**63 - 1  # the largest storable count stays
    b.gpus[0].rank = 1_000_000
    b.gpus[0].job = "pretrain 70b / run 3"  # spaces and slashes are fine in a job
    b.host.ib_ports.add(device="mlx5_0", port=1, ib_state="4: ACTIVE", ib_rate_gbps=400.0)
    b.events.add(t=now - 30 * 86_400, kind="xid", xid=79, gpu=1, source="kmsg", message="NVRM: Xid 79, GPU fell off")
    item = check_batch("rack1|n01", "boot-1", b, now)
    assert item.gpu_samples[0].metrics["ecc_sbe_volatile_total"] == 2**63 - 1
    assert item.gpu_samples[0].job == "pretrain 70b / run 3" and item.gpu_samples[0].rank == 1_000_000
    assert item.ib_ports[0]["ib_state"] == "4: ACTIVE" and item.ib_ports[0]["ib_rate_gbps"] == 400.0
    assert item.events[0].xid == 79 and item.node == "rack1|n01"


async def test_a_sample_from_a_gpu_samples_list_is_stored_once_per_seq(app: CollectorApp) -> None:
    """The ordinary path still works after all the checks: duplicates acked, stored once."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as ch:
        first = await run_stream(ch, [hello(), batch(1), batch(2)])
        second = await run_stream(ch, [hello(), batch(2), batch(3)])
    assert first.acks == [1, 2] and second.welcome == 2 and second.acks == [2, 3]
    assert app.store.count_rows("batches") == 3
    assert isinstance(app.store.latest_gpu_samples()[("n01", 0)], GpuSample)


async def test_commits_wait_for_company_only_while_batches_arrive_fast(tmp_path: Path) -> None:
    """A quiet fleet's batch is committed at once; a busy one's share commits (ingest_commit_wait_seconds)."""
    store = Store(f"sqlite:///{tmp_path / 'c.db'}")  # the writer's timing, not a database's: one is enough
    store.migrate()
    # A long wait, so that waiting for batches that are not coming would show through however long
    # one SQLite commit takes on a busy machine (up to a few tenths of a second).
    patient = IngestWriter(store, on_stored=lambda items, flags: None, commit_wait_seconds=3.0)
    patient.start()
    try:
        started = time.monotonic()
        assert await (await patient.submit(_store_batch("quiet", 1), IngestStream())) is True
        assert time.monotonic() - started < 1.5  # no wait for batches that are not coming
    finally:
        patient.stop()
    writer = IngestWriter(store, on_stored=lambda items, flags: None, commit_wait_seconds=0.2)
    writer.start()
    try:
        # One batch every 10 ms, each of its own node: alone in its commit, unless the writer waits.
        futures = []
        started = time.monotonic()
        measured_from: tuple[int, int] | None = None
        while time.monotonic() - started < 1.4:
            if measured_from is None and time.monotonic() - started > 1.05:  # the writer has seen a second of it
                measured_from = (writer.commits, len(futures))
            futures.append(await writer.submit(_store_batch(f"busy{len(futures)}", 1), IngestStream()))
            await asyncio.sleep(0.01)
        assert all(await asyncio.gather(*futures))
        assert measured_from is not None
        commits, batches = writer.commits - measured_from[0], len(futures) - measured_from[1]
        assert commits <= batches / 4, f"{commits} commits for {batches} batches"
    finally:
        writer.stop()
        store.close()
