"""Pipeline stages told from step times, for jobs whose step reports carry no coordinates.

A pipeline-parallel job's stages run different layers, so where one stage's work is heavier its
ranks all step slower than the others', from the job's first steps on, and no GPU is at fault
(issue 10: a 128-GPU job's second stage took 1.5x the first's on all 32 replicas). Reports with
`pp_stage` say so (detectors.table: one code per stage); without it, the ranks' steady step
times say it:

- each rank's time is taken against the job's median time of the same step (so the job's pace,
  checkpoints and pauses cancel out), its median over `steps` steps (`min_steps` in a young job);
- sorted, the ranks split where two neighbours are `min_gap` apart: groups of ranks;
- a group of one rank is a lone outlier (a straggler, not a stage): it joins the group just
  faster than it, the stage it falls behind;
- those groups are stages when there are at least two, the smallest holds at least
  `min_stage_ranks` ranks, and each holds a multiple of it (one stage's ranks are its
  data-parallel x tensor-parallel degree; stages of equal speed form one group);
- and only when the job's earliest steps after warm-up that the window held when it was first
  read (kept from then on) show the same groups as its newest: stages are there from the start,
  while ranks that slowed down together later (half a job behind a bad switch) have an onset,
  and stay stragglers.

Stages a few percent apart (the usual uneven split) stay one group: their ranks differ by no
more than healthy ranks do, and straggler.steps' rules already take steady offsets that small.

Cost: each job's guess is read from its newest rows of the step table (its earliest once) and
kept for `recheck_steps` of its steps, in the table's cache shared by the detectors and the
windows of the same columns, so straggler.steps and straggler.stage see the same stages and a
job is read once every 10 steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fleetwatch.detectors.table import StepTable

# Groups of ranks (stages, lone outliers within theirs), as sets: the same groups in any order.
_Groups = frozenset[frozenset[int]]


@dataclass(frozen=True, slots=True)
class StageGuessThresholds:
    # ratio; two groups' closest ranks at least 1.2x apart: straggler.stage's min_stage_ratio, the
    # smallest imbalance worth a finding. Healthy ranks of one stage differ by a few percent
    # (whole-GPU offsets of ~3% sd, tests/fixtures/alibaba's job 3 4.2%): never 1.2x neighbours
    min_gap: float = 1.2
    # ranks; a stage has at least 2 (one rank alone is an outlier, not a stage)
    min_stage_ranks: int = 2
    # steps; each rank's median over 10 steps, then and now (as straggler.steps' recent_steps)
    steps: int = 10
    # steps; a young job is read from as few as 5 (then and now the same steps: its start), in
    # time for straggler.steps, which needs 5 slow steps to report a rank (min_slow_steps)
    min_steps: int = 5
    # s; the time cap: a job whose first min_steps do not fit in this is read from 2 steps, as
    # straggler.steps judges a rank on those of its steps that fit in its max_recent_seconds
    max_young_seconds: float = 600.0
    # steps; a fresh job's first steps compile kernels and autotune (as straggler.steps)
    warmup_steps: int = 10
    # steps; a job's guess holds this many of its steps before it is read again
    recheck_steps: int = 10
    # s; jobs with a step this recent are read (again) when due
    lookback_seconds: float = 20.0
    # s; a job with none keeps its guess this long after it was made (a checkpoint or restart
    # pause, or between two steps of a job stepping every few minutes; straggler.steps' grace)
    hold_seconds: float = 600.0

    def __post_init__(self) -> None:
        if self.min_gap <= 1:
            raise ValueError("min_gap must exceed 1")
        if self.min_stage_ranks < 2:
            raise ValueError("min_stage_ranks must be at least 2")
        if not 1 <= self.min_steps <= self.steps:
            raise ValueError("need 1 <= min_steps <= steps")
        if min(self.steps, self.recheck_steps) < 1 or self.warmup_steps < 0:
            raise ValueError("steps and recheck_steps must be at least 1, warmup_steps not negative")
        if self.lookback_seconds <= 0 or self.hold_seconds < 0:
            raise ValueError("lookback_seconds must be positive, hold_seconds not negative")


@dataclass(frozen=True, slots=True)
class StageGuess:
    """A job's stages as its step times show them: each stage's ranks (fastest stage first, a
    lone outlier within the stage it falls behind), the outliers, and each stage's median time
    relative to the job's step median now (over its ranks other than outliers)."""

    stages: tuple[tuple[int, ...], ...]
    outliers: frozenset[int]
    relative: tuple[float, ...]
    seconds: tuple[float, ...]  # each stage's median step time now, in seconds
    steps: int  # how many steps `relative` and `seconds` are medians over


