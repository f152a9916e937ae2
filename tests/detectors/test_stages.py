"""Pipeline stages told from step times alone (detectors.stages), for reports without pp_stage.

The same hybrid-parallel jobs as tests/detectors/test_straggler_stage.py (4 stages x 2 replicas x
2 tensor-parallel ranks, 16 ranks in Megatron's order, 2% noise), their reports stripped of
coordinates.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from fleetwatch.detectors.model import step_table_of
from fleetwatch.detectors.stages import StageGuessThresholds, _groups, ranks_text, stage_guesses
from fleetwatch.records import Step
from tests.detectors.test_straggler_stage import pipeline_steps


def guesses(steps: list[Step], now: float | None = None):
    return stage_guesses(step_table_of(steps), steps[-1].t if now is None else now)


def test_a_stage_slower_from_the_start_is_told_from_the_step_times():
    (guess,) = guesses(pipeline_steps(stage_factors=(1.0, 1.0, 1.0, 1.6), coordinates=False)).values()
    # The three stages of equal speed form one group of 12, a multiple of the slow stage's 4.
    assert guess.stages == (tuple(range(12)), (12, 13, 14, 15))
    assert guess.outliers == frozenset()
    assert guess.relative[1] / guess.relative[0] == pytest.approx(1.6, abs=0.05)
    assert guess.seconds[1] == pytest.approx(0.9 * 1.6, rel=0.03)


def test_two_slow_stages_of_four_are_two_groups_of_eight():
    (guess,) = guesses(pipeline_steps(stage_factors=(1.0, 1.5, 1.0, 1.5), coordinates=False)).values()
    assert guess.stages == ((0, 1, 2, 3, 8, 9, 10, 11), (4, 5, 6, 7, 12, 13, 14, 15))


@pytest.mark.parametrize("factors", [(1.0, 1.05, 1.0, 1.1), (1.08, 1.0, 1.0, 1.0), (1.0, 1.0, 1.0, 1.0)])
def test_stages_a_few_percent_apart_are_one_group(factors):
    assert guesses(pipeline_steps(stage_factors=factors, coordinates=False)) == {}


def test_a_lone_slow_rank_is_an_outlier_not_a_stage():
    assert guesses(pipeline_steps(slow={3: 1.5}, coordinates=False)) == {}
    # Within a slow stage it belongs to that stage, as its outlier.
    (guess,) = guesses(pipeline_steps(stage_factors=(1.0, 1.0, 1.0, 1.6), slow={13: 2.4}, coordinates=False)).values()
    assert guess.stages == (tuple(range(12)), (12, 13, 14, 15)) and guess.outliers == {13}
    assert guess.seconds[1] == pytest.approx(0.9 * 1.6, rel=0.03)  # the stage's time, not the outlier's


def test_ranks_that_slowed_down_together_later_are_not_a_stage():
    # Stage 3's four ranks slow 1.6x from step 100 on: an onset (half a job behind a bad switch
    # looks the same), not a split model. Their first steps show no groups.
    steps = pipeline_steps(factor_at={100: (1.0, 1.0, 1.0, 1.6)}, coordinates=False)
    assert guesses(steps) == {}


def test_a_lone_fast_rank_is_an_outlier_too():
    # Rank 3 steps 1.25x faster than the rest from the start (Alibaba job 2's spread is as wide).
    assert guesses(pipeline_steps(slow={3: 0.8}, coordinates=False)) == {}
    (guess,) = guesses(pipeline_steps(stage_factors=(1.0, 1.0, 1.0, 1.6), slow={0: 0.75}, coordinates=False)).values()
    assert guess.stages == (tuple(range(12)), (12, 13, 14, 15)) and guess.outliers == {0}


def test_groups_whose_sizes_do_not_fit_one_stage_size_are_not_stages():
    # 11 fast ranks and 5 slow ones (stage 3 plus rank 2): no stage size divides both.
    steps = pipeline_steps(stage_factors=(1.0, 1.0, 1.0, 1.6), slow={2: 1.6}, coordinates=False)
    assert guesses(steps) == {}


def test_reports_with_coordinates_need_no_guess():
    assert guesses(pipeline_steps(stage_factors=(1.0, 1.0, 1.0, 1.6))) == {}


def test_a_young_job_is_told_after_five_steps_past_warm_up():
    steps = pipeline_steps(stage_factors=(1.0, 1.0, 1.0, 1.6), coordinates=False, steps=40)
    at = {number: next(s.t for s in steps if s.step == number) for number in (13, 14)}
    assert guesses([s for s in steps if s.t <= at[13]]) == {}  # steps 10-13: four
    assert guesses([s for s in steps if s.t <= at[14]])


def test_a_guess_is_kept_for_ten_steps_and_while_the_job_pauses():
    steps = pipeline_steps(stage_factors=(1.0, 1.0, 1.0, 1.6), coordinates=False, steps=60)
    table = step_table_of(steps)
    th = StageGuessThresholds()
    first_t = next(s.t for s in steps if s.step == 30)
    assert stage_guesses(table, first_t, th)
    (memo,) = [value for key, value in table.shared.items() if key == ("stages", th)]
    read_at = dict(memo)
    # Nine steps later the same guess, not read again; at the tenth it is read again.
    assert stage_guesses(table, next(s.t for s in steps if s.step == 39), th) and memo[0][0] == read_at[0][0] == 30
    stage_guesses(table, next(s.t for s in steps if s.step == 40), th)
    assert memo[0][0] == 40
    # No step for a while (a checkpoint): kept for hold_seconds, then dropped.
    last_t = steps[-1].t
    assert stage_guesses(table, last_t + th.lookback_seconds + 60, th)
    assert stage_guesses(table, last_t + th.hold_seconds + 60, th) == {}


def test_any_spread_of_step_times_gives_a_guess_or_none():
    # Random spreads (2 to 40 ranks, clustered or not, outliers at either end): never an error,
    # and every guess covers each rank once, its stages of a common size.
    rng = random.Random(5)
    for _ in range(2000):
        count = rng.randrange(2, 41)
        levels = [rng.choice((1.0, 1.3, 1.6, 2.5)) for _ in range(rng.randrange(1, 4))]
        relative = np.array([rng.choice(levels) * rng.uniform(0.97, 1.03) for _ in range(count)])
        if rng.random() < 0.5:
            relative[rng.randrange(count)] *= rng.choice((0.5, 3.0))
        groups = _groups(relative, StageGuessThresholds())
        if groups is None:
            continue
        stages, outliers = groups
        assert sorted(i for stage in stages for i in stage) == list(range(count))
        assert outliers <= {i for stage in stages for i in stage}
        sizes = [len(stage) for stage in stages]
        assert len(stages) >= 2 and all(size % min(sizes) == 0 for size in sizes) and min(sizes) >= 2


def test_thresholds_are_checked():
    with pytest.raises(ValueError, match="min_gap"):
        StageGuessThresholds(min_gap=1.0)
    with pytest.raises(ValueError, match="min_stage_ranks"):
        StageGuessThresholds(min_stage_ranks=1)
    with pytest.raises(ValueError, match="min_steps"):
        StageGuessThresholds(min_steps=20, steps=10)


def test_ranks_text():
    assert ranks_text([12, 13, 14, 15]) == "12-15"
    assert ranks_text([0, 3, 5]) == "0, 3, 5"
    assert ranks_text([7]) == "7"
