"""ThermalDetector: sustained thermal slowdown or temperature at its limits; blips never fire."""

import pytest

from fleetwatch.detectors.engine import RecentData, Tracker
from fleetwatch.detectors.model import NodeState, Window
from fleetwatch.detectors.thermal import ThermalDetector, ThermalThresholds
from fleetwatch.nvml_bits import HW_THERMAL_SLOWDOWN, SW_THERMAL_SLOWDOWN
from fleetwatch.records import GpuSample

T0 = 1_700_000_000.0
COOL = {
    "clock_event_reasons": 0x4,  # SW power cap: normal at full load
    "temp_gpu_celsius": 60,
    "temp_slowdown_celsius": 89,
    "temp_mem_celsius": 55,
    "sm_clock_mhz": 1965,
    "sm_clock_max_mhz": 1980,
}
HOT = {
    "clock_event_reasons": 0x08 | HW_THERMAL_SLOWDOWN,
    "temp_gpu_celsius": 90,
    "temp_slowdown_celsius": 89,
    "temp_mem_celsius": 84,
    "sm_clock_mhz": 990,
    "sm_clock_max_mhz": 1980,
}


def samples(metrics_list, gpu=2, interval=1.0, t0=T0, job=None):
    return [GpuSample(t=t0 + i * interval, node="n01", gpu=gpu, metrics=m, job=job) for i, m in enumerate(metrics_list)]


def window(metrics_list, gpu=2, now=None, interval=1.0):
    """A window of one GPU's samples, one every `interval` s, as of `now` (default: the last)."""
    series = samples(metrics_list, gpu=gpu, interval=interval)
    now = series[-1].t if now is None else now
    return Window(
        now=now,
        gpu={("n01", gpu): series},
        host={},
        events=[],
        steps=[],
        nodes={"n01": NodeState("n01", series[-1].t, interval)},
        watching_since=T0,
    )


def detect(metrics_list, **kwargs):
    return ThermalDetector().detect(window(metrics_list, **kwargs))


@pytest.mark.parametrize(("hot_seconds", "fires"), [(14, False), (15, False), (16, True)])
def test_sustained_hw_thermal_slowdown_fires_after_16_of_20_samples(hot_seconds, fires):
    # 16 hot samples of the last 20 (80 %), 15 s apart: 15 s after onset at 1 Hz.
    assert bool(detect([COOL] * 30 + [HOT] * hot_seconds)) is fires


def test_finding_shape_and_readable_summary():
    (finding,) = detect([COOL] * 30 + [HOT] * 16)
    assert (finding.detector, finding.severity, finding.action) == (
        "thermal",
        "warning",
        "inspect_hardware",
    )
    assert (finding.node, finding.gpu, finding.job, finding.start) == ("n01", 2, None, T0 + 30)
    assert finding.summary == (
        "GPU 2 in hardware thermal slowdown for 15 s (16 of 20 samples): "
        "SM clock 990 MHz of 1980 MHz max, 90 C (slowdown at 89 C)"
    )
    assert finding.evidence == {
        "condition": "hw_thermal_slowdown",
        "sustained_by": "recent",
        "hot_samples": 16,
        "recent_samples": 20,
        "recent_seconds": 20.0,
        "hw_thermal_slowdown": True,
        "sw_thermal_slowdown": False,
        "clock_event_reasons": 0x48,
        "temp_gpu_celsius": 90.0,
        "temp_slowdown_celsius": 89.0,
        "temp_mem_celsius": 84.0,
        "sm_clock_mhz": 990.0,
        "sm_clock_max_mhz": 1980.0,
    }


@pytest.mark.parametrize(
    "pattern",
    [
        [COOL] * 30 + [HOT] + [COOL] * 5,  # a single blip
        [COOL] * 30 + [HOT],  # a blip that is the newest sample
        [COOL] * 30 + [HOT] * 9,  # a 9 s spike
        [COOL] * 10 + [HOT] * 12 + [COOL] * 3,  # 12 of 20 hot, then clear
        [HOT] * 8,  # too short to be sustained, even as all the history there is
    ],
)
def test_blips_and_short_spikes_do_not_fire(pattern):
    assert detect(pattern) == []


def test_warming_up_to_just_under_the_threshold_does_not_fire():
    ramp = [
        dict(COOL, temp_gpu_celsius=60 + min(28, i), temp_mem_celsius=55 + min(39, i)) for i in range(120)
    ]  # core ends at 88 C (slowdown 89 C), HBM at 94 C (max 95 C)
    assert detect(ramp) == []


@pytest.mark.parametrize(("temp", "fires"), [(88, False), (88.9, False), (89, True), (95, True)])
def test_core_temperature_edges(temp, fires):
    sample = dict(COOL, temp_gpu_celsius=temp)
    assert bool(detect([sample] * 20)) is fires


def test_core_temperature_alone_says_so_in_the_summary():
    (finding,) = detect([dict(COOL, temp_gpu_celsius=90)] * 20)
    assert finding.summary == (
        "GPU 2 at its slowdown temperature for 19 s (20 of 20 samples): "
        "SM clock 1965 MHz of 1980 MHz max, 90 C (slowdown at 89 C)"
    )
    assert finding.evidence["condition"] == "at_slowdown_temperature"
    assert finding.evidence["hw_thermal_slowdown"] is False


@pytest.mark.parametrize(("temp_mem", "fires"), [(94, False), (94.9, False), (95, True)])
def test_hbm_temperature_edges(temp_mem, fires):
    assert bool(detect([dict(COOL, temp_mem_celsius=temp_mem)] * 20)) is fires