def stage_guesses(
    table: StepTable, now: float, th: StageGuessThresholds = StageGuessThresholds()
) -> dict[int, StageGuess]:
    """The stages of running jobs whose steps carry no pp_stage, by job code, where their step
    times show some (see the module's docstring). A job with a step in the last
    `lookback_seconds` is read again once it is recheck_steps past its last reading; one without
    keeps its last guess for `hold_seconds` after it was last seen stepping (a slow stepper
    between steps, a pause)."""
    # Both straggler detectors ask at each evaluation: the second gets the first's answer.
    asked = table.shared.get(("stages asked", th))
    if asked is not None and asked[0] == (now, len(table), table.origin):
        return dict(asked[1])
    memo: dict[int, tuple[int, float, StageGuess | None]] = table.shared.setdefault(("stages", th), {})
    first: dict[int, _Groups | None] = table.shared.setdefault(("stages first", th), {})
    t = table.t
    lo, hi = np.searchsorted(t, [now - th.lookback_seconds, now], side="right")
    codes, numbers = table.job[lo:hi], table.step[lo:hi]
    stageless = table.shared.get("stageless codes")
    if stageless is None or len(stageless) != len(table.stages):  # codes only grow
        stageless = np.fromiter((stage is None for stage in table.stages), dtype=bool, count=len(table.stages))
        table.shared["stageless codes"] = stageless
    keep = stageless[codes] & (numbers >= th.warmup_steps)
    codes, numbers = codes[keep], numbers[keep]
    newest = np.full(len(table.stages), -1, dtype=np.int64)
    np.maximum.at(newest, codes, numbers)
    guesses: dict[int, StageGuess] = {}
    for code in np.flatnonzero(newest >= 0).tolist():
        step = int(newest[code])
        known = memo.get(code)
        if known is not None and 0 <= step - known[0] < th.recheck_steps:
            guess = known[2]
            memo[code] = (known[0], now, guess)  # seen running now
        else:
            guess, settled = _guess(table, code, now, th, first)
            # A job too young to tell is read again at its next step (held for this one).
            memo[code] = (step if settled else step - th.recheck_steps + 1, now, guess)
        if guess is not None:
            guesses[code] = guess
    for code, (_, seen_t, guess) in list(memo.items()):
        if code < len(newest) and newest[code] >= 0:
            continue
        if now - seen_t > th.hold_seconds:
            del memo[code]
            first.pop(code, None)  # gone: a job of that code seen again is read afresh
        elif guess is not None:
            guesses[code] = guess
    table.shared[("stages asked", th)] = ((now, len(table), table.origin), dict(guesses))
    return guesses


def _guess(
    table: StepTable, code: int, now: float, th: StageGuessThresholds, first: dict[int, _Groups | None]
) -> tuple[StageGuess | None, bool]:
    """The guess from the job's rows, and whether the job had enough steps to make one. `first`
    holds each job's groups at its earliest steps, read once (None: none then)."""
    if code in first:
        rows = _newest_rows(table, code, now, th)
    else:
        rows = np.flatnonzero((table.job == code) & (table.t <= now) & (table.step >= th.warmup_steps))
    numbers = table.step[rows]
    ranks = table.rank[rows]
    rank_ids, rank_of_row = np.unique(ranks, return_inverse=True)
    if len(rank_ids) < 2 * th.min_stage_ranks:
        return None, True
    # Steps every rank reported, oldest first.
    _, step_of_row, per_step = np.unique(numbers, return_inverse=True, return_counts=True)
    enough = th.min_steps
    first_t, last_t = float(table.t[rows[0]]), float(table.t[rows[-1]])
    interval = (last_t - first_t) / (len(per_step) - 1) if len(per_step) > 1 else now - first_t
    if now - first_t + interval > th.max_young_seconds:
        enough = min(enough, 2)  # a job too slow for min_steps in the time cap (as straggler.steps)
    if len(per_step) < enough and code not in first:
        return None, False
    complete = np.flatnonzero(per_step == len(rank_ids))
    if len(complete) < enough:
        return None, True  # ranks came and went: no steady groups to tell
    if code not in first:
        then, _ = _relative(table, rows, rank_of_row, step_of_row, complete[: th.steps], len(rank_ids))
        groups_then = _groups(then, th)
        first[code] = (
            None
            if groups_then is None
            else frozenset(frozenset(int(rank_ids[i]) for i in group) for group in groups_then[0])
        )
    recent, seconds = _relative(table, rows, rank_of_row, step_of_row, complete[-th.steps :], len(rank_ids))
    groups_now = _groups(recent, th)
    if groups_now is None:
        return None, True
    stages, outliers = groups_now
    if first[code] != frozenset(frozenset(int(rank_ids[i]) for i in stage) for stage in stages):
        return None, True  # not from the start: an onset, not a partition
    members = [[i for i in stage if i not in outliers] for stage in stages]
    return (
        StageGuess(
            tuple(tuple(sorted(int(rank_ids[i]) for i in stage)) for stage in stages),
            frozenset(int(rank_ids[i]) for i in outliers),
            tuple(float(np.median(recent[m])) for m in members),
            tuple(float(np.median(seconds[m])) for m in members),
            min(th.steps, len(complete)),
        ),
        True,
    )


