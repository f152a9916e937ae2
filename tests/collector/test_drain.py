"""A stopping collector drains: new streams refused, a Drain to each open one, acks until the agent leaves."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc

from fleetwatch.collector.app import CollectorApp
from fleetwatch.collector.config import CollectorConfig
from fleetwatch.collector.server import DRAINING
from fleetwatch.v1 import telemetry_pb2 as pb
from tests.collector.test_collector_app import METHOD, batch, hello


async def start(tmp_path: Path) -> CollectorApp:
    app = CollectorApp(
        CollectorConfig(
            grpc_listen="127.0.0.1:0",
            http_listen="127.0.0.1:0",
            database_url=f"sqlite:///{tmp_path / 'c.db'}",  # type: ignore[arg-type]
            log_alerts=False,
        )
    )
    await app.start()
    return app


def open_stream(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall:
    return channel.stream_stream(
        METHOD,
        request_serializer=pb.AgentMessage.SerializeToString,
        response_deserializer=pb.CollectorMessage.FromString,
    )()


async def read_body(call: grpc.aio.StreamStreamCall) -> pb.CollectorMessage:
    reply = await asyncio.wait_for(call.read(), 5)
    assert reply is not grpc.aio.EOF
    return reply


async def test_drain_is_sent_batches_are_still_acked_and_the_stop_ends_when_the_agent_half_closes(
    tmp_path: Path,
) -> None:
    app = await start(tmp_path)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        call = open_stream(channel)
        await call.write(hello())
        assert (await read_body(call)).WhichOneof("body") == "welcome"
        await call.write(batch(1))
        assert (await read_body(call)).ack.seq == 1

        started = time.monotonic()
        stopping = asyncio.create_task(app.stop(5.0))
        drain = await read_body(call)
        assert drain.WhichOneof("body") == "drain" and drain.drain.reason
        # A batch that crossed the Drain on the wire is still stored and acked.
        await call.write(batch(2))
        assert (await read_body(call)).ack.seq == 2
        # A new stream is refused at once: its agent tries its next collector.
        refused = open_stream(channel)
        await refused.write(hello("n02"))
        assert await refused.code() == grpc.StatusCode.UNAVAILABLE
        assert await refused.details() == DRAINING
        await call.done_writing()
        await asyncio.wait_for(stopping, 10)
        # The stop waited for the agent to leave, not for its 5 s grace.
        assert time.monotonic() - started < 3.0
    app = await start(tmp_path)  # the same database: both batches are there
    try:
        assert app.store.stored_seqs("n01") == [1, 2]
    finally:
        await app.stop(0.2)


async def test_an_agent_that_ignores_the_drain_is_cut_after_the_grace(tmp_path: Path) -> None:
    app = await start(tmp_path)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        call = open_stream(channel)  # an agent before 0.3: it does not know the Drain
        await call.write(hello())
        await read_body(call)
        started = time.monotonic()
        await asyncio.wait_for(app.stop(0.5), 10)
        # The drain's grace, then the server's: bounded however the agent behaves.
        assert time.monotonic() - started < 2.5
        assert (await read_body(call)).WhichOneof("body") == "drain"
        assert await call.code() != grpc.StatusCode.OK
