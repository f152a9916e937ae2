"""Reading a GPU's counter and flag fields from its sample series, for the hardware detectors.

Shared by ecc, pcie, nvlink, row_remap and retired_pages, which judge the same kind of fields the
same way (and `float_reading` by every detector that puts a field in a finding):

- Counters (ECC, PCIe replay and NVLink error totals) only rise while the driver stays loaded. A
  value lower than the previous sample's is a reset (driver reload, GPU reset, reboot), not a
  change, and the sample after it is the new baseline; counts from before the node's last reboot
  are history.
- Flags (remap pending, retirement pending, ...) are 1 while set; a finding starts where the run
  of set readings that reaches the newest one began.
- A field the GPU does not report is absent from every sample; one missing from a single sample is
  a failed read, so the newest reading is taken from the newest of a few samples.

Series are a window's table series (detectors.table.TableSeries), oldest first, restricted to
the samples that still keep the detector's fields, so their first sample is the oldest reading of
those fields. The helpers read fields as lists (`values`), one column at a time, and materialise
a sample only where a finding needs its metrics. A healthy GPU never gets here: each detector
judges the whole fleet's newest readings with numpy first and hands these helpers only the GPUs
that may have something to report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice

import numpy as np

from fleetwatch.detectors.model import Window, held_episode
from fleetwatch.detectors.table import COLUMN, GpuTable, TableSeries
from fleetwatch.records import GpuSample

Metrics = Mapping[str, float | int]


# --- where to read -------------------------------------------------------------------------------


def newest_fresh_index(series: TableSeries, now: float, fresh_t: float) -> int:
    """Index of the newest sample at or before `now`, or -1 when there is none or it is older than
    `fresh_t` (a stale series says nothing about now)."""
    times = series.times()
    index = len(times) - 1
    while index >= 0:
        t = times[index]
        if t <= now:
            return index if t >= fresh_t else -1
        index -= 1
    return -1


def back_from(series: Sequence[GpuSample], index: int) -> Iterator[GpuSample]:
    """The samples from `index` back to the oldest, newest first."""
    return islice(reversed(series), len(series) - 1 - index, None)


def newest_carrying(series: TableSeries, index: int, name: str, oldest_t: float, lookback: int) -> int:
    """Index of the newest of the `lookback` samples ending at `index` (none older than
    `oldest_t`) that carries `name`; -1 when none does."""
    if series.values(name)[index] is not None:
        return index
    return newest_carrying_all(series, index, (name,), oldest_t, lookback)


def newest_carrying_all(
    series: TableSeries,
    index: int,
    names: tuple[str, ...],
    oldest_t: float,
    lookback: int,
) -> int:
    """Index of the newest of the `lookback` samples ending at `index` (none older than
    `oldest_t`) that carries all of `names`; -1 when none does."""
    columns = [series.values(name) for name in names]
    if all(column[index] is not None for column in columns):
        return index
    for column in columns:
        if column[index] is None and column[0] is None:
            return -1  # nor the oldest: a field the GPU does not report at all
    times = series.times()
    stop = max(index - lookback, -1)
    while index > stop:
        if times[index] < oldest_t:
            break
        if all(column[index] is not None for column in columns):
            return index
        index -= 1
    return -1


def newest_readings(
    table: GpuTable, positions: np.ndarray, newest: np.ndarray, names: tuple[str, ...]
) -> tuple[np.ndarray, ...]:
    """Fields `names` at each GPU's newest sample (NaN where that sample lacks one)."""
    return tuple(table.values(name, newest, positions) for name in names)


def unsettled(table: GpuTable, names: tuple[str, ...], fields: tuple[str, ...]) -> np.ndarray:
    """Per GPU, whether newest_carrying_all(names) must look back: the newest sample lacks one
    of `names` that the oldest sample keeping `fields` has (a failed read). Where the oldest lacks
    it too, the GPU does not report the field at all and newest_carrying_all gives up at once."""
    newest = table.newest_rows
    out = np.zeros(len(table), dtype=bool)
    for name in names:
        gone = np.isnan(newest[:, COLUMN[name]])
        if np.count_nonzero(gone):
            out |= gone & ~np.isnan(table.first_column(name, fields))
    return out


