"""Straggler detector from step reports: the rank that slows a synchronous job, and why.

Every rank reports its own compute time per step (DESIGN.md: collective waits excluded), so in a
synchronous job the straggler is the rank whose steps take longer than its peers' on the same
steps. Per job, at each evaluation:

- each step's reference is the median of the fastest half of the ranks' times for that step, so
  up to half the ranks can slow down together and the reference stays with the healthy ones; a
  pause of the whole job (a checkpoint) moves every rank's time and the reference together;
- each rank's score is 1 / the median, over its newest `recent_steps` steps (within
  `max_recent_seconds`, the time cap), of its time / the step's reference: 1.0 as fast as the
  healthy ranks, 0.5 twice as slow. A median, so one slow step (a data-loader hiccup) moves
  nothing, and a slow-down is found once it has lasted `min_slow_steps` steps (issue 10: every
  rule counts steps, so a job stepping every 0.2 s and one stepping every 45 s are judged alike
  per step, each straggler opened within 10 of its steps).

Real jobs have ranks that differ steadily. Alibaba PAI job 2 (tests/fixtures/alibaba) runs its
slowest worker at 0.80-0.82 from the first iteration to the last, healthy: a low score alone is
not an episode. A rank scoring below `peer_score` is a straggler, keyed "peers", when

- its gap to the peers grew: its score in its baseline (its oldest `min_baseline_steps` steps in
  the window, the job's pace then comparable to now) is at least `min_gap_growth` times its
  score now; or
- it scores below `floor_score`, slower than any steady offset in the traces; or
- its GPU shows a hardware cause in the same span (a throttle reason, an SM clock well below the
  peers' GPUs'): a steady offset with a hardware cause is still a fault.

A rank that slowed `self_slowdown` times against its own baseline, and as much against its peers,
but still scores above `peer_score` (it used to be faster than most), is keyed "self". A job's
first `warmup_steps` steps (numbered from 0) are never compared; a job that started within the
window takes its baseline from its first steps after them, and until it has one only the floor
and a hardware cause count. A job stepping too slowly for `window_seconds` to hold its baseline
and recent steps (slower than ~15 s a step) takes its baseline from up to `step_window_seconds`
back (the engine keeps steps that long). A job's end (no step of a rank for longer than a pause)
ends its episodes.

Cost: the newest steps are read back to `recent_seconds` (further for ranks short of
`recent_steps`) and the oldest forward to a baseline,
both stopping early; ranks within 3% of the reference (most of a healthy job) are not judged
and need no baseline. A 1,000-rank job stepping every second takes ~5 ms of a current CPU core.

Pauses: a straggler whose rank sends no step for a while (a checkpoint, a restart, or the next
step of a job stepping every minute) is still reported until `pause_grace_seconds` (or
`pause_grace_steps` of its own step times) after its newest step, and for `min_slow_steps` steps
after it steps again, what the rules need to see it again: one slow rank is one episode, not one
per pause. Hysteresis: a "peers" straggler, once reported, stays so until its score has stayed at
or above `close_score` (looser than the thresholds that open it) for `close_steps` of its steps,
so a rank hovering at them is one episode, and so is a straggler whose onset has left the window
(its gap then looks like a steady offset, which alone opens nothing). That is all that is
remembered between evaluations; the judging itself is pure. (An earlier hold, which rebuilt the
hysteresis from the data by replaying the last minute's tests with looser tolerances, is gone:
in effect it opened at looser thresholds, and in a soak it reported healthy ranks of 6-rank
pipeline stages, whose reference is noisier.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import ClassVar

import numpy as np

from fleetwatch.detectors.model import Window, gpu_table, step_table
from fleetwatch.detectors.stages import StageGuess, ranks_text, stage_guesses
from fleetwatch.detectors.straggler_telemetry import CAUSE_FIELDS, GpuCause, gpu_cause_of_columns, median
from fleetwatch.detectors.table import COLUMN, StepTable
from fleetwatch.records import Finding, Step


@dataclass(frozen=True, slots=True)
class StragglerStepsThresholds:
    # s; ranks with a step in the last 20 s are judged now; one with none is between two steps of
    # a slow stepper, paused or gone: its episode is carried through the pause grace
    recent_seconds: float = 20.0
    # steps; a rank is judged on its newest 10: a median whose noise, ~1.25 x CV / sqrt(10), is
    # 1.6% at the noisiest healthy Alibaba worker's step-to-step CV of 4.0%
    recent_steps: int = 10
    # s; the time cap: how far back those 10 steps may come from (10 steps of a job stepping
    # every minute; Alibaba job 3 records every 10th iteration, one record per 7-10 s)
    max_recent_seconds: float = 600.0
    # steps; an episode has lasted this many of the rank's steps before it is reported: half the
    # recent window, which its median needs to turn anyway (all of them where fewer fit the cap)
    min_slow_steps: int = 5
    # score; below this a rank slows its job. Healthy Alibaba workers' steps vary with a CV of
    # 1.0-2.3% (job 2) and 2.3-4.0% (job 3), p99 at most 1.10x their median; a rank 1.2x slower
    # than its peers scores ~0.82
    peer_score: float = 0.85
    # score; below this a straggler needs no visible onset. The slowest healthy Alibaba worker
    # (job 2, worker 5, 906 against ~747 normalised units) scores 0.80-0.82 throughout
    floor_score: float = 0.7
    # ratio of the baseline score to the score now. Over every evaluation of both Alibaba jobs
    # the healthy workers reach at most 1.06 (job 2) and 1.07 (job 3); job 3's late slow-down
    # reaches 1.2-1.35
    min_gap_growth: float = 1.15
    # ratio; slowed 1.2x against its own baseline and against its peers (the brief's 1.2x)
    self_slowdown: float = 1.2
    # score; a rank at or above this is within 3% of the healthy pace and slows nobody, whatever
    # its own past: not judged (most ranks of a healthy job, which then need no baseline)
    judged_below_score: float = 0.97
    # steps; each rank's baseline is its oldest 20 steps in the window after warm-up: its median
    # then moves by ~1% as the window slides (10 steps: ~2%, enough to flap a rank at a threshold)
    min_baseline_steps: int = 20
    # s; ranks are looked for in the oldest 25 s of the window, or of a job that started later
    # (found from its step numbers); a job with less than this between warm-up and its recent
    # steps has no baseline yet: only the floor and a hardware cause count
    baseline_seconds: float = 25.0
    # ratio; the job's pace (median step reference) then and now within 1.3x, else the baseline
    # is another phase (warm-up, evaluation). A delay of 0.3x a step added to every rank
    # compresses a 0.7-score rank's gap by at most 1.3 / (1 + 0.3 x 0.7) = 1.07 < min_gap_growth
    max_pace_change: float = 1.3
    # s; how old the baseline is: an onset stays visible ~9 minutes (Alibaba job 3's slow-down
    # lasts ~5). The registry's thermal, power and clocks detectors already keep 600 s of data
    window_seconds: float = 600.0
    # s; the time cap on a slow stepper's history: a job stepping every 45 s needs 20 baseline and
    # 10 recent steps, 1,350 s, which the window cannot hold. Steps are kept this long (a job
    # stepping every second keeps 1,800 steps a rank, within the engine's bound on steps)
    step_window_seconds: float = 1800.0
    # score; a "peers" straggler's episode closes only once its score is back above this, looser
    # than peer_score: a rank slowed 1.10-1.12x, hovering at the thresholds, is one episode, not
    # one every few minutes (issue 10), while a recovered rank (~1.0) closes soon
    close_score: float = 0.93
    # steps; and only once it has stayed there for this many of its steps: a 10-step median of a
    # rank slowed 1.15x wanders between 0.87 and 0.93, and touches the bound for a step or two
    close_steps: int = 20
    # s; a straggler whose rank sends no step for a while (a checkpoint being written, a restart,
    # or just its next step of a slow-stepping job) stays reported this long after its newest
    # step, so one slow rank is one episode, not one per pause (issue 10: a 47 s-step job's
    # straggler opened and closed 35 times). Two minutes covers checkpoint pauses of tens of
    # seconds and a restart from a checkpoint (our choice); a job's end closes its episodes then
    pause_grace_seconds: float = 120.0
    # steps; slow steppers wait this many of the rank's own step times instead, when longer
    pause_grace_steps: float = 3.0
    # ranks; fewer and there are no peers to compare with
    min_ranks: int = 2
    # ranks; a step's reference is taken over at most this many ranks (every n-th): the median of
    # the fastest half of 64 is within ~1% of all of them, and a 1,000-rank job stays cheap
    reference_ranks: int = 64
    # step number; a fresh job's first steps compile kernels and autotune: never compared
    warmup_steps: int = 10
    # fraction of the GPU's samples a throttle reason must be set in to be the cause
    cause_min_fraction: float = 0.5
    # ratio; SM clock at most 85% of the peers' GPUs' (healthy H100s hold 1,980 MHz or a bin below)
    clock_below_peers: float = 0.85
    # ratio; at a normal clock, at most 60% of the peers' power: the GPU is given less work
    power_below_peers: float = 0.6

    def __post_init__(self) -> None:
        if not 0 < self.floor_score <= self.peer_score < 1:
            raise ValueError("need 0 < floor_score <= peer_score < 1")
        if not self.peer_score <= self.close_score < 1:
            raise ValueError("need peer_score <= close_score < 1")
        if self.close_steps < 0:
            raise ValueError("close_steps must not be negative")
        if not self.peer_score <= self.judged_below_score <= 1:
            raise ValueError("need peer_score <= judged_below_score <= 1")
        if self.min_gap_growth < 1:
            raise ValueError("min_gap_growth must be at least 1")
        if self.self_slowdown <= 1 or self.max_pace_change < 1:
            raise ValueError("self_slowdown must exceed 1, max_pace_change be at least 1")
        if not 0 < self.recent_seconds <= self.max_recent_seconds:
            raise ValueError("need 0 < recent_seconds <= max_recent_seconds")
        if self.baseline_seconds <= 0 or self.min_slow_steps < 0:
            raise ValueError("baseline_seconds must be positive, min_slow_steps not negative")
        if 2 * self.baseline_seconds > self.window_seconds:
            raise ValueError("the window must hold two baselines' reach")
        if not self.window_seconds <= self.step_window_seconds:
            raise ValueError("need window_seconds <= step_window_seconds")
        if self.max_recent_seconds > self.step_window_seconds:
            raise ValueError("need max_recent_seconds <= step_window_seconds")
        if min(self.min_ranks, self.reference_ranks) < 2:
            raise ValueError("need min_ranks and reference_ranks of at least 2")
        if self.pause_grace_seconds < 0 or self.pause_grace_steps < 0:
            raise ValueError("pause_grace_seconds and pause_grace_steps must not be negative")
        if self.recent_steps < 1 or self.min_baseline_steps < 1:
            raise ValueError("need recent_steps and min_baseline_steps of at least 1")
        if not 0 < self.cause_min_fraction <= 1:
            raise ValueError("cause_min_fraction must be in (0, 1]")


# s; a rank's GPU samples kept for its cause: those over its recent steps, to three minutes back
# (a slow stepper's cause is read from its last three minutes: a throttle that slows its steps
# holds that long; our choice)
_CAUSE_SPAN_SECONDS = 180.0
# What gpu_cause reads of a rank's GPU.
_CAUSE_FIELDS = ("clock_event_reasons", "sm_clock_mhz", "power_watts", "power_limit_watts", "gpu_util_percent")

# Rank numbers are below this: (job, rank) as one integer key, job * _RANK_SPAN + rank.
_RANK_SPAN = 1 << 32
_CLOCK_COLUMN, _POWER_COLUMN = COLUMN["sm_clock_mhz"], COLUMN["power_watts"]

_SECONDS = attrgetter("seconds")
# fraction of the job's speed; a smaller loss is in the evidence, not worth a clause in the summary
_LOSS_WORTH_SAYING = 0.02


def _median_seconds(steps: Iterable[Step]) -> float:
    return median(list(map(_SECONDS, steps)))


def _score(ratio: float) -> float:
    return 1.0 / ratio if ratio > 0 else math.inf


def _growth(baseline_score: float, score: float) -> float:
    """How many times a rank's gap to the peers grew since its baseline (>1: it fell behind)."""
    return baseline_score / score if score > 0 else math.inf


