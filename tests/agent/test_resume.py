"""The resume protocol under attack: lying collectors, a spoofed stream, damaged spool files, a failing sender.

Every test drives a real Agent over real gRPC on loopback, either against the real collector or
against a scripted servicer that says exactly what the test needs it to say.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from fleetwatch.agent.runner import Agent, batch_problem
from fleetwatch.v1 import telemetry_pb2 as pb
from fleetwatch.v1 import telemetry_pb2_grpc as pb_grpc
from tests.agent.test_runner import free_port, make_agent, start_collector, until

CLAIMED_SEQ = 1000  # far above anything the agent under test allocates


class ScriptedCollector(pb_grpc.TelemetryServicer):
    """Welcomes with `welcome_seq` and acks each batch with `ack_seq`, or with the batch's own seq when None."""

    def __init__(self, *, welcome_seq: int, ack_seq: int | None) -> None:
        self.welcome_seq = welcome_seq
        self.ack_seq = ack_seq
        self.received: list[int] = []

    async def Stream(
        self, request_iterator: AsyncIterator[pb.AgentMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CollectorMessage]:
        hello = await anext(request_iterator)
        assert hello.WhichOneof("body") == "hello"
        yield pb.CollectorMessage(welcome=pb.Welcome(last_seq=self.welcome_seq))
        async for msg in request_iterator:
            self.received.append(msg.batch.seq)
            yield pb.CollectorMessage(ack=pb.Ack(seq=msg.batch.seq if self.ack_seq is None else self.ack_seq))


async def serve(servicer: ScriptedCollector, port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    pb_grpc.add_TelemetryServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


def spooled_seqs(agent: Agent) -> list[int]:
    return [seq for seq, _ in agent.spool.pending()]


def stored_seqs(tmp_path: Path, node: str, boot_id: str) -> set[int]:
    with sqlite3.connect(tmp_path / "c.db") as db:
        rows = db.execute("SELECT seq FROM batches WHERE node = ? AND boot_id = ?", (node, boot_id)).fetchall()
    return {seq for (seq,) in rows}


async def spool_without_collector(tmp_path: Path, port: int, at_least: int) -> list[int]:
    """Run an agent with no collector until `at_least` batches are spooled; return their seqs."""
    agent = make_agent(tmp_path, port, interval=0.02, drain=0)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await until(lambda: agent.spool.count >= at_least, 10, "batches to pile up in the spool")
    stop.set()
    await asyncio.wait_for(task, 10)
    return spooled_seqs(agent)


# -- a stream that claims more than the agent sent never costs a batch ------------------------------


async def test_welcome_and_acks_ahead_of_what_was_sent_delete_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    spooled = await spool_without_collector(tmp_path, port, at_least=10)
    liar = ScriptedCollector(welcome_seq=CLAIMED_SEQ, ack_seq=CLAIMED_SEQ)
    server = await serve(liar, port)
    agent = make_agent(tmp_path, port, interval=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        with caplog.at_level(logging.WARNING, logger="fleetwatch.agent.runner"):
            await until(lambda: set(spooled) <= set(liar.received), 5, "the spool to be sent to the liar")
            await asyncio.sleep(0.3)  # its acks of seq 1000 arrive meanwhile
        # Every batch is still spooled: neither Welcome(1000) nor Ack(1000) acknowledged any of them.
        assert set(spooled) <= set(spooled_seqs(agent))
        assert any("ahead of" in r.getMessage() for r in caplog.records)
        # New batches are numbered above what the collector claims to hold for this boot.
        assert max(spooled_seqs(agent)) > CLAIMED_SEQ
        await server.stop(0)

        honest = ScriptedCollector(welcome_seq=CLAIMED_SEQ, ack_seq=None)
        server = await serve(honest, port)
        await until(lambda: set(spooled) <= set(honest.received), 5, "the spool to reach an honest collector")
        stop.set()
        await asyncio.wait_for(task, 10)
        assert agent.spool.count == 0
        # Each batch went out under its own seq; the stored set is everything the agent made.
        assert set(honest.received) >= set(spooled) | set(range(CLAIMED_SEQ + 1, agent.spool.last_seq + 1))
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await server.stop(0)


async def test_a_spoofed_stream_holding_seq_1000_does_not_make_the_real_agent_drop_its_spool(tmp_path: Path) -> None:
    port = free_port()
    spooled = await spool_without_collector(tmp_path, port, at_least=20)
    app = await start_collector(tmp_path, port)
    agent = make_agent(tmp_path, port, interval=0.05)
    try:
        # The spoofer claims this node's boot and stores seq 1000 before the real agent reconnects.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream(
                "/fleetwatch.v1.Telemetry/Stream",
                request_serializer=pb.AgentMessage.SerializeToString,
                response_deserializer=pb.CollectorMessage.FromString,
            )()
            await call.write(pb.AgentMessage(hello=pb.Hello(node="n01", boot_id=agent.boot_id, t=time.time())))
            await call.write(pb.AgentMessage(batch=pb.Batch(seq=CLAIMED_SEQ, t=time.time(), boot_id=agent.boot_id)))
            replies = [await call.read(), await call.read()]
            assert replies[1].ack.seq == CLAIMED_SEQ
            await call.done_writing()
        assert stored_seqs(tmp_path, "n01", agent.boot_id) == {CLAIMED_SEQ}

        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        await until(lambda: set(spooled) <= stored_seqs(tmp_path, "n01", agent.boot_id), 5, "every spooled seq stored")
        await until(lambda: agent.spool.last_seq > CLAIMED_SEQ + 3, 5, "new batches after the Welcome")
        stop.set()
        await asyncio.wait_for(task, 10)
        stored = stored_seqs(tmp_path, "n01", agent.boot_id)
        assert set(spooled) <= stored  # not one of them lost to the spoofed seq
        made_after = set(range(CLAIMED_SEQ + 1, agent.spool.last_seq + 1))
        assert made_after and made_after <= stored  # and the new ones are not taken as duplicates
        assert agent.spool.count == 0
    finally:
        await app.stop(0.2)


# -- damaged spool files are quarantined, and streaming goes on -------------------------------------


def test_batch_problem_names_what_is_wrong_with_a_payload() -> None:
    good = pb.AgentMessage(batch=pb.Batch(seq=7, t=1.0, gpus=[pb.GpuSample(gpu=0, t=1.0)])).SerializeToString()
    assert batch_problem(7, good) is None
    assert "does not decode" in (batch_problem(7, good[:-3]) or "")  # torn inside the GPU sample
    assert "does not decode" in (batch_problem(7, b"\x00" * 64) or "")  # zeros, as a lost write leaves
    assert batch_problem(7, b"") == "decodes, but holds no batch"
    assert batch_problem(7, pb.AgentMessage(hello=pb.Hello(node="n01")).SerializeToString()) == (
        "decodes, but holds no batch"
    )
    assert "holds batch seq 8" in (batch_problem(7, pb.AgentMessage(batch=pb.Batch(seq=8)).SerializeToString()) or "")


async def test_random_bytes_in_a_spool_file_before_start_are_quarantined(tmp_path: Path) -> None:
    port = free_port()
    spooled = await spool_without_collector(tmp_path, port, at_least=10)
    bad = spooled[3]
    bad_path = tmp_path / "spool" / f"{bad:020d}.batch"
    bad_path.write_bytes(os.urandom(300))
    app = await start_collector(tmp_path, port)
    agent = make_agent(tmp_path, port, interval=0.05)
    stop = asyncio.Event()
    started = time.monotonic()
    task = asyncio.create_task(agent.run(stop))
    try:
        good = set(spooled) - {bad}
        await until(lambda: good <= stored_seqs(tmp_path, "n01", agent.boot_id), 5, "the good batches")
        assert time.monotonic() - started < 5
        assert bad not in stored_seqs(tmp_path, "n01", agent.boot_id)
        assert (tmp_path / "spool" / "quarantine" / bad_path.name).exists()
        assert not bad_path.exists()
        assert agent.spool.quarantined_batches == 1
        assert agent.state.spool_quarantined_batches_total == 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await app.stop(0.2)


async def test_a_spool_file_truncated_while_the_agent_runs_is_quarantined_within_5_s(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    agent = make_agent(tmp_path, port, interval=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    app = None
    try:
        await until(lambda: agent.spool.count >= 8, 10, "batches to pile up in the spool")
        bad = spooled_seqs(agent)[2]
        bad_path = tmp_path / "spool" / f"{bad:020d}.batch"
        torn = bad_path.read_bytes()[:7]  # torn mid-message
        bad_path.write_bytes(torn)
        with caplog.at_level(logging.WARNING, logger="fleetwatch.agent"):
            app = await start_collector(tmp_path, port)
            started = time.monotonic()
            await until(lambda: agent.spool.quarantined_batches == 1, 5, "the torn batch to be quarantined")
            newest = agent.spool.last_seq
            await until(
                lambda: set(range(1, newest + 1)) - {bad} <= stored_seqs(tmp_path, "n01", agent.boot_id),
                5,
                "streaming to go on past the torn batch",
            )
            took_seconds = time.monotonic() - started
        assert took_seconds < 5, took_seconds
        assert (tmp_path / "spool" / "quarantine" / bad_path.name).read_bytes() == torn
        quarantine_lines = [r for r in caplog.records if "quarantine" in r.getMessage()]
        assert len(quarantine_lines) == 1, [r.getMessage() for r in quarantine_lines]  # once per file
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        if app is not None:
            await app.stop(0.2)


# -- the sender is supervised ---------------------------------------------------------------------


async def test_a_send_loop_that_raises_is_logged_with_its_traceback_and_restarted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = await start_collector(tmp_path)
    agent = make_agent(tmp_path, app.grpc_port, interval=0.05)
    real_hello = agent._hello
    faults = []

    def hello_that_fails_once() -> bytes:
        if not faults:
            faults.append(1)
            raise RuntimeError("injected fault in the send loop")
        return real_hello()

    monkeypatch.setattr(agent, "_hello", hello_that_fails_once)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        with caplog.at_level(logging.ERROR, logger="fleetwatch.agent.runner"):
            await until(lambda: app.store.count_rows("batches") >= 5, 5, "streaming after the fault")
        assert faults == [1]
        (record,) = [r for r in caplog.records if r.exc_info and "injected fault" in str(r.exc_info[1])]
        assert record.levelno == logging.ERROR
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await app.stop(0.2)


class RefusingCollector(ScriptedCollector):
    """Acks each batch with its own seq, but ends the stream with INVALID_ARGUMENT at batch `refused`."""

    def __init__(self, refused: int) -> None:
        super().__init__(welcome_seq=0, ack_seq=None)
        self.refused = refused
        self.refusals = 0

    async def Stream(
        self, request_iterator: AsyncIterator[pb.AgentMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CollectorMessage]:
        await anext(request_iterator)
        yield pb.CollectorMessage(welcome=pb.Welcome(last_seq=self.welcome_seq))
        async for msg in request_iterator:
            if msg.batch.seq == self.refused:
                self.refusals += 1
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"batch {msg.batch.seq} over limits")
            self.received.append(msg.batch.seq)
            yield pb.CollectorMessage(ack=pb.Ack(seq=msg.batch.seq))


async def test_a_batch_the_collector_keeps_refusing_is_quarantined_and_the_rest_delivered(tmp_path: Path) -> None:
    port = free_port()
    spooled = await spool_without_collector(tmp_path, port, at_least=10)
    refused = spooled[4]
    collector = RefusingCollector(refused)
    server = await serve(collector, port)
    agent = make_agent(tmp_path, port, interval=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await until(lambda: set(spooled) - {refused} <= set(collector.received), 10, "the batches around it")
        # A refusal or two is retried; the third it sees, the agent sets the batch aside. (grpc may
        # report one more as INTERNAL when the abort races a write: that one does not count.)
        assert collector.refusals >= 3
        assert refused not in collector.received
        assert agent.spool.quarantined_batches == 1
        assert (tmp_path / "spool" / "quarantine" / f"{refused:020d}.batch").exists()
        assert refused not in spooled_seqs(agent)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await server.stop(0)
