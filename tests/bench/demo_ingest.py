"""Benchmark: samples per second the collector ingests in the demo, and its ingest capacity.

1. The demo as `make demo` runs it (4 nodes x 8 GPUs at 1 Hz): samples ingested per second.
2. Capacity: many streams push ready-made 8-GPU batches as fast as the collector acks them, into
   a SQLite file, for a bounded time; prints batches and GPU samples stored per second.
Prints JSON lines. Rerun: `.venv/bin/python tests/bench/demo_ingest.py [--capacity-seconds 10]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
import time
from pathlib import Path

import grpc

from fleetwatch.collector.app import CollectorApp
from fleetwatch.collector.config import CollectorConfig
from fleetwatch.sim.demo import _run
from fleetwatch.v1 import telemetry_pb2 as pb

METHOD = "/fleetwatch.v1.Telemetry/Stream"


def make_batch(seq: int, gpus: int, boot: str) -> bytes:
    t = time.time()
    b = pb.Batch(seq=seq, t=t, boot_id=boot)
    for i in range(gpus):
        m = b.gpus.add(gpu=i, t=t, uuid=f"GPU-{i}").metrics
        m.gpu_util_percent, m.power_watts, m.sm_clock_mhz, m.temp_gpu_celsius = 98.0, 650.0, 1980.0, 66.0
        m.energy_joules, m.clock_event_reasons, m.ecc_dbe_volatile_total = 123456.0, 0, 0
    b.host.t = t
    b.host.metrics.cpu_percent = 10.0
    return pb.AgentMessage(batch=b).SerializeToString()


async def push(port: int, node: str, gpus: int, until: float) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_stream(
            METHOD, request_serializer=None, response_deserializer=pb.CollectorMessage.FromString
        )()
        await call.write(
            pb.AgentMessage(
                hello=pb.Hello(node=node, boot_id="bench", sampling_interval_seconds=1.0)
            ).SerializeToString()
        )
        await call.read()
        seq, acked, window = 0, 0, 64
        while time.time() < until:
            while seq - acked < window:
                seq += 1
                await call.write(make_batch(seq, gpus, "bench"))
            reply = await call.read()
            acked = reply.ack.seq
        await call.done_writing()
        while acked < seq:
            acked = (await call.read()).ack.seq
        return acked


async def capacity(seconds: float, streams: int, gpus: int, workdir: Path) -> dict:
    app = CollectorApp(
        CollectorConfig(
            grpc_listen="127.0.0.1:0",
            http_listen="127.0.0.1:0",
            database_url=f"sqlite:///{workdir / 'bench.db'}",
            log_alerts=False,
        )
    )
    await app.start()
    started = time.time()
    acked = await asyncio.gather(*(push(app.grpc_port, f"b{i:03d}", gpus, started + seconds) for i in range(streams)))
    elapsed = time.time() - started
    stored = app.stats.batches
    await app.stop(grace_seconds=1)
    return {
        "benchmark": "collector_ingest_capacity",
        "streams": streams,
        "gpus_per_batch": gpus,
        "seconds": round(elapsed, 1),
        "batches_acked": sum(acked),
        "batches_stored": stored,
        "batches_per_second": round(stored / elapsed),
        "gpu_samples_per_second": round(stored * gpus / elapsed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--demo-seconds", type=float, default=20)
    parser.add_argument("--capacity-seconds", type=float, default=10)
    parser.add_argument("--streams", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the demo's XID is expected; keep the output to numbers
    with tempfile.TemporaryDirectory() as tmp:
        started = time.time()
        summary = asyncio.run(_run(args.demo_seconds, 4, 8, None, Path(tmp)))
        elapsed = time.time() - started
        print(
            json.dumps(
                {
                    "benchmark": "demo_ingest",
                    "seconds": round(elapsed, 1),
                    "samples_ingested": summary["samples_ingested"],
                    "samples_per_second": round(summary["samples_ingested"] / args.demo_seconds, 1),
                }
            )
        )
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(asyncio.run(capacity(args.capacity_seconds, args.streams, 8, Path(tmp)))))


if __name__ == "__main__":
    main()
