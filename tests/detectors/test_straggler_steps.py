"""StragglerStepsDetector: the rank that slows a synchronous job, from step reports."""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import replace

import numpy as np
import pytest

from fleetwatch.detectors.engine import RecentData
from fleetwatch.detectors.model import Window, step_table
from fleetwatch.detectors.replay import replay, replay_episodes
from fleetwatch.detectors.straggler_steps import (
    StragglerStepsDetector,
    StragglerStepsThresholds,
    _dense_scores,
    _median_ratios,
)
from fleetwatch.records import GpuSample, Step

T0 = 1_700_000_000.0
STEP_SECONDS = 0.9


def job_steps(
    *,
    ranks: int = 16,
    duration: float = 600.0,
    start: float = 0.0,
    cv: float = 0.0,
    seed: int = 1,
    job: str = "j1",
    slow: tuple[tuple[int, float, float, float], ...] = (),
    offsets: dict[int, float] | None = None,
    pauses: tuple[tuple[float, float, float, float], ...] = (),
    hiccups: frozenset[tuple[int, int]] = frozenset(),
    warmup: dict[int, float] | None = None,
    with_gpu: bool = True,
) -> list[Step]:
    """A synchronous job stepping every 0.9 s: ranks in node-then-GPU order (8 a node, n01...).

    slow: (rank, from_s, to_s, factor); offsets: steady per-rank factors; pauses: the whole job
    (from_s, for_s, factor, added seconds); hiccups: (rank, step) at 8x; warmup: step -> factor
    for every rank (each rank +-30%)."""
    rng = random.Random(seed)
    out = []
    step = 0
    t = T0 + start
    while t < T0 + start + duration:
        for rank in range(ranks):
            factor, added = (offsets or {}).get(rank, 1.0), 0.0
            for r, begin, end, f in slow:
                if r == rank and begin <= t - T0 < end:
                    factor *= f
            for begin, length, f, plus in pauses:
                if begin <= t - T0 < begin + length:
                    factor *= f
                    added += plus
            if (rank, step) in hiccups:
                factor *= 8
            if warmup and step in warmup:
                factor *= warmup[step] * rng.uniform(0.7, 1.3)
            noise = max(0.5, rng.gauss(1.0, cv)) if cv else 1.0
            out.append(
                Step(
                    t=t,
                    job=job,
                    rank=rank,
                    node=f"n{rank // 8 + 1:02d}",
                    step=100 + step,
                    seconds=STEP_SECONDS * factor * noise + added,
                    gpu=rank % 8 if with_gpu else None,
                )
            )
        step += 1
        t += STEP_SECONDS
    return out


def window_at(now: float, steps, gpu=None, detector=None) -> Window:
    """The window the engine would hand the detector at `now`."""
    detector = detector or StragglerStepsDetector()
    data = RecentData.for_detectors([detector])
    for s in steps:
        if s.t <= now:
            data.add_step(s)
    for samples in (gpu or {}).values():
        for sample in samples:
            if sample.t <= now:
                data.add_gpu(sample)
    return data.window(now, watching_since=T0)


def straggler_findings(records, detector=None):
    return replay(records, [detector or StragglerStepsDetector()])


def exact(**overrides) -> StragglerStepsDetector:
    """A detector with round thresholds, for noise-free edge tests."""
    base = dict(peer_score=0.8, floor_score=0.5, min_gap_growth=1.25, self_slowdown=2.0)
    base.update(overrides)
    return StragglerStepsDetector(StragglerStepsThresholds(**base))


# --- the straggler -------------------------------------------------------------------------------


def test_slow_rank_found_naming_rank_gpu_node_and_its_speed():
    steps = job_steps(slow=((11, 300.0, 500.0, 1.3),))
    (finding,) = straggler_findings(steps)
    assert finding.summary == (
        "rank 11 of job j1 (GPU 3 on n02) runs at 0.77 of its peers' speed: 1.17 s per step against 0.90 s; "
        "job j1 loses about 23% of its speed to it"
    )
    assert (finding.detector, finding.severity, finding.action) == ("straggler.steps", "warning", "check_app")
    assert (finding.job, finding.rank, finding.node, finding.gpu) == ("j1", 11, "n02", 3)
    # The episode starts at the first slow step and ends once the rank is back: its median over
    # its last 10 steps recovers after ~5 steps, then it stays there for close_steps (20) steps.
    assert T0 + 300 <= finding.start <= T0 + 301
    assert finding.end is not None and T0 + 500 + 20 * 0.9 < finding.end <= T0 + 500 + 30 * 0.9
    assert finding.evidence["score"] == pytest.approx(1 / 1.3, abs=0.001)
    assert finding.evidence["rank_seconds"] == pytest.approx(1.17)
    assert finding.evidence["reference_seconds"] == pytest.approx(0.9)
    assert finding.evidence["cause"] is None
    assert finding.evidence["basis"] == "peers"
    assert finding.evidence["baseline_score"] == pytest.approx(1.0)
    assert finding.key == "peers"
    # Each step waits 0.27 s for it: 23% of the 1.17 s it takes.
    assert finding.evidence["job_loss"] == pytest.approx(0.27 / 1.17, abs=0.001)


