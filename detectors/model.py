"""What a detector sees and is: the window of recent data, node state, the Detector protocol, and
the shared sustained-condition rule. The records themselves live in `fleetwatch.records`."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, Protocol, TypeVar

import numpy as np

from fleetwatch.detectors.table import Condition, GpuTable, StepTable, step_table_of, table_of
from fleetwatch.records import Event, Finding, GpuSample, HostSample, IbSample, Step


def fmt_number(value: float) -> str:
    """A number for a finding's summary: at most one decimal, no trailing zeros (12, 3.5)."""
    return f"{round(value, 1):g}"


def fmt_count(count: float, noun: str) -> str:
    """A count and its noun for a finding's summary: "1 PCIe replay", "3 PCIe replays"."""
    return f"{count:g} {noun}" if count == 1 else f"{count:g} {noun}s"


@dataclass(frozen=True, slots=True)
class NodeState:
    node: str
    last_seen: float | None  # time of the newest data from this node
    sampling_interval_seconds: float
    gpu_count: int | None = None
    boot_id: str | None = None
    boot_seen_at: float | None = None  # when the current boot_id was first seen
    # GPU index -> time of its newest sample, kept (unlike the samples) for as long as the node is
    # known, across reboots: lets gpu_lost notice a GPU that stopped reporting. A live read-only
    # view where the engine provides it; empty where the caller does not know.
    gpu_last_seen: Mapping[int, float] = field(default_factory=lambda: MappingProxyType({}), compare=False)
    # (InfiniBand device, port) -> time of its newest sample in state ACTIVE, kept like
    # gpu_last_seen: lets infiniband tell a port that went down from one never used.
    ib_last_active: Mapping[tuple[str, int], float] = field(default_factory=lambda: MappingProxyType({}), compare=False)


# s; a node's interval where it is unknown or nonsensical (0 or negative): the agent's default
# sampling_interval_seconds (agent/config.py).
FALLBACK_SAMPLING_INTERVAL_SECONDS = 1.0


def sampling_interval_seconds(state: NodeState | None) -> float:
    """The node's sampling interval, or FALLBACK_SAMPLING_INTERVAL_SECONDS where not known."""
    interval_seconds = None if state is None else state.sampling_interval_seconds
    if not interval_seconds or interval_seconds <= 0:
        return FALLBACK_SAMPLING_INTERVAL_SECONDS
    return interval_seconds


@dataclass(frozen=True, slots=True)
class Window:
    """Recent data as of `now`; every sequence is oldest first."""

    now: float
    gpu: Mapping[tuple[str, int], Sequence[GpuSample]]
    host: Mapping[str, Sequence[HostSample]]
    events: Sequence[Event]
    steps: Sequence[Step]
    nodes: Mapping[str, NodeState]
    # When the watcher (collector process or replay) began receiving data; lets node_silent tell
    # "the node went quiet" from "we only just started listening".
    watching_since: float
    # InfiniBand ports by (node, device, port), oldest first; empty where the caller has none.
    ib: Mapping[tuple[str, str, int], Sequence[IbSample]] = field(default_factory=lambda: MappingProxyType({}))
    # `gpu` as arrays (detectors.table), which the detectors read; RecentData hands it out, and
    # gpu_table() builds it from `gpu` for a Window made by hand.
    table: GpuTable | None = field(default=None, compare=False, repr=False)
    # `steps` as columns (detectors.table.StepTable), likewise: step_table() builds it by hand.
    step_table: StepTable | None = field(default=None, compare=False, repr=False)


def step_table(window: Window) -> StepTable:
    """The window's steps as columns: RecentData's, or built (once) from `window.steps`."""
    table = window.step_table
    if table is None:
        table = step_table_of(window.steps)
        object.__setattr__(window, "step_table", table)  # a cache, as gpu_table's
    return table


def gpu_table(window: Window) -> GpuTable:
    """The window's GPU samples as a table: RecentData's, or one built (once) from `window.gpu`."""
    table = window.table
    if table is None or table.now != window.now:
        table = table_of(window.gpu, window.now)
        object.__setattr__(window, "table", table)  # a cache: Windows are frozen, not their reads
    return table


