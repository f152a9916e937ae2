"""Pipeline-stage imbalance (straggler.stage), and straggler.steps judging ranks against their stage.

Hybrid-parallel jobs as their step reports arrive: 4 pipeline stages x 2 data-parallel replicas x
2 tensor-parallel ranks (16 ranks in Megatron's order), every rank's compute time per step with
a little noise, replayed through the detectors as the collector runs them.
"""

from __future__ import annotations

import random

import pytest

from fleetwatch.detectors.replay import replay
from fleetwatch.detectors.straggler_stage import StragglerStageDetector, StragglerStageThresholds
from fleetwatch.detectors.straggler_steps import StragglerStepsDetector
from fleetwatch.records import Step

T0 = 1_700_000_000.0
STAGES, REPLICAS, TP = 4, 2, 2


def place(rank: int) -> tuple[int, int, int]:
    """(dp_rank, pp_stage, tp_rank) in Megatron's order: stages in contiguous blocks of ranks."""
    per_stage = REPLICAS * TP
    within = rank % per_stage
    return within // TP, rank // per_stage, within % TP


def pipeline_steps(
    *,
    stage_factors: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0),
    slow: dict[int, float] | None = None,
    step_seconds: float = 0.9,
    steps: int = 200,
    coordinates: bool = True,
    factor_at: dict[int, tuple[float, ...]] | None = None,
    seed: int = 3,
) -> list[Step]:
    """Every rank's reports of `steps` steps; `slow`: rank -> factor for the whole run;
    `factor_at`: from step number k on, these stage factors."""
    rng = random.Random(seed)
    out = []
    t = T0
    factors = stage_factors
    for number in range(steps):
        factors = (factor_at or {}).get(number, factors)
        own = []
        for rank in range(STAGES * REPLICAS * TP):
            dp, stage, tp = place(rank)
            seconds = step_seconds * factors[stage] * (slow or {}).get(rank, 1.0) * rng.gauss(1.0, 0.02)
            own.append((rank, dp, stage, tp, round(seconds, 4)))
        wall = max(seconds for *_, seconds in own) * 1.05
        t += wall
        for rank, dp, stage, tp, seconds in own:
            out.append(
                Step(
                    t=t,
                    job="j1",
                    rank=rank,
                    node=f"n{rank // 8 + 1:02d}",
                    step=number,
                    seconds=seconds,
                    gpu=rank % 8,
                    dp_rank=dp if coordinates else None,
                    pp_stage=stage if coordinates else None,
                    tp_rank=tp if coordinates else None,
                    wall_seconds=round(wall, 4),
                )
            )
    return out


def findings(steps: list[Step]):
    return replay(steps, [StragglerStepsDetector(), StragglerStageDetector()])


def test_an_uneven_last_stage_is_one_job_finding_and_no_rank_is_a_straggler():
    (finding,) = findings(pipeline_steps(stage_factors=(1.0, 1.0, 1.0, 1.6)))
    assert (finding.detector, finding.job, finding.node, finding.rank, finding.action) == (
        "straggler.stage",
        "j1",
        None,
        None,
        "check_app",
    )
    evidence = finding.evidence
    assert evidence["pp_stage"] == 3 and evidence["replicas"] == 2 and evidence["stages"] == 4
    assert evidence["ratio"] == pytest.approx(1.6, abs=0.06)
    assert evidence["job_loss"] == pytest.approx(1 - 1 / 1.6, abs=0.03)  # the other stages would keep pace
    assert finding.summary == (
        f"pipeline stage 3 of job j1 takes {evidence['ratio']:.2f}x or more the other stages' time on each of its "
        f"2 data-parallel replicas ({evidence['stage_seconds']:.2f} s a step against "
        f"{evidence['other_stages_seconds']:.2f} s): the model is split unevenly, not a GPU at fault; "
        f"job j1 loses about {evidence['job_loss']:.0%} of its speed to it"
    )
    assert finding.end is None  # open while the imbalance lasts


@pytest.mark.parametrize("factors", [(1.0, 1.05, 1.0, 1.1), (1.08, 1.0, 1.0, 1.0), (1.0, 1.0, 1.0, 1.0)])
def test_stages_a_few_percent_apart_are_healthy(factors):
    assert findings(pipeline_steps(stage_factors=factors)) == []


def test_a_slow_rank_is_a_straggler_against_its_own_stage_not_a_stage_imbalance():
    # Rank 13 (stage 3, replica 1) runs 2.4x slower than the rest of its stage, in a job whose
    # last stage is also 1.6x the others: it is judged against stage 3's ranks only.
    (finding,) = [
        f for f in findings(pipeline_steps(stage_factors=(1.0, 1.0, 1.0, 1.6), slow={13: 2.4})) if f.rank is not None
    ]
    assert (finding.detector, finding.rank, finding.evidence["pp_stage"]) == ("straggler.steps", 13, 3)
    assert finding.evidence["score"] == pytest.approx(1 / 2.4, abs=0.03)
    assert "pipeline stage 3, GPU 5 on n02" in finding.summary