def test_hbm_at_its_max_says_so():
    (finding,) = detect([dict(COOL, temp_mem_celsius=96)] * 20)
    assert finding.summary.startswith("GPU 2 with HBM at its max operating temperature for 19 s")
    assert finding.summary.endswith("HBM 96 C (max 95 C)")
    assert finding.evidence["condition"] == "hbm_at_max_temperature"


def test_hbm_limit_is_a_threshold():
    detector = ThermalDetector(ThermalThresholds(temp_mem_max_celsius=90))
    assert detector.detect(window([dict(COOL, temp_mem_celsius=91)] * 20)) != []


def test_sustained_sw_thermal_slowdown_is_a_thermal_finding():
    (finding,) = detect([dict(COOL, clock_event_reasons=SW_THERMAL_SLOWDOWN)] * 20)
    assert finding.summary.startswith("GPU 2 in software thermal slowdown for 19 s")
    assert finding.evidence["sw_thermal_slowdown"] is True


def test_slowdown_bit_alone_fires_without_temperatures():
    (finding,) = detect([{"clock_event_reasons": HW_THERMAL_SLOWDOWN | 0x1}] * 20)
    assert finding.summary == "GPU 2 in hardware thermal slowdown for 19 s (20 of 20 samples)"


@pytest.mark.parametrize("reasons", [0x0, 0x1, 0x2, 0x4, 0x8, 0x10, 0x80, 0x100])
def test_other_clock_event_reasons_do_not_fire(reasons):
    assert detect([{"clock_event_reasons": reasons}] * 30) == []


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
    assert detect([sample] * 30) == []


def test_stale_samples_do_not_fire():
    age = ThermalThresholds().max_sample_age_seconds
    assert detect([HOT] * 30, now=T0 + 29 + age + 1) == []


def test_a_flickering_bit_at_80_percent_still_fires():
    flicker = [COOL] * 10 + [COOL if i % 5 == 4 else HOT for i in range(20)]
    (finding,) = detect(flicker)
    assert finding.evidence["hot_samples"] == 16


def test_slow_sampling_needs_two_samples_10_s_apart():
    assert detect([COOL, HOT], interval=10.0) == []
    (finding,) = detect([COOL, HOT, HOT], interval=10.0)
    assert finding.start == T0 + 10


def test_intermittent_slowdown_fires_on_six_of_ten_minutes():
    # A one-second slowdown every minute never fills 80 % of 20 s; gpud counts it per minute.
    minute = [HOT] + [COOL] * 59
    assert detect([COOL] * 120 + minute * 4 + [HOT]) == []  # 5 minutes with a slowdown
    (finding,) = detect([COOL] * 120 + minute * 5 + [HOT])  # 6 minutes
    assert finding.evidence["sustained_by"] == "long"
    assert finding.evidence["hot_minutes"] == 6
    assert finding.summary.startswith(
        "GPU 2 in hardware thermal slowdown in 6 of the last 10 minutes: SM clock 990 MHz"
    )
    assert finding.start == T0 + 120  # the first hot sample of the long window


def test_thresholds_are_configurable():
    detector = ThermalDetector(ThermalThresholds(recent_seconds=10, recent_min_seconds=5))
    assert detector.detect(window([COOL] * 10 + [HOT] * 8)) != []
    assert ThermalDetector().detect(window([COOL] * 10 + [HOT] * 8)) == []
    assert ThermalDetector().window_seconds == 600.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clear_samples": 0},
        {"recent_fraction": 0},
        {"recent_fraction": 1.5},
        {"recent_seconds": 0},
        {"long_min_buckets": 0},
        {"max_sample_age_seconds": 0},
        {"recent_min_seconds": -1},
    ],
)
def test_impossible_thresholds_are_rejected(kwargs):
    with pytest.raises(ValueError):
        ThermalThresholds(**kwargs)


def run(pattern, detectors=None, job_of=lambda i: None):
    """Feeds one GPU's samples second by second; returns (second, opened, closed) changes."""
    data = RecentData.for_detectors(detectors or [ThermalDetector()])
    tracker = Tracker(detectors or [ThermalDetector()])
    changes = []
    for i, metrics in enumerate(pattern):
        data.add_gpu(GpuSample(t=T0 + i, node="n01", gpu=2, metrics=metrics, job=job_of(i)))
        opened, closed = tracker.evaluate(data.window(T0 + i, watching_since=T0))
        if opened or closed:
            changes.append((i, len(opened), len(closed)))
    return changes, tracker


def test_holds_through_a_clear_sample_and_resolves_after_five():
    pattern = [COOL] * 10 + [HOT] * 40 + [COOL] + [HOT] * 30 + [COOL] * 10
    changes, _ = run(pattern)
    # Opens at the 16th hot sample (second 25), holds through the single clear sample at 50,
    # closes when seconds 81-85 are all clear.
    assert changes == [(25, 1, 0), (85, 0, 1)]


def test_resolves_when_the_recent_window_falls_under_80_percent():
    pattern = [COOL] * 10 + [HOT] * 40 + [COOL] + [HOT] * 10 + [COOL] * 10
    changes, _ = run(pattern)
    # At second 64 a hot sample is still among the newest 5, but only 15 of the last 20 are hot.
    assert changes == [(25, 1, 0), (64, 0, 1)]


def test_a_job_restart_mid_episode_keeps_one_finding():
    pattern = [COOL] * 10 + [HOT] * 60
    changes, tracker = run(pattern, job_of=lambda i: "j1" if i < 40 else "j2")
    assert changes == [(25, 1, 0)]
    (finding,) = tracker.open.values()
    assert finding.job is None and finding.evidence["job"] == "j2"
