"""Straggler detector from step reports: the rank that slows a synchronous job, and why.

Every rank reports its own compute time per step (DESIGN.md: collective waits excluded), so in a
synchronous job the straggler is the rank whose steps take longer than its peers' on the same
steps. Per job, at each evaluation:

- each step's reference is the median of the fastest half of the ranks' times for that step, so
  up to half the ranks can slow down together and the reference stays with the healthy ones; a
  pause of the whole job (a checkpoint) moves every rank's time and the reference together;
- each rank's score is 1 / the median, over its steps of the last `recent_seconds` (at least
  `min_recent_steps`: slower-stepping jobs look further back), of its time / the step's
  reference: 1.0 as fast as the healthy ranks, 0.5 twice as slow. A median, so one slow step (a
  data-loader hiccup) moves nothing, and a slow-down is found once it has lasted ~10 s.

Real jobs have ranks that differ steadily. Alibaba PAI job 2 (tests/fixtures/alibaba) runs its
slowest worker at 0.80-0.82 from the first iteration to the last, healthy: a low score alone is
not an episode. A rank scoring below `peer_score` is a straggler, keyed "peers", when

- its gap to the peers grew: its score in its baseline (its oldest steps in the window, the
  job's pace then comparable to now) is at least `min_gap_growth` times its score now; or
- it scores below `floor_score`, slower than any steady offset in the traces; or
- its GPU shows a hardware cause in the same span (a throttle reason, an SM clock well below the
  peers' GPUs'): a steady offset with a hardware cause is still a fault.

A rank that slowed `self_slowdown` times against its own baseline, and as much against its peers,
but still scores above `peer_score` (it used to be faster than most), is keyed "self". A job's
first `warmup_steps` steps (numbered from 0) are never compared; a job that started within the
window takes its baseline from its first steps after them, and until it has one only the floor
and a hardware cause count. A job's end (no step of a rank in `recent_seconds`) ends its episodes.

Cost: the newest steps are read back to `recent_seconds` and the oldest forward to a baseline,
both stopping early; ranks within 3% of the reference (most of a healthy job) are not judged
and need no baseline. A 1,000-rank job stepping every second takes ~5 ms of a current CPU core.

Pure: nothing is remembered between evaluations, so nothing before the window can be seen. A gap
that opened longer ago than the window (`window_seconds`, less the baseline) looks like a steady
offset: a straggler between `floor_score` and `peer_score` with no hardware cause is reported
until its onset leaves the window, then its episode closes. Hysteresis is rebuilt from the data
(`hold_*`), which damps but cannot remove flapping for a rank sitting on a threshold.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice, repeat
from operator import attrgetter, truediv
from typing import ClassVar

from fleetwatch.detectors.model import Window
from fleetwatch.detectors.straggler_telemetry import GpuCause, gpu_cause, median, tail
from fleetwatch.records import Finding, Step


@dataclass(frozen=True, slots=True)
class StragglerStepsThresholds:
    # s; a rank is judged on its steps of the last 20 s: the median flips once ~10 s of them are
    # slow (the brief's ">= 10 s"), inside the scenarios' 30 s to find a straggler. A rank with
    # no step in it has stopped (job ended, rank gone): it is not judged and its episode closes
    recent_seconds: float = 20.0
    # steps; a median of at least 10: its noise, ~1.25 x CV / sqrt(10), is 1.6% at the noisiest
    # healthy Alibaba worker's step-to-step CV of 4.0%; slower-stepping jobs look further back
    min_recent_steps: int = 10
    # s; how far back those 10 steps may come from (Alibaba job 3 records every 10th iteration,
    # one record per 7-10 s, so 10 records span ~90 s)
    max_recent_seconds: float = 120.0
    # s; an episode has lasted this long before it is reported (the brief's 10 s)
    min_slow_seconds: float = 10.0
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
    # Hysteresis without memory. A rank that passed the "peers" test at some step of the last
    # hold_seconds (recomputed from its own steps, one point a second, against today's reference
    # and baseline, which drift by a percent or two: hence within hold_tolerance) stays a
    # straggler while it scores below hold_score with its gap grown by hold_gap_growth (above the
    # healthy Alibaba workers' 1.07). Without it a rank slowed ~1.15x, hovering at the thresholds,
    # opens a new episode every few seconds. With it the test is in effect 3% looser to open
    hold_score: float = 0.9
    hold_gap_growth: float = 1.1
    hold_seconds: float = 60.0
    hold_tolerance: float = 0.03
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
        if not 0 < self.floor_score <= self.peer_score <= self.hold_score < 1:
            raise ValueError("need 0 < floor_score <= peer_score <= hold_score < 1")
        if not self.hold_score <= self.judged_below_score <= 1:
            raise ValueError("need hold_score <= judged_below_score <= 1")
        if not 1 <= self.hold_gap_growth <= self.min_gap_growth:
            raise ValueError("need 1 <= hold_gap_growth <= min_gap_growth")
        if self.hold_seconds < 0 or self.hold_tolerance < 0:
            raise ValueError("hold_seconds and hold_tolerance must not be negative")
        if self.self_slowdown <= 1 or self.max_pace_change < 1:
            raise ValueError("self_slowdown must exceed 1, max_pace_change be at least 1")
        if not 0 < self.recent_seconds <= self.max_recent_seconds:
            raise ValueError("need 0 < recent_seconds <= max_recent_seconds")
        if self.baseline_seconds <= 0 or self.min_slow_seconds < 0:
            raise ValueError("baseline_seconds must be positive, min_slow_seconds not negative")
        history_seconds = 2 * self.baseline_seconds + self.max_recent_seconds + self.hold_seconds
        if history_seconds > self.window_seconds:
            raise ValueError("the window must hold the baselines, the longest span and the hold")
        if min(self.min_ranks, self.reference_ranks) < 2:
            raise ValueError("need min_ranks and reference_ranks of at least 2")
        if self.min_recent_steps < 1 or self.min_baseline_steps < 1:
            raise ValueError("need min_recent_steps and min_baseline_steps of at least 1")
        if not 0 < self.cause_min_fraction <= 1:
            raise ValueError("cause_min_fraction must be in (0, 1]")


# job -> rank -> steps: recent spans newest first, baselines oldest first
_Spans = dict[str, dict[int, list[Step]]]

_SECONDS = attrgetter("seconds")
_STEP = attrgetter("step")
_T = attrgetter("t")


def _median_seconds(steps: Iterable[Step]) -> float:
    return median(list(map(_SECONDS, steps)))


def _fastest_half_median(values: list[float]) -> float:
    """The median of the fastest half: robust to up to half the ranks slowing down together."""
    values.sort()
    return median(values[: (len(values) + 1) // 2])


def _score(ratio: float) -> float:
    return 1.0 / ratio if ratio > 0 else math.inf


def _median_ratio(steps: Sequence[Step], refs: Mapping[int, float]) -> tuple[float, int]:
    """The median of each step's time over its step's reference, and how many steps had one.

    C-level maps (this runs for every step of every rank): a step without a reference gets an
    infinite one, a ratio of 0, and sorts first where it is skipped (as is a 0 s step).
    """
    ratios = list(map(truediv, map(_SECONDS, steps), map(refs.get, map(_STEP, steps), repeat(math.inf))))
    ratios.sort()
    skip = bisect_right(ratios, 0.0)
    count = len(ratios) - skip
    if count == 0:
        return math.nan, 0
    middle = skip + count // 2
    if count % 2:
        return ratios[middle], count
    return (ratios[middle - 1] + ratios[middle]) / 2, count


@dataclass(slots=True)
class _Rank:
    rank: int
    recent: list[Step]  # newest first
    score: float
    # Filled by _Job.baseline_score on first use: most ranks of a healthy job never need it.
    baseline: list[Step] | None = None  # oldest first, when the baseline counts
    baseline_score: float | None = None
    baseline_read: bool = False


@dataclass(slots=True)
class _Job:
    """One job at one evaluation: its ranks, references, pace against the baseline, and its GPUs'
    telemetry, read once and only when some rank needs a cause."""

    name: str
    ranks: list[_Rank]
    refs: dict[int, float]  # step number -> reference seconds
    reference: float  # median of refs: the healthy step time now
    window: Window
    min_baseline_steps: int
    pace: float = math.inf  # reference now / reference in the baseline (inf without one)
    # rank -> baseline steps and their step references; empty when the baseline does not count
    baselines: Mapping[int, list[Step]] = field(default_factory=dict)
    base_refs: dict[int, float] = field(default_factory=dict)
    _gpus: dict[int, tuple[float | None, float | None]] | None = None  # rank -> clock, power
    _causes: dict[int, GpuCause | None] = field(default_factory=dict)

    def baseline_score(self, r: _Rank) -> float | None:
        """r's score over its baseline steps against those steps' references, or None."""
        if not r.baseline_read:
            r.baseline_read = True
            span = self.baselines.get(r.rank)
            if span is not None:
                ratio, count = _median_ratio(span, self.base_refs)
                if count * 2 >= self.min_baseline_steps:
                    r.baseline = span
                    r.baseline_score = _score(ratio)
        return r.baseline_score

    def growth(self, r: _Rank) -> float | None:
        """How many times r's gap to the peers grew since its baseline (>1: it fell behind)."""
        baseline_score = self.baseline_score(r)
        if baseline_score is None:
            return None
        return baseline_score / r.score if r.score > 0 else math.inf

    def cause(self, th: StragglerStepsThresholds, r: _Rank) -> GpuCause | None:
        """What r's GPU telemetry over its recent span says against the GPUs of the other ranks
        (each one's latest sample); None without telemetry for r's GPU."""
        if r.rank in self._causes:
            return self._causes[r.rank]
        cause = None
        newest = r.recent[0]
        series = self.window.gpu.get((newest.node, newest.gpu)) if newest.gpu is not None else None
        if series:
            began_t = r.recent[-1].t - r.recent[-1].seconds  # when its oldest recent step began
            samples = tail(series, began_t, self.window.now)
            if samples:
                gpus = self._peer_gpus(th.recent_seconds)
                clocks = [c for rank, (c, _) in gpus.items() if rank != r.rank and c is not None]
                powers = [p for rank, (_, p) in gpus.items() if rank != r.rank and p is not None]
                cause = gpu_cause(
                    samples,
                    median(clocks) if clocks else None,
                    median(powers) if powers else None,
                    min_fraction=th.cause_min_fraction,
                    clock_below_peers=th.clock_below_peers,
                    power_below_peers=th.power_below_peers,
                )
        self._causes[r.rank] = cause
        return cause

    def _peer_gpus(self, max_age_seconds: float) -> dict[int, tuple[float | None, float | None]]:
        if self._gpus is None:
            self._gpus = {}
            now = self.window.now
            seen: set[tuple[str, int]] = set()
            for r in self.ranks:
                step = r.recent[0]
                if step.gpu is None or (step.node, step.gpu) in seen:
                    continue
                seen.add((step.node, step.gpu))  # two ranks on one GPU count once
                series = self.window.gpu.get((step.node, step.gpu))
                latest = tail(series[-3:], now - max_age_seconds, now) if series else []
                if latest:
                    clock = latest[-1].metrics.get("sm_clock_mhz")
                    power = latest[-1].metrics.get("power_watts")
                    self._gpus[r.rank] = (
                        None if clock is None else float(clock),
                        None if power is None else float(power),
                    )
        return self._gpus


