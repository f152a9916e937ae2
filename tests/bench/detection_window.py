"""Benchmark: RecentData's memory per GPU with the window full, and one detection pass's time.

A healthy busy fleet (jobs of 4 nodes, every GPU at work, the fields a Hopper board reports, one
InfiniBand port and one host sample per node) is fed at 1 Hz until every detector's window is
full, then timed: one pass is `data.window(now)` plus every registered detector (Tracker.evaluate),
as the collector runs it each second. Memory is what RecentData holds (tracemalloc) per GPU, on a
smaller fleet of the same shape, GPU samples only and with the host and InfiniBand samples. Where
RecentData has add_gpu_rows (the collector's bulk ingest), feeding one second of GPU samples
through it is timed too (its rows built beforehand from the same metrics).

Runs against whichever fleetwatch is importable, so the same script measures a tree before and
after a change. Prints one JSON line. Rerun:
`.venv/bin/python tests/bench/detection_window.py [--nodes 300 --memory-nodes 8 --passes 20]`.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import statistics
import time
import tracemalloc
from typing import Any

import numpy as np

from fleetwatch.detectors import default_detectors
from fleetwatch.detectors.engine import RecentData, Tracker
from fleetwatch.records import GpuSample, HostSample, IbSample
from fleetwatch.wire import GPU_FIELDS

COLUMN = {name: i for i, name in enumerate(GPU_FIELDS)}

T0 = 1_700_000_000.0
GPUS_PER_NODE = 8
NODES_PER_JOB = 4


class Fleet:
    """Healthy H100 nodes at work: readings that move every second, counters that do not."""

    def __init__(self, nodes: int, seed: int = 7) -> None:
        self.nodes = [f"n{i:04d}" for i in range(nodes)]
        self.rng = random.Random(seed)
        self.energy = {(n, g): 1e8 + self.rng.random() * 1e8 for n in self.nodes for g in range(GPUS_PER_NODE)}

    def gpu_metrics(self, node: str, gpu: int, t: float) -> dict[str, Any]:
        r = self.rng.random()
        power = 600.0 + 40.0 * math.sin(t / 30.0 + gpu) + 10.0 * r
        self.energy[(node, gpu)] += power
        capped = power > 668.0
        return {
            "gpu_util_percent": 100.0 if r < 0.6 else 97.0 + round(r * 3),
            "mem_util_percent": 9.0 + round(r * 3),
            "mem_used_bytes": 76_000_000_000 + gpu * 64 * 2**20,
            "mem_total_bytes": 85_520_809_984,
            "temp_gpu_celsius": 66.0 + round(4 * math.sin(t / 300.0 + gpu)),
            "temp_mem_celsius": 62.0 + round(4 * math.sin(t / 300.0 + gpu)),
            "temp_slowdown_celsius": 89.0,
            "temp_shutdown_celsius": 92.0,
            "power_watts": round(power, 3),
            "power_limit_watts": 700.0,
            "energy_joules": round(self.energy[(node, gpu)], 3),
            "sm_clock_mhz": 1965.0 if capped or r < 0.08 else 1980.0,
            "sm_clock_max_mhz": 1980.0,
            "mem_clock_mhz": 2619.0,
            "clock_event_reasons": 4 if capped else 0,
            "pcie_replay_total": gpu % 3,
            "pcie_tx_bytes_per_second": 1.2e7 + 1e6 * r,
            "pcie_rx_bytes_per_second": 9.5e7 + 1e7 * r,
            "pcie_link_gen": 5,
            "pcie_link_gen_max": 5,
            "pcie_link_width": 16,
            "pcie_link_width_max": 16,
            "ecc_sbe_volatile_total": 0,
            "ecc_dbe_volatile_total": 0,
            "ecc_sbe_aggregate_total": 0,
            "ecc_dbe_aggregate_total": 0,
            "remapped_rows_correctable": 0,
            "remapped_rows_uncorrectable": 0,
            "remap_pending": 0,
            "remap_failure": 0,
            "nvlink_links_up": 18,
            "nvlink_links_total": 18,
            "nvlink_crc_flit_errors_total": 0,
            "nvlink_replay_errors_total": 0,
            "nvlink_recovery_errors_total": 0,
        }

    def rows(self, t: float) -> list[tuple[Any, ...]]:
        """One second of the fleet's GPU samples as add_gpu_rows' arguments, one batch a node."""
        gpus = list(range(GPUS_PER_NODE))
        batches = []
        for n, node in enumerate(self.nodes):
            values = np.full((GPUS_PER_NODE, len(GPU_FIELDS)), np.nan)
            for gpu in gpus:
                for name, value in self.gpu_metrics(node, gpu, t).items():
                    values[gpu, COLUMN[name]] = value
            first_rank = (n % NODES_PER_JOB) * GPUS_PER_NODE
            uuids = [f"GPU-{node}-{gpu}" for gpu in gpus]
            jobs = [f"job{n // NODES_PER_JOB}"] * GPUS_PER_NODE
            batches.append((node, t, gpus, values, uuids, jobs, [first_rank + gpu for gpu in gpus]))
        return batches

    def feed(self, data: RecentData, t: float, *, host: bool = True) -> None:
        """One second of the fleet: GpuSamples (add_gpu), and the host and InfiniBand samples."""
        gpus = list(range(GPUS_PER_NODE))
        for n, node in enumerate(self.nodes):
            job = f"job{n // NODES_PER_JOB}"
            first_rank = (n % NODES_PER_JOB) * GPUS_PER_NODE
            for gpu in gpus:
                data.add_gpu(
                    GpuSample(
                        t=t,
                        node=node,
                        gpu=gpu,
                        metrics=self.gpu_metrics(node, gpu, t),
                        uuid=f"GPU-{node}-{gpu}",
                        job=job,
                        rank=first_rank + gpu,
                    )
                )
            if host:
                data.add_host(
                    HostSample(
                        t=t,
                        node=node,
                        metrics={"cpu_percent": 40.0 + self.rng.random(), "load1": 30.0, "mem_used_bytes": 10**11},
                    )
                )
                data.add_ib(
                    IbSample(
                        t=t,
                        node=node,
                        device="mlx5_0",
                        port=1,
                        metrics={
                            "ib_state": "ACTIVE",
                            "ib_rate_gbps": 400.0,
                            "ib_link_downed_total": 0,
                            "ib_symbol_error_total": 0,
                            "ib_rcv_errors_total": 0,
                            "ib_link_error_recovery_total": 0,
                        },
                    )
                )


def fill_seconds(detectors: list) -> int:
    """Seconds of data after which every detector's window is full."""
    return int(max(d.window_seconds for d in detectors)) + 2


