"""ECC detector: volatile double-bit errors, and single-bit errors arriving faster than DCGM allows.

Two findings per GPU, told apart by `key`:

- `dbe` (critical, reset_gpu): the volatile double-bit (uncorrectable) count is above zero. DCGM's
  memory health watch fails a GPU for any volatile DBE (DcgmHealthWatch::MonitorMemVolatileDbes,
  DCGM_FR_VOLATILE_DBE_DETECTED) and says "Drain the GPU and reset it or reboot the node"
  (DCGM_FR_VOLATILE_DBE_DETECTED_NEXT); reset_gpu is the lighter of the two and the scheduler
  drains a GPU before anyone resets it. Volatile counts start from 0 at every driver load, so the
  condition holds until the GPU is reset, the driver reloaded or the node rebooted, and the
  finding with it: a DBE does not heal by waiting. `start` is the first sample showing the errors
  (the sample where the count rose, when that is still in the window). Following DCGM, a GPU that
  already carries volatile DBEs when watching starts is reported too: it has not been reset since.
- `sbe_rate` (warning, inspect_hardware): at least `sbe_per_window` new single-bit (corrected)
  errors within `sbe_window_seconds`. DCGM's memory health watch warns at 10 volatile SBEs in its
  one-minute window (DCGM_LIMIT_MAX_SBE_RATE, DCGM_FR_VOLATILE_SBE_DETECTED); a climbing SBE rate
  is what the driver reports as XID 92 ("High single-bit ECC error rate", warning and
  inspect_hardware in detectors/xid_catalog.csv). A one-off SBE is healthy noise and never fires.
  The finding holds `sbe_hold_seconds` after the last sample over the limit.

Counters: a value lower than the previous sample's is a reset (driver reload, reboot, GPU reset),
not an error; the sample after it is the new baseline. A field the GPU does not report is absent
and its rule does not run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice
from typing import ClassVar, Iterator, Sequence

from detectors.model import Finding, GpuSample, Window, held_episode

DBE = "ecc_dbe_volatile_total"
SBE = "ecc_sbe_volatile_total"


@dataclass(frozen=True, slots=True)
class EccThresholds:
    # errors; new SBEs in one window that warn: DCGM_LIMIT_MAX_SBE_RATE (dcgm_gpu_hardware_limits.h)
    sbe_per_window: int = 10
    # s; the window SBEs are counted over: DCGM's health watch default (the minute before a check)
    sbe_window_seconds: float = 60.0
    # s; an SBE finding outlives its last over-limit sample by this, so a rate hovering at the
    # limit does not flap (our choice)
    sbe_hold_seconds: float = 120.0
    # s; the newest sample must be this recent to say anything about now; a quiet node is
    # node_silent's finding (as thermal)
    max_sample_age_seconds: float = 30.0
    # samples; a field missing from the newest sample (a failed read) is read from the newest of
    # this many, so one bad read does not close a finding (our choice)
    field_lookback_samples: int = 3

    def __post_init__(self) -> None:
        if self.field_lookback_samples < 1:
            raise ValueError("field_lookback_samples must be at least 1")
        if self.sbe_per_window < 1:
            raise ValueError("sbe_per_window must be at least 1")
        if self.sbe_window_seconds <= 0 or self.max_sample_age_seconds <= 0:
            raise ValueError("sbe_window_seconds and max_sample_age_seconds must be positive")
        if self.sbe_hold_seconds < 0:
            raise ValueError("sbe_hold_seconds must not be negative")


def _plural(count: float, noun: str) -> str:
    return f"{count:g} {noun}" if count == 1 else f"{count:g} {noun}s"


def _newest_index(series: Sequence[GpuSample], now: float) -> int:
    """Index of the newest sample at or before `now` (-1: none); a window's views hide later
    ones, plain lists in tests may not."""
    index = len(series) - 1
    while index >= 0 and series[index].t > now:
        index -= 1
    return index


def _back_from(series: Sequence[GpuSample], index: int) -> Iterator[GpuSample]:
    """The samples from `index` back to the oldest, newest first; a window's views iterate this
    way without indexing into the middle of their deque."""
    return islice(reversed(series), len(series) - 1 - index, None)


def _latest(
    series: Sequence[GpuSample], index: int, name: str, oldest_t: float, lookback: int
) -> int:
    """Index of the newest of the `lookback` samples ending at `index` (none older than
    `oldest_t`) that carries `name`; -1 when none does."""
    if series[index].metrics.get(name) is not None:
        return index  # the fast path: the newest sample has it
    if series[0].metrics.get(name) is None:
        return -1  # nor the oldest: a field the GPU does not report at all
    stop = max(index - lookback, -1)
    while index > stop:
        sample = series[index]
        if sample.t < oldest_t:
            break
        if sample.metrics.get(name) is not None:
            return index
        index -= 1
    return -1


def _ends(
    series: Sequence[GpuSample], newest: int, name: str, lookback: int
) -> tuple[float | int | None, float | int | None]:
    """A counter's oldest and newest readings in the kept series, each taken from the first of the
    `lookback` samples at that end that carries it (None: none does)."""
    last = None
    for i in range(newest, max(newest - lookback, -1), -1):
        last = series[i].metrics.get(name)
        if last is not None:
            break
    first = None
    for i in range(min(lookback, newest + 1)):
        first = series[i].metrics.get(name)
        if first is not None:
            break
    return first, last


def _points(
    series: Sequence[GpuSample], name: str, oldest_t: float, now: float
) -> list[tuple[float, float]]:
    """(t, value) of the samples in [oldest_t, now] that carry `name`, oldest first; read from the
    newest end, so only the window's tail of a long series is touched."""
    points = []
    for sample in reversed(series):
        if sample.t > now:
            continue
        if sample.t < oldest_t:
            break
        value = sample.metrics.get(name)
        if value is not None:
            points.append((sample.t, float(value)))
    points.reverse()
    return points