class Detector(Protocol):
    """A detector is pure: it reads a Window and returns the findings that hold at window.now.

    Optional attributes RecentData.for_detectors reads to keep no more than detectors need:
    `gpu_fields` (GPU field name -> seconds of full-resolution history; without it, every field
    for `gpu_window_seconds`, default window_seconds), `gpu_conditions` (detectors.table
    Conditions tested on every sample as it arrives), `event_window_seconds`, `step_window_seconds`
    (step reports, default window_seconds). Detectors read GPU
    samples through `gpu_table(window)`, the arrays behind `window.gpu`.
    """

    # The detector's name in findings and alerts; a class attribute, read from the class too.
    id: ClassVar[str]

    @property
    def window_seconds(self) -> float:
        """How much history (seconds before now) this detector needs in the window."""
        ...

    def detect(self, window: Window) -> list[Finding]: ...


def held_episode(
    times: Sequence[float], now: float, hold_seconds: float, boot_seen_at: float | None
) -> Sequence[float]:
    """The occurrences (sorted times, all <= now) of the episode still held at `now`, or empty.

    An episode ends when the node reboots after an occurrence (boot_seen_at later than it) or when
    more than `hold_seconds` pass without a new one; a later occurrence starts a new episode.
    """
    if not times:
        return ()
    last = times[-1]
    if (boot_seen_at is not None and boot_seen_at > last) or now - last > hold_seconds:
        return ()
    first = len(times) - 1
    while first > 0:
        previous = times[first - 1]
        rebooted_between = boot_seen_at is not None and boot_seen_at > previous
        if rebooted_between or times[first] - previous > hold_seconds:
            break
        first -= 1
    return times[first:]


S = TypeVar("S", bound=GpuSample)


@dataclass(frozen=True, slots=True)
class Sustained:
    """How a per-sample condition held over a GPU's recent samples (see `sustained`)."""

    start: float  # the first sample of the episode that shows the condition
    latest: GpuSample  # the newest sample that shows the condition
    by: str  # "recent": the short window's fraction; "long": the long window's minutes
    recent_hits: int  # samples showing the condition in the recent window
    recent_samples: int  # samples in the recent window
    long_hit_buckets: int | None  # buckets of the long window with the condition (None: not read)
    long_buckets: int  # buckets in the long window

    @property
    def how_long(self) -> str:
        """How it held, for a finding's summary: " for 15 s (15 of 16 samples)" or " in 6 of the
        last 10 minutes"."""
        if self.by == "recent":
            return (
                f" for {round(self.latest.t - self.start, 1):g} s ({self.recent_hits} of {self.recent_samples} samples)"
            )
        return f" in {self.long_hit_buckets} of the last {self.long_buckets} minutes"


def sustained(
    series: Sequence[S],
    now: float,
    condition: Callable[[S], bool],
    *,
    clear_samples: int,
    max_sample_age_seconds: float,
    recent_seconds: float,
    recent_fraction: float,
    recent_min_seconds: float,
    long_seconds: float,
    long_bucket_seconds: float,
    long_min_buckets: int,
) -> Sustained | None:
    """Whether `condition` holds, sustained, on an oldest-first series as of `now`, or None.

    It holds when one of the newest `clear_samples` samples (none older than
    `max_sample_age_seconds`) shows it (a GPU clear for that many samples in a row has recovered),
    and either
    - recent: at least `recent_fraction` of the samples of the last `recent_seconds` show it, the
      first and the newest of those at least `recent_min_seconds` apart (a short spike does not);
    - long: it shows in at least `long_min_buckets` of the `long_bucket_seconds` buckets of the last
      `long_seconds` (gpud's rule for intermittent slowdowns: 6 of the last 10 minutes).

    Detectors apply the rule to a window's table (SustainedThresholds.held_gpus), where the long
    window reads only the times of the samples that showed the condition; this form takes the
    samples themselves.
    """
    visible = [(i, sample) for i, sample in enumerate(series) if sample.t <= now]
    shown = {i for i, sample in visible if condition(sample)}
    oldest_fresh = now - max_sample_age_seconds
    recent = []
    for i, sample in reversed(visible):
        if sample.t < oldest_fresh and sample.t <= now - recent_seconds:
            break
        recent.append((sample.t, i in shown, i))
    long_from = now - long_seconds
    long_hits = [(sample.t, i) for i, sample in reversed(visible) if i in shown and sample.t > long_from]
    held = sustained_rule(
        recent,
        long_hits,
        now,
        clear_samples=clear_samples,
        max_sample_age_seconds=max_sample_age_seconds,
        recent_seconds=recent_seconds,
        recent_fraction=recent_fraction,
        recent_min_seconds=recent_min_seconds,
        long_seconds=long_seconds,
        long_bucket_seconds=long_bucket_seconds,
        long_min_buckets=long_min_buckets,
    )
    if held is None:
        return None
    latest, start, by, recent_hits, recent_samples, long_hit_buckets, long_buckets = held
    return Sustained(start, series[latest], by, recent_hits, recent_samples, long_hit_buckets, long_buckets)


