"""NVML's clock event reason bits (nvmlClocksEventReason*, nvml.h), defined once for every layer."""

from __future__ import annotations

import enum
from typing import Final


class ClockEventReason(enum.IntFlag):
    """The bits of nvmlDeviceGetCurrentClocksEventReasons' mask: why the clocks are below maximum.

    Values and names are nvml.h's nvmlClocksEventReason* (pynvml's constants of the same names;
    before R535 nvmlClocksThrottleReason*, same values); stdlib only, so that the detectors and
    the base layer read them without pynvml. tests/base/test_nvml_bits.py holds them to pynvml's.
    """

    GPU_IDLE = 0x001  # nvmlClocksEventReasonGpuIdle: nothing runs on the GPU
    APPLICATIONS_CLOCKS_SETTING = 0x002  # nvmlClocksEventReasonApplicationsClocksSetting (nvidia-smi -ac)
    SW_POWER_CAP = 0x004  # nvmlClocksEventReasonSwPowerCap: the GPU holds its own power limit
    HW_SLOWDOWN = 0x008  # nvmlClocksEventReasonHwSlowdown: clocks cut by half or more
    SYNC_BOOST = 0x010  # nvmlClocksEventReasonSyncBoost: limited by the Sync Boost setting
    SW_THERMAL_SLOWDOWN = 0x020  # nvmlClocksEventReasonSwThermalSlowdown: core or HBM too warm
    HW_THERMAL_SLOWDOWN = 0x040  # nvmlClocksEventReasonHwThermalSlowdown: HW slowdown, too hot
    HW_POWER_BRAKE_SLOWDOWN = 0x080  # nvmlClocksEventReasonHwPowerBrakeSlowdown: PSU's brake signal
    DISPLAY_CLOCK_SETTING = 0x100  # nvmlClocksEventReasonDisplayClockSetting


# The bits as plain ints for per-sample tests: `mask & bit` with an IntFlag member builds a flag
# object and costs about 20 times the int operation (timeit, CPython 3.11), and the detectors
# test every sample of every GPU on every tick.
GPU_IDLE: Final = ClockEventReason.GPU_IDLE.value
APPLICATIONS_CLOCKS_SETTING: Final = ClockEventReason.APPLICATIONS_CLOCKS_SETTING.value
SW_POWER_CAP: Final = ClockEventReason.SW_POWER_CAP.value
HW_SLOWDOWN: Final = ClockEventReason.HW_SLOWDOWN.value
SYNC_BOOST: Final = ClockEventReason.SYNC_BOOST.value
SW_THERMAL_SLOWDOWN: Final = ClockEventReason.SW_THERMAL_SLOWDOWN.value
HW_THERMAL_SLOWDOWN: Final = ClockEventReason.HW_THERMAL_SLOWDOWN.value
HW_POWER_BRAKE_SLOWDOWN: Final = ClockEventReason.HW_POWER_BRAKE_SLOWDOWN.value
DISPLAY_CLOCK_SETTING: Final = ClockEventReason.DISPLAY_CLOCK_SETTING.value

# (bit, name) of every reason, lowest bit first; the name is nvml.h's in snake case
# ("hw_power_brake_slowdown"), the `reason` label of the agent's fleetwatch_gpu_clock_event_reason.
CLOCK_EVENT_REASONS: Final[tuple[tuple[int, str], ...]] = tuple(
    (reason.value, name.lower()) for name, reason in ClockEventReason.__members__.items()
)
