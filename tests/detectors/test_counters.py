"""Counter windows and series reads over the ring buffers: the numpy paths against plain Python.

The hardware detectors (ecc, pcie, nvlink) read every GPU whose counter moved through these, each
pass; they must give the same numbers as a running total over the readings would, through ring
wrap-around, resets, failed reads and fields kept less long than others.
"""

from __future__ import annotations

import random

import pytest

from fleetwatch.detectors.counters import FleetCounterWindows
from fleetwatch.detectors.table import GpuStore, row_of

COUNTER = "pcie_replay_total"
OTHER = "nvlink_replay_errors_total"
T0 = 1_700_000_000.0


def reference(points: list[tuple[float, float]], window_seconds: float) -> tuple[list[float], list[float], list[int]]:
    """The increase since the first reading, over the window ending at each, and its base index."""
    cumulative, total, previous = [], 0.0, None
    for _, value in points:
        if previous is not None and value > previous:
            total += value - previous
        previous = value
        cumulative.append(total)
    counts, bases, base = [], [], 0
    for i, (t, _) in enumerate(points):
        while base < i and points[base + 1][0] <= t - window_seconds:
            base += 1
        counts.append(cumulative[i] - cumulative[base])
        bases.append(base)
    return cumulative, counts, bases


def fill(
    seed: int, samples: int, capacity: int, gpus: int = 1
) -> tuple[GpuStore, list[list[tuple[float, dict[str, float]]]]]:
    """GPUs whose counter climbs in odd steps, with resets and failed reads; the OTHER field kept
    half as long, so its older readings are gone from the ring."""
    rng = random.Random(seed)
    store = GpuStore({COUNTER: capacity, OTHER: capacity // 2}, max_samples=capacity)
    written: list[list[tuple[float, dict[str, float]]]] = []
    for gpu in range(gpus):
        value, series = rng.choice([0.0, 1e6]), []
        for i in range(samples - rng.randrange(5)):
            t = T0 + i + rng.choice([0.0, 0.25])
            value = 0.0 if rng.random() < 0.03 else value + rng.choice([0, 0, 0, 1, 2.5, 7])
            metrics = {OTHER: float(i)}
            if rng.random() > 0.1:  # a failed read now and then
                metrics[COUNTER] = value
            store.add(("n1", gpu), t, row_of(metrics))
            series.append((t, metrics))
        written.append(series)
    return store, written


@pytest.mark.parametrize("seed", range(6))
def test_series_reads_match_what_was_written_through_wraparound(seed: int) -> None:
    capacity = 40
    store, (written,) = fill(seed, samples=137, capacity=capacity)
    now = written[-1][0]
    table = store.table(now, prune=False)
    series = table.series(0)
    kept = written[-len(series) :]
    assert series.t.tolist() == [t for t, _ in kept]
    assert series.values(COUNTER) == [m.get(COUNTER) for _, m in kept]
    # OTHER is kept for fewer samples than the series spans: absent (None) before that.
    other = series.values(OTHER)
    assert other[-1] == float(len(written) - 1)
    assert other.count(None) == len(series) - sum(1 for v in other if v is not None) > 0
    assert series.column(OTHER).shape == (len(series),)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("window_seconds", [0.5, 5.0, 12.0, 1000.0])
def test_counter_windows_match_a_running_total_per_gpu(seed: int, window_seconds: float) -> None:
    store, written = fill(seed, samples=90, capacity=200, gpus=4)
    now = max(series[-1][0] for series in written) - 3
    table = store.table(now, prune=False)
    oldest_t = T0 + 17.0
    boots = [None, T0 + 40.0, None, now - 0.5]  # the last: fewer than two readings after it
    fleet = FleetCounterWindows(table, [0, 1, 2, 3], COUNTER, (COUNTER,), oldest_t, now, window_seconds, boots)
    for p, (series, boot) in enumerate(zip(written, boots)):
        since = oldest_t if boot is None else max(oldest_t, boot)
        points = [(t, m[COUNTER]) for t, m in series if COUNTER in m and since <= t <= now]
        windows = fleet.get(table.position(("n1", p)))  # type: ignore[arg-type]
        if len(points) < 2:
            assert windows is None
            continue
        cumulative, counts, bases = reference(points, window_seconds)
        assert windows is not None
        assert windows.t.tolist() == [t for t, _ in points]
        assert windows.values.tolist() == [v for _, v in points]
        assert windows.cumulative.tolist() == cumulative  # the same floats, not just close
        assert windows.counts.tolist() == counts
        assert windows.bases.tolist() == bases
        limit = max(counts)
        assert windows.over(limit) == [i for i, c in enumerate(counts) if c >= limit]
        assert windows.over(limit, strictly=True) == []


def test_counter_windows_of_no_gpus() -> None:
    store, _ = fill(1, samples=10, capacity=100)
    table = store.table(T0 + 100, prune=False)
    assert FleetCounterWindows(table, [], COUNTER, (COUNTER,), T0, T0 + 100, 10.0, []).get(0) is None
