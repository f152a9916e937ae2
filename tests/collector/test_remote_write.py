"""Prometheus remote write: the wire bytes, the agent's names, order per series, the bounded queue, retries.

The requests are decoded with the generated prompb modules and cramjam's snappy, as a receiver
would; the HTTP side runs against a local aiohttp receiver that answers what each test asks.
"""

from __future__ import annotations

import asyncio
import math
import time
import urllib.request
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import cramjam
import numpy as np
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from fleetwatch.agent.metrics import AgentMetrics
from fleetwatch.agent.state import AgentState
from fleetwatch.collector.app import CollectorApp
from fleetwatch.collector.config import CollectorConfig
from fleetwatch.collector.remote_write import HEADERS, Chunk, Encoder, RemoteWriter, varint
from fleetwatch.collector.storage.store import GpuRows, IngestBatch
from fleetwatch.configfile import ConfigError, describe, load_config
from fleetwatch.metric_names import GPU_METRICS, HOST_METRICS, IB_METRICS
from fleetwatch.prompb import remote_pb2
from fleetwatch.records import GpuSample, HostSample
from fleetwatch.wire import GPU_FIELDS
from tests.collector.test_collector_app import batch, exchange, hello

T0 = 1_700_000_000.0
# The field tables' names (GPU and host share canonical names such as mem_used_bytes).
METRIC_NAMES = {spec.name for spec in (*GPU_METRICS, *HOST_METRICS, *IB_METRICS)}
Series = tuple[tuple[str, str], ...]


def decode(body: bytes) -> remote_pb2.WriteRequest:
    return remote_pb2.WriteRequest.FromString(bytes(cramjam.snappy.decompress_raw(body)))


def series_of(request: remote_pb2.WriteRequest) -> dict[Series, list[tuple[int, float]]]:
    """Samples per label set, in request order (a series may come in several entries)."""
    out: dict[Series, list[tuple[int, float]]] = defaultdict(list)
    for ts in request.timeseries:
        names = [label.name for label in ts.labels]
        assert names == sorted(names), names  # remote write 1.0: labels sorted by name
        key = tuple((label.name, label.value) for label in ts.labels)
        out[key].extend((s.timestamp, s.value) for s in ts.samples)
    return out


def gpu_rows(t0: float, cycles: int, gpus: int, fields: dict[str, Callable[[int, int], float]]) -> GpuRows:
    """A dense batch: `cycles` sampling times of `gpus` GPUs, each field's value by (cycle, gpu)."""
    rows = cycles * gpus
    values = np.full((rows, len(GPU_FIELDS)), math.nan)
    for name, fn in fields.items():
        values[:, GPU_FIELDS.index(name)] = [fn(c, g) for c in range(cycles) for g in range(gpus)]
    return GpuRows(
        t=np.repeat(t0 + np.arange(cycles, dtype=np.float64), gpus),
        gpu=np.tile(np.arange(gpus, dtype=np.int64), cycles),
        values=values,
        label=np.tile(np.arange(gpus, dtype=np.int64), cycles),
        labels=[(f"GPU-{g}", "j7", g) for g in range(gpus)],
    )


def item(node: str, seq: int, **records: Any) -> IngestBatch:
    return IngestBatch(node=node, boot_id="boot-1", seq=seq, received_at=T0, **records)


def joined(chunks: list[Chunk]) -> bytes:
    """An encoder's chunks for one shard as the WriteRequest they make."""
    return b"".join(data for data, _, _, _, _ in chunks)


def sealed(writer: RemoteWriter) -> list[remote_pb2.WriteRequest]:
    """Every request queued for the first receiver, all shards, after sealing what is open."""
    for shard in range(writer.shards):
        writer._seal(shard)
    return [decode(r.body) for queue in writer.receivers[0].queues for r in queue]


# ---- the bytes ------------------------------------------------------------------------------------