def test_job_loss_is_out_of_the_wall_time_where_ranks_report_it():
    # Collectives add 0.5 s to every step: the straggler's 0.27 s is a smaller share of the step.
    steps = [
        replace(s, wall_seconds=max(x.seconds for x in steps_of_step) + 0.5)
        for steps_of_step in _by_step(job_steps(slow=((11, 300.0, 500.0, 1.3),)))
        for s in steps_of_step
    ]
    (finding,) = straggler_findings(steps)
    assert finding.evidence["job_loss"] == pytest.approx(0.27 / 1.67, abs=0.001)
    assert finding.summary.endswith("; job j1 loses about 16% of its speed to it")


def _by_step(steps: list[Step]) -> list[list[Step]]:
    groups: dict[int, list[Step]] = {}
    for s in steps:
        groups.setdefault(s.step, []).append(s)
    return list(groups.values())


def test_open_time_is_within_ten_steps_of_the_slowdown():
    # Steps every 0.9 s; rank 5's first slow step ends at 300.6 s.
    steps = job_steps(slow=((5, 300.0, 600.0, 1.3),), cv=0.03, seed=4)
    detector = StragglerStepsDetector()
    assert detector.detect(window_at(T0 + 304, steps)) == []  # 4 slow steps: too few yet
    found = [s for s in range(305, 331) if detector.detect(window_at(T0 + s, steps))]
    assert found and found[0] <= 300.6 + 9 * 0.9
    assert all(second in found for second in range(found[0], 331))


def test_each_step_is_compared_with_the_same_step_of_its_peers():
    # Ranks with a 2x slower step every 4th step, the same for all: the reference moves with it.
    steps = job_steps(slow=((3, 200.0, 600.0, 1.4),))
    steps = [dataclasses.replace(s, seconds=s.seconds * 2) if s.step % 4 == 0 else s for s in steps]
    (finding,) = straggler_findings(steps)
    assert finding.rank == 3 and finding.evidence["score"] == pytest.approx(1 / 1.4, abs=0.001)


# --- threshold edges (noise-free, round numbers) -------------------------------------------------


@pytest.mark.parametrize(
    ("factor", "found"),
    [(1.24, False), (1.25, False), (1.26, True)],  # scores 0.806, 0.8 (at: not below), 0.794
)
def test_peer_score_edge(factor, found):
    steps = job_steps(ranks=8, slow=((2, 200.0, 400.0, factor),), duration=400)
    detector = exact(min_gap_growth=1.2)
    assert bool(straggler_findings(steps, detector)) is found


@pytest.mark.parametrize(
    ("factor", "found"),
    [(1.27, False), (1.28, True), (1.29, True)],  # growth just under / at / over 1.28
)
def test_gap_growth_edge(factor, found):
    steps = job_steps(ranks=8, slow=((2, 200.0, 400.0, factor),), duration=400)
    detector = exact(min_gap_growth=1.28)
    assert bool(straggler_findings(steps, detector)) is found


@pytest.mark.parametrize(
    ("factor", "found"),
    [(1.24, False), (1.25, False), (1.26, True)],  # steady from the start: only the floor counts
)
def test_floor_edge_for_a_rank_slow_from_the_start(factor, found):
    steps = job_steps(ranks=8, offsets={2: factor}, duration=300)
    detector = exact(peer_score=0.85, floor_score=0.8)
    assert bool(straggler_findings(steps, detector)) is found


def test_a_finding_needs_five_slow_steps():
    steps = job_steps(ranks=8, slow=((2, 200.0, 400.0, 2.0),), duration=400)
    detector = exact(min_slow_steps=6)
    # At 204.5 s five of the last ten steps are slow: the median has turned, one step short.
    assert detector.detect(window_at(T0 + 204.5, steps)) == []
    assert detector.detect(window_at(T0 + 205.5, steps))
    assert exact().detect(window_at(T0 + 204.5, steps))  # five, the default


