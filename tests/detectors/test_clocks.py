"""ClocksDetector: sustained HW slowdown (0x8) not explained by thermal (0x40) or power (0x80)."""

import pytest

from fleetwatch.detectors.clocks import ClocksDetector, ClocksThresholds
from fleetwatch.detectors.engine import RecentData, Tracker
from fleetwatch.detectors.model import NodeState, Window
from fleetwatch.detectors.power import PowerDetector
from fleetwatch.detectors.thermal import ThermalDetector
from fleetwatch.records import GpuSample

T0 = 1_700_000_000.0
OK = {
    "clock_event_reasons": 0x4,
    "temp_gpu_celsius": 62,
    "temp_slowdown_celsius": 89,
    "sm_clock_mhz": 1965,
    "sm_clock_max_mhz": 1980,
    "gpu_util_percent": 100,
}
SLOW = dict(OK, clock_event_reasons=0x08, sm_clock_mhz=990)  # HW slowdown, no cause named
THERMAL = dict(OK, clock_event_reasons=0x08 | 0x40, sm_clock_mhz=990, temp_gpu_celsius=90)
BRAKE = dict(OK, clock_event_reasons=0x08 | 0x80, sm_clock_mhz=885)


def window(metrics_list, gpu=1, now=None):
    series = [GpuSample(t=T0 + i, node="n03", gpu=gpu, metrics=m) for i, m in enumerate(metrics_list)]
    now = series[-1].t if now is None else now
    return Window(
        now=now,
        gpu={("n03", gpu): series},
        host={},
        events=[],
        steps=[],
        nodes={"n03": NodeState("n03", series[-1].t, 1.0)},
        watching_since=T0,
    )


def detect(metrics_list, **kwargs):
    return ClocksDetector().detect(window(metrics_list, **kwargs))


@pytest.mark.parametrize(("slow_seconds", "fires"), [(15, False), (16, True)])
def test_unexplained_hw_slowdown_fires_after_16_of_20_samples(slow_seconds, fires):
    assert bool(detect([OK] * 30 + [SLOW] * slow_seconds)) is fires


def test_finding_shape():
    (finding,) = detect([OK] * 30 + [SLOW] * 20)
    assert (finding.detector, finding.severity, finding.action) == (
        "clocks",
        "warning",
        "inspect_hardware",
    )
    assert (finding.node, finding.gpu, finding.start) == ("n03", 1, T0 + 30)
    assert finding.summary == (
        "GPU 1 in hardware slowdown for 19 s (20 of 20 samples), not thermal or power brake: "
        "SM clock 990 MHz of 1980 MHz max"
    )
    assert finding.evidence == {
        "sustained_by": "recent",
        "slowed_samples": 20,
        "recent_samples": 20,
        "recent_seconds": 20.0,
        "clock_event_reasons": 0x08,
        "sm_clock_mhz": 990.0,
        "sm_clock_max_mhz": 1980.0,
    }


@pytest.mark.parametrize("sample", [THERMAL, BRAKE, dict(OK, clock_event_reasons=0x08 | 0xC0)])
def test_hw_slowdown_with_a_named_cause_is_left_to_thermal_or_power(sample):
    assert detect([OK] * 30 + [sample] * 60) == []


def test_a_named_cause_anywhere_in_the_window_suppresses():
    # Mostly bare HW slowdown, but the thermal bit shows in the same 20 s: one fault, thermal's.
    assert detect([OK] * 30 + [THERMAL] * 3 + [SLOW] * 17) == []
    # Once the cause has left the window, what remains is unexplained.
    assert detect([OK] * 30 + [THERMAL] * 3 + [SLOW] * 21) != []


@pytest.mark.parametrize("reasons", [0x0, 0x1, 0x2, 0x4, 0x10, 0x20, 0x100])
def test_other_reasons_are_not_clock_findings(reasons):
    # 0x20 (SW thermal) is thermal's; 0x4 (SW power cap) is normal at full load.
    assert detect([dict(SLOW, clock_event_reasons=reasons)] * 60) == []


def test_low_clock_while_busy_without_a_reason_is_not_a_finding():
    # Locked clocks (nvidia-smi -lgc) look like this on a healthy GPU.
    assert detect([dict(OK, clock_event_reasons=0, sm_clock_mhz=900)] * 120) == []


def test_missing_fields_and_blips():
    assert detect([{}] * 60) == []
    assert detect([{"sm_clock_mhz": 300, "sm_clock_max_mhz": 1980}] * 60) == []
    assert detect([OK] * 30 + [SLOW] + [OK] * 3) == []


def test_intermittent_slowdown_fires_on_six_of_ten_minutes():
    minute = [SLOW] * 3 + [OK] * 57
    assert detect([OK] * 60 + minute * 4 + [SLOW]) == []
    (finding,) = detect([OK] * 60 + minute * 5 + [SLOW])
    assert finding.evidence["slowed_minutes"] == 6


def test_intermittent_slowdown_with_a_thermal_cause_in_the_long_window_is_thermals():
    minute = [SLOW] * 3 + [OK] * 57
    assert detect([OK] * 60 + [THERMAL] + minute * 5 + [SLOW]) == []


def run_all(pattern):
    detectors = [ThermalDetector(), PowerDetector(), ClocksDetector()]
    data = RecentData.for_detectors(detectors)
    tracker = Tracker(detectors)
    opened_ids = []
    for i, metrics in enumerate(pattern):
        data.add_gpu(GpuSample(t=T0 + i, node="n03", gpu=1, metrics=metrics))
        opened, _ = tracker.evaluate(data.window(T0 + i, watching_since=T0))
        opened_ids += [(f.detector, i) for f in opened]
    return opened_ids


@pytest.mark.parametrize(("fault", "detector"), [(THERMAL, "thermal"), (BRAKE, "power"), (SLOW, "clocks")])
def test_one_slowdown_fault_gives_one_hardware_finding(fault, detector):
    assert run_all([OK] * 60 + [fault] * 120 + [OK] * 30) == [(detector, 75)]


def test_thresholds():
    assert ClocksDetector().window_seconds == 600.0
    assert ClocksDetector(ClocksThresholds(clear_samples=2)).detect(window([OK] * 30 + [SLOW] * 20 + [OK] * 2)) == []
    with pytest.raises(ValueError):
        ClocksThresholds(clear_samples=0)
