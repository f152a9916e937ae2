"""Several collectors: the rotation over the configured list and DNS names, and the agent moving on a failure or a Drain."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from fleetwatch.agent.collectors import CollectorRotation, CollectorTarget, node_offset, resolve_addresses
from fleetwatch.agent.tls import ChannelTls
from fleetwatch.collector.storage.store import Store
from fleetwatch.v1 import telemetry_pb2 as pb
from fleetwatch.v1 import telemetry_pb2_grpc as pb_grpc
from tests.agent.test_runner import free_port, make_agent, start_collector, until


class FakeDns:
    """Names to addresses, as a resolver the rotation takes; counts the lookups."""

    def __init__(self, records: dict[str, list[str]]) -> None:
        self.records = records
        self.lookups = 0

    def __call__(self, host: str, port: int) -> list[str]:
        self.lookups += 1
        if host not in self.records:
            raise OSError(f"[Errno -2] Name or service not known: {host}")
        return self.records[host]


def walk(rotation: CollectorRotation, n: int) -> list[str]:
    return [str(rotation.next()) for _ in range(n)]


def test_the_list_is_walked_in_order_each_name_as_its_addresses() -> None:
    # The DNS server answers in any order; the walk is the same every time (sorted, IPv4 first).
    dns = FakeDns({"pool.example": ["10.0.0.12", "fd00::7", "10.0.0.9"], "one.example": ["10.0.1.1"]})
    rotation = CollectorRotation(["pool.example:9470", "10.0.2.1:9470", "one.example:9471"], resolve=dns)
    assert walk(rotation, 6) == [
        "pool.example:9470 (10.0.0.9:9470)",
        "pool.example:9470 (10.0.0.12:9470)",
        "pool.example:9470 ([fd00::7]:9470)",
        "10.0.2.1:9470",
        "one.example:9471",  # one address: dialed by name, as a single collector always was
        "pool.example:9470 (10.0.0.9:9470)",
    ]
    first = rotation.targets()[0]
    assert (first.entry, first.address, first.host, first.resolved) == (
        "pool.example:9470",
        "10.0.0.9:9470",
        "pool.example",
        True,
    )


def test_names_are_resolved_at_every_pick_and_one_that_fails_is_dialed_by_name() -> None:
    dns = FakeDns({"pool.example": ["10.0.0.1", "10.0.0.2"]})
    rotation = CollectorRotation(["pool.example:9470", "gone.example:9470"], resolve=dns)
    assert walk(rotation, 3) == [
        "pool.example:9470 (10.0.0.1:9470)",
        "pool.example:9470 (10.0.0.2:9470)",
        "gone.example:9470",  # gRPC resolves it again and says why it fails
    ]
    assert dns.lookups == 6  # both names, at each of the three picks
    dns.records["pool.example"] = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]  # a collector added to the name
    assert walk(rotation, 4) == [
        "pool.example:9470 (10.0.0.1:9470)",
        "pool.example:9470 (10.0.0.2:9470)",
        "pool.example:9470 (10.0.0.3:9470)",
        "gone.example:9470",
    ]
    assert walk(rotation, 2) == ["pool.example:9470 (10.0.0.1:9470)", "pool.example:9470 (10.0.0.2:9470)"]
    dns.records["pool.example"] = ["10.0.0.1", "10.0.0.3"]  # the one picked last leaves the name
    assert walk(rotation, 2) == ["pool.example:9470 (10.0.0.3:9470)", "gone.example:9470"]


def test_the_walk_starts_at_an_offset_hashed_from_the_node_name() -> None:
    entries = ["10.0.0.1:9470", "10.0.0.2:9470", "10.0.0.3:9470"]
    assert node_offset("n01") == zlib.crc32(b"n01")  # the same after a restart, unlike hash()
    assert [str(CollectorRotation(entries, start=1).next()) for _ in range(2)] == ["10.0.0.2:9470"] * 2
    firsts = [str(CollectorRotation(entries, start=node_offset(f"node{i:03d}")).next()) for i in range(300)]
    # A fleet with the same list spreads over it: each collector is the first of a fair share.
    assert all(80 <= firsts.count(entry) <= 120 for entry in entries), {e: firsts.count(e) for e in entries}


def test_the_real_resolver_answers_for_localhost() -> None:
    assert "127.0.0.1" in resolve_addresses("localhost", 9470)


def test_tls_checks_the_configured_name_when_dialing_an_address_it_resolved_to() -> None:
    resolved = CollectorTarget("pool.example:9470", "10.0.0.9:9470", "pool.example")
    tls = ChannelTls(b"", b"", b"")
    assert tls.options(resolved) == [("grpc.ssl_target_name_override", "pool.example")]
    # Dialing the entry itself, gRPC checks its host already; tls_server_name, when set, wins.
    assert tls.options(CollectorTarget.of("pool.example:9470")) == []
    assert tls.options(CollectorTarget.of("10.0.0.9:9470")) == []
    named = ChannelTls(b"", b"", b"", server_name="collector.internal")
    assert named.options(resolved) == [("grpc.ssl_target_name_override", "collector.internal")]


# -- the agent moves -------------------------------------------------------------------------------


async def test_an_unreachable_collector_costs_one_attempt_then_the_next_one_is_used(tmp_path: Path) -> None:
    app = await start_collector(tmp_path)
    agent = make_agent(tmp_path, app.grpc_port)
    dead = f"127.0.0.1:{free_port()}"
    agent.collectors = CollectorRotation([dead, f"127.0.0.1:{app.grpc_port}"])  # the dead one first
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await until(lambda: agent.connected, 5, "the agent to reach the second collector")
        assert agent.collector.address == f"127.0.0.1:{app.grpc_port}"
        assert (agent.state.collector_entry, agent.state.collector_address) == (agent.collector.entry,) * 2
        await until(lambda: app.store.count_rows("batches") >= 3, 5, "batches to be stored")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await app.stop(0.2)


class DrainingCollector(pb_grpc.TelemetryServicer):
    """Acks batches; after `drain_after` of them sends a Drain, acks what still comes, and records
    whether the agent half-closed (its request stream ended rather than being cancelled)."""

    def __init__(self, drain_after: int) -> None:
        self.drain_after = drain_after
        self.received: list[int] = []
        self.after_drain: list[int] = []
        self.drained_at: float | None = None
        self.half_closed = asyncio.Event()

    async def Stream(
        self, request_iterator: AsyncIterator[pb.AgentMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CollectorMessage]:
        await anext(request_iterator)
        yield pb.CollectorMessage(welcome=pb.Welcome(last_seq=0, accepts_columns=True))
        async for msg in request_iterator:
            (self.after_drain if self.drained_at is not None else self.received).append(msg.batch.seq)
            yield pb.CollectorMessage(ack=pb.Ack(seq=msg.batch.seq))
            if self.drained_at is None and len(self.received) >= self.drain_after:
                self.drained_at = time.monotonic()
                yield pb.CollectorMessage(drain=pb.Drain(reason="test says so"))
        self.half_closed.set()


async def test_on_a_drain_the_agent_half_closes_and_streams_to_the_next_collector_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    draining = DrainingCollector(drain_after=5)
    server = grpc.aio.server()
    pb_grpc.add_TelemetryServicer_to_server(draining, server)
    draining_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    app = await start_collector(tmp_path)
    # One batch each 0.2 s: the Drain reaches the agent between two (a batch may cross it on the wire).
    agent = make_agent(tmp_path, app.grpc_port, interval=0.2)
    # A reconnect backoff of seconds: a move within it was not a backoff.
    agent.config = dataclasses.replace(agent.config, reconnect_min_seconds=5.0, reconnect_max_seconds=10.0)
    agent.collectors = CollectorRotation([f"127.0.0.1:{draining_port}", f"127.0.0.1:{app.grpc_port}"])
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        with caplog.at_level(logging.INFO, logger="fleetwatch.agent.runner"):
            await until(lambda: draining.drained_at is not None, 5, "the drain")
            await asyncio.wait_for(draining.half_closed.wait(), 3)
            await until(lambda: agent.connected and agent.collector.address.endswith(f":{app.grpc_port}"), 3, "move")
        assert draining.drained_at is not None and time.monotonic() - draining.drained_at < 2.5
        assert len(draining.after_drain) <= 1, f"batches sent to a draining collector: {draining.after_drain}"
        assert any("test says so" in r.getMessage() for r in caplog.records)
        stop.set()
        await asyncio.wait_for(task, 10)
        # Everything reached one collector or the other, and nothing acked by the first was resent.
        assert agent.spool.count == 0
        stored = app.store.stored_seqs("n01")
        assert sorted(draining.received + draining.after_drain + stored) == list(range(1, agent.spool.last_seq + 1))
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await app.stop(0.2)
        await server.stop(0)


async def test_a_stopping_collector_drains_its_agents_to_the_other_with_nothing_lost(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = await start_collector(tmp_path / "a")
    second = await start_collector(tmp_path / "b")
    agent = make_agent(tmp_path, first.grpc_port, interval=0.05)
    agent.collectors = CollectorRotation([f"127.0.0.1:{first.grpc_port}", f"127.0.0.1:{second.grpc_port}"])
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await until(lambda: first.store.count_rows("batches") >= 5, 5, "batches stored by the first collector")
        stopped_at = time.monotonic()
        await first.stop(2.0)
        # The first collector's stop waited for the agent to leave, not for its whole grace.
        assert time.monotonic() - stopped_at < 1.5
        await until(lambda: agent.connected and agent.collector.address.endswith(f":{second.grpc_port}"), 3, "move")
        stop.set()
        await asyncio.wait_for(task, 10)
        store = Store(f"sqlite:///{tmp_path / 'a' / 'c.db'}")
        try:
            before = store.stored_seqs("n01")
        finally:
            store.close()
        after = second.store.stored_seqs("n01")
        assert sorted(before + after) == list(range(1, agent.spool.last_seq + 1)), "a batch lost or stored twice"
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await second.stop(0.2)


def test_a_collectors_agents_spread_over_the_others_when_they_leave_it() -> None:
    from collections import Counter

    entries = [f"10.0.0.{i}:9470" for i in range(1, 4)]
    moved_to: Counter[str] = Counter()
    for i in range(300):
        rotation = CollectorRotation(entries, start=node_offset(f"node{i:03d}"))
        if str(rotation.next()) != entries[0]:
            continue  # the agents that start on the first collector
        moved_to[str(rotation.next())] += 1
        # and every collector is still visited, one move after another
        assert {str(rotation.next()) for _ in range(3)} | {entries[0]} == set(entries)
    assert set(moved_to) == set(entries[1:])  # not all onto the one after it
    assert min(moved_to.values()) > 0.3 * sum(moved_to.values())