# --- what is not a straggler ---------------------------------------------------------------------


def test_steady_offsets_from_the_start_are_not_an_episode():
    # Alibaba job 2's spread: the slowest worker at 0.80 of the reference for the whole job.
    offsets = {0: 0.95, 1: 0.92, 2: 1.0, 3: 1.15, 4: 1.14, 5: 1.22, 6: 1.12, 7: 1.13, 8: 1.12, 9: 1.07}
    steps = job_steps(ranks=10, offsets=offsets, cv=0.02, duration=1800, seed=2)
    assert straggler_findings(steps) == []


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_noisy_healthy_ranks_raise_nothing(seed):
    # CV 4%: the noisiest healthy Alibaba worker; offsets up to 1.2x; hiccups and pauses.
    rng = random.Random(seed)
    offsets = {rank: rng.uniform(0.85, 1.2) for rank in range(24)}
    hiccups = frozenset((rng.randrange(24), rng.randrange(1300)) for _ in range(80))
    pauses = tuple((float(a), 20.0, 3.0, 0.0) for a in range(150, 1200, 400))
    steps = job_steps(
        ranks=24,
        offsets=offsets,
        cv=0.04,
        hiccups=hiccups,
        pauses=pauses,
        duration=1200,
        seed=seed,
    )
    assert straggler_findings(steps) == []


def wandering_steps(*, ranks: int, duration: float, seed: int, limit_sd: float = 2.5) -> list[Step]:
    """A healthy job as the simulator steps one (fleetwatch.sim.fleet): each rank a steady offset
    (sd 3%, clipped at 2.5 sd), a slow drift of its own pace (sd 1.9%, 0.98 of it kept a step,
    clipped at `limit_sd` sd), white noise (sd 1.6%) and rare +6..12% spikes; the job a step
    every ~1 s with a 20 s checkpoint every 10 minutes."""
    rng = random.Random(seed)
    sd, keep = 0.019, 0.98
    limit = limit_sd * sd
    offsets = [1.0 + min(max(rng.gauss(0.0, 0.03), -0.075), 0.075) for _ in range(ranks)]
    drifts = [min(max(rng.gauss(0.0, sd), -limit), limit) for _ in range(ranks)]
    out, step, t = [], 0, T0
    while t < T0 + duration:
        drifts = [min(max(keep * d + rng.gauss(0.0, sd * (1 - keep**2) ** 0.5), -limit), limit) for d in drifts]
        own = [
            STEP_SECONDS
            * o
            * max(0.85, 1.0 + d + rng.gauss(0.0, 0.016) + (rng.uniform(0.06, 0.12) if rng.random() < 0.004 else 0.0))
            for o, d in zip(offsets, drifts)
        ]
        if step and step % 600 == 0:
            own = [o + 20.0 for o in own]  # a checkpoint: every rank waits on the file system
        t += max(own) * 1.1
        out.extend(
            Step(t=t, job="j1", rank=r, node=f"n{r // 8 + 1:02d}", step=100 + step, seconds=round(own[r], 4), gpu=r % 8)
            for r in range(ranks)
        )
        step += 1
    return out


def test_a_long_healthy_run_whose_ranks_wander_raises_nothing():
    # Half an hour of 8 ranks that wander within the bounds healthy traces show: the drift of a
    # rank's own pace reaches 2.5 sd (4.75%) either way, so its gap to the peers grows by ~10% at
    # most over the window (below the 1.15 to open), checkpoints included: nothing.
    steps = wandering_steps(ranks=8, duration=1800.0, seed=1)
    assert straggler_findings(steps) == []


@pytest.mark.parametrize(("factor", "added_seconds"), [(3.0, 0.0), (1.0, 5.0)], ids=["3x slower", "5 s added"])
def test_checkpoint_pause_of_the_whole_job_is_not_a_straggler(factor, added_seconds):
    offsets = {4: 1.18}  # a steady slow rank, whose gap a pause compresses or stretches
    steps = job_steps(offsets=offsets, pauses=((330.0, 25.0, factor, added_seconds),), cv=0.02)
    assert straggler_findings(steps) == []


def test_checkpoint_pause_does_not_end_a_real_episode():
    steps = job_steps(slow=((6, 200.0, 600.0, 1.5),), pauses=((330.0, 25.0, 3.0, 0.0),))
    (finding,) = straggler_findings(steps)
    assert finding.rank == 6 and finding.end is None


def test_data_loader_hiccup_is_not_an_episode():
    steps = job_steps(hiccups=frozenset({(7, 300), (7, 301), (3, 100)}), cv=0.02)
    assert straggler_findings(steps) == []


