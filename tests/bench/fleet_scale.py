"""The per-node figures docs/scale.md multiplies out: what one node costs on the wire and in the
database, and what the fleet_detection lease holder spends reading the other collectors' batches.

    .venv/bin/python tests/bench/fleet_scale.py [--nodes 200] [--pg-url URL]

1. Wire: the agent's dense batch (10 cycles of 8 H100s at 1 Hz, 45 GPU fields and 8 host fields
   from the agent's own NVML source over the fake NVML) serialized, per node-second; and the
   same batch as the collector stores it until compaction (zstd).
2. Fleet detection: `--nodes` nodes' batches stored in PostgreSQL by "another collector", then
   read back and checked by FleetDetection.poll and taken in by one detection pass (what the
   lease holder does for every batch it did not receive itself): CPU per value.

Prints one JSON object (and a table) on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from tests.bench import fleet_load  # noqa: E402

GPUS = 8
CYCLES = 10  # the agent's default batch_interval_seconds at 1 Hz


def wire_figures(values: fleet_load.FleetValues, nodes: int) -> tuple[dict[str, float], list[tuple[str, bytes]]]:
    from fleetwatch.collector.storage.chunks import compress_body
    from fleetwatch.v1 import telemetry_pb2 as pb

    cycles: list[list] = [[] for _ in range(nodes)]
    t0 = 1.7e9
    for second in range(CYCLES):
        values.step()
        for local in range(nodes):
            cycles[local].append(values.cycle(local, t0 + second))
    messages = [values.dense_batch(local, 1, cycles[local], f"boot-{local}") for local in range(nodes)]
    bodies = [pb.AgentMessage.FromString(m).batch.SerializeToString() for m in messages]
    values_per_batch = CYCLES * (GPUS * len(values.gpu_fields) + len(values.host_fields))
    wire = sum(len(m) for m in messages) / nodes
    stored = sum(len(compress_body(b)) for b in bodies) / nodes
    figures = {
        "values_per_node_second": values_per_batch / CYCLES,
        "wire_bytes_per_node_second": wire / CYCLES,
        "wire_bytes_per_value": wire / values_per_batch,
        "stored_batch_bytes_per_value": stored / values_per_batch,
    }
    return figures, [(f"n{local:05d}", body) for local, body in enumerate(bodies)]


def fleet_feed_figures(pg_url: str, batches: list[tuple[str, bytes]], values_per_batch: float) -> dict[str, float]:
    from fleetwatch.collector.fleet import FleetDetection, split_detectors
    from fleetwatch.collector.storage.store import Store
    from fleetwatch.collector.validate import ClockWindow, check_batch
    from fleetwatch.detectors import default_detectors
    from fleetwatch.v1 import telemetry_pb2 as pb

    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    schema = f"fw_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(pg_url).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(False)
    store = Store(url)
    try:
        store.migrate()
        window = ClockWindow(max_skew_seconds=1e12, max_age_seconds=1e12)
        items = [
            check_batch(node, f"boot-{node}", pb.Batch.FromString(body), 1.7e9 + 10, window) for node, body in batches
        ]
        store.ingest(items)
        _, fleet_detectors = split_detectors(default_detectors())
        fleet = FleetDetection(
            store,
            fleet_detectors,
            targets=[],
            interval_seconds=2.0,
            on_alerts_changed=lambda: None,
            active=lambda: True,
            local_nodes=lambda: (),
            window=window,
            clock=lambda: 1.7e9 + 10,
        )
        fleet._cursor = fleet._floor = 0  # as if the lease had been taken before these batches came in
        cpu, wall = time.process_time(), time.perf_counter()
        read = 0
        while True:
            n = fleet.poll()
            if not n:
                break
            read += n
        fleet.loop.run_pass()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        store.close()
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
    total_values = read * values_per_batch
    return {
        "fleet_batches_read": read,
        "fleet_feed_cpu_us_per_value": cpu / total_values * 1e6,
        "fleet_feed_wall_us_per_value": wall / total_values * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    templates = fleet_load.build_templates(6, GPUS)
    values = fleet_load.FleetValues(nodes=range(args.nodes), templates=templates, seed=1, batch_seconds=CYCLES)
    figures, batches = wire_figures(values, args.nodes)
    figures.update(fleet_feed_figures(args.pg_url, batches, figures["values_per_node_second"] * CYCLES))
    for key, value in figures.items():
        print(f"{key:<36} {value:,.3f}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
