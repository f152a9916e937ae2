"""Benchmark: the collector's CPU per value for Prometheus remote write, beside its 0.77 us per stored value.

A simulated fleet (tests/bench/fleet_load.py: the agent's own NVML source over the fake NVML for
the field set, values moving as real telemetry does) is turned into the batches the collector
stores: the agent's dense form (10 cycles a batch) checked by collector/validate.py, exactly what
CollectorApp._on_stored hands to RemoteWriter.enqueue. Measured, in this process's CPU time:

1. enqueue: encoding into the wire format, sharding, filling requests and snappy-compressing them
   (everything remote write adds to the ingest path on the event loop), per value;
2. send: the same requests POSTed by the shards to a receiver in another process that reads each
   body and answers 204 (the aiohttp client side on the event loop), per value;
3. the same enqueue for 0.1.0 agents' per-sample batches (one cycle a batch);
and the queue's memory: compressed bytes per queued sample (what remote_write_capacity_samples
costs), and uncompressed bytes per sample on the wire.

Prints JSON lines. Rerun: `.venv/bin/python tests/bench/remote_write.py [--nodes 300 --seconds 60]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import cramjam
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fleetwatch.collector.config import CollectorConfig
from fleetwatch.collector.remote_write import RemoteWriter
from fleetwatch.collector.storage.store import IngestBatch
from fleetwatch.collector.validate import ClockWindow, check_batch
from fleetwatch.v1 import telemetry_pb2 as pb
from tests.bench import fleet_load

TEMPLATES = 4
# Batches handed to enqueue at once: one commit group of the ingest writer at 300 nodes
# (ingest_commit_wait_seconds 0.2 of 30 batches a second gathers about 6; a loaded one, dozens).
GROUP = 16
# The stored cost it is compared with: README, Performance (300 nodes, SQLite), 0.77 us a value
# measured when the reference loop took 0.77 s; figures from hours apart compare after scaling by
# the reference loop, as the README does.
STORED_US_PER_VALUE = 0.77
STORED_REFERENCE_SECONDS = 0.77


def reference_loop_seconds() -> float:
    """The README's reference loop, for comparing runs across hours of a shared machine."""
    started = time.perf_counter()
    s = 0
    for i in range(10_000_000):
        s += i
    return time.perf_counter() - started


def build_batches(nodes: int, seconds: int, batch_seconds: int, seed: int) -> list[IngestBatch]:
    """The fleet's batches as the collector checked them, in arrival order (every node's batch of a period)."""
    templates = fleet_load.build_templates(TEMPLATES, 8)
    fleet = fleet_load.FleetValues(nodes=range(nodes), templates=templates, seed=seed, batch_seconds=batch_seconds)
    start = time.time() - seconds - 5
    window = ClockWindow(max_skew_seconds=3600, max_age_seconds=86400)
    out: list[IngestBatch] = []
    cycles: list[list[tuple[float, np.ndarray, tuple]]] = [[] for _ in range(nodes)]
    seqs = [0] * nodes
    for second in range(seconds):
        t = start + second
        if second:
            fleet.step()
        for local in range(nodes):
            if batch_seconds == 0:
                seqs[local] += 1
                message = pb.AgentMessage.FromString(fleet.batch(local, seqs[local], t, "bench"))
            else:
                cycles[local].append(fleet.cycle(local, t))
                if len(cycles[local]) < batch_seconds:
                    continue
                seqs[local] += 1
                message = pb.AgentMessage.FromString(fleet.dense_batch(local, seqs[local], cycles[local], "bench"))
                cycles[local] = []
            out.append(check_batch(fleet.names[local], "bench", message.batch, t, window=window))
    return out


def values_in(batches: Sequence[IngestBatch]) -> int:
    n = 0
    for b in batches:
        if b.gpu_rows is not None:
            n += int(np.count_nonzero(~np.isnan(b.gpu_rows.values)))
        n += sum(len(s.metrics) for s in b.gpu_samples) + sum(len(h.metrics) for h in b.host_samples)
    return n