def test_job_start_warmup_is_not_compared():
    warmup = {step: 6.0 for step in range(100, 110)}  # step numbers 100..109 ...
    steps = job_steps(warmup=warmup)
    steps = [dataclasses.replace(s, step=s.step - 100) for s in steps]  # ... as steps 0..9
    assert straggler_findings(steps) == []


def test_rank_slow_from_the_job_start_is_found_by_the_floor():
    steps = job_steps(offsets={4: 2.0}, duration=120)
    (finding,) = straggler_findings(steps)
    assert finding.rank == 4 and finding.start == T0
    assert finding.evidence["score"] == pytest.approx(0.5)
    # As slow in its baseline as now (no growth): the floor alone makes it a straggler.
    assert finding.evidence["baseline_score"] == pytest.approx(0.5)


def test_a_job_that_started_later_gets_its_baseline_from_its_first_steps():
    # A job running since before the window and one started at 400 s; 100 s into the young job
    # one of its ranks slows 1.3x (0.77: above the floor, so its baseline must show the change).
    old = job_steps(job="old", duration=900, cv=0.02, seed=5)
    young = job_steps(job="young", start=400.0, duration=500, cv=0.02, seed=6, slow=((3, 500.0, 900.0, 1.3),))
    young = [dataclasses.replace(s, step=s.step - 100) for s in young]  # numbered from 0
    (finding,) = straggler_findings(old + young)
    assert (finding.job, finding.rank) == ("young", 3)
    assert T0 + 500 <= finding.start <= T0 + 502 and finding.end is None
    assert finding.evidence["baseline_score"] == pytest.approx(1.0, abs=0.05)


def test_job_end_closes_the_episode_and_raises_nothing_new():
    steps = job_steps(slow=((2, 200.0, 1000.0, 1.5),), duration=400)
    (finding,) = straggler_findings(steps + job_steps(job="other", start=400, duration=200))
    assert finding.job == "j1" and finding.end is not None
    # No step for longer than a pause may last (pause_grace_seconds after its last step): over.
    last_t = max(s.t for s in steps)
    assert last_t + 100 < finding.end <= last_t + 120 + 1
    assert StragglerStepsDetector().detect(window_at(T0 + 425, steps)) == []  # not judged any more


@pytest.mark.parametrize("pause_seconds", [30.0, 90.0])
def test_a_pause_in_step_reports_does_not_close_and_reopen_the_episode(pause_seconds):
    # A checkpoint (or a restart) stops every rank's reports for a while; the straggler is the same.
    steps = [
        s
        for s in job_steps(slow=((2, 200.0, 1000.0, 1.5),), duration=600)
        if not T0 + 300 <= s.t < T0 + 300 + pause_seconds
    ]
    (finding,) = straggler_findings(steps)
    assert finding.rank == 2 and finding.end is None


@pytest.mark.parametrize("factor", [1.10, 1.12])
def test_a_rank_hovering_at_the_thresholds_is_at_most_one_episode(factor):
    # 1.10-1.12x slower, with 3% step noise, for half an hour: its score wanders around
    # peer_score, and its gap's growth around min_gap_growth; it closes only above close_score.
    steps = job_steps(slow=((5, 300.0, 1800.0, factor),), duration=1800, cv=0.03, seed=1)
    assert len(straggler_findings(steps)) <= 1


def test_close_score_must_be_between_peer_score_and_one():
    with pytest.raises(ValueError, match="close_score"):
        StragglerStepsThresholds(close_score=0.8)


def paced_steps(step_seconds: float, steps: int, slow: dict[int, tuple[int, float]], ranks: int = 16, seed: int = 7):
    """A synchronous job stepping every `step_seconds` (2% noise); slow: rank -> (from step, factor)."""
    rng = random.Random(seed)
    out, t = [], T0
    for number in range(steps):
        own = []
        for rank in range(ranks):
            since, factor = slow.get(rank, (steps, 1.0))
            own.append(step_seconds * (factor if number >= since else 1.0) * rng.gauss(1.0, 0.02))
        t += max(own)
        out += [
            Step(t=t, job="j1", rank=rank, node=f"n{rank // 8 + 1:02d}", step=number, seconds=seconds, gpu=rank % 8)
            for rank, seconds in enumerate(own)
        ]
    return out


