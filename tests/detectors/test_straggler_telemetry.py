"""StragglerTelemetryDetector: the slow GPU of a job without step reports, from its clocks."""

from __future__ import annotations

import random

import pytest

from fleetwatch.detectors.engine import RecentData
from fleetwatch.detectors.model import Window
from fleetwatch.detectors.replay import replay
from fleetwatch.detectors.straggler_telemetry import StragglerTelemetryDetector, StragglerTelemetryThresholds
from fleetwatch.nvml_bits import HW_POWER_BRAKE_SLOWDOWN, HW_SLOWDOWN, HW_THERMAL_SLOWDOWN, SW_POWER_CAP
from fleetwatch.records import GpuSample, Step

T0 = 1_700_000_000.0
PEER = {
    "sm_clock_mhz": 1980,
    "sm_clock_max_mhz": 1980,
    "clock_event_reasons": 0,
    "power_watts": 520.0,  # waiting in collectives for the slow one: less than its 650 W
    "power_limit_watts": 700.0,
    "gpu_util_percent": 100,
}
THERMAL = {
    **PEER,
    "sm_clock_mhz": 990,
    "clock_event_reasons": HW_SLOWDOWN | HW_THERMAL_SLOWDOWN,
    "power_watts": 330.0,
}
IDLE = {**PEER, "sm_clock_mhz": 345, "power_watts": 70.0, "gpu_util_percent": 0}


def fleet(
    seconds: int = 120,
    *,
    nodes: int = 2,
    job: str | None = "j1",
    slow: tuple[str, int] = ("n02", 3),
    slow_from: int = 60,
    slow_metrics=THERMAL,
    peer_metrics=PEER,
    jitter: bool = True,
    seed: int = 3,
) -> list[GpuSample]:
    """8 GPUs a node sampled every second; `slow` runs `slow_metrics` from `slow_from` on."""
    rng = random.Random(seed)
    samples = []
    for second in range(seconds):
        for n in range(1, nodes + 1):
            for gpu in range(8):
                key = (f"n{n:02d}", gpu)
                is_slow = key == slow and second >= slow_from
                metrics = dict(slow_metrics if is_slow else peer_metrics)
                if jitter and metrics["sm_clock_mhz"] > 1000 and rng.random() < 0.1:
                    metrics["sm_clock_mhz"] -= 15  # Hopper drops a 15 MHz bin now and then
                samples.append(
                    GpuSample(
                        t=T0 + second,
                        node=key[0],
                        gpu=gpu,
                        metrics=metrics,
                        job=job,
                        rank=(n - 1) * 8 + gpu if job else None,
                    )
                )
    return samples


def window_at(now: float, samples, steps=()) -> Window:
    detector = StragglerTelemetryDetector()
    data = RecentData.for_detectors([detector])
    for s in samples:
        if s.t <= now:
            data.add_gpu(s)
    for s in steps:
        if s.t <= now:
            data.add_step(s)
    return data.window(now, watching_since=T0)


def telemetry_findings(records, detector=None):
    return replay(records, [detector or StragglerTelemetryDetector()])


def test_thermal_straggler_in_a_job_is_named_with_its_clock_and_cause():
    (finding,) = telemetry_findings(fleet(180, slow_from=60))
    assert finding.summary == (
        "GPU 3 on n02 (job j1, rank 11) runs at 990 MHz against its peers' 1,980 MHz: hardware thermal slowdown; "
        "job j1 loses up to 50% of its speed to it"
    )
    assert (finding.detector, finding.severity, finding.action) == (
        "straggler.telemetry",
        "warning",
        "inspect_hardware",
    )
    assert (finding.node, finding.gpu, finding.job, finding.rank) == ("n02", 3, "j1", 11)
    assert finding.start == T0 + 60
    assert finding.end is None
    evidence = finding.evidence
    assert evidence["cause"] == "hardware thermal slowdown"
    assert evidence["clock_event_reasons"] == HW_SLOWDOWN | HW_THERMAL_SLOWDOWN
    assert (evidence["sm_clock_mhz"], evidence["peer_sm_clock_mhz"]) == (990, 1980)
    assert evidence["job_loss"] == 0.5  # the job steps at this GPU's half clock
    # The peers wait in collectives: they draw less than usual, the straggler even less here;
    # power is evidence, not the signal.
    assert (evidence["power_watts"], evidence["peer_power_watts"]) == (330.0, 520.0)
    assert evidence["peers"] == 15 and evidence["group"] == "job j1"


