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

import math
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


@dataclass(slots=True)
class CounterWindows:
    """A counter's readings over a stretch of time and, at each, its increase over a sliding
    window, as arrays (one entry per reading, oldest first). A decrease is a reset and adds
    nothing: the value after it is the new baseline."""

    t: np.ndarray  # the times of the samples that carry the counter
    values: np.ndarray  # its readings there
    cumulative: np.ndarray  # the increase since the first reading
    counts: np.ndarray  # the increase over the window that ends at each reading
    bases: np.ndarray  # the index of the reading each window is measured from

    def over(self, limit: float, *, strictly: bool = False) -> list[int]:
        """Indexes of the readings whose window count reaches `limit` (exceeds it: `strictly`)."""
        return np.flatnonzero(self.counts > limit if strictly else self.counts >= limit).tolist()

    def increase_since(self, index: int) -> float:
        """The increase from reading `index` to the newest."""
        return float(self.cumulative[-1] - self.cumulative[index])


class FleetCounterWindows:
    """CounterWindows of many GPUs at once: counter `name` in [oldest_t, now] of each GPU's series
    of `fields` (after its node's last reboot), with its increase over `window_seconds` at each
    reading; `get(p)` gives GPU p's (None with fewer than two readings: nothing to measure).

    The GPUs that get here are those whose counters move, and on a fleet with a few noisy links that
    is hundreds every pass: their readings are gathered, filtered and summed in one go. Counters are
    whole numbers, so a running total taken across GPUs and differenced is exact."""

    def __init__(
        self,
        table: GpuTable,
        positions: Sequence[int],
        name: str,
        fields: tuple[str, ...],
        oldest_t: float,
        now: float,
        window_seconds: float,
        boot_seen_at: Sequence[float | None],
    ) -> None:
        self._windows: dict[int, CounterWindows] = {}
        if not len(positions):
            return
        where = np.asarray(positions, dtype=np.int64)
        lo, end = table.field_first(fields, where), table.end[where]
        lengths = np.maximum(end - lo, 0)
        seg = np.repeat(np.arange(len(where)), lengths)
        idx = lo[seg] + np.arange(len(seg)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        t, values = table.times(idx, where[seg]), table.values(name, idx, where[seg])
        # Counts from before a reboot are history.
        since = np.array([oldest_t if b is None else max(oldest_t, b) for b in boot_seen_at])
        keep = (t >= since[seg]) & (t <= now) & (values == values)
        t, values, seg = t[keep], values[keep], seg[keep]
        counts = np.bincount(seg, minlength=len(where))
        starts = np.cumsum(counts) - counts
        rises = np.diff(values, prepend=values[:1])
        rises[starts[counts > 0]] = 0.0  # each GPU's first reading starts its own total
        total = np.cumsum(np.maximum(rises, 0.0, out=rises))  # a decrease is a reset: adds nothing
        for i in np.flatnonzero(counts >= 2).tolist():
            a, b = int(starts[i]), int(starts[i] + counts[i])
            times = t[a:b]
            cumulative = total[a:b] - total[a]
            # Each window is measured from the last reading at or before its start (the first
            # reading when none is): an earlier reading than its own, the window being positive.
            bases = np.searchsorted(times, times - window_seconds, side="right") - 1
            np.maximum(bases, 0, out=bases)
            windows = CounterWindows(times, values[a:b], cumulative, cumulative - cumulative[bases], bases)
            self._windows[int(where[i])] = windows

    def get(self, p: int) -> CounterWindows | None:
        return self._windows.get(p)

    def may_hold(self, limit: float | Mapping[int, float], since_t: float, *, strictly: bool = False) -> set[int]:
        """The GPUs with a reading at or after `since_t` whose window count reaches `limit` (one
        for all, or per GPU; exceeds it: `strictly`). An episode still held at now needs its last
        occurrence within the hold (held_episode), so with since_t = now - hold_seconds the other
        GPUs have none: counters that move a little, under their limit, end here."""
        found = set()
        for p, windows in self._windows.items():
            bound = limit if isinstance(limit, float | int) else limit.get(p, -math.inf)
            counts = windows.counts[windows.t >= since_t]
            if np.count_nonzero(counts > bound if strictly else counts >= bound):
                found.add(p)
        return found


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
    """The episode of readings over the limit (`over`: their indexes in `windows`,
    ascending) still held at `now` (detectors.model.held_episode), or None."""
    if not over:
        return None
    times = windows.t.tolist()
    episode = held_episode([times[i] for i in over], now, hold_seconds, boot_seen_at)
    if not episode:
        return None
    first = over[len(over) - len(episode)]
    base = int(windows.bases[first])
    return CounterEpisode(
        start=times[first],
        increase=windows.increase_since(base),
        seconds=times[-1] - times[base],
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