@pytest.mark.parametrize(("step_seconds", "steps"), [(0.9, 300), (10.0, 150), (47.0, 40)])
def test_one_slow_rank_is_one_episode_open_until_the_end_whatever_the_step_time(step_seconds, steps):
    # Rank 13 runs 2.4x slower than the rest of its stage for the whole run. Between two of a
    # 47 s job's reports the rank sends nothing: its episode is carried, not closed and reopened.
    (finding,) = replay(
        pipeline_steps(slow={13: 2.4}, step_seconds=step_seconds, steps=steps), [StragglerStepsDetector()]
    )
    assert (finding.rank, finding.key, finding.end) == (13, "peers", None)


def test_a_slow_replica_of_one_stage_is_not_a_stage_imbalance():
    # Both tensor-parallel ranks of stage 1 on replica 0 slow down: only one replica, not every one.
    result = findings(pipeline_steps(slow={4: 1.6, 5: 1.6}))
    assert [f.detector for f in result] == ["straggler.steps", "straggler.steps"]
    assert sorted(f.rank for f in result) == [4, 5]


def test_the_stage_finding_holds_near_the_threshold_and_closes_when_balanced():
    # 1.3x, then 1.15x (inside the hold), then balanced.
    steps = pipeline_steps(
        stage_factors=(1.0, 1.0, 1.0, 1.3), factor_at={120: (1.0, 1.0, 1.0, 1.15), 240: (1.0,) * 4}, steps=360
    )
    (finding,) = findings(steps)
    assert finding.detector == "straggler.stage"
    balanced_t = next(s.t for s in steps if s.step == 240)
    assert finding.end is not None and balanced_t < finding.end < balanced_t + 30


def test_without_coordinates_a_balanced_job_has_no_stage():
    assert findings(pipeline_steps(coordinates=False)) == []


@pytest.mark.parametrize(("step_seconds", "steps"), [(0.9, 200), (47.0, 60)])
def test_without_coordinates_the_stage_is_told_from_the_step_times(step_seconds, steps):
    # The same uneven pipeline, its reports without pp_stage: ranks 12-15 step 1.6x slower than
    # the rest from the first steps on, as one group of a stage's size (detectors.stages).
    (finding,) = findings(
        pipeline_steps(stage_factors=(1.0, 1.0, 1.0, 1.6), step_seconds=step_seconds, steps=steps, coordinates=False)
    )
    evidence = finding.evidence
    assert (finding.detector, finding.job, finding.node, finding.rank) == ("straggler.stage", "j1", None, None)
    assert evidence["pp_stage"] is None and evidence["stage_ranks"] == [12, 13, 14, 15]
    assert evidence["ratio"] == pytest.approx(1.6, abs=0.06) and evidence["stages"] == 2
    assert evidence["job_loss"] == pytest.approx(1 - 1 / 1.6, abs=0.03)
    assert finding.summary.startswith("ranks 12-15 of job j1 take 1.")
    assert "told from the step times (the reports carry no pp_stage)" in finding.summary
    assert finding.end is None


@pytest.mark.parametrize(("step_seconds", "steps"), [(0.9, 200), (47.0, 60)])
def test_without_coordinates_a_slow_rank_is_judged_against_its_told_stage(step_seconds, steps):
    result = findings(
        pipeline_steps(
            stage_factors=(1.0, 1.0, 1.0, 1.6),
            slow={13: 2.4},
            step_seconds=step_seconds,
            steps=steps,
            coordinates=False,
        )
    )
    assert sorted((f.detector, f.rank) for f in result) == [("straggler.stage", None), ("straggler.steps", 13)]
    assert all(f.end is None for f in result)  # one episode each, open until the end
    (straggler,) = [f for f in result if f.rank is not None]
    assert straggler.evidence["score"] == pytest.approx(1 / 2.4, abs=0.03)
    assert straggler.evidence["stage_ranks"] == [12, 13, 14, 15]
    assert "(the pipeline stage of ranks 12-15 by their step times, GPU 5 on n02)" in straggler.summary


def test_without_coordinates_ranks_that_slow_down_together_later_are_stragglers():
    # Stage 3's ranks slow 1.6x from step 100: an onset, so no stage is told, and they are judged
    # against the whole job (as half a job behind a bad switch would be).
    result = findings(pipeline_steps(factor_at={100: (1.0, 1.0, 1.0, 1.6)}, coordinates=False, steps=250))
    assert sorted((f.detector, f.rank) for f in result) == [("straggler.steps", rank) for rank in (12, 13, 14, 15)]


def test_slow_steppers_are_judged_on_fewer_steps_inside_the_time_cap():
    # 47 s steps: 12 of them fit in the 600 s the registry keeps; the finding still comes.
    result = replay(
        pipeline_steps(stage_factors=(1.0, 1.0, 1.0, 1.6), step_seconds=47.0, steps=40), [StragglerStageDetector()]
    )
    (finding,) = result
    assert finding.evidence["pp_stage"] == 3 and 5 <= finding.evidence["steps"] <= 10


def test_thresholds_are_checked():
    with pytest.raises(ValueError, match="hold_stage_ratio"):
        StragglerStageThresholds(hold_stage_ratio=1.3, min_stage_ratio=1.2)
    with pytest.raises(ValueError, match="min_steps"):
        StragglerStageThresholds(min_steps=0)
