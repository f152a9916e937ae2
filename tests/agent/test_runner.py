"""The agent's loops against a real collector on loopback: spooling, resending, events at once, settings."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

from fleetwatch.agent.config import AgentConfig
from fleetwatch.agent.runner import Agent
from fleetwatch.agent.sampler import Sampler
from fleetwatch.agent.sources.host import HostSource
from fleetwatch.agent.sources.nvml import NvmlSource
from fleetwatch.agent.spool import Spool
from fleetwatch.agent.state import AgentState
from fleetwatch.collector.app import CollectorApp
from fleetwatch.collector.config import CollectorConfig
from fleetwatch.sim.fake_nvml import make_fake_nvml
from fleetwatch.sim.node import SimNode
from fleetwatch.sim.scenario import Fault
from fleetwatch.v1 import telemetry_pb2 as pb


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_agent(
    tmp_path: Path,
    port: int,
    *,
    gpus: int = 2,
    interval: float = 0.1,
    faults=(),
    nvml: bool = True,
    drain: float = 5,
    kmsg=None,
    steps=None,
    batch_interval: float = 0.0,  # one batch per cycle, as the spool and resume tests count them
) -> Agent:
    config = AgentConfig(
        node="n01",
        collector_address=f"127.0.0.1:{port}",
        sampling_interval_seconds=interval,
        spool_dir=str(tmp_path / "spool"),
        spool_fsync=False,
        reconnect_min_seconds=0.05,
        reconnect_max_seconds=0.2,
        stop_drain_seconds=drain,
        batch_interval_seconds=batch_interval,
    )
    source = None
    if nvml:
        source = NvmlSource(make_fake_nvml(SimNode("n01", gpu_count=gpus, faults=faults)))
        source.start()
    spool = Spool(config.spool_dir, config.spool_max_bytes, fsync=False)
    host = HostSource()
    sampler = Sampler(AgentState(node="n01"), host=host, nvml=source)
    return Agent(config, node="n01", sampler=sampler, spool=spool, boot_id=host.boot_id(), kmsg=kmsg, steps=steps)


async def start_collector(tmp_path: Path, port: int = 0, **overrides) -> CollectorApp:
    config = CollectorConfig(
        grpc_listen=f"127.0.0.1:{port}",
        http_listen="127.0.0.1:0",
        database_url=f"sqlite:///{tmp_path / 'c.db'}",
        log_alerts=False,
        **overrides,
    )
    app = CollectorApp(config)
    await app.start()
    return app


async def until(predicate, timeout_seconds: float, what: str) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def test_agent_spools_while_the_collector_is_down_and_delivers_everything_later(tmp_path: Path) -> None:
    port = free_port()
    agent = make_agent(tmp_path, port)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await until(lambda: agent.spool.count >= 5, 5, "batches to pile up in the spool")
    assert not agent.connected
    app = await start_collector(tmp_path, port)
    try:
        await until(lambda: agent.connected, 5, "the agent to reconnect")
        stop.set()
        await asyncio.wait_for(task, 10)
        assert agent.spool.count == 0
        assert app.store.count_rows("batches") == agent.batches_made
        assert len(app.store.gpu_samples_since(0)) == 2 * agent.batches_made
    finally:
        await app.stop(0.2)


async def test_xid_is_sent_at_once_not_at_the_next_sampling_tick(tmp_path: Path) -> None:
    app = await start_collector(tmp_path)
    # A 30 s sampling interval: only the event path can deliver the XID within the test's 2 s.
    agent = make_agent(tmp_path, app.grpc_port, interval=30, faults=[Fault(kind="xid", gpu=1, at_seconds=1.0, xid=31)])
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await until(lambda: app.store.count_rows("events") == 1, 4, "the XID to be stored")
        (event,) = app.store.events_since(0)
        assert (event.node, event.gpu, event.xid, event.source) == ("n01", 1, 31, "nvml")
        assert app.store.count_rows("batches") == 2  # the first sample, then the XID on its own
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await app.stop(0.2)


async def test_collector_setting_changes_the_sampling_interval(tmp_path: Path) -> None:
    app = await start_collector(tmp_path, agent_sampling_interval_seconds=0.05)
    agent = make_agent(tmp_path, app.grpc_port, interval=5)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await until(lambda: agent.sampling_interval_seconds == 0.05, 5, "the pushed interval")
        await until(lambda: app.store.count_rows("batches") >= 5, 5, "sampling at the new pace")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await app.stop(0.2)


async def test_without_nvml_the_agent_streams_host_samples_only(tmp_path: Path) -> None:
    app = await start_collector(tmp_path)
    agent = make_agent(tmp_path, app.grpc_port, nvml=False)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await until(lambda: len(app.store.host_samples_since(0)) >= 3, 5, "host samples")
        assert len(app.store.gpu_samples_since(0)) == 0
        (node,) = app.store.nodes()
        assert not node["nvml_available"]
        # the first sample may come within a clock tick of the CPU baseline: absent, never 0
        assert "cpu_percent" in app.store.host_samples_since(0)[-1].metrics
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await app.stop(0.2)


async def test_agent_restart_continues_numbering_and_resends_its_spool(tmp_path: Path) -> None:
    port = free_port()
    first = make_agent(tmp_path, port, drain=0.3)
    stop = asyncio.Event()
    task = asyncio.create_task(first.run(stop))
    await until(lambda: first.spool.count >= 3, 5, "spooled batches")
    stop.set()
    await asyncio.wait_for(task, 10)  # no collector: they stay spooled (bounded drain)
    left = first.spool.count
    assert left >= 3

    app = await start_collector(tmp_path, port)
    second = make_agent(tmp_path, port)
    stop = asyncio.Event()
    task = asyncio.create_task(second.run(stop))
    try:
        await until(lambda: app.store.count_rows("batches") >= left + 3, 5, "old and new batches")
        stop.set()
        await asyncio.wait_for(task, 10)
        seqs = [r for r in range(1, second.spool.last_seq + 1)]
        assert app.store.count_rows("batches") == len(seqs) == first.batches_made + second.batches_made
    finally:
        await app.stop(0.2)


async def test_odd_kernel_log_values_never_get_a_batch_refused(tmp_path: Path) -> None:
    """The collector refuses a whole batch over one bad field: the agent brings values in first."""
    app = await start_collector(tmp_path)
    agent = make_agent(tmp_path, app.grpc_port, interval=30, nvml=False)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await until(lambda: app.store.count_rows("batches") == 1, 4, "the first sample")
        now = time.time()
        agent.send_events(
            [
                # An XID number no driver prints, then a real one whose message carries an escape
                # sequence and a NUL, as a corrupted kernel line may.
                {"t": now, "kind": "xid", "gpu": 0, "xid": 123456, "message": "garbled", "source": "kmsg"},
                {"t": now, "kind": "xid", "gpu": 1, "xid": 79, "message": "off \x1b[31mthe\x00 bus", "source": "kmsg"},
            ]
        )
        await until(lambda: app.store.count_rows("events") == 1, 4, "the valid XID to be stored")
        (event,) = app.store.events_since(0)
        assert (event.gpu, event.xid) == (1, 79)
        assert event.message.isprintable() and "bus" in event.message
        assert app.stats.rejected == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await app.stop(0.2)


def spooled_batches(agent: Agent) -> list[pb.Batch]:
    return [pb.AgentMessage.FromString(payload).batch for _, payload in agent.spool.pending()]


def test_cycles_are_gathered_only_for_a_collector_that_takes_them(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, free_port(), interval=0.1, batch_interval=0.5)
    # Before any Welcome (or from a 0.1.0 collector): one batch per cycle, in the 0.1.0 form.
    assert agent.sample_once() is not None
    agent.collector_accepts_columns = True
    assert agent.cycles_per_batch == 5
    assert [agent.sample_once() for _ in range(5)][:4] == [None] * 4
    agent.sample_once()
    agent.sample_once()
    # The collector went back to 0.1.0: what was gathered goes one cycle a batch, nothing lost.
    agent.collector_accepts_columns = False
    agent.sample_once()
    batches = spooled_batches(agent)
    assert [len(b.gpus) for b in batches] == [2, 0, 2, 2, 2]
    dense = batches[1]
    assert len(dense.gpu_columns.t) == 10 and len(dense.hosts) == 5 and not dense.HasField("host")
    assert list(dense.gpu_columns.gpu) == [0, 1] * 5
    assert all(b.HasField("host") for b in batches if b.gpus)


async def test_agent_sends_its_batch_interval_of_cycles_in_one_batch_and_loses_none_on_stop(
    tmp_path: Path,
) -> None:
    app = await start_collector(tmp_path)
    agent = make_agent(tmp_path, app.grpc_port, interval=0.05, batch_interval=0.5)
    cycles = 0
    sample = agent.sampler.sample

    def counted():
        nonlocal cycles
        cycles += 1
        return sample()

    agent.sampler.sample = counted  # type: ignore[method-assign]
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await until(lambda: app.store.count_rows("batches") >= 3, 5, "three batches")
        stop.set()
        await asyncio.wait_for(task, 10)
        assert agent.spool.count == 0
        stored = app.store.gpu_samples_since(0)
        assert len(stored) == 2 * cycles  # the cycles gathered at stop were sent too
        assert len(app.store.host_samples_since(0)) == cycles
        # The first cycle went alone (no Welcome yet), then ten cycles a batch.
        assert app.store.count_rows("batches") <= 2 + cycles // 10 + 1
        assert app.latest_gpu[("n01", 1)][0] == max(s.t for s in stored)
    finally:
        await app.stop(0.2)


async def test_an_xid_is_not_held_back_by_the_batch_interval(tmp_path: Path) -> None:
    app = await start_collector(tmp_path)
    # 0.1 s sampling, 10 s batches: only the event path delivers the XID within the test's 4 s.
    agent = make_agent(
        tmp_path,
        app.grpc_port,
        interval=0.1,
        batch_interval=10,
        faults=[Fault(kind="xid", gpu=1, at_seconds=1.0, xid=79)],
    )
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await until(lambda: app.store.count_rows("events") == 1, 4, "the XID to be stored")
        (event,) = app.store.events_since(0)
        assert (event.gpu, event.xid) == (1, 79)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await app.stop(0.2)
