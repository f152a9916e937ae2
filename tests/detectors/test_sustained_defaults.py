"""The sustained rule's defaults are one definition that thermal, power and clocks share."""

from dataclasses import asdict, dataclass

from fleetwatch.detectors.clocks import ClocksThresholds
from fleetwatch.detectors.model import SustainedThresholds
from fleetwatch.detectors.power import PowerThresholds
from fleetwatch.detectors.thermal import ThermalThresholds


def test_the_three_detectors_use_the_shared_defaults() -> None:
    shared = asdict(SustainedThresholds())
    for thresholds in (ThermalThresholds(), PowerThresholds(), ClocksThresholds()):
        assert {k: v for k, v in asdict(thresholds).items() if k in shared} == shared


def test_the_defaults_are_the_documented_ones() -> None:
    # The docstrings of power and clocks: 80 % of the last 20 s over 10 s, or 6 of the last 10 min.
    rule = SustainedThresholds()
    assert (rule.recent_seconds, rule.recent_fraction, rule.recent_min_seconds) == (20.0, 0.8, 10.0)
    assert (rule.long_seconds, rule.long_bucket_seconds, rule.long_min_buckets) == (600.0, 60.0, 6)
    assert rule.window_seconds == 600.0


def test_a_detector_can_override_a_value_and_keep_the_rest() -> None:
    @dataclass(frozen=True, slots=True)
    class SlowerPower(PowerThresholds):
        recent_seconds: float = 30.0  # a per-detector default

    assert SlowerPower().recent_seconds == 30.0
    assert SlowerPower().long_min_buckets == SustainedThresholds().long_min_buckets
    assert PowerThresholds(recent_seconds=40.0).recent_seconds == 40.0  # and a per-instance one
