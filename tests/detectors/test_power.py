"""PowerDetector: sustained HW power brake (0x80); SW power cap (0x4) is never a finding."""

import pytest

from fleetwatch.detectors.engine import RecentData, Tracker
from fleetwatch.detectors.model import NodeState, Window
from fleetwatch.detectors.power import PowerDetector, PowerThresholds
from fleetwatch.nvml_bits import HW_POWER_BRAKE_SLOWDOWN
from fleetwatch.records import GpuSample

T0 = 1_700_000_000.0
BUSY = {  # full load: the GPU holds its power limit (SW power cap), as H100s do under training
    "clock_event_reasons": 0x4,
    "power_watts": 690.0,
    "power_limit_watts": 700.0,
    "sm_clock_mhz": 1935,
    "sm_clock_max_mhz": 1980,
}
BRAKED = {
    "clock_event_reasons": 0x08 | HW_POWER_BRAKE_SLOWDOWN,
    "power_watts": 260.0,
    "power_limit_watts": 700.0,
    "sm_clock_mhz": 885,
    "sm_clock_max_mhz": 1980,
}


def window(metrics_list, gpu=4, now=None, interval=1.0):
    series = [GpuSample(t=T0 + i * interval, node="n02", gpu=gpu, metrics=m) for i, m in enumerate(metrics_list)]
    now = series[-1].t if now is None else now
    return Window(
        now=now,
        gpu={("n02", gpu): series},
        host={},
        events=[],
        steps=[],
        nodes={"n02": NodeState("n02", series[-1].t, interval)},
        watching_since=T0,
    )


def detect(metrics_list, **kwargs):
    return PowerDetector().detect(window(metrics_list, **kwargs))


@pytest.mark.parametrize(("braked_seconds", "fires"), [(1, False), (15, False), (16, True)])
def test_fast_path_opens_after_16_of_the_last_20_samples(braked_seconds, fires):
    assert bool(detect([BUSY] * 30 + [BRAKED] * braked_seconds)) is fires


def test_finding_shape_and_readable_summary():
    (finding,) = detect([BUSY] * 30 + [BRAKED] * 20)
    assert (finding.detector, finding.severity, finding.action) == (
        "power",
        "warning",
        "inspect_hardware",
    )
    assert (finding.node, finding.gpu, finding.start) == ("n02", 4, T0 + 30)
    assert finding.summary == (
        "GPU 4 in hardware power brake slowdown for 19 s (20 of 20 samples): "
        "SM clock 885 MHz of 1980 MHz max, 260 W of 700 W limit"
    )
    assert finding.evidence == {
        "sustained_by": "recent",
        "braked_samples": 20,
        "recent_samples": 20,
        "recent_seconds": 20.0,
        "clock_event_reasons": 0x88,
        "power_watts": 260.0,
        "power_limit_watts": 700.0,
        "sm_clock_mhz": 885.0,
        "sm_clock_max_mhz": 1980.0,
    }


def test_sw_power_cap_at_full_load_is_never_a_finding():
    assert detect([BUSY] * 900) == []
    assert detect([dict(BUSY, clock_event_reasons=0x4 | 0x1)] * 900) == []


@pytest.mark.parametrize("reasons", [0x0, 0x1, 0x4, 0x8, 0x20, 0x40, 0x48])
def test_other_reasons_are_not_power_brake(reasons):
    assert detect([dict(BUSY, clock_event_reasons=reasons)] * 60) == []


def test_blips_and_short_brakes_do_not_fire():
    assert detect([BUSY] * 30 + [BRAKED] + [BUSY] * 4) == []
    assert detect([BUSY] * 30 + [BRAKED] * 9 + [BUSY]) == []


def test_brake_alone_fires_without_power_readings():
    (finding,) = detect([{"clock_event_reasons": HW_POWER_BRAKE_SLOWDOWN}] * 20)
    assert finding.summary == "GPU 4 in hardware power brake slowdown for 19 s (20 of 20 samples)"


@pytest.mark.parametrize("sample", [{}, {"power_watts": 100.0}, {"sm_clock_mhz": 300}])
def test_missing_clock_event_reasons_give_no_finding(sample):
    assert detect([sample] * 60) == []


def test_intermittent_brake_fires_on_six_of_ten_minutes():
    minute = [BRAKED] * 5 + [BUSY] * 55
    assert detect([BUSY] * 60 + minute * 4 + [BRAKED]) == []
    (finding,) = detect([BUSY] * 60 + minute * 5 + [BRAKED])
    assert finding.evidence["sustained_by"] == "long"
    assert finding.evidence["braked_minutes"] == 6
    assert "in 6 of the last 10 minutes" in finding.summary


def test_stale_samples_do_not_fire():
    age = PowerThresholds().max_sample_age_seconds
    assert detect([BRAKED] * 30, now=T0 + 29 + age + 1) == []


def test_holds_while_braked_and_resolves():
    data = RecentData.for_detectors([PowerDetector()])
    tracker = Tracker([PowerDetector()])
    pattern = [BUSY] * 10 + [BRAKED] * 40 + [BUSY] * 10
    changes = []
    for i, metrics in enumerate(pattern):
        data.add_gpu(GpuSample(t=T0 + i, node="n02", gpu=4, metrics=metrics))
        opened, closed = tracker.evaluate(data.window(T0 + i, watching_since=T0))
        changes += [("open", i, f.start) for f in opened] + [("close", i, f.end) for f in closed]
    assert changes == [("open", 25, T0 + 10), ("close", 54, T0 + 54)]


def test_thresholds_are_configurable_and_checked():
    detector = PowerDetector(PowerThresholds(recent_fraction=0.5, recent_min_seconds=5))
    assert detector.detect(window([BUSY] * 30 + [BRAKED] * 10)) != []
    assert PowerDetector().window_seconds == 600.0
    with pytest.raises(ValueError):
        PowerThresholds(recent_fraction=0)
    with pytest.raises(ValueError):
        PowerThresholds(long_bucket_seconds=0)


def test_samples_after_now_are_not_read():
    # A node whose clock runs ahead: its newest samples are not "now" yet.
    w = window([BUSY] * 30 + [BRAKED] * 20, now=T0 + 30)
    assert PowerDetector().detect(w) == []
    w = window([BRAKED] * 30 + [BUSY] * 20, now=T0 + 29)
    assert PowerDetector().detect(w) != []