@pytest.mark.parametrize(("step_seconds", "steps"), [(0.2, 3000), (1.0, 600), (10.0, 120), (45.0, 80)])
def test_a_slowdown_onset_is_one_episode_opened_within_ten_steps_at_any_step_time(step_seconds, steps):
    # Rank 5 slows 1.3x from step 50: between the floor and the peer score, so only its grown gap
    # to its peers tells it from a steady offset. A 45 s job's baseline (20 steps before its
    # recent 10) lies beyond the 600 s window: its steps are kept for step_window_seconds.
    records = paced_steps(step_seconds, steps, {5: (50, 1.3)})
    (episode,) = replay_episodes(records, [StragglerStepsDetector()])
    onset_t = next(s.t for s in records if s.step == 50 and s.rank == 5)
    tenth_t = next(s.t for s in records if s.step == 59 and s.rank == 5)
    assert (episode.finding.rank, episode.finding.key, episode.finding.end) == (5, "peers", None)
    assert onset_t < episode.opened_at <= tenth_t + 1.0  # evaluated once a second


def test_a_rank_hovering_near_the_threshold_is_one_episode():
    # 1.15x: its 10-step median wanders across peer_score and close_score; it opens once at most.
    for seed in (1, 2, 3):
        records = paced_steps(1.0, 900, {3: (100, 1.15)}, seed=seed)
        assert len(replay_episodes(records, [StragglerStepsDetector()])) <= 1


def test_a_straggler_that_recovers_closes_without_waiting_out_the_grace():
    (finding,) = straggler_findings(job_steps(slow=((11, 300.0, 500.0, 1.3),)))
    # It kept stepping, at full speed: it closes after close_steps of them, not the 120 s grace.
    assert finding.end is not None and finding.end <= T0 + 500 + 30 * 0.9


def test_a_job_needs_two_ranks():
    steps = job_steps(ranks=1, duration=120)
    assert StragglerStepsDetector().detect(window_at(T0 + 119, steps)) == []


# --- several stragglers, self-slowdown -----------------------------------------------------------


def test_several_ranks_slowing_together_are_each_found():
    slow = tuple((rank, 300.0, 600.0, 1.3) for rank in (6, 7, 8, 9))
    findings = straggler_findings(job_steps(ranks=10, slow=slow, cv=0.02))
    assert sorted(f.rank for f in findings) == [6, 7, 8, 9]
    for f in findings:
        assert T0 + 300 <= f.start <= T0 + 302
        assert f.evidence["score"] == pytest.approx(1 / 1.3, abs=0.03)


def test_half_a_job_slowing_down_together_is_four_stragglers():
    # 4 of 8 ranks slow at 300 s: two groups of 4, as a 2-stage pipeline's would be, but they were
    # one group before: stragglers, whatever later infers pipeline stages from step times.
    slow = tuple((rank, 300.0, 600.0, 1.4) for rank in (4, 5, 6, 7))
    findings = straggler_findings(job_steps(ranks=8, slow=slow, cv=0.02))
    assert sorted(f.rank for f in findings) == [4, 5, 6, 7]


def test_rank_slower_than_its_own_past_is_keyed_self():
    # Rank 3 was 20% faster than its peers; it slows 1.3x: still within 0.85 of them.
    steps = job_steps(ranks=10, offsets={3: 0.8}, slow=((3, 300.0, 600.0, 1.3),))
    (finding,) = straggler_findings(steps)
    assert finding.key == "self" and finding.evidence["basis"] == "self"
    assert finding.summary == (
        "rank 3 of job j1 (GPU 3 on n01) runs 1.30x slower than it did while its peers kept "
        "their pace: 0.94 s per step against 0.72 s; job j1 loses about 4% of its speed to it"
    )
    assert finding.evidence["baseline_score"] == pytest.approx(1.25)
    # Now only a little slower than its peers (0.94 s against 0.90): that is all the job loses.
    assert finding.evidence["job_loss"] == pytest.approx(0.036 / 0.936, abs=0.001)
    assert T0 + 300 <= finding.start <= T0 + 301


def test_whole_job_slowing_down_is_not_self():
    steps = job_steps(ranks=10, pauses=((300.0, 300.0, 1.25, 0.0),))
    assert straggler_findings(steps) == []


@pytest.mark.parametrize(("growth", "found"), [(1.125, False), (1.16, True)])
def test_a_gap_grown_less_than_min_gap_growth_opens_nothing(growth, found):
    # A rank 1.1x behind its peers from the start falls behind by 12.5% more: less than
    # min_gap_growth (1.15), as healthy ranks' slow wander can over long runs: no episode; 1.16 is.
    steps = job_steps(offsets={4: 1.1}, slow=((4, 300.0, 600.0, growth),), cv=0.01, seed=3)
    assert [f.rank for f in straggler_findings(steps)] == ([4] if found else [])