def _newest_rows(table: StepTable, code: int, now: float, th: StageGuessThresholds) -> np.ndarray:
    """The job's rows after warm-up back to at least `steps` + 2 of its step numbers (a step
    still arriving is not complete), read from the newest back in growing spans."""
    t = table.t
    hi = int(np.searchsorted(t, now, side="right"))
    span = th.lookback_seconds
    while True:
        lo = int(np.searchsorted(t, now - span, side="left"))
        mine = (table.job[lo:hi] == code) & (table.step[lo:hi] >= th.warmup_steps)
        rows = lo + np.flatnonzero(mine)
        if lo == 0 or len(np.unique(table.step[rows])) >= th.steps + 2:
            return rows
        span *= 4


def _relative(
    table: StepTable,
    rows: np.ndarray,
    rank_of_row: np.ndarray,
    step_of_row: np.ndarray,
    steps: np.ndarray,
    rank_count: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Each rank's median, over `steps` (indexes into the job's step numbers), of its time over
    the job's median time of that step; and of its time."""
    grid = np.zeros((rank_count, len(steps)))
    column = np.full(int(step_of_row.max()) + 1, -1, dtype=np.int64)
    column[steps] = np.arange(len(steps))
    picked = column[step_of_row] >= 0
    grid[rank_of_row[picked], column[step_of_row[picked]]] = table.seconds[rows[picked]]
    # Complete steps: every cell is filled, so plain medians.
    medians = np.median(grid, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative: np.ndarray = np.median(grid / medians, axis=1)
    seconds: np.ndarray = np.median(grid, axis=1)
    return relative, seconds


def _groups(relative: np.ndarray, th: StageGuessThresholds) -> tuple[list[list[int]], set[int]] | None:
    """The stages (rank indexes, fastest first, lone outliers within the stage they fall behind)
    and the outliers, where the ranks split into stages; else None."""
    if not np.all(np.isfinite(relative)) or np.any(relative <= 0):
        return None
    order = np.argsort(relative, kind="stable")
    values = relative[order]
    cuts = np.flatnonzero(values[1:] >= th.min_gap * values[:-1]) + 1
    if not len(cuts):
        return None
    parts = [part.tolist() for part in np.split(order, cuts)]
    stages: list[list[int]] = []
    outliers: set[int] = set()
    for part in parts:
        if len(part) == 1:
            outliers.add(part[0])
            if stages:
                stages[-1].extend(part)
                continue
        stages.append(list(part))
    if len(stages) > 1 and len(stages[0]) == 1:  # the fastest rank alone: it joins the next group
        lone = stages.pop(0)
        stages[0][:0] = lone
    sizes = [len(stage) for stage in stages]
    smallest = min(sizes)
    if len(stages) < 2 or smallest < th.min_stage_ranks or any(size % smallest for size in sizes):
        return None
    return stages, outliers


def ranks_text(ranks: Sequence[int]) -> str:
    """'12-15' for consecutive ranks (ascending), else '0, 3, 5'."""
    if len(ranks) > 1 and list(ranks) == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ", ".join(map(str, ranks))