def test_request_decodes_to_the_agents_names_labels_units_and_millisecond_timestamps() -> None:
    writer = RemoteWriter(["http://127.0.0.1:1/api/v1/write"], shards=2)
    rows = gpu_rows(T0, 3, 2, {"temp_gpu_celsius": lambda c, g: 50 + c + 10 * g, "sm_clock_mhz": lambda c, g: 1980})
    host = [HostSample(t=T0 + c, node="n01", metrics={"cpu_percent": 12.5, "load1": 3}) for c in range(3)]
    ports = [{"t": T0, "device": "mlx5_0", "port": 1, "ib_state": "DOWN", "ib_rate_gbps": 400.0}]
    writer.enqueue([item("n01", 1, gpu_rows=rows, host_samples=host, ib_ports=ports)], [True])
    got: dict[Series, list[tuple[int, float]]] = {}
    for request in sealed(writer):
        got.update(series_of(request))
    ms = [int(T0 * 1000) + 1000 * c for c in range(3)]
    gpu1 = (("gpu", "1"), ("node", "n01"), ("uuid", "GPU-1"))
    assert got[(("__name__", "fleetwatch_gpu_temperature_celsius"), *gpu1)] == [(m, 60.0 + i) for i, m in enumerate(ms)]
    assert got[(("__name__", "fleetwatch_gpu_sm_clock_hertz"), *gpu1)] == [(m, 1.98e9) for m in ms]
    assert got[(("__name__", "fleetwatch_host_cpu_utilization_ratio"), ("node", "n01"))] == [(m, 0.125) for m in ms]
    port = (("device", "mlx5_0"), ("node", "n01"), ("port", "1"))
    assert got[(("__name__", "fleetwatch_ib_port_up"), *port)] == [(ms[0], 0.0)]
    assert got[(("__name__", "fleetwatch_ib_port_rate_bytes_per_second"), *port)] == [(ms[0], 5e10)]
    assert len(got) == 2 * 2 + 2 + 2  # no series for absent fields, never a 0


def test_fast_encoding_is_byte_for_byte_what_the_generated_classes_write() -> None:
    # Eight GPUs: seven share a layout (written as one matrix), one lacks a value (entry by entry).
    power = {"power_watts": lambda c, g: 612.5 + c * 0.1 + g, "gpu_util_percent": lambda c, g: 97 - g}
    rows = gpu_rows(T0 + 0.123, 4, 8, power)
    rows.values[5, GPU_FIELDS.index("power_watts")] = math.nan  # cycle 0, GPU 5
    encoder = Encoder(shards=1)
    [chunks] = encoder.encode([item("n01", 1, gpu_rows=rows)], [True])
    ours = joined(chunks)
    request = remote_pb2.WriteRequest.FromString(ours)
    # Re-serialized by protobuf itself (nonzero values: proto3 would leave a 0.0 out).
    assert request.SerializeToString() == ours
    got = series_of(request)
    assert len(got) == 8 * 2
    for g in range(8):
        labels = (("gpu", str(g)), ("node", "n01"), ("uuid", f"GPU-{g}"))
        watts = got[(("__name__", "fleetwatch_gpu_power_watts"), *labels)]
        cycles = range(1, 4) if g == 5 else range(4)
        assert watts == [(round((T0 + 0.123 + c) * 1000), 612.5 + c * 0.1 + g) for c in cycles]
        assert got[(("__name__", "fleetwatch_gpu_utilization_ratio"), *labels)] == [
            (round((T0 + 0.123 + c) * 1000), (97 - g) / 100) for c in range(4)
        ]


def test_timestamps_outside_the_fast_range_take_the_general_varints() -> None:
    encoder = Encoder(shards=1)
    old = [GpuSample(t=t, node="n01", gpu=0, metrics={"power_watts": 100.0 + t}, uuid="GPU-0") for t in (1.5, 2.0, 1e9)]
    [chunks] = encoder.encode([item("n01", 1, gpu_samples=old)], [True])
    request = remote_pb2.WriteRequest.FromString(joined(chunks))
    [ts] = request.timeseries
    assert [(s.timestamp, s.value) for s in ts.samples] == [(1500, 101.5), (2000, 102.0), (10**12, 100.0 + 1e9)]
    assert request.SerializeToString() == joined(chunks)
    assert varint(-1) == b"\xff" * 9 + b"\x01"  # int64 -1: ten bytes, as protobuf writes it