_Held = tuple[int, float, str, int, int, int | None, int]


def sustained_rule(
    recent: Sequence[tuple[float, bool, int]],
    long_hits: Sequence[tuple[float, int]],
    now: float,
    *,
    clear_samples: int,
    max_sample_age_seconds: float,
    recent_seconds: float,
    recent_fraction: float,
    recent_min_seconds: float,
    long_seconds: float,
    long_bucket_seconds: float,
    long_min_buckets: int,
) -> _Held | None:
    """The `sustained` rule on one GPU: `recent` is (t, shows it, id) of its newest samples at or
    before now, newest first, down to at least the older of the recent window and the freshness
    limit; `long_hits` (t, id) of the samples in the long window that show it, newest first.
    Returns (id of the latest sample showing it, start, by, recent hits, recent samples, long hit
    buckets, long buckets) or None."""
    oldest_fresh = now - max_sample_age_seconds
    gate = False
    for clear, (t, shows, _) in enumerate(recent):
        if t < oldest_fresh or clear >= clear_samples:
            break
        if shows:
            gate = True
            break
    if not gate:
        return None

    recent_from = now - recent_seconds
    recent_samples = recent_hits = 0
    latest: int | None = None
    latest_t = 0.0
    oldest_recent_hit: float | None = None
    start: float | None = None
    clear_run = 0
    in_episode = True
    for t, shows, i in recent:
        if t <= recent_from:
            break
        recent_samples += 1
        if shows:
            recent_hits += 1
            oldest_recent_hit = t
            if latest is None:
                latest, latest_t = i, t
            if in_episode:
                start, clear_run = t, 0
        elif in_episode:
            clear_run += 1
            in_episode = clear_run < clear_samples
    long_buckets = max(1, math.ceil(long_seconds / long_bucket_seconds - 1e-9))
    if (
        latest is not None
        and oldest_recent_hit is not None
        and start is not None
        and recent_hits >= recent_fraction * recent_samples
        and latest_t - oldest_recent_hit >= recent_min_seconds
    ):
        return latest, start, "recent", recent_hits, recent_samples, None, long_buckets

    # Intermittent: the episode is the whole stretch of the long window with the condition, so
    # it starts at the oldest sample there that shows it.
    long_from = now - long_seconds
    hit_buckets: set[int] = set()
    latest, start = None, None
    for t, i in long_hits:
        if t <= long_from:
            break
        hit_buckets.add(int((now - t) // long_bucket_seconds))
        if latest is None:
            latest = i
        start = t
    if latest is None or start is None or len(hit_buckets) < long_min_buckets:
        return None
    return latest, start, "long", recent_hits, recent_samples, len(hit_buckets), long_buckets


@dataclass(frozen=True, slots=True)
class SustainedThresholds:
    """The `sustained` rule's thresholds, with the defaults thermal, power and clocks share: checks
    them and applies the rule. Each detector's thresholds dataclass derives from this one; a
    detector that needs another value redeclares that field there, with its source."""

    # samples; newest this many all clear = recovered: 5 s at the 1 s default interval (our choice)
    clear_samples: int = 5
    # s; the fast window: 80% of 20 samples at 1 Hz opens 15 s after onset, within the corpus's 30 s
    recent_seconds: float = 20.0
    # fraction of the fast window's samples; 0.8 forgives one caught mid-transition (our choice)
    recent_fraction: float = 0.8
    # s; first to newest sample with the condition in the fast window: spikes under 10 s never
    # fire (our choice)
    recent_min_seconds: float = 10.0
    # s; gpud hw-slowdown DefaultStateHWSlowdownEvaluationWindow (10 min) for intermittent slowdown
    long_seconds: float = 600.0
    # s; gpud counts the minutes of the window that saw a slowdown event (hw-slowdown component.go)
    long_bucket_seconds: float = 60.0
    # minutes; gpud DefaultStateHWSlowdownEventsThresholdFrequencyPerMinute 0.6 x 10 min = 6
    long_min_buckets: int = 6
    # s; older samples say nothing about now, a quiet node is node_silent's (our choice)
    max_sample_age_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.clear_samples < 1 or self.long_min_buckets < 1:
            raise ValueError("clear_samples and long_min_buckets must be at least 1")
        if not 0 < self.recent_fraction <= 1:
            raise ValueError("recent_fraction must be in (0, 1]")
        if min(self.recent_seconds, self.long_seconds, self.long_bucket_seconds) <= 0:
            raise ValueError("windows must be positive")
        if self.recent_min_seconds < 0 or self.max_sample_age_seconds <= 0:
            raise ValueError("recent_min_seconds must not be negative, max_sample_age positive")

    @property
    def window_seconds(self) -> float:
        """The history the rule reads: the detector's window_seconds."""
        return max(self.recent_seconds, self.long_seconds, self.max_sample_age_seconds)

    @property
    def short_seconds(self) -> float:
        """The history the rule reads whole samples of (the long window reads a condition's times)."""
        return max(self.recent_seconds, self.max_sample_age_seconds)

    def held_gpus(self, window: Window, condition: Condition) -> Iterator[tuple[str, int, int, Sustained]]:
        """(node, gpu, table position, how it held) of each GPU of `window` on which `condition`
        holds, sustained (see `sustained`).

        Vectorised for the common case: only GPUs whose newest `clear_samples` samples include
        one that shows the condition are looked at one by one; their long window is the times of
        the samples that showed it (the table keeps those for the condition's `seconds`)."""
        table = gpu_table(window)
        now = window.now
        if not len(table) or table.latest_hit_t(condition) < now - self.max_sample_age_seconds:
            return  # no fresh sample of any GPU shows the condition: none passes the gate
        last = table.last_hit(condition)
        gate = (last >= table.end - self.clear_samples) & (last >= table.first)
        if not gate.any():
            return
        candidates = np.flatnonzero(gate)
        fresh = table.times(last[candidates], candidates) >= now - self.max_sample_age_seconds
        keys = table.keys
        oldest = now - max(self.recent_seconds, self.max_sample_age_seconds)
        long_from = now - self.long_seconds
        for p in candidates[fresh].tolist():
            series = table.series(p)
            times = series.t.tolist()
            hits = table.hits(condition, p, long_from)
            shown = {i for _, i in hits}
            recent = []
            for k in range(len(times) - 1, -1, -1):
                t = times[k]
                if t < oldest and t <= now - self.recent_seconds:
                    break
                i = series.lo + k
                recent.append((t, i in shown, i))
            held = sustained_rule(
                recent,
                hits[::-1],
                now,
                clear_samples=self.clear_samples,
                max_sample_age_seconds=self.max_sample_age_seconds,
                recent_seconds=self.recent_seconds,
                recent_fraction=self.recent_fraction,
                recent_min_seconds=self.recent_min_seconds,
                long_seconds=self.long_seconds,
                long_bucket_seconds=self.long_bucket_seconds,
                long_min_buckets=self.long_min_buckets,
            )
            if held is not None:
                latest, start, by, recent_hits, recent_samples, long_hit_buckets, long_buckets = held
                node, gpu = keys[p]
                sample = table.sample(p, latest)
                yield (
                    node,
                    gpu,
                    p,
                    Sustained(start, sample, by, recent_hits, recent_samples, long_hit_buckets, long_buckets),
                )
