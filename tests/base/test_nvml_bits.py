"""The clock event reason bits equal pynvml's constants, under their current and former names."""

import pynvml
import pytest

from fleetwatch import nvml_bits
from fleetwatch.nvml_bits import CLOCK_EVENT_REASONS, ClockEventReason


def _camel(name: str) -> str:
    """HW_POWER_BRAKE_SLOWDOWN -> HwPowerBrakeSlowdown, pynvml's spelling."""
    return "".join(word.capitalize() for word in name.split("_"))


@pytest.mark.parametrize("reason", list(ClockEventReason), ids=lambda r: r.name)
def test_each_bit_equals_pynvml(reason: ClockEventReason) -> None:
    assert reason.value == getattr(pynvml, f"nvmlClocksEventReason{_camel(reason.name)}")
    assert reason.value == getattr(pynvml, f"nvmlClocksThrottleReason{_camel(reason.name)}")
    assert getattr(nvml_bits, reason.name) == reason.value
    assert type(getattr(nvml_bits, reason.name)) is int  # the fast form the detectors test with


def test_every_event_reason_of_pynvml_is_defined() -> None:
    assert sum(ClockEventReason) == pynvml.nvmlClocksEventReasonAll


def test_table_names_each_bit_in_order() -> None:
    assert CLOCK_EVENT_REASONS[0] == (0x001, "gpu_idle")
    assert CLOCK_EVENT_REASONS[7] == (0x080, "hw_power_brake_slowdown")
    assert [bit for bit, _ in CLOCK_EVENT_REASONS] == [1 << i for i in range(9)]
    assert all(type(bit) is int for bit, _ in CLOCK_EVENT_REASONS)


def test_a_mask_reads_as_its_reasons() -> None:
    mask = ClockEventReason(0x48)
    assert mask == ClockEventReason.HW_SLOWDOWN | ClockEventReason.HW_THERMAL_SLOWDOWN
    assert list(mask) == [ClockEventReason.HW_SLOWDOWN, ClockEventReason.HW_THERMAL_SLOWDOWN]