def test_series_match_the_agents_own_metrics_exposition() -> None:
    """What the agent serves on /metrics and what the collector remote-writes from the same sample."""
    metrics = {spec.canonical: 7.0 for spec in GPU_METRICS}
    metrics.update(gpu_util_percent=97.0, sm_clock_mhz=1980.0, clock_event_reasons=0, energy_joules=12345.5)
    host = {spec.canonical: 3.0 for spec in HOST_METRICS}
    port = {"device": "mlx5_0", "port": 1, "ib_state": "ACTIVE", "ib_rate_gbps": 400.0, "ib_symbol_error_total": 5}
    state = AgentState(node="n07")
    state.gpus = {3: {"gpu": 3, "t": T0, "uuid": "GPU-abc", "job": "j7", "rank": 0, "metrics": metrics}}
    state.host = host
    state.ib_ports = [port]
    agent = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in AgentMetrics(state).collect()
        for s in family.samples
        if s.name in METRIC_NAMES
    }

    writer = RemoteWriter(["http://127.0.0.1:1/api/v1/write"])
    gpu = GpuSample(t=T0, node="n07", gpu=3, metrics=metrics, uuid="GPU-abc", job="j7", rank=0)
    ib = {"t": T0, **port}
    writer.enqueue(
        [item("n07", 1, gpu_samples=[gpu], host_samples=[HostSample(T0, "n07", host)], ib_ports=[ib])], [True]
    )
    ours = {}
    for request in sealed(writer):
        for key, samples in series_of(request).items():
            labels = dict(key)
            ours[(labels.pop("__name__"), tuple(sorted(labels.items())))] = samples[0][1]
    assert ours == agent
    assert len(ours) == len(GPU_METRICS) + len(HOST_METRICS) + 3  # port up, rate, symbol errors


# ---- order and the queue --------------------------------------------------------------------------


def test_late_samples_are_dropped_and_counted_not_sent_out_of_order() -> None:
    writer = RemoteWriter(["http://127.0.0.1:1/api/v1/write"], shards=1)
    temp = {"temp_gpu_celsius": lambda c, g: 40.0 + c}
    writer.enqueue([item("n01", 2, gpu_rows=gpu_rows(T0 + 10, 5, 1, temp))], [True])
    # A spooled batch that overlaps: 8 of its cycles are older than what went, 2 are new.
    writer.enqueue([item("n01", 1, gpu_rows=gpu_rows(T0 + 5, 12, 1, temp))], [True])
    writer.enqueue([item("n01", 3, gpu_rows=gpu_rows(T0 + 20, 1, 1, temp))], [False])  # a duplicate: not new
    [request] = sealed(writer)
    [samples] = series_of(request).values()
    stamps = [ts for ts, _ in samples]
    assert stamps == sorted(set(stamps)) and len(stamps) == 5 + 2
    assert writer.receivers[0].dropped["out_of_order"] == 10


def test_sharding_keeps_every_series_on_one_shard_in_time_order() -> None:
    writer = RemoteWriter(["http://127.0.0.1:1/api/v1/write"], shards=4, max_samples_per_send=50)
    temp = {"temp_gpu_celsius": lambda c, g: c + g / 10, "power_watts": lambda c, g: 500 + c}
    for seq in range(1, 6):
        batches = [item(f"n{n:02d}", seq, gpu_rows=gpu_rows(T0 + 10 * seq, 10, 8, temp)) for n in range(6)]
        writer.enqueue(batches, [True] * len(batches))
    for shard in range(4):
        writer._seal(shard)
    shard_of: dict[Series, int] = {}
    stamps: dict[Series, list[int]] = defaultdict(list)
    for shard, queue in enumerate(writer.receivers[0].queues):
        assert queue, f"shard {shard} got nothing"
        for request in queue:
            assert request.samples <= 50
            for key, samples in series_of(decode(request.body)).items():
                assert shard_of.setdefault(key, shard) == shard
                stamps[key].extend(ts for ts, _ in samples)
    assert len(stamps) == 6 * 8 * 2
    for key, got in stamps.items():
        assert got == [int(T0 * 1000) + 1000 * i for i in range(10, 60)], key