def test_found_once_80_percent_of_the_last_20_s_are_slow_and_closed_when_it_recovers():
    samples = [s for s in fleet(200, slow_from=60) if (s.node, s.gpu) != ("n02", 3)]
    slow = [
        GpuSample(t=T0 + t, node="n02", gpu=3, metrics=THERMAL if 60 <= t < 150 else PEER, job="j1", rank=11)
        for t in range(200)
    ]
    detector = StragglerTelemetryDetector()
    assert detector.detect(window_at(T0 + 74, samples + slow)) == []  # 15 of 21 samples: 71%
    assert detector.detect(window_at(T0 + 76, samples + slow))  # 17 of 21: 81%
    (finding,) = telemetry_findings(samples + slow)
    assert finding.start == T0 + 60 and T0 + 150 <= finding.end <= T0 + 156


def test_power_brake_and_a_clock_low_for_no_reason():
    brake = {**THERMAL, "sm_clock_mhz": 885, "clock_event_reasons": 0x88, "power_watts": 260.0}
    (finding,) = telemetry_findings(fleet(120, slow_metrics=brake))
    assert "runs at 885 MHz against its peers' 1,980 MHz: hardware power brake; job j1 loses" in finding.summary
    assert finding.evidence["clock_event_reasons"] == HW_POWER_BRAKE_SLOWDOWN | HW_SLOWDOWN

    unexplained = {**PEER, "sm_clock_mhz": 1410}
    (finding,) = telemetry_findings(fleet(120, slow_metrics=unexplained))
    assert "runs at 1,410 MHz against its peers' 1,980 MHz: no clock event reason reported; job j1" in finding.summary
    capped = {**PEER, "sm_clock_mhz": 1500, "clock_event_reasons": SW_POWER_CAP, "power_limit_watts": 450.0}
    (finding,) = telemetry_findings(fleet(120, slow_metrics=capped))
    assert finding.evidence["cause"] == "software power cap at a 450 W limit"


@pytest.mark.parametrize(("clock", "found"), [(1698, False), (1683, True), (1668, True)])
def test_clock_ratio_edge(clock, found):
    # 85% of 1,980 MHz is 1,683 MHz: at or under it is slow.
    slow = {**PEER, "sm_clock_mhz": clock}
    findings = telemetry_findings(fleet(100, slow_metrics=slow, jitter=False))
    assert bool(findings) is found


def test_the_whole_job_idling_and_resuming_is_not_a_straggler():
    # A checkpoint or restart: every GPU of the job at its idle clock, then busy again. Just
    # after, the last 20 s are mostly idle samples at 345 MHz: idle, not slow.
    paused = {**IDLE, "clock_event_reasons": 0x1}  # NVML's GPU idle reason
    samples = [
        GpuSample(
            t=s.t,
            node=s.node,
            gpu=s.gpu,
            job=s.job,
            rank=s.rank,
            metrics=paused if 100 <= s.t - T0 < 130 else s.metrics,
        )
        for s in fleet(200, slow_from=10**9)
    ]
    assert telemetry_findings(samples) == []


def test_power_alone_is_not_a_straggler():
    # A GPU at full clock drawing little (peers of a straggler, or a lighter shard) is not one.
    low_power = {**PEER, "power_watts": 250.0}
    assert telemetry_findings(fleet(120, slow_metrics=low_power)) == []


def test_healthy_fleet_with_clock_bins_and_power_swings_raises_nothing():
    rng = random.Random(5)
    samples = [
        GpuSample(
            t=s.t,
            node=s.node,
            gpu=s.gpu,
            job=s.job,
            rank=s.rank,
            metrics={
                **s.metrics,
                "power_watts": rng.uniform(450, 690),
                "sm_clock_mhz": s.metrics["sm_clock_mhz"] - 15 * rng.randrange(3),
            },
        )
        for s in fleet(600, nodes=4, slow_from=10**9)
    ]
    assert telemetry_findings(samples) == []


def test_idle_gpus_are_left_out_on_both_sides():
    # Half the job idle (low clocks, util 0): neither a straggler nor a peer that drags the median.
    samples = fleet(120, slow_from=60)
    samples = [
        GpuSample(t=s.t, node=s.node, gpu=s.gpu, job=s.job, rank=s.rank, metrics=IDLE)
        if s.node == "n01" and s.gpu < 6
        else s
        for s in samples
    ]
    (finding,) = telemetry_findings(samples)
    assert (finding.node, finding.gpu) == ("n02", 3)
    assert finding.evidence["peers"] == 9


def test_without_job_the_busy_gpus_of_one_model_are_peers_and_a_reason_is_needed():
    (finding,) = telemetry_findings(fleet(120, job=None))
    assert finding.summary == ("GPU 3 on n02 runs at 990 MHz against its peers' 1,980 MHz: hardware thermal slowdown")
    assert finding.job is None and finding.rank is None
    assert finding.evidence["group"] == "sm_clock_max_mhz 1,980"
    # A job-less GPU at a lower clock with no reason may just run something else.
    unexplained = {**PEER, "sm_clock_mhz": 1410}
    assert telemetry_findings(fleet(120, job=None, slow_metrics=unexplained)) == []