@dataclass(slots=True)
class _Groups:
    """Rows of a window's step table grouped by (job, rank), groups sorted by job then rank:
    group g's rows are rows[start[g]:start[g] + count[g]], in the order they were grouped in, and
    the groups follow one another in rows (start is the running total of count)."""

    job: np.ndarray
    rank: np.ndarray
    start: np.ndarray
    count: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.job)

    def of(self, g: int) -> np.ndarray:
        start = int(self.start[g])
        return self.rows[start : start + int(self.count[g])]

    def take(self, which: np.ndarray) -> _Groups:
        """The groups `which` (indexes, ascending), their rows alone."""
        counts = self.count[which]
        offsets = np.cumsum(counts) - counts
        # Each taken row's position in self.rows: its group's start plus its place in the group.
        at = np.repeat(self.start[which] - offsets, counts) + np.arange(
            int(offsets[-1] + counts[-1]) if len(counts) else 0
        )
        return _Groups(self.job[which], self.rank[which], offsets, counts, self.rows[at])


def _grouped(table: StepTable, rows: np.ndarray, newest_first: bool) -> _Groups:
    """`rows` (ascending) grouped by (job, rank), each group's rows newest first or oldest first."""
    if newest_first:
        rows = rows[::-1]
    # One stable sort by (job, rank) as one integer keeps each group's rows in the order given.
    keys = table.job[rows] * _RANK_SPAN + table.rank[rows]
    order = np.argsort(keys, kind="stable")
    rows = rows[order]
    start = _run_starts((keys[order],))
    first = rows[start]
    return _Groups(table.job[first], table.rank[first], start, _run_lengths(start, len(rows)), rows)


def _run_starts(keys: Sequence[np.ndarray]) -> np.ndarray:
    """Where a new run of equal (keys[0][i], keys[1][i], ...) starts in sorted columns."""
    first = keys[0]
    if len(first) < 2:
        return np.zeros(len(first), dtype=np.int64)
    changed = first[1:] != first[:-1]
    for key in keys[1:]:
        changed |= key[1:] != key[:-1]
    starts = np.empty(np.count_nonzero(changed) + 1, dtype=np.int64)
    starts[0] = 0
    starts[1:] = changed.nonzero()[0] + 1
    return starts


def _run_lengths(starts: np.ndarray, total: int) -> np.ndarray:
    """The length of each run starting at `starts`, the last one ending at `total`."""
    lengths = np.empty_like(starts)
    if len(starts):
        lengths[:-1] = starts[1:] - starts[:-1]
        lengths[-1] = total - starts[-1]
    return lengths


@dataclass(slots=True)
class _Spans:
    """Rows of some groups of a _Groups (`recent`): group groups[i] (ascending) has rows
    rows[start[i]:start[i] + count[i]]."""

    groups: np.ndarray
    start: np.ndarray
    count: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.groups)

    @classmethod
    def none(cls) -> _Spans:
        empty = np.zeros(0, dtype=np.int64)
        return cls(empty, empty, empty, empty)

    def merged(self, other: _Spans) -> _Spans:
        """These spans and `other`'s (other groups), groups ascending."""
        groups = np.concatenate([self.groups, other.groups])
        order = np.argsort(groups, kind="stable")
        start = np.concatenate([self.start, other.start + len(self.rows)])
        count = np.concatenate([self.count, other.count])
        return _Spans(groups[order], start[order], count[order], np.concatenate([self.rows, other.rows]))