def test_a_rank_hovering_at_the_threshold_is_one_episode():
    # 1.16x with 3% noise: the score hovers around 0.85 and the growth around 1.15.
    steps = job_steps(slow=((5, 300.0, 600.0, 1.16),), cv=0.03, seed=0)
    findings = straggler_findings(steps)
    assert [f.rank for f in findings] == [5]


# --- hardware cause ------------------------------------------------------------------------------


def gpu_samples(steps, *, slow_gpu=("n02", 3), start=0.0, metrics=None, healthy=None):
    """One sample a second for every GPU the ranks use; `metrics` on slow_gpu from `start` on."""
    healthy = healthy or {"sm_clock_mhz": 1980, "clock_event_reasons": 0, "power_watts": 650.0, "gpu_util_percent": 100}
    end = int(max(s.t for s in steps) - T0) + 1
    gpus = sorted({(s.node, s.gpu) for s in steps})
    return {
        key: [
            GpuSample(
                t=T0 + second,
                node=key[0],
                gpu=key[1],
                metrics=(metrics if key == slow_gpu and second >= start and metrics is not None else healthy),
            )
            for second in range(end)
        ]
        for key in gpus
    }


def replay_with_gpus(steps, samples, detector=None):
    records = list(steps) + [s for series in samples.values() for s in series]
    return replay(records, [detector or StragglerStepsDetector()])


@pytest.mark.parametrize(
    ("reasons", "clock", "cause"),
    [
        (0x48, 990, "hardware thermal slowdown"),
        (0x88, 885, "hardware power brake"),
        (0x20, 1410, "software thermal slowdown"),
        (0x08, 1200, "hardware slowdown"),
    ],
)
def test_hardware_cause_is_named_with_the_clock_against_the_peers(reasons, clock, cause):
    steps = job_steps(slow=((11, 300.0, 600.0, 1980 / clock),))
    samples = gpu_samples(
        steps,
        start=300,
        metrics={"sm_clock_mhz": clock, "clock_event_reasons": reasons, "power_watts": 330.0},
    )
    (finding,) = replay_with_gpus(steps, samples)
    assert f": {cause} (SM clock {clock:,} MHz against peers' 1,980 MHz); job j1 loses about" in finding.summary
    assert finding.action == "inspect_hardware"
    assert finding.evidence["cause"] == cause
    assert finding.evidence["clock_event_reasons"] == reasons
    assert finding.evidence["sm_clock_mhz"] == clock
    assert finding.evidence["peer_sm_clock_mhz"] == 1980


def test_thermal_straggler_summary_in_full():
    steps = job_steps(slow=((11, 300.0, 600.0, 1.97),))
    samples = gpu_samples(
        steps,
        start=300,
        metrics={"sm_clock_mhz": 1005, "clock_event_reasons": 0x48, "power_watts": 330.0},
    )
    (finding,) = replay_with_gpus(steps, samples)
    assert finding.summary == (
        "rank 11 of job j1 (GPU 3 on n02) runs at 0.51 of its peers' speed: 1.77 s per step "
        "against 0.90 s: hardware thermal slowdown (SM clock 1,005 MHz against peers' 1,980 MHz); "
        "job j1 loses about 49% of its speed to it"
    )


def test_low_clock_without_a_reason_and_low_power_are_named_too():
    steps = job_steps(slow=((11, 300.0, 600.0, 1.4),))
    low_clock = gpu_samples(steps, start=300, metrics={"sm_clock_mhz": 1410, "power_watts": 600.0})
    (finding,) = replay_with_gpus(steps, low_clock)
    assert (
        ": SM clock 1,410 MHz against peers' 1,980 MHz with no clock event reason reported; job j1" in finding.summary
    )
    assert finding.action == "inspect_hardware"

    low_power = gpu_samples(steps, start=300, metrics={"sm_clock_mhz": 1980, "power_watts": 300.0})
    (finding,) = replay_with_gpus(steps, low_power)
    assert ": power far below its peers' (300 W against 650 W); job j1 loses about 29%" in finding.summary
    assert finding.action == "check_app"  # a GPU given less work: the rank's input, not the GPU


def test_hardware_cause_turns_a_steady_offset_into_a_straggler():
    steps = job_steps(offsets={11: 1.2})  # 0.83 from the start: an offset, unless the GPU says so
    assert straggler_findings(steps) == []
    samples = gpu_samples(steps, metrics={"sm_clock_mhz": 1650, "clock_event_reasons": 0x60})
    (finding,) = replay_with_gpus(steps, samples)
    assert finding.rank == 11 and finding.evidence["cause"] == "hardware thermal slowdown"