_Pending = tuple[_Job, _Rank]


@dataclass(slots=True)
class StragglerStepsDetector:
    """Step reports -> a finding per rank that runs well below its job's healthy pace, or below
    its own earlier pace, with the hardware cause when its GPU's telemetry shows one."""

    thresholds: StragglerStepsThresholds = field(default_factory=StragglerStepsThresholds)
    id: ClassVar[str] = "straggler.steps"
    # Warning: the job still runs, at the straggler's pace.
    severity: ClassVar[str] = "warning"

    @property
    def window_seconds(self) -> float:
        return self.thresholds.window_seconds

    def detect(self, window: Window) -> list[Finding]:
        th = self.thresholds
        steps = window.steps
        if not steps:
            return []
        now = window.now
        recent = self._recent(steps, now)
        if not recent:
            return []
        jobs: list[tuple[_Job, list[_Rank]]] = []
        for name, spans in recent.items():
            job = self._job(window, name, spans)
            if job is not None:
                # Ranks within a few percent of the healthy pace slow nobody: never judged.
                judged = [r for r in job.ranks if r.score < th.judged_below_score]
                if judged:
                    jobs.append((job, judged))
        # Baselines only for the jobs with a rank to judge.
        baselines = self._baselines(steps, now, {job.name: recent[job.name] for job, _ in jobs})
        findings: list[Finding] = []
        pending: list[_Pending] = []
        for job, judged in jobs:
            self._attach_baseline(job, baselines.get(job.name, {}))
            for r in judged:
                verdict = self._verdict(job, r)
                if verdict == "hold":
                    pending.append((job, r))
                elif verdict is not None:
                    findings.extend(self._finding(window, job, r, verdict, r.recent))
        if pending:
            findings.extend(self._settle(window, steps, pending))
        findings.sort(key=lambda f: (f.start, f.job or "", -1 if f.rank is None else f.rank))
        return findings

    # --- reading the window: newest steps back, oldest steps forward, both stopping early -------

    def _recent(self, steps: Sequence[Step], now: float) -> _Spans:
        """Each running rank's steps (one at least in the last recent_seconds), newest first,
        extended back to min_recent_steps within max_recent_seconds."""
        th = self.thresholds
        cut = now - th.recent_seconds
        far = now - th.max_recent_seconds
        warmup = th.warmup_steps
        spans: _Spans = {}
        last_job: str | None = None
        ranks: dict[int, list[Step]] = {}
        needy = -1  # ranks short of min_recent_steps, counted once past `cut`
        for s in reversed(steps):
            t = s.t
            if t > now or s.step < warmup:
                continue
            if t >= cut:
                if s.job != last_job:  # steps of one job mostly come together: one lookup
                    last_job = s.job
                    ranks = spans.setdefault(last_job, {})
                span = ranks.get(s.rank)
                if span is None:
                    ranks[s.rank] = [s]
                else:
                    span.append(s)
                continue
            if needy < 0:
                needy = sum(
                    1 for job_ranks in spans.values() for span in job_ranks.values() if len(span) < th.min_recent_steps
                )
            if needy == 0 or t < far:
                break
            job_ranks = spans.get(s.job)
            span = job_ranks.get(s.rank) if job_ranks is not None else None
            if span is None or len(span) >= th.min_recent_steps:
                continue
            span.append(s)
            if len(span) == th.min_recent_steps:
                needy -= 1
        return spans

    def _baselines(self, steps: Sequence[Step], now: float, recent: _Spans) -> _Spans:
        """Each running rank's oldest min_baseline_steps steps in the window before its recent
        span (oldest first): a job's first steps after warm-up when it started in the window."""
        th = self.thresholds
        # The engine keeps steps as long as the most demanding detector needs: start at this
        # detector's own window, so that its baseline does not depend on the others.
        oldest = bisect_left(steps, now - th.window_seconds, key=_T)
        found = self._baseline_from(steps, oldest, now, recent)
        # A job that started later: its steps are numbered from 0, so its step rate says when its
        # first steps after warm-up ran; look there (a job younger than a baseline has none yet).
        for job, ranks in recent.items():
            if found.get(job):
                continue
            began_t = _warmed_up_at(ranks, th.warmup_steps)
            recent_t = min(span[-1].t for span in ranks.values())
            if began_t is None or began_t + th.baseline_seconds > recent_t:
                continue
            index = bisect_left(steps, max(began_t, now - th.window_seconds), key=_T)
            if index > oldest:
                found.update(self._baseline_from(steps, index, now, {job: ranks}))
        return found

    def _baseline_from(self, steps: Sequence[Step], index: int, now: float, recent: _Spans) -> _Spans:
        th = self.thresholds
        if index >= len(steps):
            return {}
        warmup = th.warmup_steps
        need = th.min_baseline_steps
        stop_t = now - th.recent_seconds
        overlap_t = now - th.max_recent_seconds  # a slow stepper's recent span may reach here
        look_until_t = steps[index].t + th.baseline_seconds  # where ranks are looked for
        spans: _Spans = {job: {rank: [] for rank in ranks} for job, ranks in recent.items()}
        needy = 0  # ranks found, short of min_baseline_steps
        last_job: str | None = None
        ranks: dict[int, list[Step]] | None = None
        for s in islice(steps, index, None):
            t = s.t
            if t >= stop_t or (needy == 0 and t > look_until_t):
                break
            if s.job != last_job:  # steps of one job mostly come together: one lookup
                last_job = s.job
                ranks = spans.get(last_job)
            if ranks is None:
                continue
            span = ranks.get(s.rank)
            if span is None or s.step < warmup:
                continue
            count = len(span)
            if count >= need or (count == 0 and t > look_until_t):
                continue  # enough, or a rank that first appears later: no baseline here
            if t >= overlap_t and t >= recent[s.job][s.rank][-1].t:
                continue  # never overlap the rank's own recent span
            span.append(s)
            if count == 0:
                needy += need > 1
            elif count + 1 == need:
                needy -= 1
        return {job: {r: span for r, span in ranks.items() if span} for job, ranks in spans.items()}

    # --- judging ---------------------------------------------------------------------------------

    def _references(self, spans: Mapping[int, list[Step]]) -> dict[int, float]:
        """Step number -> the median of the fastest half of that step's times, over at most
        reference_ranks ranks, for the steps most of those reported."""
        th = self.thresholds
        ranks = sorted(spans)
        if len(ranks) > th.reference_ranks:
            every = len(ranks) / th.reference_ranks
            ranks = [ranks[int(i * every)] for i in range(th.reference_ranks)]
        by_step: dict[int, list[float]] = {}
        for rank in ranks:
            for s in spans[rank]:
                values = by_step.get(s.step)
                if values is None:
                    by_step[s.step] = [s.seconds]
                else:
                    values.append(s.seconds)
        min_reports = max(th.min_ranks, (len(ranks) + 1) // 2)
        return {step: _fastest_half_median(values) for step, values in by_step.items() if len(values) >= min_reports}

    def _job(self, window: Window, name: str, spans: Mapping[int, list[Step]]) -> _Job | None:
        """The job's ranks scored step by step against the same steps' references."""
        th = self.thresholds
        if len(spans) < th.min_ranks:
            return None
        refs = self._references(spans)
        ranks = []
        for rank, span in spans.items():
            ratio, count = _median_ratio(span, refs)
            if count:
                ranks.append(_Rank(rank, span, _score(ratio)))
        if len(ranks) < th.min_ranks:
            return None
        reference = median(list(refs.values()))
        return _Job(name, ranks, refs, reference, window, th.min_baseline_steps)

    def _attach_baseline(self, job: _Job, baseline_spans: Mapping[int, list[Step]]) -> None:
        """The job's baseline steps and their references, where the job's pace then was
        comparable to now (the ranks' baseline scores follow on first use)."""
        th = self.thresholds
        based = {rank: span for rank, span in baseline_spans.items() if len(span) >= th.min_baseline_steps}
        base_refs = self._references(based) if len(based) >= th.min_ranks else {}
        pace = job.reference / median(list(base_refs.values())) if base_refs else math.inf
        job.pace = pace
        if 1 / th.max_pace_change <= pace <= th.max_pace_change:
            job.baselines, job.base_refs = based, base_refs

    def _peers_slow(self, job: _Job, r: _Rank, score: float, score_limit: float, min_growth: float) -> bool:
        """The "peers" test of r at `score` (now, or at an earlier step): below score_limit, and
        its gap grown by min_growth, below the floor, or with a hardware cause."""
        if score >= score_limit:
            return False
        if score < self.thresholds.floor_score:
            return True
        baseline_score = job.baseline_score(r)
        if baseline_score is not None and baseline_score >= min_growth * score:
            return True
        cause = job.cause(self.thresholds, r)
        return cause is not None and cause.hardware

    def _self_slow(self, job: _Job, r: _Rank) -> bool:
        """Slowed self_slowdown times against its peers and (with the job's pace) its own past."""
        growth = job.growth(r)
        slowdown = self.thresholds.self_slowdown
        return growth is not None and growth >= slowdown and growth * job.pace >= slowdown

    def _verdict(self, job: _Job, r: _Rank) -> str | None:
        """ "peers", "self", "hold" (a peers straggler if the test held lately) or None."""
        th = self.thresholds
        if self._peers_slow(job, r, r.score, th.peer_score, th.min_gap_growth):
            return "peers"
        if self._peers_slow(job, r, r.score, th.hold_score, th.hold_gap_growth):
            return "hold"
        if self._self_slow(job, r):
            return "self"
        return None

    def _settle(self, window: Window, steps: Sequence[Step], pending: list[_Pending]) -> list[Finding]:
        """Ranks that pass only the hold test: "peers" when the full test held at some step of
        the last hold_seconds, else "self" when that holds, else nothing."""
        history = self._history(steps, window.now, pending)
        findings: list[Finding] = []
        for job, r in pending:
            own = history.get((job.name, r.rank), r.recent)
            if self._held(job, r, own, window.now):
                findings.extend(self._finding(window, job, r, "peers", own))
            elif self._self_slow(job, r):
                findings.extend(self._finding(window, job, r, "self", r.recent))
        return findings

    def _history(self, steps: Sequence[Step], now: float, pending: list[_Pending]) -> dict[tuple[str, int], list[Step]]:
        """The pending ranks' steps of the last hold_seconds, newest first, and the
        min_recent_steps (at least recent_seconds' worth) before them."""
        th = self.thresholds
        wanted: dict[str, dict[int, list[Step]]] = {}
        for job, r in pending:
            wanted.setdefault(job.name, {})[r.rank] = []
        hold_t = now - th.hold_seconds
        enough_t = hold_t - th.recent_seconds
        far_t = hold_t - th.max_recent_seconds
        short = len(pending)  # ranks short of min_recent_steps before hold_t
        before: dict[tuple[str, int], int] = {}
        for s in reversed(steps):
            t = s.t
            if t > now or s.step < th.warmup_steps:
                continue
            if t < far_t or (t < enough_t and short == 0):
                break
            ranks = wanted.get(s.job)
            own = ranks.get(s.rank) if ranks is not None else None
            if own is None:
                continue
            key = (s.job, s.rank)
            if t < enough_t and before.get(key, 0) >= th.min_recent_steps:
                continue
            own.append(s)
            if t < hold_t:
                before[key] = before.get(key, 0) + 1
                if before[key] == th.min_recent_steps:
                    short -= 1
        return {(job, rank): own for job, ranks in wanted.items() for rank, own in ranks.items()}

    def _held(self, job: _Job, r: _Rank, own: list[Step], now: float) -> bool:
        """Whether the full "peers" test held, within hold_tolerance, at some step of the last
        hold_seconds (one a second of data time, the grid the engine evaluates on), judged as an
        evaluation then would have: on the rank's steps of recent_seconds (at least
        min_recent_steps) up to it, against the steps' references where known."""
        th = self.thresholds
        if th.hold_seconds == 0:
            return False
        score_limit = th.peer_score * (1 + th.hold_tolerance)
        min_growth = th.min_gap_growth / (1 + th.hold_tolerance)
        hold_t = now - th.hold_seconds
        refs, reference = job.refs, job.reference
        last_second = None
        end = 0  # own[i:end]: the steps within recent_seconds before own[i] (newest first)
        for i, step in enumerate(own):
            if step.t < hold_t:
                break
            second = math.floor(step.t)
            if second == last_second:
                continue
            last_second = second
            end = max(end, i + 1)
            while end < len(own) and own[end].t >= step.t - th.recent_seconds:
                end += 1
            stop = max(end, i + th.min_recent_steps)
            if stop > len(own):
                break  # not enough history that far back
            ratios = [s.seconds / refs.get(s.step, reference) for s in own[i:stop]]
            if self._peers_slow(job, r, _score(median(ratios)), score_limit, min_growth):
                return True
        return False

    # --- the finding -----------------------------------------------------------------------------

    def _finding(self, window: Window, job: _Job, r: _Rank, basis: str, own_newest_first: list[Step]) -> list[Finding]:
        """The finding for `r`, none when its slow run is shorter than min_slow_seconds. A step
        counts as slow from halfway to the threshold, so a rank just past the threshold does not
        lose its episode's start to every other step."""
        th = self.thresholds
        baseline_score = job.baseline_score(r)
        if basis == "peers":
            slow_ratio = 2 / (1.0 + th.peer_score)
        else:
            assert baseline_score is not None
            slow_ratio = (1.0 + th.self_slowdown) / 2 / baseline_score
        start = _episode_start(own_newest_first, slow_ratio, job.refs, job.reference)
        if start is None or window.now - start < th.min_slow_seconds:
            return []
        cause = job.cause(th, r)
        newest = r.recent[0]
        if newest.gpu is not None:
            where = f"GPU {newest.gpu} on {newest.node}"
        else:
            where = f"node {newest.node}"
        rank_seconds = _median_seconds(r.recent)
        reference_seconds = rank_seconds * r.score  # the peers' time on the rank's own steps
        evidence: dict[str, object] = {
            "score": round(r.score, 4),
            "rank_seconds": rank_seconds,
            "reference_seconds": reference_seconds,
            "cause": cause.name if cause is not None else None,
            "basis": basis,
            "ranks": len(job.ranks),
            "steps": len(r.recent),
        }
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


def _warmed_up_at(ranks: Mapping[int, list[Step]], warmup_steps: int) -> float | None:
    """When a job's step number `warmup_steps` ran, from its recent steps' rate, or None."""
    newest = max((span[0] for span in ranks.values()), key=_STEP)
    oldest = min((span[-1] for span in ranks.values()), key=_STEP)
    if newest.step <= oldest.step or newest.t <= oldest.t:
        return None
    seconds_per_step = (newest.t - oldest.t) / (newest.step - oldest.step)
    return newest.t - (newest.step - warmup_steps) * seconds_per_step


def _episode_start(
    newest_first: Sequence[Step], slow_ratio: float, refs: Mapping[int, float], reference: float
) -> float | None:
    """The t of the first slow step (at least slow_ratio times its step's reference, or today's
    where unknown) of the trailing run of mostly slow steps (two fast ones in a row end it, going
    back); None when the newest two steps are fast."""
    start = None
    fast_in_a_row = 0
    for s in newest_first:
        if s.seconds >= slow_ratio * refs.get(s.step, reference):
            start = s.t
            fast_in_a_row = 0
        else:
            fast_in_a_row += 1
            if fast_in_a_row >= 2:
                break
    return start