def _sink(port_out: multiprocessing.connection.Connection) -> None:
    """A remote-write receiver that takes everything (another process: its CPU is not ours)."""
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=204)

    async def main() -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/api/v1/write", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port_out.send(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        await asyncio.Event().wait()

    asyncio.run(main())


async def measure(batches: list[IngestBatch], send: bool, max_samples_per_send: int) -> dict[str, float]:
    # Room for everything: nothing may be dropped while nobody sends.
    writer_url = "http://127.0.0.1:9/api/v1/write"
    sink = None
    if send:
        parent, child = multiprocessing.Pipe()
        sink = multiprocessing.get_context("spawn").Process(target=_sink, args=(child,), daemon=True)
        sink.start()
        writer_url = f"http://127.0.0.1:{parent.recv()}/api/v1/write"
    writer = RemoteWriter(
        [writer_url],
        capacity_samples=10**9,
        batch_send_deadline_seconds=0.5,
        max_samples_per_send=max_samples_per_send,
    )
    values = values_in(batches)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i in range(0, len(batches), GROUP):
        group = batches[i : i + GROUP]
        writer.enqueue(group, [True] * len(group))
    for shard in range(writer.shards):
        writer._seal(shard)
    enqueue_cpu = time.process_time() - cpu0
    enqueue_wall = time.perf_counter() - wall0
    receiver = writer.receivers[0]
    queued = sum(receiver.queued)
    compressed = receiver.queued_bytes
    raw = sum(len(cramjam.snappy.decompress_raw(r.body)) for q in receiver.queues for r in q)
    result = {
        "values": values,
        "samples_queued": queued,
        "dropped_out_of_order": receiver.dropped["out_of_order"],
        "enqueue_us_per_value": round(enqueue_cpu / values * 1e6, 4),
        "enqueue_wall_ms_per_call": round(enqueue_wall / -(-len(batches) // GROUP) * 1000, 3),
        "queued_bytes_per_sample": round(compressed / queued, 2),
        "wire_bytes_per_sample_uncompressed": round(raw / queued, 2),
    }
    if send:
        cpu1 = time.process_time()
        writer.start()
        while receiver.pending():
            await asyncio.sleep(0.01)
        result["send_us_per_value"] = round((time.process_time() - cpu1) / values * 1e6, 4)
        result["sent"] = receiver.samples["sent"]
        await writer.close()
        assert sink is not None
        sink.kill()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=300)
    parser.add_argument("--seconds", type=int, default=60, help="simulated seconds of the fleet (a multiple of 10)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--max-samples-per-send",
        type=int,
        default=CollectorConfig().remote_write_max_samples_per_send,
        help="samples a request (default: the setting's default)",
    )
    args = parser.parse_args(argv)
    reference = reference_loop_seconds()
    dense = build_batches(args.nodes, args.seconds, 10, args.seed)
    result = asyncio.run(measure(dense, send=True, max_samples_per_send=args.max_samples_per_send))
    total = result["enqueue_us_per_value"] + result["send_us_per_value"]
    print(
        json.dumps(
            {
                "bench": "remote_write",
                "form": "dense, 10 cycles a batch",
                "nodes": args.nodes,
                "gpus_per_node": 8,
                "seconds": args.seconds,
                "max_samples_per_send": args.max_samples_per_send,
                **result,
                "us_per_value": round(total, 4),
                "reference_loop_seconds": round(reference, 3),
                # This run's cost at the reference loop's speed of the README's stored figure.
                "us_per_value_scaled_to_readme_hour": round(total * STORED_REFERENCE_SECONDS / reference, 4),
                "share_of_stored_cost": round(total * STORED_REFERENCE_SECONDS / reference / STORED_US_PER_VALUE, 3),
            }
        )
    )
    legacy = build_batches(min(args.nodes, 50), min(args.seconds, 20), 0, args.seed)
    print(
        json.dumps(
            {
                "bench": "remote_write",
                "form": "per-sample (0.1.0 agents), one cycle a batch",
                "nodes": min(args.nodes, 50),
                "seconds": min(args.seconds, 20),
                **asyncio.run(measure(legacy, send=False, max_samples_per_send=args.max_samples_per_send)),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