def ends_moved(table: GpuTable, name: str, fields: tuple[str, ...], lookback: int) -> np.ndarray:
    """Per GPU, whether counter `name` may have moved (counter_moved) in its series of `fields`,
    judged for the whole fleet at once: its reading at the oldest sample against the newest. Where
    an end has no reading, True if the first `lookback` samples at either end have one (a failed
    read: counter_moved decides), False if none does (a counter the GPU does not keep)."""
    old, new = table.first_column(name, fields), table.newest_rows[:, COLUMN[name]]
    moved = old != new  # NaN at an end counts as moved: refined below
    either = (old != old) | (new != new)
    which = either.nonzero()[0]
    if len(which):
        first = table.field_first(fields, which)
        newest = table.end[which] - 1
        offsets = np.arange(lookback)
        heads = np.minimum(first[:, None] + offsets, newest[:, None])
        tails = np.maximum(newest[:, None] - offsets, first[:, None])
        read = ~np.isnan(table.values(name, heads, which)) | ~np.isnan(table.values(name, tails, which))
        moved[which] = read.any(axis=1)
    return moved


def float_reading(metrics: Metrics, name: str) -> float | None:
    """Field `name` of one sample as a float; None when the sample does not carry it."""
    value = metrics.get(name)
    return None if value is None else float(value)


def node_boot_seen_at(window: Window, node: str) -> float | None:
    """When the node's current boot was first seen (None: no reboot seen or the node unknown)."""
    state = window.nodes.get(node)
    return state.boot_seen_at if state is not None else None


# --- counters ------------------------------------------------------------------------------------


def counter_ends(series: TableSeries, newest: int, name: str, lookback: int) -> tuple[float | None, float | None]:
    """A counter's oldest and newest readings in the kept series, each taken from the first of the
    `lookback` samples at that end that carries it (None: none does)."""
    values = series.values(name)
    last = None
    for i in range(newest, max(newest - lookback, -1), -1):
        last = values[i]
        if last is not None:
            break
    first = None
    for i in range(min(lookback, newest + 1)):
        first = values[i]
        if first is not None:
            break
    return first, last


def counter_moved(series: TableSeries, newest: int, name: str, lookback: int) -> bool:
    """Whether counter `name` may have moved in the kept series, judged from its two ends: a
    counter that reads the same at both ends has not (a reset that climbed back to the same value
    in between is missed)."""
    values = series.values(name)
    first, last = values[0], values[newest]
    if first is None or last is None:  # a failed read at an end: look a little further in
        first, last = counter_ends(series, newest, name, lookback)
    return first != last


def counter_points(series: TableSeries, name: str, oldest_t: float, now: float) -> list[tuple[float, float]]:
    """(t, value) of the samples in [oldest_t, now] that carry `name`, oldest first."""
    times, values = series.times(), series.values(name)
    points = []
    for i in range(len(times) - 1, -1, -1):
        t = times[i]
        if t > now:
            continue
        if t < oldest_t:
            break
        value = values[i]
        if value is not None:
            points.append((t, value))
    points.reverse()
    return points


def window_counts(
    points: Sequence[tuple[float, float]], window_seconds: float
) -> tuple[list[float], list[float], list[int]]:
    """Per point: the counter's increase since the first point, its increase over the
    `window_seconds` before it, and the index of the point that is measured from. A decrease is a
    reset and adds nothing: the value after it is the new baseline."""
    cumulative = []
    total = 0.0
    previous = None
    for _, value in points:
        if previous is not None and value > previous:
            total += value - previous
        previous = value
        cumulative.append(total)
    counts, bases = [], []
    base = 0
    for i, (t, _) in enumerate(points):
        window_start = t - window_seconds
        while base < i and points[base + 1][0] <= window_start:
            base += 1
        counts.append(cumulative[i] - cumulative[base])
        bases.append(base)
    return cumulative, counts, bases


