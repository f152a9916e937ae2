"""The collector as agents and operators see it: real gRPC on loopback, a real SQLite file, real HTTP."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleetwatch.collector.app import CollectorApp
from fleetwatch.collector.config import CollectorConfig
from fleetwatch.sim.demo import WebhookReceiver
from fleetwatch.v1 import telemetry_pb2 as pb

METHOD = "/fleetwatch.v1.Telemetry/Stream"


def hello(node: str = "n01", boot_id: str = "boot-1", gpus: int = 2) -> pb.AgentMessage:
    msg = pb.Hello(
        node=node,
        boot_id=boot_id,
        agent_version="test",
        sampling_interval_seconds=1.0,
        t=time.time(),
        nvml_available=True,
    )
    for i in range(gpus):
        msg.gpus.add(
            index=i, uuid=f"GPU-{node}-{i}", name="NVIDIA H100 80GB HBM3", pci_bus_id=f"0000:{0x18 + i:02x}:00.0"
        )
    return pb.AgentMessage(hello=msg)


def batch(seq: int, *, gpus: int = 2, xid: int | None = None, t: float | None = None) -> pb.AgentMessage:
    t = time.time() if t is None else t
    b = pb.Batch(seq=seq, t=t)
    for i in range(gpus):
        sample = b.gpus.add(gpu=i, t=t, uuid=f"GPU-n01-{i}")
        sample.metrics.gpu_util_percent = 97.0
        sample.metrics.power_watts = 612.5
        sample.metrics.clock_event_reasons = 0
    b.host.t = t
    b.host.metrics.cpu_percent = 12.5
    if xid is not None:
        b.events.add(t=t, kind="xid", gpu=1, xid=xid, pci_bus_id="0000:19:00.0", source="nvml")
    return pb.AgentMessage(batch=b)


async def exchange(port: int, messages: list[pb.AgentMessage], expect: int) -> list[pb.CollectorMessage]:
    """Send messages on one stream and read `expect` replies."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(
            METHOD,
            request_serializer=pb.AgentMessage.SerializeToString,
            response_deserializer=pb.CollectorMessage.FromString,
        )()
        for m in messages:
            await call.write(m)
        replies = []
        for _ in range(expect):
            replies.append(await asyncio.wait_for(call.read(), 10))
        await call.done_writing()
        return replies


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


async def get(url: str) -> str:
    """GET from a worker thread: the collector answers on this test's event loop."""
    return await asyncio.to_thread(_get, url)


@pytest.fixture
async def app(tmp_path: Path):
    receiver = await WebhookReceiver().__aenter__()
    config = CollectorConfig(
        grpc_listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        database_url=f"sqlite:///{tmp_path / 'c.db'}",
        webhook_urls=[receiver.url],
        detect_interval_seconds=0.2,
        delivery_backoff_min_seconds=0.1,
        delivery_backoff_max_seconds=0.2,
    )
    collector = CollectorApp(config)
    await collector.start()
    collector.receiver = receiver
    yield collector
    await collector.stop(grace_seconds=0.2)
    await receiver.__aexit__()


async def test_welcome_then_acks_after_commit_and_duplicates_stored_once(app: CollectorApp) -> None:
    replies = await exchange(app.grpc_port, [hello(), batch(1), batch(2)], expect=3)
    assert replies[0].WhichOneof("body") == "welcome" and replies[0].welcome.last_seq == 0
    assert [r.ack.seq for r in replies[1:]] == [1, 2]
    assert len(app.store.gpu_samples_since(0)) == 4

    # A reconnecting agent learns what is already stored, and a resent batch is not stored twice.
    replies = await exchange(app.grpc_port, [hello(), batch(2), batch(3)], expect=3)
    assert replies[0].welcome.last_seq == 2
    assert [r.ack.seq for r in replies[1:]] == [2, 3]
    assert len(app.store.gpu_samples_since(0)) == 6
    assert app.store.count_rows("batches") == 3


async def test_same_seq_after_reboot_is_a_new_batch(app: CollectorApp) -> None:
    await exchange(app.grpc_port, [hello(boot_id="boot-1"), batch(1)], expect=2)
    replies = await exchange(app.grpc_port, [hello(boot_id="boot-2"), batch(1)], expect=2)
    assert replies[0].welcome.last_seq == 0
    assert app.store.count_rows("batches") == 2