def test_a_full_queue_drops_the_oldest_counts_them_and_enqueue_stays_fast() -> None:
    writer = RemoteWriter(
        ["http://127.0.0.1:1/api/v1/write", "http://127.0.0.1:2/api/v1/write"],
        shards=1,
        max_samples_per_send=100,
        capacity_samples=1000,
    )
    temp = {"temp_gpu_celsius": lambda c, g: 40.0 + c}
    seconds = []
    for seq in range(1, 201):  # nobody sends: 200 x 80 samples against room for 1000
        started = time.perf_counter()
        writer.enqueue([item("n01", seq, gpu_rows=gpu_rows(T0 + 10 * seq, 10, 8, temp))], [True])
        seconds.append(time.perf_counter() - started)
    writer._seal(0)
    for receiver in writer.receivers:
        queued = sum(receiver.queued)
        assert queued <= 1000
        assert receiver.dropped["queue_full"] == 200 * 80 - queued
        newest = decode(receiver.queues[0][-1].body)
        assert max(s.timestamp for ts in newest.timeseries for s in ts.samples) == int((T0 + 2009) * 1000)
    # Each call is as cheap when full as when empty (a bound far above either, for a loaded CI host).
    assert sorted(seconds)[len(seconds) // 2] < 0.01
    samples = {(s.name, s.labels["url"], s.labels.get("reason")): s.value for f in writer.metrics() for s in f.samples}
    assert samples[("fleetwatch_remote_write_samples_dropped_total", "http://127.0.0.1:2/...", "queue_full")] > 0
    assert samples[("fleetwatch_remote_write_queue_samples", "http://127.0.0.1:1/...", None)] <= 1000


# ---- against a receiver ---------------------------------------------------------------------------


class Receiver:
    """A remote-write endpoint on loopback: answers from `script` (then 204), records what it took."""

    def __init__(self) -> None:
        self.script: list[tuple[int, dict[str, str]]] = []
        self.requests: list[tuple[float, dict[str, str], remote_pb2.WriteRequest]] = []
        self.taken: dict[Series, list[tuple[int, float]]] = defaultdict(list)
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = decode(await request.read())
        self.requests.append((time.monotonic(), dict(request.headers), body))
        await asyncio.sleep(0.001)  # let shards interleave
        if self.script:
            status, headers = self.script.pop(0)
            return web.Response(status=status, headers=headers, text="out of order sample" if status == 400 else "")
        for key, samples in series_of(body).items():
            self.taken[key].extend(samples)
        return web.Response(status=204)

    async def start(self, port: int = 0) -> Receiver:
        app = web.Application()
        app.router.add_post("/api/v1/write", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/api/v1/write"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    yield r
    await r.stop()


async def wait_for(predicate: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def counters(writer: RemoteWriter) -> dict[tuple[str, ...], float]:
    return {
        (s.name, *(v for k, v in sorted(s.labels.items()) if k != "url")): s.value
        for family in writer.metrics()
        for s in family.samples
    }


async def test_requests_carry_the_protocol_headers_and_basic_auth(receiver: Receiver) -> None:
    url = receiver.url.replace("http://", "http://fleet:s3cret@")
    writer = RemoteWriter([url], batch_send_deadline_seconds=0.05)
    writer.start()
    try:
        writer.enqueue([item("n01", 1, gpu_rows=gpu_rows(T0, 2, 2, {"power_watts": lambda c, g: 600}))], [True])
        await wait_for(lambda: bool(receiver.requests))
    finally:
        await writer.close()
    _, headers, _ = receiver.requests[0]
    for name, value in HEADERS.items():
        assert headers[name] == value
    assert headers["User-Agent"].startswith("fleetwatch/")
    assert headers["Authorization"] == "Basic ZmxlZXQ6czNjcmV0"
    assert "s3cret" not in repr([f.samples for f in writer.metrics()])


async def test_5xx_and_429_are_retried_with_backoff_and_retry_after(receiver: Receiver) -> None:
    receiver.script = [(500, {}), (503, {}), (429, {"Retry-After": "0.3"}), (500, {})]
    writer = RemoteWriter([receiver.url], shards=1, min_backoff_seconds=0.05, max_backoff_seconds=1.0)
    writer.start()
    try:
        writer.enqueue([item("n01", 1, gpu_rows=gpu_rows(T0, 2, 2, {"power_watts": lambda c, g: 600}))], [True])
        writer._seal(0)
        await wait_for(lambda: bool(receiver.taken))
    finally:
        await writer.close()
    times = [at for at, _, _ in receiver.requests]
    gaps = np.diff(times)
    # 0.05 doubling: 0.05, 0.1; then Retry-After 0.3; then twice what was waited, capped at 1.0: 0.6.
    expected = [0.05, 0.1, 0.3, 0.6]
    assert len(gaps) == len(expected)
    for gap, wait in zip(gaps, expected):
        assert wait - 0.01 <= gap < wait + 0.25, (gaps, expected)  # late only by a loaded host's delay
    got = counters(writer)
    assert got[("fleetwatch_remote_write_samples_total", "sent")] == 4
    assert got[("fleetwatch_remote_write_samples_total", "retried")] == 4 * 4
    assert got[("fleetwatch_remote_write_requests_total", "500")] == 2
    assert got[("fleetwatch_remote_write_requests_total", "429")] == 1
    assert got[("fleetwatch_remote_write_requests_total", "204")] == 1
    assert ("fleetwatch_remote_write_last_success_timestamp_seconds",) in got


async def test_a_4xx_drops_the_request_counts_it_and_the_next_goes_on(receiver: Receiver) -> None:
    receiver.script = [(400, {})]
    writer = RemoteWriter([receiver.url], shards=1)
    writer.start()
    try:
        for seq in (1, 2):
            writer.enqueue(
                [item("n01", seq, gpu_rows=gpu_rows(T0 + seq * 10, 1, 3, {"power_watts": lambda c, g: 1}))], [True]
            )
            writer._seal(0)
        await wait_for(lambda: bool(receiver.taken))
    finally:
        await writer.close()
    got = counters(writer)
    assert got[("fleetwatch_remote_write_samples_dropped_total", "rejected")] == 3
    assert got[("fleetwatch_remote_write_samples_total", "dropped")] == 3
    assert got[("fleetwatch_remote_write_samples_total", "retried")] == 0
    assert got[("fleetwatch_remote_write_samples_total", "sent")] == 3
    assert len(receiver.requests) == 2


async def test_a_receiver_that_is_down_gets_everything_in_order_once_it_is_up() -> None:
    placeholder = await Receiver().start()
    url = placeholder.url
    port = int(url.split(":")[2].split("/")[0])
    await placeholder.stop()  # nothing listens there now: connection refused
    writer = RemoteWriter(
        [url],
        shards=2,
        max_samples_per_send=40,
        batch_send_deadline_seconds=0.1,
        min_backoff_seconds=0.02,
        max_backoff_seconds=0.2,
    )
    writer.start()
    late = None
    try:
        temp = {"temp_gpu_celsius": lambda c, g: 40.0 + c}
        for seq in range(1, 6):
            writer.enqueue([item("n01", seq, gpu_rows=gpu_rows(T0 + 10 * seq, 10, 4, temp))], [True])
        await asyncio.sleep(0.5)
        assert counters(writer)[("fleetwatch_remote_write_requests_total", "error")] >= 2
        late = await Receiver().start(port)
        await wait_for(lambda: sum(len(v) for v in late.taken.values()) == 5 * 40)
        await wait_for(lambda: counters(writer)[("fleetwatch_remote_write_queue_samples",)] == 0)
    finally:
        await writer.close()
        if late is not None:
            await late.stop()
    for samples in late.taken.values():
        assert [ts for ts, _ in samples] == [int(T0 * 1000) + 1000 * i for i in range(10, 60)]
    got = counters(writer)
    assert got[("fleetwatch_remote_write_samples_total", "retried")] > 0
    assert got[("fleetwatch_remote_write_samples_total", "sent")] == 200
    assert got[("fleetwatch_remote_write_highest_sent_timestamp_seconds",)] == T0 + 59


async def test_close_sends_what_is_queued_before_the_deadline(receiver: Receiver) -> None:
    writer = RemoteWriter([receiver.url], batch_send_deadline_seconds=60)
    writer.start()
    writer.enqueue([item("n01", 1, gpu_rows=gpu_rows(T0, 1, 8, {"power_watts": lambda c, g: 600}))], [True])
    await writer.close(flush_seconds=5)
    assert sum(len(v) for v in receiver.taken.values()) == 8
    assert counters(writer)[("fleetwatch_remote_write_samples_dropped_total", "shutdown")] == 0


# ---- the collector ------------------------------------------------------------------------------


async def test_the_collector_forwards_what_it_stores_and_reports_it_on_metrics(
    tmp_path: Path, receiver: Receiver
) -> None:
    config = CollectorConfig(
        grpc_listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        database_url=f"sqlite:///{tmp_path / 'c.db'}",
        remote_write_urls=[receiver.url],
        remote_write_batch_send_deadline_seconds=0.05,
        log_alerts=False,
    )
    app = CollectorApp(config)
    await app.start()
    try:
        t = time.time()
        await exchange(app.grpc_port, [hello(), batch(1, t=t), batch(2, t=t + 1)], expect=3)
        await exchange(app.grpc_port, [hello(), batch(2, t=t + 1)], expect=2)  # resent: stored once, sent once
        await wait_for(lambda: len(receiver.taken) == 2 * 3 + 1)
        url = f"http://127.0.0.1:{app.http_port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    finally:
        await app.stop(grace_seconds=0.5)
    power = receiver.taken[
        (("__name__", "fleetwatch_gpu_power_watts"), ("gpu", "1"), ("node", "n01"), ("uuid", "GPU-n01-1"))
    ]
    assert power == [(round(t * 1000), 612.5), (round((t + 1) * 1000), 612.5)]
    families = {f.name: f for f in text_string_to_metric_families(text)}
    [sent] = [s for s in families["fleetwatch_remote_write_samples"].samples if s.labels["result"] == "sent"]
    assert sent.value == 2 * (2 * 3 + 1)
    assert sent.labels["url"] == receiver.url.removesuffix("/api/v1/write") + "/..."  # no path: tokens live there


def test_settings_from_flags_and_environment_and_the_url_is_never_shown() -> None:
    urls = "http://u:s3cr3tpw@vm:8428/api/v1/write,https://prom:9090/api/v1/write"
    config = load_config(
        CollectorConfig,
        path=None,
        flags={"remote_write_urls": urls, "remote_write_shards": "8"},
        env={"FLEETWATCH_REMOTE_WRITE_MAX_SAMPLES_PER_SEND": "500"},
    )
    assert [u.reveal() for u in config.remote_write_urls] == urls.split(",")
    assert config.remote_write_shards == 8 and config.remote_write_max_samples_per_send == 500
    assert "s3cr3tpw" not in repr(describe(config))
    with pytest.raises(ConfigError, match="remote_write_urls"):
        load_config(CollectorConfig, path=None, flags={"remote_write_urls": "vm:8428"}, env={})
    with pytest.raises(ConfigError, match="remote_write_shards"):
        load_config(CollectorConfig, path=None, flags={"remote_write_shards": "0"}, env={})