def memory_per_gpu(nodes: int, host: bool) -> float:
    """Bytes RecentData holds per GPU with the window full (tracemalloc)."""
    detectors = default_detectors()
    fleet = Fleet(nodes)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    data = RecentData.for_detectors(detectors)
    seconds = fill_seconds(detectors)
    for second in range(seconds):
        fleet.feed(data, T0 + second, host=host)
    data.window(T0 + seconds - 1, watching_since=T0)  # prunes, as a detection pass does
    fleet = None  # type: ignore[assignment]
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del data
    return held / (nodes * GPUS_PER_NODE)


def detection_pass(nodes: int, passes: int) -> dict[str, float]:
    """Milliseconds of one detection pass (window + every detector) over a full window."""
    detectors = default_detectors()
    fleet = Fleet(nodes)
    data = RecentData.for_detectors(detectors)
    tracker = Tracker(detectors)
    seconds = fill_seconds(detectors)
    fill_started = time.perf_counter()
    for second in range(seconds):
        fleet.feed(data, T0 + second)
    fill_seconds_taken = time.perf_counter() - fill_started
    durations = []
    ingest = []
    for second in range(seconds, seconds + passes):
        now = T0 + second
        started = time.perf_counter()
        fleet.feed(data, now)
        ingest.append(time.perf_counter() - started)
        started = time.perf_counter()
        opened, _ = tracker.evaluate(data.window(now, watching_since=T0))
        durations.append(time.perf_counter() - started)
        assert not opened, f"a healthy fleet raised {[f.summary for f in opened]}"
    durations.sort()
    result = {
        "pass_ms_median": round(statistics.median(durations) * 1000, 2),
        "pass_ms_p90": round(durations[int(len(durations) * 0.9) - 1] * 1000, 2),
        "feed_one_second_ms_median": round(statistics.median(ingest) * 1000, 1),
        "fill_seconds": round(fill_seconds_taken, 1),
    }
    if hasattr(data, "add_gpu_rows"):  # the collector's bulk ingest, where this tree has it
        ingest = []
        for second in range(seconds + passes, seconds + 2 * passes):
            batches = fleet.rows(T0 + second)
            started = time.perf_counter()
            for batch in batches:
                data.add_gpu_rows(*batch)
            ingest.append(time.perf_counter() - started)
        result["add_gpu_rows_one_second_ms_median"] = round(statistics.median(ingest) * 1000, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=300, help="nodes of 8 GPUs timed [default: 300]")
    parser.add_argument("--memory-nodes", type=int, default=8, help="nodes of 8 GPUs measured [default: 8]")
    parser.add_argument("--passes", type=int, default=20, help="detection passes timed [default: 20]")
    args = parser.parse_args()
    result: dict[str, Any] = {"benchmark": "detection_window", "gpus": args.nodes * GPUS_PER_NODE}
    result["recent_data_bytes_per_gpu"] = round(memory_per_gpu(args.memory_nodes, host=False))
    result["recent_data_bytes_per_gpu_with_host_and_ib"] = round(memory_per_gpu(args.memory_nodes, host=True))
    result.update(detection_pass(args.nodes, args.passes))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