@pytest.mark.parametrize(
    ("first", "status"),
    [
        (batch(1), grpc.StatusCode.INVALID_ARGUMENT),  # no hello
        (pb.AgentMessage(hello=pb.Hello(node="", boot_id="x")), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_bad_stream_opening_is_refused_and_the_collector_keeps_serving(app: CollectorApp, first, status) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await exchange(app.grpc_port, [first], expect=1)
    assert err.value.code() == status
    replies = await exchange(app.grpc_port, [hello(), batch(1)], expect=2)
    assert replies[1].ack.seq == 1


async def test_malformed_batch_ends_only_that_stream_and_keeps_what_was_stored(app: CollectorApp) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await exchange(app.grpc_port, [hello(), batch(1), batch(0)], expect=3)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "seq" in err.value.details()
    assert app.store.count_rows("batches") == 1
    assert app.stats.rejected == 1


async def test_undecodable_bytes_do_not_hurt_the_collector(app: CollectorApp) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        call = channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)()
        await call.write(b"\xff\xff\xff not a protobuf")
        with pytest.raises(grpc.aio.AioRpcError):
            await asyncio.wait_for(call.read(), 10)
    replies = await exchange(app.grpc_port, [hello(), batch(1)], expect=2)
    assert replies[1].ack.seq == 1


async def test_xid_event_reaches_the_webhook_within_two_seconds(app: CollectorApp) -> None:
    await exchange(app.grpc_port, [hello(), batch(1)], expect=2)
    sent_at = time.time()
    await exchange(app.grpc_port, [hello(), batch(2, xid=79, t=sent_at)], expect=2)
    deadline = time.time() + 5
    while time.time() < deadline and not app.receiver.received:
        await asyncio.sleep(0.05)
    assert app.receiver.received, "no webhook arrived"
    arrived, body = app.receiver.received[0]
    assert arrived - sent_at < 2.0
    assert body["version"] == "4" and body["status"] == "firing"
    alert = body["alerts"][0]
    assert alert["labels"]["detector"] in ("xid", "gpu_lost")
    assert alert["labels"]["node"] == "n01" and alert["labels"]["gpu"] == "1"
    assert alert["endsAt"] == "0001-01-01T00:00:00Z"
    firing = json.loads(await get(f"http://127.0.0.1:{app.http_port}/api/v1/alerts"))["alerts"]
    xid = [a for a in firing if a["detector"] == "xid"]
    assert xid and xid[0]["severity"] == "critical" and xid[0]["action"] == "reboot"


async def test_metrics_parse_and_show_ingest_and_alerts(app: CollectorApp) -> None:
    await exchange(app.grpc_port, [hello(), batch(1), batch(2, xid=48)], expect=3)
    await asyncio.sleep(0.5)
    families = {
        f.name: f for f in text_string_to_metric_families(await get(f"http://127.0.0.1:{app.http_port}/metrics"))
    }
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("fleetwatch_collector_batches_total", ())] == 2
    assert samples[("fleetwatch_collector_samples_total", (("kind", "gpu"),))] == 4
    assert samples[("fleetwatch_collector_events_total", ())] == 1
    assert samples[("fleetwatch_alerts_firing", (("detector", "xid"), ("severity", "critical")))] == 1
    assert ("fleetwatch_agent_ingest_lag_seconds", (("node", "n01"),)) in samples
    assert "fleetwatch_collector_agents_connected" in families


async def test_status_api_shows_nodes_gpus_and_health(app: CollectorApp) -> None:
    await exchange(app.grpc_port, [hello(), batch(1, xid=79)], expect=2)
    await asyncio.sleep(0.5)
    status = json.loads(await get(f"http://127.0.0.1:{app.http_port}/api/v1/status"))
    (node,) = status["nodes"]
    assert node["node"] == "n01" and len(node["gpus"]) == 2
    health = {g["gpu"]: g["health"] for g in node["gpus"]}
    assert health == {0: "ok", 1: "critical"}
    assert node["gpus"][0]["metrics"]["power_watts"] == 612.5


async def test_unreachable_webhook_is_retried_until_it_answers(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port with nothing listening yet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = CollectorConfig(
        grpc_listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        database_url=f"sqlite:///{tmp_path / 'c.db'}",
        webhook_urls=[f"http://127.0.0.1:{port}/alerts"],
        log_alerts=False,
        detect_interval_seconds=0.2,
        delivery_backoff_min_seconds=0.2,
        delivery_backoff_max_seconds=0.4,
    )
    app = CollectorApp(config)
    await app.start()
    try:
        await exchange(app.grpc_port, [hello(), batch(1, xid=79)], expect=2)
        deadline = time.time() + 5
        while time.time() < deadline and app.outbox.retried < 2:
            await asyncio.sleep(0.05)
        assert app.outbox.retried >= 2 and app.outbox.sent == 0
        async with WebhookReceiver(port=port) as receiver:
            deadline = time.time() + 5
            while time.time() < deadline and not receiver.received:
                await asyncio.sleep(0.05)
            assert receiver.received, "the retried delivery never arrived"
    finally:
        await app.stop(grace_seconds=0.2)


async def test_fleetwatchctl_status_and_alerts_read_the_running_collector(app: CollectorApp, capsys) -> None:
    from fleetwatch.ctl.main import main

    await exchange(app.grpc_port, [hello(), batch(1, xid=79)], expect=2)
    await asyncio.sleep(0.5)
    url = f"http://127.0.0.1:{app.http_port}"
    assert await asyncio.to_thread(main, ["--collector", url, "status"]) == 0
    out = capsys.readouterr().out
    assert "n01" in out and ".C" in out and "gpu 1 GPU-n01-1: " in out
    assert await asyncio.to_thread(main, ["--collector", url, "alerts", "--json"]) == 0
    alerts = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {a["detector"] for a in alerts} >= {"xid"} and all(a["status"] == "firing" for a in alerts)


def thermal_batch(seq: int, hot: bool, t: float) -> pb.AgentMessage:
    msg = batch(seq, gpus=1, t=t)
    m = msg.batch.gpus[0].metrics
    m.clock_event_reasons = 0x40 | 0x08 if hot else 0
    m.temp_gpu_celsius, m.temp_slowdown_celsius = (91.0 if hot else 65.0), 89.0
    m.sm_clock_mhz, m.sm_clock_max_mhz = (1005.0 if hot else 1980.0), 1980.0
    return msg


async def test_alert_fires_then_resolves_and_both_reach_the_webhook(app: CollectorApp) -> None:
    # 25 s of hardware thermal slowdown at 1 Hz (sustained, as the detector requires), then 6 clean samples
    now = time.time()
    hot = [thermal_batch(i, hot=True, t=now - 30 + i) for i in range(1, 26)]
    await exchange(app.grpc_port, [hello(gpus=1), *hot], expect=26)
    await asyncio.sleep(0.6)
    cool = [thermal_batch(i, hot=False, t=now - 5 + (i - 26)) for i in range(26, 32)]
    await exchange(app.grpc_port, [hello(gpus=1), *cool], expect=7)
    deadline = time.time() + 5
    while (
        time.time() < deadline
        and sum(body["alerts"][0]["labels"]["detector"] == "thermal" for _, body in app.receiver.received) < 2
    ):
        await asyncio.sleep(0.05)
    # Only thermal's deliveries: between the two streams node_silent may fire on a loaded machine.
    thermal = [body for _, body in app.receiver.received if body["alerts"][0]["labels"]["detector"] == "thermal"]
    assert [body["status"] for body in thermal] == ["firing", "resolved"]
    resolved = thermal[1]["alerts"][0]
    assert resolved["endsAt"] != "0001-01-01T00:00:00Z"
    (alert,) = [a for a in app.store.alerts(status="resolved") if a["detector"] == "thermal"]
    assert alert["ends_at"] is not None
    assert "thermal slowdown" in alert["summary"]


async def test_restarted_collector_keeps_its_firing_alerts_without_notifying_twice(tmp_path: Path) -> None:
    async with WebhookReceiver() as receiver:
        config = CollectorConfig(
            grpc_listen="127.0.0.1:0",
            http_listen="127.0.0.1:0",
            database_url=f"sqlite:///{tmp_path / 'c.db'}",
            webhook_urls=[receiver.url],
            log_alerts=False,
            detect_interval_seconds=0.2,
        )
        first = CollectorApp(config)
        await first.start()
        await exchange(first.grpc_port, [hello(), batch(1, xid=79)], expect=2)
        deadline = time.time() + 5
        while time.time() < deadline and not receiver.received:
            await asyncio.sleep(0.05)
        await first.stop(0.2)

        second = CollectorApp(config)
        await second.start()
        try:
            assert [f.detector for f in second.tracker.open.values()] == ["xid"]
            await exchange(second.grpc_port, [hello(), batch(2)], expect=2)
            await asyncio.sleep(1.0)
            assert len(receiver.received) == 1
            assert len(second.store.alerts(status=None)) == 1
        finally:
            await second.stop(0.2)


async def test_database_failure_is_unavailable_to_the_agent_and_the_collector_recovers(app: CollectorApp) -> None:
    from fleetwatch.collector.storage.store import StoreError

    real_ingest = app.store.ingest
    calls = {"n": 0}

    def failing_once(items):
        calls["n"] += 1
        if calls["n"] == 1:
            raise StoreError("database or disk is full")
        return real_ingest(items)

    app.store.ingest = failing_once
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await exchange(app.grpc_port, [hello(), batch(1)], expect=2)
    # The agent learns to resend; the cause (and the database's address) stays in the collector's log.
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "storage unavailable" in err.value.details()
    assert app.store.url_for_log not in err.value.details()
    assert app.store.count_rows("batches") == 0
    # the agent resends the same batch on its next stream; now it is stored and acked
    replies = await exchange(app.grpc_port, [hello(), batch(1)], expect=2)
    assert replies[1].ack.seq == 1 and app.store.count_rows("batches") == 1
    assert app.writer.errors == 1
