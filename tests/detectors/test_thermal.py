"""ThermalDetector: HW thermal slowdown bit or slowdown temperature over most recent samples."""

import pytest

from detectors.engine import RecentData, Tracker
from detectors.model import GpuSample, NodeState, Window
from detectors.thermal import HW_THERMAL_SLOWDOWN, ThermalDetector, ThermalThresholds

T0 = 1_700_000_000.0
COOL = {
    "clock_event_reasons": 0,
    "temp_gpu_celsius": 60,
    "temp_slowdown_celsius": 87,
    "sm_clock_mhz": 1980,
    "sm_clock_max_mhz": 1980,
}
HOT = {
    "clock_event_reasons": HW_THERMAL_SLOWDOWN,
    "temp_gpu_celsius": 88,
    "temp_slowdown_celsius": 87,
    "sm_clock_mhz": 990,
    "sm_clock_max_mhz": 1980,
}


def window(metrics_per_second, gpu=2, now=None):
    """A window of one GPU's samples, one a second ending at `now` (default: the last sample)."""
    samples = [
        GpuSample(t=T0 + i, node="n01", gpu=gpu, metrics=m)
        for i, m in enumerate(metrics_per_second)
    ]
    now = samples[-1].t if now is None else now
    return Window(
        now=now,
        gpu={("n01", gpu): samples},
        host={},
        events=[],
        steps=[],
        nodes={"n01": NodeState("n01", samples[-1].t, 1.0)},
        watching_since=T0,
    )


def test_two_of_three_hot_samples_fire_with_a_readable_summary():
    (finding,) = ThermalDetector().detect(window([COOL, HOT, COOL, HOT]))
    assert finding.summary == (
        "GPU 2 in hardware thermal slowdown: "
        "SM clock 990 MHz of 1980 MHz max, 88 C (slowdown at 87 C)"
    )
    assert (finding.detector, finding.severity, finding.action) == (
        "thermal",
        "warning",
        "inspect_hardware",
    )
    assert (finding.node, finding.gpu, finding.start) == ("n01", 2, T0 + 1)
    assert finding.evidence == {
        "hot_samples": 2,
        "recent_samples": 3,
        "hw_thermal_slowdown": True,
        "temp_gpu_celsius": 88.0,
        "temp_slowdown_celsius": 87.0,
        "sm_clock_mhz": 990.0,
        "sm_clock_max_mhz": 1980.0,
    }


def test_a_single_blip_does_not_fire():
    assert ThermalDetector().detect(window([COOL, COOL, HOT, COOL])) == []
    assert ThermalDetector().detect(window([COOL, COOL, HOT])) == []


def test_one_sample_is_not_enough_history():
    assert ThermalDetector().detect(window([HOT])) == []


@pytest.mark.parametrize(("temp", "fires"), [(86.9, False), (87, True), (95, True)])
def test_temperature_rule_edges(temp, fires):
    sample = {"temp_gpu_celsius": temp, "temp_slowdown_celsius": 87, "clock_event_reasons": 0}
    assert bool(ThermalDetector().detect(window([sample, sample, sample]))) is fires


def test_temperature_rule_alone_says_so_in_the_summary():
    sample = {"temp_gpu_celsius": 90, "temp_slowdown_celsius": 87}
    (finding,) = ThermalDetector().detect(window([sample] * 3))
    assert finding.summary == "GPU 2 at its slowdown temperature: 90 C (slowdown at 87 C)"
    assert finding.evidence["hw_thermal_slowdown"] is False


def test_slowdown_bit_alone_fires_without_temperatures():
    (finding,) = ThermalDetector().detect(window([{"clock_event_reasons": 0x40 | 0x1}] * 3))
    assert finding.summary == "GPU 2 in hardware thermal slowdown"


@pytest.mark.parametrize(
    "reasons", [0x0, 0x1, 0x4, 0x8, 0x20, 0x80]
)  # idle, power cap, HW, SW thermal, brake
def test_other_clock_event_reasons_do_not_fire(reasons):
    assert ThermalDetector().detect(window([{"clock_event_reasons": reasons}] * 3)) == []


@pytest.mark.parametrize(
    "sample",
    [
        {},  # nothing supported
        {"temp_gpu_celsius": 120},  # no slowdown threshold: never compare against an assumed 0
        {"temp_slowdown_celsius": 87},  # no temperature
        {"sm_clock_mhz": 300, "sm_clock_max_mhz": 1980},
    ],
)
def test_missing_fields_give_no_finding(sample):
    assert ThermalDetector().detect(window([sample] * 3)) == []


def test_stale_samples_do_not_fire():
    hot_long_ago = window(
        [HOT, HOT, HOT], now=T0 + 2 + ThermalThresholds().max_sample_age_seconds + 1
    )
    assert ThermalDetector().detect(hot_long_ago) == []


def test_thresholds_are_configurable():
    detector = ThermalDetector(ThermalThresholds(recent_samples=5, min_hot_samples=4))
    assert detector.detect(window([HOT, HOT, COOL, HOT, HOT])) != []
    assert detector.detect(window([HOT, COOL, COOL, HOT, HOT])) == []


def test_resolves_when_recent_samples_are_clean():
    data = RecentData(retention_seconds=60)
    tracker = Tracker([ThermalDetector()])
    states = []
    for i, metrics in enumerate([COOL, HOT, HOT, HOT, COOL, COOL, COOL]):
        data.add_gpu(GpuSample(t=T0 + i, node="n01", gpu=2, metrics=metrics))
        opened, closed = tracker.evaluate(data.window(T0 + i, watching_since=T0))
        states.append((len(opened), len(closed)))
    # Opens at the second hot sample, still holds with one clean sample, closes with two.
    assert states == [(0, 0), (0, 0), (1, 0), (0, 0), (0, 0), (0, 1), (0, 0)]


def test_impossible_thresholds_are_rejected():
    with pytest.raises(ValueError):
        ThermalThresholds(recent_samples=2, min_hot_samples=3)
