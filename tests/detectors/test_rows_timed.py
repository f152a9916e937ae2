"""RecentData.add_gpu_rows_timed: several agents' dense batches (rows of many nodes and times) in a
few writes hold what add_gpu of the same samples one by one holds, slow-down conditions included."""

from __future__ import annotations

import numpy as np

from fleetwatch.detectors import default_detectors
from fleetwatch.detectors.engine import RecentData
from fleetwatch.records import GpuSample
from fleetwatch.wire import GPU_FIELDS, INTEGER_FIELDS

T0 = 1_700_000_000.0
COLUMN = {name: i for i, name in enumerate(GPU_FIELDS)}


def test_rows_of_many_nodes_and_times_are_the_samples_one_by_one() -> None:
    rng = np.random.default_rng(3)
    by_rows = RecentData.for_detectors(default_detectors())
    by_samples = RecentData.for_detectors(default_detectors())
    nodes, times, gpus, rows, labels = [], [], [], [], []
    for batch in range(4):  # four 5-cycle batches of three nodes, the nodes' clocks apart
        for n in range(3):
            for cycle in range(5):
                t = T0 + batch * 5 + cycle + 0.3 * n
                for gpu in (0, 1):
                    values = np.full(len(GPU_FIELDS), np.nan)
                    values[COLUMN["sm_clock_mhz"]] = 1980 - 15 * rng.integers(0, 40)
                    values[COLUMN["clock_event_reasons"]] = float(rng.choice([0, 0x8, 0x20]))
                    values[COLUMN["power_watts"]] = rng.uniform(100, 700)
                    if gpu == 1:
                        values[COLUMN["ecc_sbe_volatile_total"]] = batch
                    label = (f"GPU-{n}-{gpu}", "job" if batch < 2 else "job-2", gpu)
                    nodes.append(f"n{n}")
                    times.append(t)
                    gpus.append(gpu)
                    rows.append(values)
                    labels.append(label)
                    metrics = {
                        GPU_FIELDS[j]: int(v) if GPU_FIELDS[j] in INTEGER_FIELDS else float(v)
                        for j, v in enumerate(values)
                        if not np.isnan(v)
                    }
                    by_samples.add_gpu(GpuSample(t, f"n{n}", gpu, metrics, uuid=label[0], job=label[1], rank=label[2]))
        # One write per detection drain: this batch of every node, rows in arrival order.
        start = len(rows) - 30
        by_rows.add_gpu_rows_timed(
            nodes[start:],
            np.array(times[start:]),
            gpus[start:],
            np.array(rows[start:]),
            [label[0] for label in labels[start:]],
            [label[1] for label in labels[start:]],
            [label[2] for label in labels[start:]],
        )
    now = max(times)
    a, b = by_rows.window(now, watching_since=T0), by_samples.window(now, watching_since=T0)
    assert sorted(a.gpu) == sorted(b.gpu) and len(a.gpu) == 6
    for key in b.gpu:
        assert list(a.gpu[key]) == list(b.gpu[key]), key
    assert a.nodes == b.nodes
    assert a.nodes["n2"].gpu_last_seen == {0: now, 1: now}
