"""Pipeline-stage imbalance: one stage of a pipeline-parallel job slower than the others everywhere.

In a pipeline-parallel job each stage runs its share of the model's layers, and every step waits for
the slowest stage. When one stage takes clearly longer than the others on every data-parallel
replica, no GPU is at fault: the model is split unevenly (the last stage often holds the loss and
the output layer as well). That is worth one finding for the whole job, naming the stage, its time
against the other stages' and what the job loses, not a straggler finding on each of its ranks
(straggler.steps compares a rank with its own stage's ranks on the other replicas, so it reports
none of them).

Per job whose step reports carry `pp_stage` (and `dp_rank`), at each evaluation: its newest
`recent_steps` steps that every stage has reported (at least `min_steps`; before warm-up: never;
older than `max_recent_seconds`: not counted); per replica and stage the median of the ranks'
times; a stage is imbalanced when, on every replica, it takes at least `min_stage_ratio` times
the median of the other stages' times. Once reported it stays so while the ratio holds above
`hold_stage_ratio` on every replica, so a stage near the threshold does not flap.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from fleetwatch.detectors.model import Window, step_table
from fleetwatch.detectors.stages import StageGuess, ranks_text, stage_guesses
from fleetwatch.detectors.straggler_telemetry import median
from fleetwatch.detectors.table import StepTable
from fleetwatch.records import Finding

# The stage key of a job's finding from stages told by step times (see detectors.stages).
_TOLD = -1


@dataclass(frozen=True, slots=True)
class StragglerStageThresholds:
    # steps; a median over 10 steps: ~1.6% of noise at the noisiest healthy Alibaba worker's 4% CV
    # (as straggler.steps' recent_steps)
    recent_steps: int = 10
    # s; the time cap: steps older than this are not counted (as straggler.steps'
    # max_recent_seconds); 10 steps of a 45 s-step job fit in it
    max_recent_seconds: float = 600.0
    # steps; fewer than recent_steps inside the cap (a job stepping every minute) still count
    # from this many: a median of 5 moves ~2.5% at 4% CV, far inside min_stage_ratio's margin
    min_steps: int = 5
    # step number; a fresh job's first steps compile kernels and autotune (as straggler.steps)
    warmup_steps: int = 10
    # ratio; partitioning by layer count leaves stages 5-10% apart in healthy jobs (the corpus's
    # pipelines); at 1.2x a stage costs the job a sixth of its speed, and straggler.steps would
    # call a rank that much slower than its peers a straggler (peer_score 0.85 ~ 1 / 1.18)
    min_stage_ratio: float = 1.2
    # ratio; a reported stage stays reported while it is this much slower (hysteresis, our choice:
    # half the threshold's margin over a balanced pipeline)
    hold_stage_ratio: float = 1.1

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.recent_steps:
            raise ValueError("need 1 <= min_steps <= recent_steps")
        if not 1 < self.hold_stage_ratio <= self.min_stage_ratio:
            raise ValueError("need 1 < hold_stage_ratio <= min_stage_ratio")
        if self.max_recent_seconds <= 0:
            raise ValueError("max_recent_seconds must be positive")


@dataclass(slots=True)
class StragglerStageDetector:
    """Step reports with pipeline coordinates -> a finding per job with one stage slower than the
    rest on every data-parallel replica."""

    thresholds: StragglerStageThresholds = field(default_factory=StragglerStageThresholds)
    id: ClassVar[str] = "straggler.stage"
    # Warning: the job runs, at the slow stage's pace; nothing is broken.
    severity: ClassVar[str] = "warning"
    # Repartition the model (move layers off the slow stage); no hardware to inspect.
    action: ClassVar[str] = "check_app"
    # (job, stage) reported at the last evaluation: the hold applies to them.
    _reported: set[tuple[str, int]] = field(default_factory=set, init=False, repr=False, compare=False)

    @property
    def window_seconds(self) -> float:
        return self.thresholds.max_recent_seconds

    # Reads step reports only: no GPU sample fields.
    gpu_window_seconds: ClassVar[float] = 0.0

    def detect(self, window: Window) -> list[Finding]:
        if not window.steps:
            self._reported = set()
            return []
        table = step_table(window)
        codes_by_job: dict[str, list[int]] = defaultdict(list)
        for code, (job, stage) in enumerate(zip(table.jobs, table.stages)):
            if stage is not None:
                codes_by_job[job].append(code)
        findings = []
        reported: set[tuple[str, int]] = set()
        for job, codes in codes_by_job.items():
            finding = self._job(window, table, job, codes)
            if finding is not None:
                findings.append(finding)
                reported.add((job, finding.evidence["pp_stage"]))
        for code, guess in stage_guesses(table, window.now).items():
            finding = self._told(table, code, guess)
            if finding is not None:
                findings.append(finding)
                reported.add((table.jobs[code], _TOLD))
        self._reported = reported
        return findings

    def _told(self, table: StepTable, code: int, guess: StageGuess) -> Finding | None:
        """The finding for a job without coordinates whose step times show stages: its slowest
        stage against the others (each stage as one group: the replicas are not known)."""
        th = self.thresholds
        job = table.jobs[code]
        slowest = max(range(len(guess.stages)), key=lambda i: guess.relative[i])
        others = [i for i in range(len(guess.stages)) if i != slowest]
        ratio = guess.relative[slowest] / median([guess.relative[i] for i in others])
        limit = th.hold_stage_ratio if (job, _TOLD) in self._reported else th.min_stage_ratio
        if ratio < limit:
            return None
        stage_seconds = guess.seconds[slowest]
        other_seconds = median([guess.seconds[i] for i in others])
        loss = max(0.0, 1.0 - max(guess.seconds[i] for i in others) / stage_seconds)
        ranks = list(guess.stages[slowest])  # with a straggler among them: straggler.steps reports it
        rows = np.flatnonzero((table.job == code) & (table.step >= th.warmup_steps))
        return self._finding(
            job,
            "stage told from step times",
            f"ranks {ranks_text(ranks)} of job {job} take {ratio:.2f}x the other ranks' time, together since "
            f"its first steps ({stage_seconds:.2f} s a step against {other_seconds:.2f} s): a pipeline stage, "
            f"told from the step times (the reports carry no pp_stage), the model split unevenly, not a "
            f"GPU at fault; job {job} loses about {loss:.0%} of its speed to it",
            float(table.t[rows].min()) if len(rows) else float(table.t[-1]),
            {"pp_stage": None, "stage_ranks": ranks},
            ratio=ratio,
            stage_seconds=stage_seconds,
            other_seconds=other_seconds,
            stages=len(guess.stages),
            replicas=None,
            steps=guess.steps,
            loss=loss,
        )

    def _job(self, window: Window, table: StepTable, job: str, codes: list[int]) -> Finding | None:
        th = self.thresholds
        now = window.now
        stage_of_code = np.full(len(table.jobs), -1, dtype=np.int64)
        for code in codes:
            stage = table.stages[code]
            assert stage is not None  # codes are the job's stages (detect())
            stage_of_code[code] = stage
        rows = np.flatnonzero(
            (stage_of_code[table.job] >= 0)
            & (table.t <= now)
            & (table.t >= now - th.max_recent_seconds)
            & (table.step >= th.warmup_steps)
        )
        if not len(rows):
            return None
        stages = stage_of_code[table.job[rows]]
        all_stages = set(np.unique(stages).tolist())
        if len(all_stages) < 2:
            return None
        # The newest steps every stage reported (a step still arriving is left for the next pass).
        numbers = table.step[rows]
        complete = set.intersection(*(set(numbers[stages == stage].tolist()) for stage in all_stages))
        picked = sorted(complete)[-th.recent_steps :]
        if len(picked) < th.min_steps:
            return None
        kept = np.isin(numbers, picked)
        rows, stages = rows[kept], stages[kept]
        times: dict[tuple[int, int], list[float]] = defaultdict(list)  # (replica, stage) -> seconds
        for replica, stage, seconds in zip(table.dp[rows].tolist(), stages.tolist(), table.seconds[rows].tolist()):
            times[(replica, stage)].append(seconds)
        by_replica: dict[int, dict[int, float]] = defaultdict(dict)
        for (replica, stage), values in times.items():
            by_replica[replica][stage] = median(values)
        replicas = [stage_times for stage_times in by_replica.values() if set(stage_times) == all_stages]
        if not replicas:
            return None
        slowest = max(all_stages, key=lambda s: median([r[s] for r in replicas]))
        ratios, losses, others = [], [], []
        for stage_times in replicas:
            other = [t for s, t in stage_times.items() if s != slowest]
            ratios.append(stage_times[slowest] / median(other))
            losses.append(1.0 - max(other) / stage_times[slowest])
            others.append(median(other))
        limit = th.hold_stage_ratio if (job, slowest) in self._reported else th.min_stage_ratio
        ratio = min(ratios)
        if ratio < limit:
            return None
        stage_seconds = median([r[slowest] for r in replicas])
        other_seconds = median(others)
        loss = max(0.0, median(losses))
        first_t = float(table.t[rows].min())
        return self._finding(
            job,
            f"stage {slowest}",
            f"pipeline stage {slowest} of job {job} takes {ratio:.2f}x or more the other stages' time on "
            f"each of its {len(replicas)} data-parallel replica{'s' if len(replicas) != 1 else ''} "
            f"({stage_seconds:.2f} s a step against {other_seconds:.2f} s): the model is split unevenly, "
            f"not a GPU at fault; job {job} loses about {loss:.0%} of its speed to it",
            first_t,
            {"pp_stage": slowest},
            ratio=ratio,
            stage_seconds=stage_seconds,
            other_seconds=other_seconds,
            stages=len(all_stages),
            replicas=len(replicas),
            steps=len(picked),
            loss=loss,
        )

    def _finding(
        self,
        job: str,
        key: str,
        summary: str,
        start: float,
        where: dict[str, object],
        *,
        ratio: float,
        stage_seconds: float,
        other_seconds: float,
        stages: int,
        replicas: int | None,
        steps: int,
        loss: float,
    ) -> Finding:
        """A slow stage's finding: `where` names the stage (pp_stage, or the ranks told from step times)."""
        evidence = {
            **where,
            "ratio": round(ratio, 4),
            "stage_seconds": round(stage_seconds, 6),
            "other_stages_seconds": round(other_seconds, 6),
            "stages": stages,
            "replicas": replicas,
            "steps": steps,
            "job_loss": round(loss, 4),
        }
        return Finding(self.id, self.severity, self.action, summary, start, job=job, evidence=evidence, key=key)