@dataclass(slots=True)
class _Refs:
    """Step references of some jobs: (job, step) keys, ascending, and each one's reference."""

    keys: np.ndarray  # job * span + step
    values: np.ndarray
    span: int  # larger than any step number

    @classmethod
    def joined(cls, keys: Sequence[np.ndarray], values: Sequence[np.ndarray], span: int) -> _Refs:
        """The references of parts of other jobs (each part's keys ascending) as one."""
        parts = [i for i, part in enumerate(keys) if len(part)]
        if len(parts) == 1:
            return cls(keys[parts[0]], values[parts[0]], span)
        if not parts:
            return cls(np.zeros(0, dtype=np.int64), np.zeros(0), span)
        joined = np.concatenate(keys)
        order = np.argsort(joined, kind="stable")
        return cls(joined[order], np.concatenate(values)[order], span)

    def of(self, job: int) -> dict[int, float]:
        """One job's references: step number -> reference seconds."""
        lo, hi = np.searchsorted(self.keys, [job * self.span, (job + 1) * self.span])
        return dict(zip((self.keys[lo:hi] - job * self.span).tolist(), self.values[lo:hi].tolist()))


def _median_ratios(table: StepTable, groups: _Groups, refs: _Refs) -> tuple[np.ndarray, np.ndarray]:
    """_median_ratio for each group: (median of its steps' time over their reference, how many
    steps had one), for every group at once."""
    rows = groups.rows
    keys = table.job[rows] * refs.span + table.step[rows]
    if len(refs.keys):
        at = refs.keys.searchsorted(keys)
        at[at == len(refs.keys)] = 0
        known = refs.keys[at] == keys
        ratios = table.seconds[rows] / refs.values[at]
        ratios[~known] = 0.0  # no reference: 0, skipped like a 0 s step
    else:
        ratios = np.zeros(len(rows))
    # Sorted within each group: groups are consecutive, so sort by group, then ratio.
    gid = np.repeat(np.arange(len(groups)), groups.count)
    ratios = ratios[np.lexsort((ratios, gid))]
    skip = np.bincount(gid[ratios <= 0.0], minlength=len(groups))
    counts = groups.count - skip
    middle = groups.start + skip + counts // 2
    last = len(ratios) - 1
    if last < 0:
        return np.full(len(groups), np.nan), counts
    high = ratios[np.minimum(middle, last)]
    low = ratios[np.clip(middle - 1, 0, last)]
    medians = np.where(counts % 2 == 1, high, (low + high) / 2)
    medians[counts == 0] = np.nan
    return medians, counts