def test_healthy_telemetry_names_no_cause():
    steps = job_steps(slow=((11, 300.0, 600.0, 1.3),))
    (finding,) = replay_with_gpus(steps, gpu_samples(steps))
    assert finding.evidence["cause"] is None and finding.action == "check_app"
    assert finding.evidence["sm_clock_mhz"] == 1980


# --- missing fields, purity, cost ----------------------------------------------------------------


def test_steps_without_gpu_name_the_node():
    steps = job_steps(slow=((11, 300.0, 600.0, 1.3),), with_gpu=False)
    (finding,) = straggler_findings(steps)
    assert finding.gpu is None
    assert finding.summary.startswith("rank 11 of job j1 (node n02) runs at 0.77")


def test_gpu_samples_missing_fields_name_no_cause():
    steps = job_steps(slow=((11, 300.0, 600.0, 1.3),))
    samples = gpu_samples(steps, healthy={"gpu_util_percent": 100}, metrics={})
    (finding,) = replay_with_gpus(steps, samples)
    assert finding.evidence["cause"] is None
    assert "sm_clock_mhz" not in finding.evidence


def test_steps_after_now_are_ignored_and_detect_is_pure():
    steps = job_steps(slow=((11, 300.0, 600.0, 1.3),))
    now = T0 + 330
    window = Window(now=now, gpu={}, host={}, events=[], steps=steps, nodes={}, watching_since=T0)
    detector = StragglerStepsDetector()
    first = detector.detect(window)
    assert first == detector.detect(window)
    assert first == detector.detect(window_at(now, steps))  # a list and the engine's view agree
    assert [f.rank for f in first] == [11]


def test_empty_window():
    window = Window(now=T0, gpu={}, host={}, events=[], steps=[], nodes={}, watching_since=T0)
    assert StragglerStepsDetector().detect(window) == []


def test_thresholds_are_checked():
    with pytest.raises(ValueError):
        StragglerStepsThresholds(floor_score=0.9, peer_score=0.85)
    with pytest.raises(ValueError):
        StragglerStepsThresholds(window_seconds=40.0)
    with pytest.raises(ValueError):
        StragglerStepsThresholds(window_seconds=2400.0)  # longer than step_window_seconds
    with pytest.raises(ValueError):
        StragglerStepsThresholds(min_gap_growth=0.9)
    with pytest.raises(ValueError, match="close_steps"):
        StragglerStepsThresholds(close_steps=-1)
    assert StragglerStepsDetector().window_seconds == StragglerStepsThresholds().window_seconds


def test_a_1000_rank_job_is_cheap_to_evaluate():
    rng = random.Random(7)
    pace = [rng.uniform(0.95, 1.05) for _ in range(1000)]
    steps = [
        Step(
            t=T0 + k,
            job="big",
            rank=r,
            node=f"n{r // 8:03d}",
            step=100 + k,
            seconds=pace[r] * rng.gauss(1.0, 0.03) * (1.3 if r == 17 and k > 250 else 1.0),
            gpu=r % 8,
        )
        for k in range(300)
        for r in range(1000)
    ]
    detector = StragglerStepsDetector()
    window = window_at(T0 + 299, steps, detector=detector)
    detector.detect(window)
    began = time.process_time()
    findings = detector.detect(window)
    cpu_seconds = time.process_time() - began
    assert [f.rank for f in findings] == [17]
    assert cpu_seconds < 0.25  # ~0.01 s on a laptop core; generous for loaded CI machines


@pytest.mark.parametrize("layout", ["grid", "restarted", "rank missing a step"])
def test_the_grid_fast_path_scores_as_the_general_one(layout):
    steps = job_steps(ranks=12, cv=0.04, duration=120, slow=((3, 60.0, 120.0, 1.3),))
    newest = steps[-1].step
    if layout == "restarted":  # its last 8 steps reported again after a restart from a checkpoint
        steps += [dataclasses.replace(s, t=s.t + 8 * STEP_SECONDS) for s in steps if s.step > newest - 8]
    elif layout == "rank missing a step":
        steps = [s for s in steps if not (s.rank == 5 and s.step == newest - 5)]
    detector = StragglerStepsDetector()
    now = steps[-1].t
    table = step_table(window_at(now, steps, detector=detector))
    groups = detector._recent(table, now)
    refs = detector._references(table, groups)
    ratios, counts = _median_ratios(table, groups, refs)
    dense_refs, dense_ratios, dense_counts, dense = _dense_scores(table, groups, detector.thresholds)
    if layout != "grid":
        assert not dense.any()
        return
    assert dense.all()
    assert np.array_equal(dense_refs.keys, refs.keys) and np.array_equal(dense_refs.values, refs.values)
    assert np.array_equal(dense_ratios, ratios) and np.array_equal(dense_counts, counts)