def _window_counts(
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
        while base < i and points[base + 1][0] <= t - window_seconds:
            base += 1
        counts.append(cumulative[i] - cumulative[base])
        bases.append(base)
    return cumulative, counts, bases


@dataclass(slots=True)
class EccDetector:
    """GPU samples -> per GPU a `dbe` finding (volatile DBEs) and an `sbe_rate` finding."""

    thresholds: EccThresholds = field(default_factory=EccThresholds)
    id: ClassVar[str] = "ecc"

    @property
    def window_seconds(self) -> float:
        t = self.thresholds
        return max(t.sbe_window_seconds + t.sbe_hold_seconds, t.max_sample_age_seconds)

    def detect(self, window: Window) -> list[Finding]:
        now = window.now
        findings = []
        for (node, gpu), series in window.gpu.items():
            newest = _newest_index(series, now)
            fresh_t = now - self.thresholds.max_sample_age_seconds
            if newest < 0 or series[newest].t < fresh_t:
                continue
            lookback = self.thresholds.field_lookback_samples
            index = _latest(series, newest, DBE, fresh_t, lookback)
            if index >= 0 and series[index].metrics[DBE] > 0:
                findings.append(self._dbe(node, gpu, series, index, now))
            # Fast path: a counter that reads the same at both ends of the kept series has not
            # moved (a reset that climbed back to the same value in between is missed).
            first_sbe, last_sbe = series[0].metrics.get(SBE), series[newest].metrics.get(SBE)
            if first_sbe is None or last_sbe is None:  # a failed read at an end: look further in
                first_sbe, last_sbe = _ends(series, newest, SBE, lookback)
            if first_sbe != last_sbe:
                state = window.nodes.get(node)
                boot_seen_at = state.boot_seen_at if state is not None else None
                finding = self._sbe_rate(node, gpu, series, now, boot_seen_at)
                if finding is not None:
                    findings.append(finding)
        findings.sort(key=lambda f: (f.start, f.node or "", f.gpu, f.key))
        return findings

    def _dbe(
        self, node: str, gpu: int, series: Sequence[GpuSample], index: int, now: float
    ) -> Finding:
        total = float(series[index].metrics[DBE])
        # Walk back over the run of samples that show these errors: it ends (going back) at a
        # sample with none, at a reset (an older value above a newer one) or at the window's edge.
        oldest_t = now - self.window_seconds
        start = series[index].t
        newer = total
        baseline = None
        for sample in _back_from(series, index):
            if sample.t < oldest_t:
                break
            value = sample.metrics.get(DBE)
            if value is None:
                continue
            if value <= 0:
                baseline = 0.0
                break
            if value > newer:
                break  # reset between this sample and the newer one: the run began after it
            start = sample.t
            newer = value
        evidence: dict[str, object] = {"ecc_dbe_volatile_total": total}
        if baseline is not None:
            new = total - baseline
            evidence["new_dbe"] = new
            what = f"{_plural(new, 'new double-bit ECC error')} (volatile total {total:g})"
        else:
            what = (
                f"{_plural(total, 'double-bit ECC error')} since the driver loaded "
                f"(volatile total {total:g})"
            )
        return Finding(
            detector=self.id,
            severity="critical",
            action="reset_gpu",
            summary=f"GPU {gpu} on {node}: {what}",
            start=start,
            node=node,
            gpu=gpu,
            evidence=evidence,
            key="dbe",
        )

    def _sbe_rate(
        self,
        node: str,
        gpu: int,
        series: Sequence[GpuSample],
        now: float,
        boot_seen_at: float | None,
    ) -> Finding | None:
        t = self.thresholds
        oldest_t = now - self.window_seconds
        if boot_seen_at is not None:
            oldest_t = max(oldest_t, boot_seen_at)  # errors from before a reboot are history
        points = _points(series, SBE, oldest_t, now)
        if len(points) < 2:
            return None
        cumulative, counts, bases = _window_counts(points, t.sbe_window_seconds)
        over = [i for i, count in enumerate(counts) if count >= t.sbe_per_window]
        if not over:
            return None
        times = [points[i][0] for i in over]
        episode = held_episode(times, now, t.sbe_hold_seconds, boot_seen_at)
        if not episode:
            return None
        first = over[len(over) - len(episode)]
        base = bases[first]
        last = len(points) - 1
        new = cumulative[last] - cumulative[base]  # from the episode's first window to now
        seconds = points[last][0] - points[base][0]
        return Finding(
            detector=self.id,
            severity="warning",
            action="inspect_hardware",
            summary=(
                f"GPU {gpu} on {node}: {_plural(new, 'single-bit ECC error')} in the last "
                f"{seconds:g} s "
                f"(limit {t.sbe_per_window} in {t.sbe_window_seconds:g} s)"
            ),
            start=points[first][0],
            node=node,
            gpu=gpu,
            evidence={
                "sbe_new": new,
                "seconds": seconds,
                "sbe_in_window": counts[last],
                "window_seconds": t.sbe_window_seconds,
                "limit": t.sbe_per_window,
                "ecc_sbe_volatile_total": points[last][1],
            },
            key="sbe_rate",
        )