def _grid_candidates(groups: _Groups, th: StragglerStepsThresholds) -> list[tuple[np.ndarray, int, int]]:
    """The jobs of `groups` that may form grids for _dense_scores, stacked by shape: (each one's
    first group, ranks, steps), for jobs of at most reference_ranks ranks (enough for
    min_reports) that reported as many steps each."""
    count = len(groups)
    least = max(2, th.min_ranks)
    if groups.job[0] == groups.job[-1]:  # one job (groups are sorted by job): the common case
        steps = int(groups.count[0])
        if least <= count <= th.reference_ranks and steps and not np.count_nonzero(groups.count != steps):
            return [(np.zeros(1, dtype=np.int64), count, steps)]
        return []
    firsts = _run_starts((groups.job,))
    ranks = _run_lengths(firsts, count)
    steps = groups.count[firsts]
    of_job = np.repeat(np.arange(len(firsts)), ranks)
    uneven = np.bincount(of_job, weights=groups.count != steps[of_job], minlength=len(firsts))
    fits = (ranks >= least) & (ranks <= th.reference_ranks) & (steps > 0) & (uneven == 0)
    span = int(steps.max()) + 1
    shapes = ranks * span + steps
    return [(firsts[fits & (shapes == s)], s // span, s % span) for s in np.unique(shapes[fits]).tolist()]


def _dense_scores(
    table: StepTable, groups: _Groups, th: StragglerStepsThresholds
) -> tuple[_Refs, np.ndarray, np.ndarray, np.ndarray]:
    """_references() and _median_ratios() of the jobs of `groups` that form the grid of a
    synchronous job: at most reference_ranks ranks (enough for min_reports), every rank the same
    steps in the same order, each step once, every time positive. As a (ranks, steps) matrix, and
    the jobs of one shape stacked, the same picks take two sorts along its axes instead of sorting
    rows by key. Returns those jobs' references, each group's ratio and count (NaN and 0 for the
    groups of other jobs) and which groups were scored."""
    count = len(groups)
    keys, values, parts = [], [], []
    for firsts, rank_count, step_count in _grid_candidates(groups, th):
        # (jobs, ranks, steps): a job's groups are consecutive in rows, as each group's rows are.
        at = groups.start[firsts][:, None] + np.arange(rank_count * step_count)
        rows = groups.rows[at].reshape(len(firsts), rank_count, step_count)
        numbers = table.step[rows]
        first = numbers[:, 0]
        gaps = first[:, 1:] - first[:, :-1]
        ascending = (gaps > 0).all(axis=1)
        seconds = table.seconds[rows]
        # Every rank reported the same steps, none twice (a restart from a checkpoint), none in 0 s
        # (_median_ratios skips its ratio).
        grid = (
            (numbers == first[:, None]).all(axis=(1, 2))
            & (ascending | (gaps < 0).all(axis=1))
            & (seconds > 0).all(axis=(1, 2))
        )
        if not grid.all():
            firsts, first, ascending, seconds = firsts[grid], first[grid], ascending[grid], seconds[grid]
            if not len(firsts):
                continue
        # Each step's reference: the median of the fastest half of its times (every rank reported it).
        fastest = np.sort(seconds, axis=1)
        half = (rank_count + 1) // 2
        middle = half // 2
        reference = fastest[:, middle] if half % 2 else (fastest[:, middle - 1] + fastest[:, middle]) / 2
        # Each rank's median ratio of its times to the steps' references.
        sorted_ratios = np.sort(seconds / reference[:, None], axis=2)
        middle = step_count // 2
        if step_count % 2:
            medians = sorted_ratios[:, :, middle]
        else:
            medians = (sorted_ratios[:, :, middle - 1] + sorted_ratios[:, :, middle]) / 2
        parts.append(((firsts[:, None] + np.arange(rank_count)).ravel(), medians.ravel(), step_count))
        job_keys = groups.job[firsts][:, None] * table.step_span + first
        if not ascending.all():  # references by ascending step
            job_keys = np.where(ascending[:, None], job_keys, job_keys[:, ::-1])
            reference = np.where(ascending[:, None], reference, reference[:, ::-1])
        keys.append(job_keys.ravel())
        values.append(reference.ravel())
    refs = _Refs.joined(keys, values, table.step_span)
    if len(parts) == 1 and len(parts[0][0]) == count:  # one job, or jobs of one shape: every group
        return refs, parts[0][1], np.full(count, parts[0][2], dtype=np.int64), np.ones(count, dtype=bool)
    ratios = np.full(count, np.nan)
    counts = np.zeros(count, dtype=np.int64)
    scored = np.zeros(count, dtype=bool)
    for members, medians, step_count in parts:
        ratios[members] = medians
        counts[members] = step_count
        scored[members] = True
    return refs, ratios, counts, scored


@dataclass(slots=True)
class _Rank:
    rank: int
    groups: _Groups  # its recent steps are group `group` of these (rows newest first)
    group: int
    score: float
    steps: Sequence[Step]  # the window's steps, which the rows index
    # Set by the detector where the rank has baseline steps (oldest first) and their score: the
    # baseline groups, the rank's group in them, and how far their rows are from this table's.
    baseline_of: tuple[_Groups, int, int] | None = None
    baseline_ratio: tuple[float, int] | None = None
    _recent: list[Step] | None = None

    @property
    def rows(self) -> np.ndarray:
        return self.groups.of(self.group)

    @property
    def recent(self) -> list[Step]:
        """Its recent steps, newest first."""
        if self._recent is None:
            steps = self.steps
            self._recent = [steps[i] for i in self.rows.tolist()]
        return self._recent

    @property
    def newest(self) -> Step:
        if self._recent is not None:
            return self._recent[0]
        return self.steps[int(self.groups.rows[self.groups.start[self.group]])]

    @property
    def baseline(self) -> list[Step] | None:
        """Its baseline steps, oldest first, where they count (see _Job.baseline_score)."""
        if self.baseline_of is None or self.baseline_score is None:
            return None
        groups, group, shift = self.baseline_of
        return [self.steps[i + shift] for i in groups.of(group).tolist()]

    @property
    def baseline_score(self) -> float | None:
        return None if self.baseline_ratio is None else _score(self.baseline_ratio[0])


@dataclass(slots=True)
class _Job:
    """One job at one evaluation: its ranks, references, pace against the baseline, and its GPUs'
    telemetry, read once and only when some rank needs a cause. Ranks and references become
    Python objects only where a verdict needs them (most ranks of a healthy job never do)."""

    name: str
    groups: _Groups  # every scored rank's recent steps (all jobs)
    members: np.ndarray  # this job's scored groups, the rank whose step came last first
    scores: np.ndarray  # per group of `groups`
    all_refs: _Refs  # the references of every scored job
    code: int  # the job's index in the step table
    reference: float  # median of its references: the healthy step time now
    window: Window
    min_baseline_steps: int
    table: StepTable  # the step table its code indexes (with stages told from step times)
    pace: float = math.inf  # reference now / reference in the baseline (inf without one)
    _ranks: dict[int, _Rank] = field(default_factory=dict)  # group -> rank, as they are needed
    _refs: dict[int, float] | None = None
    _gpus: dict[int, tuple[float | None, float | None]] | None = None  # rank -> clock, power
    _causes: dict[int, GpuCause | None] = field(default_factory=dict)

    def rank(self, g: int) -> _Rank:
        """The rank of group g."""
        r = self._ranks.get(g)
        if r is None:
            groups = self.groups
            r = self._ranks[g] = _Rank(int(groups.rank[g]), groups, g, float(self.scores[g]), self.window.steps)
        return r

    @property
    def ranks(self) -> list[_Rank]:
        """Every scored rank, the one whose step came last first."""
        return [self.rank(g) for g in self.members.tolist()]

    @property
    def refs(self) -> dict[int, float]:
        """Step number -> reference seconds."""
        if self._refs is None:
            self._refs = self.all_refs.of(self.code)
        return self._refs

    def baseline_score(self, r: _Rank) -> float | None:
        """r's score over its baseline steps against those steps' references, or None."""
        return r.baseline_score

    def growth(self, r: _Rank) -> float | None:
        """How many times r's gap to the peers grew since its baseline (>1: it fell behind)."""
        baseline_score = self.baseline_score(r)
        if baseline_score is None:
            return None
        return _growth(baseline_score, r.score)

    def cause(self, th: StragglerStepsThresholds, r: _Rank) -> GpuCause | None:
        """What r's GPU telemetry over its recent span says against the GPUs of the other ranks
        (each one's latest sample); None without telemetry for r's GPU."""
        if r.rank in self._causes:
            return self._causes[r.rank]
        cause = None
        newest = r.newest
        table = gpu_table(self.window)
        p = table.position((newest.node, newest.gpu)) if newest.gpu is not None else None
        if p is not None:
            steps = self.table
            oldest = int(r.rows[-1])
            began_t = float(steps.t[oldest]) - float(steps.seconds[oldest])  # its oldest recent step began
            # Its GPU's samples in [began_t, now], read as columns (tail() of the series).
            series = table.series(p)
            times = series.t
            lo = int(np.searchsorted(times, began_t, side="left"))
            if lo < len(times):
                gpus = self._peer_gpus(th.recent_seconds)
                clocks = [c for rank, (c, _) in gpus.items() if rank != r.rank and c is not None]
                powers = [p for rank, (_, p) in gpus.items() if rank != r.rank and p is not None]
                reasons, sm_clocks, power_draws, limits = (series.column(name)[lo:] for name in CAUSE_FIELDS)
                cause = gpu_cause_of_columns(
                    reasons,
                    sm_clocks,
                    power_draws,
                    limits,
                    median(clocks) if clocks else None,
                    median(powers) if powers else None,
                    min_fraction=th.cause_min_fraction,
                    clock_below_peers=th.clock_below_peers,
                    power_below_peers=th.power_below_peers,
                )
        self._causes[r.rank] = cause
        return cause

    def _peer_gpus(self, max_age_seconds: float) -> dict[int, tuple[float | None, float | None]]:
        """rank -> its GPU's SM clock and power at its newest sample, where that is at most
        max_age_seconds old (a GPU two ranks share counts for the first of them)."""
        if self._gpus is None:
            self._gpus = {}
            now = self.window.now
            table = gpu_table(self.window)
            newest_t, newest = table.newest_t, table.newest_rows
            steps = self.table
            groups = self.groups
            # Each rank's newest step (its group's first row): its node and GPU, as columns.
            rows = groups.rows[groups.start[self.members]]
            nodes = steps.nodes
            seen: set[tuple[str, int]] = set()
            ranks, positions = [], []
            for rank, node, gpu in zip(
                groups.rank[self.members].tolist(), steps.node[rows].tolist(), steps.gpu[rows].tolist()
            ):
                if gpu < 0:
                    continue  # no GPU named
                key = (nodes[node], gpu)
                if key in seen:
                    continue
                seen.add(key)  # two ranks on one GPU count once
                p = table.position(key)
                if p is not None:
                    ranks.append(rank)
                    positions.append(p)
            # Their newest samples read as columns, not one GPU at a time.
            at = np.array(positions, dtype=np.int64)
            for rank, t, clock, power in zip(
                ranks,
                newest_t[at].tolist(),
                newest[at, _CLOCK_COLUMN].tolist(),
                newest[at, _POWER_COLUMN].tolist(),
            ):
                if now - max_age_seconds <= t <= now:
                    self._gpus[rank] = (None if clock != clock else clock, None if power != power else power)
        return self._gpus


_Judged = tuple[_Job, _Rank]


@dataclass(slots=True)
class _Baselines:
    """The baselines of one evaluation (see StragglerStepsDetector._baseline_scores)."""

    medians: dict[int, float]  # job code -> median of its baseline step references
    groups: _Groups  # the ranks with a baseline that counts, and their baseline rows
    ratios: np.ndarray  # per group: _median_ratio of its baseline steps
    counts: np.ndarray  # per group: how many of them had a reference
    index: dict[tuple[int, int], int]  # (job code, rank) -> group
    origin: int  # StepTable.origin[1] of the table the rows index

    @classmethod
    def none(cls, table: StepTable) -> _Baselines:
        empty = np.zeros(0, dtype=np.int64)
        return cls({}, _Groups(empty, empty, empty, empty, empty), np.zeros(0), empty, {}, table.origin[1])


@dataclass(slots=True)
class _BaselineMemo:
    """The baselines of the last evaluation, reused while they cannot have changed: the window
    has not moved past its oldest step (a window that has not filled yet), the same ranks are
    judged, every one had its full baseline of steps and all were found from the window's oldest
    step. _baseline_from's picks are each rank's first steps from there that precede its recent
    span, which only moves forward: they stay its first. Pure: the same result, computed once."""

    generation: int  # StepTable.origin[0]: which step columns (job codes hold within them)
    oldest: int  # absolute row the baselines were looked for from
    job: np.ndarray  # the groups' jobs and ranks the baselines are for
    rank: np.ndarray
    baselines: _Baselines

    @classmethod
    def of(
        cls,
        table: StepTable,
        oldest: int,
        found: _Spans,
        baselines: _Baselines,
        recent: _Groups,
        th: StragglerStepsThresholds,
        from_oldest: bool,
    ) -> _BaselineMemo | None:
        if not from_oldest or len(found) != len(recent) or np.count_nonzero(found.count < th.min_baseline_steps):
            return None  # a rank without its full baseline: its next evaluation may find more
        return cls(table.origin[0], oldest + table.origin[1], recent.job, recent.rank, baselines)

    def holds(self, table: StepTable, oldest: int, recent: _Groups) -> bool:
        return (
            table.origin[0] == self.generation
            and oldest + table.origin[1] == self.oldest
            and np.array_equal(recent.job, self.job)
            and np.array_equal(recent.rank, self.rank)
        )


@dataclass(slots=True)
class StragglerStepsDetector:
    """Step reports -> a finding per rank that runs well below its job's healthy pace, or below
    its own earlier pace, with the hardware cause when its GPU's telemetry shows one."""

    thresholds: StragglerStepsThresholds = field(default_factory=StragglerStepsThresholds)
    id: ClassVar[str] = "straggler.steps"
    # The last evaluation's baselines, reused while they cannot have changed (_BaselineMemo).
    _baseline_memo: _BaselineMemo | None = field(default=None, init=False, repr=False, compare=False)
    # Findings of the last evaluation and their rank's newest step then: one whose rank has sent
    # nothing since is carried through the pause (pause_grace_*).
    _carried: dict[str, tuple[Finding, float, float | None]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    # This evaluation's scores: (its step table, each scored rank's job code, rank, score).
    _scores: tuple[StepTable, np.ndarray, np.ndarray, np.ndarray] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    # This evaluation's job codes for stages told from step times (stage_guesses): their ranks.
    _told: dict[int, tuple[int, ...]] = field(default_factory=dict, init=False, repr=False, compare=False)
    # Warning: the job still runs, at the straggler's pace.
    severity: ClassVar[str] = "warning"

    @property
    def window_seconds(self) -> float:
        return self.thresholds.window_seconds

    @property
    def step_window_seconds(self) -> float:
        return self.thresholds.step_window_seconds

    @property
    def gpu_window_seconds(self) -> float:
        return _CAUSE_SPAN_SECONDS

    @property
    def gpu_fields(self) -> Mapping[str, float]:
        return dict.fromkeys(_CAUSE_FIELDS, self.gpu_window_seconds)

    def detect(self, window: Window) -> list[Finding]:
        findings = self._judge(window) if window.steps else []
        return self._through_pauses(window, findings)

    def _through_pauses(self, window: Window, findings: list[Finding]) -> list[Finding]:
        """`findings`, plus the last evaluation's that are missing now because their rank has sent
        no step since (a pause, or a slow step still running), within the grace after its newest,
        or because a "peers" straggler has not yet stayed above close_score for close_steps."""
        th = self.thresholds
        previous, self._carried = self._carried, {}
        if not findings and not previous:
            return findings
        keys = {(f.job, f.rank) for f in findings} | {(f.job, f.rank) for f, _, _ in previous.values()}
        times = _step_times(window, keys)
        found = {f.fingerprint for f in findings}
        out = list(findings)
        for finding in findings:
            own = times.get((finding.job, finding.rank))
            if own is not None:
                self._carried[finding.fingerprint] = (finding, float(own[-1]), None)
        for fingerprint, (finding, last_t, recovered_t) in previous.items():
            if fingerprint in found:
                continue
            own = times.get((finding.job, finding.rank), np.zeros(0))
            since = own[own > last_t]
            score = self._score_now(finding.job, finding.rank) if finding.key == "peers" else None
            if len(since) and score is not None and len(since) >= th.min_slow_steps:
                # Stepping again, and scored: a "peers" straggler closes only once its score has
                # stayed at or above close_score for close_steps of its steps (hysteresis).
                if score < th.close_score:
                    carry, recovered_t = True, None
                else:
                    recovered_t = window.now if recovered_t is None else recovered_t
                    carry = int(np.count_nonzero(own > recovered_t)) < th.close_steps
            elif len(since) >= th.min_slow_steps and finding.key != "peers":
                carry = False  # stepping again for as long as the rules need to see it: they do not
            else:
                # Paused (a checkpoint, a restart, a slow stepper between two steps), or stepping
                # again for fewer steps than the rules need to see it: held for a grace after its
                # newest step.
                newest_t = float(own[-1]) if len(own) else last_t
                seconds = finding.evidence.get("rank_seconds")
                steps_grace = th.pause_grace_steps * seconds if isinstance(seconds, float) else 0.0
                carry = window.now - newest_t <= max(th.pause_grace_seconds, steps_grace)
            if carry:
                out.append(finding)
                self._carried[fingerprint] = (finding, last_t, recovered_t)
        return out

    def _score_now(self, job: str | None, rank: int | None) -> float | None:
        """The rank's score at this evaluation, None where it was not scored."""
        if self._scores is None:
            return None
        table, codes, ranks, scores = self._scores
        mine = np.flatnonzero((ranks == rank) & np.isin(codes, table.codes_of(job)))
        return float(scores[mine].min()) if len(mine) else None

    def _judge(self, window: Window) -> list[Finding]:
        th = self.thresholds
        now = window.now
        table = step_table(window)
        self._scores = None
        self._told = {}
        guesses = stage_guesses(table, now)
        if guesses:  # jobs without coordinates whose step times show pipeline stages
            table = self._with_stages(table, guesses)
        recent = self._recent(table, now)
        if recent is None:
            return []
        # Every job's ranks scored at once; only jobs with a rank to judge are looked at further.
        ranks_per_job = np.bincount(recent.job)
        eligible = ranks_per_job[recent.job] >= th.min_ranks
        if not np.count_nonzero(eligible):
            return []
        scored = recent if eligible.all() else recent.take(eligible.nonzero()[0])
        refs, ratios, counts = self._scored(table, scored)
        counted = counts > 0
        scores = np.full(len(ratios), np.inf)
        np.divide(1.0, ratios, out=scores, where=ratios > 0)
        self._scores = (table, scored.job, scored.rank, np.where(counted, scores, np.inf))
        judged_any = np.bincount(scored.job, weights=counted & (scores < th.judged_below_score))
        counted_per_job = np.bincount(scored.job, weights=counted)
        codes = ((judged_any > 0) & (counted_per_job >= th.min_ranks)).nonzero()[0]
        if not len(codes):
            return []
        jobs = {
            code: self._job(window, table, scored, ((scored.job == code) & counted).nonzero()[0], scores, refs, code)
            for code in codes.tolist()
        }
        # Baselines only for the jobs with a rank to judge, all at once.
        in_jobs = np.zeros(len(ranks_per_job), dtype=bool)
        in_jobs[codes] = True
        in_jobs = in_jobs[scored.job]
        spans = scored if in_jobs.all() else scored.take(in_jobs.nonzero()[0])
        baselines = self._paced(table, jobs, spans, now)
        findings: list[Finding] = []
        for job, r in self._judged(table, jobs, scores, baselines):
            verdict = self._verdict(job, r)
            if verdict is not None:
                findings.extend(self._finding(window, job, r, verdict, r.recent))
        findings.sort(key=lambda f: (f.start, f.job or "", -1 if f.rank is None else f.rank))
        return findings

    def _with_stages(self, table: StepTable, guesses: Mapping[int, StageGuess]) -> StepTable:
        """`table` with each guessed stage of a job as its own code (its first stage keeps the
        job's), as if its steps carried pp_stage: its ranks are compared with their stage's."""
        job = table.job.copy()
        jobs, stages = list(table.jobs), list(table.stages)
        for code, guess in sorted(guesses.items()):
            mine = table.job == code
            self._told[code] = guess.stages[0]
            for ranks in guess.stages[1:]:
                self._told[len(jobs)] = ranks
                job[mine & np.isin(table.rank, ranks)] = len(jobs)
                jobs.append(table.jobs[code])
                stages.append(None)
        columns = {
            "t": table.t,
            "seconds": table.seconds,
            "job": job,
            "rank": table.rank,
            "step": table.step,
            "node": table.node,
            "gpu": table.gpu,
            "dp": table.dp,
        }
        # Another numbering of the same columns: the baselines of one are not the other's.
        generation = hash((table.origin[0], tuple(sorted((code, g.stages) for code, g in guesses.items()))))
        return StepTable(columns, jobs, table.nodes, table.steps, (generation, table.origin[1]), stages, table.shared)

    # --- reading the window's step table: newest steps back, oldest steps forward ----------------

    def _recent(self, table: StepTable, now: float) -> _Groups | None:
        """Each running rank's steps (one at least in the last recent_seconds), newest first,
        extended back to recent_steps within max_recent_seconds; steps before warm-up are
        never read. None when no rank is running."""
        th = self.thresholds
        t = table.t
        end = int(np.searchsorted(t, now, side="right"))
        cut = int(np.searchsorted(t, now - th.recent_seconds, side="left"))
        rows = np.arange(cut, end)
        rows = rows[table.step[rows] >= th.warmup_steps]
        if not len(rows):
            return None
        recent = _grouped(table, rows, newest_first=True)
        short = recent.count < th.recent_steps
        if np.count_nonzero(short):
            far = int(np.searchsorted(t, now - th.max_recent_seconds, side="left"))
            older = np.arange(cut - 1, far - 1, -1)  # newest first
            older = older[table.step[older] >= th.warmup_steps]
            if len(older):
                # Each short rank takes its newest older steps, as many as it lacks.
                wanted = recent.job[short] * _RANK_SPAN + recent.rank[short]
                lacking = th.recent_steps - recent.count[short]
                keys = table.job[older] * _RANK_SPAN + table.rank[older]
                which = np.searchsorted(wanted, keys)
                which = np.minimum(which, len(wanted) - 1)
                mine = wanted[which] == keys
                older, which = older[mine], which[mine]
                order = np.argsort(which, kind="stable")
                sorted_which = which[order]
                runs = _run_starts([sorted_which])
                position = np.arange(len(order)) - np.repeat(runs, np.diff(np.append(runs, len(order))))
                taken = np.empty(len(order), dtype=bool)
                taken[order] = position < lacking[sorted_which]
                if np.count_nonzero(taken):
                    recent = _grouped(table, np.sort(np.concatenate([recent.rows, older[taken]])), newest_first=True)
        if np.count_nonzero(recent.count > th.recent_steps):
            # Judged on its newest recent_steps alone, however fast it steps: alike per step.
            counts = np.minimum(recent.count, th.recent_steps)
            offsets = np.cumsum(counts) - counts
            at = np.repeat(recent.start - offsets, counts) + np.arange(int(offsets[-1] + counts[-1]))
            recent = _Groups(recent.job, recent.rank, offsets, counts, recent.rows[at])
        return recent

    def _scored(self, table: StepTable, groups: _Groups) -> tuple[_Refs, np.ndarray, np.ndarray]:
        """The groups' step references and, against them, each group's _median_ratios()."""
        refs, ratios, counts, dense = _dense_scores(table, groups, self.thresholds)
        if dense.all():
            return refs, ratios, counts
        # The other jobs the general way: a job's scores depend on its own ranks' steps alone.
        rest = (~dense).nonzero()[0]
        others = groups.take(rest) if len(rest) < len(groups) else groups
        other_refs = self._references(table, others)
        ratios[rest], counts[rest] = _median_ratios(table, others, other_refs)
        return _Refs.joined([refs.keys, other_refs.keys], [refs.values, other_refs.values], refs.span), ratios, counts

    def _references(self, table: StepTable, groups: _Groups) -> _Refs:
        """Per job of `groups`: step number -> the median of the fastest half of that step's times,
        over at most reference_ranks of its ranks, for the steps most of those reported."""
        th = self.thresholds
        per_job = np.bincount(groups.job)
        used = groups
        if np.count_nonzero(per_job > th.reference_ranks):
            sampled = np.ones(len(groups), dtype=bool)
            for code in (per_job > th.reference_ranks).nonzero()[0].tolist():
                members = (groups.job == code).nonzero()[0]  # ranks in ascending order
                every = len(members) / th.reference_ranks
                sampled[members] = False
                sampled[members[[int(i * every) for i in range(th.reference_ranks)]]] = True
            used = groups.take(sampled.nonzero()[0])
            per_job = np.bincount(used.job, minlength=len(per_job))
        span = table.step_span
        rows = used.rows
        keys = table.job[rows] * span + table.step[rows]
        seconds = table.seconds[rows]
        order = np.lexsort((seconds, keys))
        keys, seconds = keys[order], seconds[order]
        starts = _run_starts((keys,))
        counts = _run_lengths(starts, len(keys))
        step_keys = keys[starts]
        min_reports = np.maximum(th.min_ranks, (per_job + 1) // 2)
        keep = counts >= min_reports[step_keys // span]
        starts, counts, step_keys = starts[keep], counts[keep], step_keys[keep]
        half = (counts + 1) // 2  # the fastest half of each step's times, and its median
        middle = starts + half // 2
        high = seconds[middle]
        low = seconds[np.maximum(middle - 1, 0)]
        return _Refs(step_keys, np.where(half % 2 == 1, high, (low + high) / 2), span)

    def _job(
        self,
        window: Window,
        table: StepTable,
        groups: _Groups,
        members: np.ndarray,
        scores: np.ndarray,
        refs: _Refs,
        code: int,
    ) -> _Job:
        """The job's ranks (those of `members` with a score), in the order their newest steps
        came (the newest first), against its references."""
        newest = groups.rows[groups.start[members]]
        members = members[np.argsort(-newest, kind="stable")]
        lo, hi = refs.keys.searchsorted([code * refs.span, (code + 1) * refs.span])
        values = np.sort(refs.values[lo:hi])  # their median, as median() takes it
        middle = len(values) // 2
        reference = float(values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2)
        return _Job(
            table.jobs[code],
            groups,
            members,
            scores,
            refs,
            code,
            reference,
            window,
            self.thresholds.min_baseline_steps,
            table,
        )

    def _baselines(self, table: StepTable, now: float, recent: _Groups) -> tuple[_Spans, bool]:
        """Each running rank's (group of `recent`) oldest min_baseline_steps steps in the window
        before its recent span (rows, oldest first): a job's first steps after warm-up when it
        started in the window, its steps of up to step_window_seconds ago when it steps too slowly
        for the window to hold a baseline; and whether all were found from the window's oldest
        step."""
        th = self.thresholds
        t = table.t
        # The engine keeps steps as long as the most demanding detector needs: start at this
        # detector's own window, so that its baseline does not depend on the others.
        oldest = int(np.searchsorted(t, now - th.window_seconds, side="left"))
        found = self._baseline_from(table, oldest, now, recent, np.arange(len(recent)), th.baseline_seconds)
        from_oldest = True
        # Jobs with a full baseline there; the others started later or step slowly.
        full = found.count >= th.min_baseline_steps
        with_baseline = set(recent.job[found.groups[full]].tolist())
        for code in np.unique(recent.job).tolist():
            if code in with_baseline:
                continue
            groups = (recent.job == code).nonzero()[0]
            spans = [recent.of(g) for g in groups.tolist()]
            rate = _seconds_per_step(table, spans)
            if rate is None:
                continue
            seconds_per_step = rate
            # The window holds a baseline and the recent steps of a job stepping every few
            # seconds; a slower one reaches back further, up to step_window_seconds.
            needed_seconds = (th.min_baseline_steps + th.recent_steps) * seconds_per_step + th.baseline_seconds
            reach_seconds = th.window_seconds if needed_seconds <= th.window_seconds else th.step_window_seconds
            # From the job's first step after warm-up in that reach (a job started later, or one
            # whose ranks the window's oldest seconds do not show); its ranks all report a step
            # within a step or two of one another.
            far = int(np.searchsorted(t, now - reach_seconds, side="left"))
            stop = int(np.searchsorted(t, now - th.recent_seconds, side="left"))
            began = np.flatnonzero((table.job[far:stop] == code) & (table.step[far:stop] >= th.warmup_steps))
            if not len(began):
                continue  # younger than a baseline
            index = far + int(began[0])
            look_seconds = 2 * seconds_per_step + 1.0
            if index <= oldest and reach_seconds == th.window_seconds:
                continue  # looked there already
            mine = np.isin(found.groups, groups)
            if np.count_nonzero(mine):
                keep = ~mine
                found = _Spans(found.groups[keep], found.start[keep], found.count[keep], found.rows)
            found = found.merged(self._baseline_from(table, index, now, recent, groups, look_seconds))
            from_oldest = False
        return found, from_oldest

    def _baseline_from(
        self, table: StepTable, index: int, now: float, recent: _Groups, groups: np.ndarray, look_seconds: float
    ) -> _Spans:
        """From row `index` on: per group `groups` of `recent`, its first min_baseline_steps steps
        after warm-up before its own recent span, where the first comes
        within look_seconds of row `index` (a rank that first appears later has no baseline
        here)."""
        th = self.thresholds
        t = table.t
        if index >= len(t) or not len(groups):
            return _Spans.none()
        need = th.min_baseline_steps
        look_until_t = float(t[index]) + look_seconds  # where ranks are looked for
        stop = int(np.searchsorted(t, now, side="right"))
        wanted = recent.job[groups] * _RANK_SPAN + recent.rank[groups]  # ascending, as the groups
        # each rank's oldest recent step
        own_oldest_t = t[recent.rows[recent.start[groups] + recent.count[groups] - 1]]
        # Rows are read in growing spans from `index` until every rank has its steps or the span
        # has passed look_until_t with no rank short. One job's groups (a job that started in the
        # window) read that job's rows alone, found by one comparison.
        jobs = recent.job[groups]
        one_job = int(jobs.min()) == int(jobs.max())
        candidates = index + np.flatnonzero(table.job[index:stop] == int(jobs[0])) if one_job else None
        available = len(candidates) if candidates is not None else max(0, stop - index)
        size = min(available, max(need * len(groups) * 2, 256))
        while True:
            rows = candidates[:size] if candidates is not None else np.arange(index, index + size)
            keys = table.job[rows] * _RANK_SPAN + table.rank[rows]
            which = np.minimum(np.searchsorted(wanted, keys), len(wanted) - 1)
            usable = (wanted[which] == keys) & (table.step[rows] >= th.warmup_steps)
            times = t[rows]
            usable &= times < own_oldest_t[which]  # never its recent span
            rows, which, times = rows[usable], which[usable], times[usable]
            order = np.argsort(which, kind="stable")
            rows, which, times = rows[order], which[order], times[order]
            starts = _run_starts([which])
            taken = np.minimum(np.diff(np.append(starts, len(rows))), need)
            # A rank counts only if its first step comes by look_until_t; then its first `need`.
            counted = times[starts] <= look_until_t
            starts, taken = starts[counted], taken[counted]
            short = bool(np.count_nonzero(taken < need))
            if size >= available or (not short and float(t[_row_at(candidates, index, size - 1)]) > look_until_t):
                return _Spans(groups[which[starts]], starts, taken, rows)
            size = min(available, 2 * size)

    # --- judging ---------------------------------------------------------------------------------

    def _paced(self, table: StepTable, jobs: Mapping[int, _Job], recent: _Groups, now: float) -> _Baselines:
        """The baselines of the ranks of `recent`, and each job's pace against its own, where it
        has one."""
        th = self.thresholds
        oldest = int(np.searchsorted(table.t, now - th.window_seconds, side="left"))
        memo = self._baseline_memo
        if memo is not None and memo.holds(table, oldest, recent):
            baselines = memo.baselines
        else:
            found, from_oldest = self._baselines(table, now, recent)
            baselines = self._baseline_scores(table, recent, found)
            self._baseline_memo = _BaselineMemo.of(table, oldest, found, baselines, recent, th, from_oldest)
        for code, job in jobs.items():
            base_median = baselines.medians.get(code)
            job.pace = math.inf if base_median is None else job.reference / base_median
        return baselines

    def _judged(
        self, table: StepTable, jobs: Mapping[int, _Job], scores: np.ndarray, baselines: _Baselines
    ) -> list[_Judged]:
        """The ranks to judge, with their baseline scores where the job's pace then was comparable
        to now: those below judged_below_score (within a few percent of the healthy pace a rank
        slows nobody), less those that can pass no test of _verdict (at or above peer_score and
        not _slowed): most ranks of a healthy job, which never become _Rank objects."""
        th = self.thresholds
        score_of = scores.tolist()
        ratios, counts = baselines.ratios.tolist(), baselines.counts.tolist()
        shift = baselines.origin - table.origin[1]  # the baselines' rows in this table
        judged: list[_Judged] = []
        for job in jobs.values():
            # Another phase then (warm-up, evaluation): its baselines do not count.
            index = baselines.index if 1 / th.max_pace_change <= job.pace <= th.max_pace_change else {}
            rank_of = job.groups.rank
            for g in job.members[scores[job.members] < th.judged_below_score].tolist():
                i = index.get((job.code, int(rank_of[g])))
                if i is not None and counts[i] * 2 < th.min_baseline_steps:
                    i = None
                score = score_of[g]
                if score >= th.peer_score and (
                    i is None or not self._slowed(_growth(_score(ratios[i]), score), job.pace)
                ):
                    continue
                r = job.rank(g)
                if i is not None:
                    r.baseline_of = (baselines.groups, i, shift)
                    r.baseline_ratio = (ratios[i], counts[i])
                judged.append((job, r))
        return judged

    def _baseline_scores(self, table: StepTable, recent: _Groups, found: _Spans) -> _Baselines:
        """The ranks' baselines that count (min_baseline_steps steps, in a job with min_ranks such
        ranks): per job the median of its baseline step references, per rank its _median_ratio."""
        th = self.thresholds
        full = found.count >= th.min_baseline_steps
        based, start, counts = found.groups[full], found.start[full], found.count[full]
        if len(based):
            per_job = np.bincount(recent.job[based])
            enough = per_job[recent.job[based]] >= th.min_ranks
            based, start, counts = based[enough], start[enough], counts[enough]
        if not len(based):
            return _Baselines.none(table)
        offsets = np.cumsum(counts) - counts
        at = np.repeat(start - offsets, counts) + np.arange(int(offsets[-1] + counts[-1]))
        groups = _Groups(recent.job[based], recent.rank[based], offsets, counts, found.rows[at])
        base_refs, ratios, counts = self._scored(table, groups)
        medians = {}
        for code in np.unique(groups.job).tolist():
            lo, hi = base_refs.keys.searchsorted([code * base_refs.span, (code + 1) * base_refs.span])
            if hi > lo:
                medians[code] = median(base_refs.values[lo:hi].tolist())
        index = {(job, rank): i for i, (job, rank) in enumerate(zip(groups.job.tolist(), groups.rank.tolist()))}
        return _Baselines(medians, groups, ratios, counts, index, table.origin[1])

    def _peers_slow(self, job: _Job, r: _Rank) -> bool:
        """The "peers" test: below peer_score, and its gap grown by min_gap_growth, below the
        floor, or with a hardware cause."""
        th = self.thresholds
        score = r.score
        if score >= th.peer_score:
            return False
        if score < th.floor_score:
            return True
        baseline_score = job.baseline_score(r)
        if baseline_score is not None and baseline_score >= th.min_gap_growth * score:
            return True
        cause = job.cause(self.thresholds, r)
        return cause is not None and cause.hardware

    def _self_slow(self, job: _Job, r: _Rank) -> bool:
        """Slowed self_slowdown times against its peers and (with the job's pace) its own past."""
        growth = job.growth(r)
        return growth is not None and self._slowed(growth, job.pace)

    def _slowed(self, growth: float, pace: float) -> bool:
        """A rank's gap to its peers grown `growth` times, in a job whose pace changed `pace`
        times, is self_slowdown times slower than its own past and against its peers."""
        slowdown = self.thresholds.self_slowdown
        return growth >= slowdown and growth * pace >= slowdown

    def _verdict(self, job: _Job, r: _Rank) -> str | None:
        """ "peers", "self" or None."""
        if self._peers_slow(job, r):
            return "peers"
        if self._self_slow(job, r):
            return "self"
        return None

    # --- the finding -----------------------------------------------------------------------------

    def _finding(self, window: Window, job: _Job, r: _Rank, basis: str, own_newest_first: list[Step]) -> list[Finding]:
        """The finding for `r`, none when its slow run is shorter than min_slow_steps steps. A step
        counts as slow from halfway to the threshold, so a rank just past the threshold does not
        lose its episode's start to every other step."""
        th = self.thresholds
        baseline_score = job.baseline_score(r)
        if basis == "peers":
            slow_ratio = 2 / (1.0 + th.peer_score)
        else:
            assert baseline_score is not None
            slow_ratio = (1.0 + th.self_slowdown) / 2 / baseline_score
        start, slow_steps = _episode_start(own_newest_first, slow_ratio, job.refs, job.reference)
        # A rank stepping so slowly that fewer steps fit in max_recent_seconds (the time cap: its
        # next older step lies beyond it) needs them all slow; a young job's waits for its steps.
        needed = th.min_slow_steps
        count = len(own_newest_first)
        if count < needed:
            oldest_t = own_newest_first[-1].t
            interval = (own_newest_first[0].t - oldest_t) / (count - 1) if count > 1 else window.now - oldest_t
            if window.now - oldest_t + interval > th.max_recent_seconds:
                needed = count
        if start is None or slow_steps < needed:
            return []
        cause = job.cause(th, r)
        newest = r.recent[0]
        if newest.gpu is not None:
            where = f"GPU {newest.gpu} on {newest.node}"
        else:
            where = f"node {newest.node}"
        stage = job.table.stages[job.code]
        told = self._told.get(job.code)
        if stage is not None:  # its peers are the ranks of its pipeline stage
            where = f"pipeline stage {stage}, {where}"
        elif told is not None:  # or of the stage its step times show
            where = f"the pipeline stage of ranks {ranks_text(told)} by their step times, {where}"
        rank_seconds = _median_seconds(r.recent)
        reference_seconds = rank_seconds * r.score  # the peers' time on the rank's own steps
        evidence: dict[str, object] = {
            "score": round(r.score, 4),
            "rank_seconds": rank_seconds,
            "reference_seconds": reference_seconds,
            "cause": cause.name if cause is not None else None,
            "basis": basis,
            "ranks": len(job.members),
            "pp_stage": stage,
            "steps": len(r.recent),
        }
        if told is not None:
            evidence["stage_ranks"] = list(told)
        if basis == "peers":
            summary = (
                f"rank {r.rank} of job {job.name} ({where}) runs at {r.score:.2f} of its peers' "
                f"speed: {rank_seconds:.2f} s per step against {reference_seconds:.2f} s"
            )
        else:
            assert r.baseline is not None
            baseline_seconds = _median_seconds(r.baseline)
            summary = (
                f"rank {r.rank} of job {job.name} ({where}) runs "
                f"{rank_seconds / baseline_seconds:.2f}x slower than it did while its peers kept "
                f"their pace: {rank_seconds:.2f} s per step against {baseline_seconds:.2f} s"
            )
        if baseline_score is not None and r.baseline is not None:
            evidence["baseline_score"] = round(baseline_score, 4)
            evidence["baseline_seconds"] = _median_seconds(r.baseline)
        cause_text = cause.text() if cause is not None else None
        if cause_text is not None:
            summary += f": {cause_text}"
        if cause is not None:
            evidence.update(cause.evidence())
        table = step_table(window)
        loss = _job_loss(table, table.codes_of(job.name), r.rank, r.recent)
        if loss is not None:
            evidence["job_loss"] = round(loss, 4)
            if loss >= _LOSS_WORTH_SAYING:
                summary += f"; job {job.name} loses about {loss:.0%} of its speed to it"
        return [
            Finding(
                detector=self.id,
                severity=self.severity,
                # A GPU that cannot hold its clock is hardware; otherwise the rank's own work
                # (input pipeline, CPU contention, uneven data) is the first place to look.
                action="inspect_hardware" if cause is not None and cause.hardware else "check_app",
                summary=summary,
                start=start,
                node=newest.node,
                gpu=newest.gpu,
                job=job.name,
                rank=r.rank,
                evidence=evidence,
                key=basis,
            )
        ]


def _job_loss(table: StepTable, codes: Sequence[int], rank: int, recent: Sequence[Step]) -> float | None:
    """The share of its job's speed a rank costs over its recent steps (0 to 1; None when no other
    rank reported those steps; `codes`: the job's, every pipeline stage's): a synchronous step
    waits for its slowest rank, so had this one run no slower than the slowest other rank, each
    step would have been (own - slowest other) shorter.
    Out of the step's wall time where the rank reports it, else out of its own time (the step's
    compute is then the slowest rank's, this one's, and the waits are left out)."""
    numbers = np.fromiter((s.step for s in recent), dtype=np.int64, count=len(recent))
    rows = np.flatnonzero(np.isin(table.job, codes) & (table.rank != rank) & np.isin(table.step, numbers))
    if not len(rows):
        return None
    slowest_other: dict[int, float] = {}
    for number, seconds in zip(table.step[rows].tolist(), table.seconds[rows].tolist()):
        if seconds > slowest_other.get(number, 0.0):
            slowest_other[number] = seconds
    losses = [
        max(0.0, s.seconds - slowest_other[s.step]) / (s.wall_seconds or s.seconds)
        for s in recent
        if s.step in slowest_other
    ]
    return min(1.0, median(losses)) if losses else None


def _step_times(
    window: Window, ranks: set[tuple[str | None, int | None]]
) -> dict[tuple[str | None, int | None], np.ndarray]:
    """The times of each of `ranks`' (job, rank) steps in the window up to now, oldest first."""
    times: dict[tuple[str | None, int | None], np.ndarray] = {}
    if not ranks or not window.steps:
        return times
    table = step_table(window)
    visible = table.t <= window.now
    for job, rank in ranks:
        rows = np.flatnonzero(visible & np.isin(table.job, table.codes_of(job)) & (table.rank == rank))
        if len(rows):
            times[(job, rank)] = table.t[rows]
    return times


def _row_at(candidates: np.ndarray | None, index: int, k: int) -> int:
    """The k-th row _baseline_from reads: of `candidates` where it reads those, else index + k."""
    return int(candidates[k]) if candidates is not None else index + k


def _seconds_per_step(table: StepTable, spans: Sequence[np.ndarray]) -> float | None:
    """A job's seconds per step from its ranks' recent steps (spans: each rank's rows, newest
    first), or None."""
    newest = max((int(span[0]) for span in spans), key=lambda i: int(table.step[i]))
    oldest = min((int(span[-1]) for span in spans), key=lambda i: int(table.step[i]))
    newest_step, oldest_step = int(table.step[newest]), int(table.step[oldest])
    newest_t, oldest_t = float(table.t[newest]), float(table.t[oldest])
    if newest_step <= oldest_step or newest_t <= oldest_t:
        return None
    return (newest_t - oldest_t) / (newest_step - oldest_step)


def _episode_start(
    newest_first: Sequence[Step], slow_ratio: float, refs: Mapping[int, float], reference: float
) -> tuple[float | None, int]:
    """The t of the first slow step (at least slow_ratio times its step's reference, or today's
    where unknown) of the trailing run of mostly slow steps (two fast ones in a row end it, going
    back), and how many slow steps the run has; None and 0 when the newest two steps are fast."""
    start = None
    slow = fast_in_a_row = 0
    for s in newest_first:
        if s.seconds >= slow_ratio * refs.get(s.step, reference):
            start = s.t
            slow += 1
            fast_in_a_row = 0
        else:
            fast_in_a_row += 1
            if fast_in_a_row >= 2:
                break
    return start, slow