def test_gpus_of_other_models_are_not_peers():
    h200 = {**PEER, "sm_clock_max_mhz": 1755, "sm_clock_mhz": 1755}
    samples = fleet(120, job=None, slow_from=10**9) + [
        GpuSample(t=T0 + t, node="n09", gpu=g, metrics=h200) for t in range(120) for g in range(2)
    ]
    assert telemetry_findings(samples) == []


def test_a_job_with_step_reports_is_left_to_straggler_steps():
    samples = fleet(120, slow_from=60)
    steps = [
        Step(t=T0 + t, job="j1", rank=r, node=f"n{r // 8 + 1:02d}", step=t, seconds=0.9, gpu=r % 8)
        for t in range(120)
        for r in range(16)
    ]
    assert telemetry_findings(samples + steps) == []
    # The same GPUs without job attribution: their (node, GPU) sends steps, so still deferred.
    no_job = fleet(120, job=None, slow_from=60)
    assert telemetry_findings(no_job + steps) == []
    # Steps of another job do not hide this one.
    other = [Step(t=s.t, job="j9", rank=s.rank, node="n77", step=s.step, seconds=0.9, gpu=s.gpu) for s in steps]
    assert [f.rank for f in telemetry_findings(samples + other)] == [11]


def test_too_few_samples_or_peers_and_missing_fields():
    detector = StragglerTelemetryDetector()
    samples = fleet(120, slow_from=60)
    # Sparse sampling: 3 samples in the last 20 s are too few to judge.
    sparse = [s for s in samples if int(s.t - T0) % 8 == 0]
    assert detector.detect(window_at(T0 + 119, sparse)) == []
    # A job of two GPUs has one peer: not enough for a median.
    pair = [s for s in samples if s.node == "n02" and s.gpu in (2, 3)]
    assert detector.detect(window_at(T0 + 119, pair)) == []
    # No clock at all, or no sm_clock_max_mhz without a job: nothing to compare.
    bare = [GpuSample(t=s.t, node=s.node, gpu=s.gpu, metrics={"power_watts": 100.0}) for s in samples]
    assert detector.detect(window_at(T0 + 119, bare)) == []
    modelless = [
        GpuSample(
            t=s.t, node=s.node, gpu=s.gpu, metrics={k: v for k, v in s.metrics.items() if k != "sm_clock_max_mhz"}
        )
        for s in samples
    ]
    assert detector.detect(window_at(T0 + 119, modelless)) == []
    empty = Window(now=T0, gpu={}, host={}, events=[], steps=[], nodes={}, watching_since=T0)
    assert detector.detect(empty) == []


def test_a_spread_job_does_not_flag_its_slowest():
    # GPUs whose clocks legitimately spread (different power caps): the MAD widens the band.
    rng = random.Random(9)
    clocks = {(f"n0{n}", g): rng.choice([1980, 1800, 1650, 1500]) for n in (1, 2) for g in range(8)}
    samples = [
        GpuSample(
            t=s.t,
            node=s.node,
            gpu=s.gpu,
            job=s.job,
            rank=s.rank,
            metrics={**s.metrics, "sm_clock_mhz": clocks[(s.node, s.gpu)]},
        )
        for s in fleet(120, slow_from=10**9, jitter=False)
    ]
    assert telemetry_findings(samples) == []


def test_thresholds_are_checked():
    with pytest.raises(ValueError):
        StragglerTelemetryThresholds(persist_seconds=90.0, window_seconds=60.0)
    with pytest.raises(ValueError):
        StragglerTelemetryThresholds(clock_ratio=1.2)
    assert StragglerTelemetryDetector().window_seconds >= 60.0


def test_idle_samples_before_a_job_starts_are_not_a_low_clock_cause():
    """A GPU whose window still holds idle samples (345 MHz, GpuIdle) from before its job began
    is not running slow: the cause is read from its busy samples only."""
    from fleetwatch.detectors.model import GpuSample
    from fleetwatch.detectors.straggler_telemetry import gpu_cause

    idle = [
        GpuSample(
            t=float(i),
            node="n01",
            gpu=4,
            metrics={"sm_clock_mhz": 345.0, "clock_event_reasons": 0x1, "power_watts": 70.0, "gpu_util_percent": 0.0},
        )
        for i in range(12)
    ]
    busy = [
        GpuSample(
            t=float(12 + i),
            node="n01",
            gpu=4,
            metrics={"sm_clock_mhz": 1980.0, "clock_event_reasons": 0, "power_watts": 640.0, "gpu_util_percent": 99.0},
        )
        for i in range(8)
    ]
    cause = gpu_cause(idle + busy, 1980.0, 650.0, min_fraction=0.5, clock_below_peers=0.85, power_below_peers=0.6)
    assert not cause.hardware and cause.name is None