@dataclass(slots=True)
class CounterWindows:
    """A counter's readings over a stretch of time and, at each, its increase over a sliding
    window (what `window_counts` makes of them)."""

    points: list[tuple[float, float]]  # (t, value) of the samples that carry it, oldest first
    cumulative: list[float]  # per point: the increase since the first point
    counts: list[float]  # per point: the increase over the window that ends at it
    bases: list[int]  # per point: the index of the point its window is measured from


def counter_windows(
    series: TableSeries,
    name: str,
    oldest_t: float,
    now: float,
    window_seconds: float,
    boot_seen_at: float | None,
) -> CounterWindows | None:
    """Counter `name` in [oldest_t, now], after the node's last reboot, with its increase over
    `window_seconds` at each reading; None with fewer than two readings (nothing to measure)."""
    if boot_seen_at is not None:
        oldest_t = max(oldest_t, boot_seen_at)  # counts from before a reboot are history
    points = counter_points(series, name, oldest_t, now)
    if len(points) < 2:
        return None
    cumulative, counts, bases = window_counts(points, window_seconds)
    return CounterWindows(points, cumulative, counts, bases)


@dataclass(slots=True)
class CounterEpisode:
    """A counter over its limit, still held at `now` (see `held_over_limit`)."""

    start: float  # the first reading over the limit in the episode
    increase: float  # the increase from the start of that reading's window to the newest reading
    seconds: float  # the time that increase took


def held_over_limit(
    windows: CounterWindows,
    over: Sequence[int],
    now: float,
    hold_seconds: float,
    boot_seen_at: float | None,
) -> CounterEpisode | None:
    """The episode of readings over the limit (`over`: their indexes in `windows.points`,
    ascending) still held at `now` (detectors.model.held_episode), or None."""
    if not over:
        return None
    points = windows.points
    episode = held_episode([points[i][0] for i in over], now, hold_seconds, boot_seen_at)
    if not episode:
        return None
    first = over[len(over) - len(episode)]
    base = windows.bases[first]
    return CounterEpisode(
        start=points[first][0],
        increase=windows.cumulative[-1] - windows.cumulative[base],
        seconds=points[-1][0] - points[base][0],
    )


# --- flags ---------------------------------------------------------------------------------------


def start_of_run(
    series: TableSeries,
    index: int,
    oldest_t: float,
    names: tuple[str, ...],
    holds: Callable[[Metrics], bool],
) -> float:
    """The time of the first sample of the run of samples, ending at `index`, for which `holds`
    (given the sample's readings of `names`); a sample carrying none of `names` (a failed read)
    does not break the run, the window's edge does."""
    times = series.times()
    columns = [(name, series.values(name)) for name in names]
    start = times[index]
    for i in range(index - 1, -1, -1):
        if times[i] < oldest_t:
            break
        metrics: dict[str, float | int] = {}
        for name, column in columns:
            value = column[i]
            if value is not None:
                metrics[name] = value
        if not metrics:
            continue  # carries none of them: a failed read, which neither holds nor breaks
        if not holds(metrics):
            break
        start = times[i]
    return start


def flag_raised(
    series: TableSeries, index: int, name: str, oldest_t: float, lookback: int
) -> tuple[Metrics, float] | None:
    """When flag `name` is set on its newest reading (from the newest of the `lookback` samples
    ending at `index` that carries it): that sample's metrics and the time the run of set readings
    began; None when it is clear or not read."""
    value = series.values(name)[index]
    if value is None:  # off the fast path: a failed read, or a flag the GPU does not report
        index = newest_carrying_all(series, index, (name,), oldest_t, lookback)
        if index < 0:
            return None
        value = series.values(name)[index]
    if value is None or value < 1:
        return None
    return series[index].metrics, start_of_run(series, index, oldest_t, (name,), lambda m: m[name] >= 1)