def test_jobs_of_several_shapes_score_as_the_general_path():
    # Grids of two shapes (two jobs of one), a job restarted from a checkpoint, one whose rank
    # missed a step and one too large for a grid: each scored as the general path scores it.
    steps = job_steps(ranks=12, cv=0.04, duration=120, seed=1, slow=((3, 60.0, 120.0, 1.3),))
    steps += job_steps(job="j2", ranks=12, cv=0.03, duration=120, seed=2)
    steps += job_steps(job="j3", ranks=8, cv=0.03, duration=120, start=0.4, seed=3)
    restarted = job_steps(job="j4", ranks=6, cv=0.03, duration=120, seed=4)
    newest = restarted[-1].step
    steps += restarted + [dataclasses.replace(s, t=s.t + 8 * STEP_SECONDS) for s in restarted if s.step > newest - 8]
    steps += [
        s for s in job_steps(job="j5", ranks=6, cv=0.03, duration=120, seed=5) if (s.rank, s.step) != (2, newest - 5)
    ]
    steps += job_steps(job="j6", ranks=70, cv=0.03, duration=120, seed=6)
    steps.sort(key=lambda s: s.t)
    detector = StragglerStepsDetector()
    now = max(s.t for s in steps)
    table = step_table(window_at(now, steps, detector=detector))
    groups = detector._recent(table, now)
    refs, ratios, counts = detector._scored(table, groups)
    general_refs = detector._references(table, groups)
    general_ratios, general_counts = _median_ratios(table, groups, general_refs)
    dense = _dense_scores(table, groups, detector.thresholds)[3]
    assert sorted({table.jobs[j] for j in groups.job[dense].tolist()}) == ["j1", "j2", "j3"]
    assert np.array_equal(refs.keys, general_refs.keys) and np.array_equal(refs.values, general_refs.values)
    assert np.array_equal(ratios, general_ratios, equal_nan=True) and np.array_equal(counts, general_counts)


def test_baselines_kept_between_evaluations_are_the_ones_found_afresh(monkeypatch):
    # Evaluated every second as the engine does, a detector that keeps its baselines between
    # evaluations uses the ones a fresh detector finds: a job whose step rate drops (its ranks'
    # recent spans then reach back over their baselines) and one that started later at an uneven
    # step rate (where its baselines start moves with the rate), before its baselines are older
    # than any recent span could reach.
    rng = random.Random(9)
    steps = []
    for job, start, periods in (
        ("slowing", 0.0, [1.5] * 60 + [12.0] * 9),
        ("young", 60.0, [rng.uniform(0.7, 1.1) for _ in range(150)]),
    ):
        t = T0 + start
        for step, period in enumerate(periods):
            t += period
            for rank in range(4):
                seconds = period * rng.uniform(0.85, 1.0)
                steps.append(Step(t=t, job=job, rank=rank, node="n01", step=step, seconds=seconds, gpu=rank))
    steps.sort(key=lambda s: s.t)
    seen = []
    paced = StragglerStepsDetector._paced

    def recorded(self, table, jobs, recent, now):
        baselines = paced(self, table, jobs, recent, now)
        rows = baselines.groups.rows + baselines.origin  # absolute rows
        seen.append((baselines.medians, baselines.groups.job, baselines.groups.rank, rows, baselines.ratios))
        return baselines

    monkeypatch.setattr(StragglerStepsDetector, "_paced", recorded)
    kept = StragglerStepsDetector()
    data = RecentData.for_detectors([kept])
    pending = iter(steps)
    upcoming = next(pending, None)
    reused = 0
    for second in range(1, int(steps[-1].t - T0) + 2):
        now = T0 + second
        while upcoming is not None and upcoming.t <= now:
            data.add_step(upcoming)
            upcoming = next(pending, None)
        window = data.window(now, watching_since=T0)
        memo = kept._baseline_memo
        seen.clear()
        found = kept.detect(window)
        reused += memo is not None and kept._baseline_memo is memo
        assert found == StragglerStepsDetector().detect(window), second
        assert len(seen) in (0, 2), second
        if seen:
            (medians, *arrays), (fresh_medians, *fresh_arrays) = seen
            assert medians == fresh_medians, second
            assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(arrays, fresh_arrays)), second
    assert reused > 0
