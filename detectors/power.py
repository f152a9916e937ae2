"""Power detector: a GPU held in hardware power brake slowdown (clock event reason 0x80).

HW power brake slowdown means an external power brake signal (the system power supply or power
shelf) is asserted and the GPU has cut its clocks by half or more. The issue asked for gpud's rule
(the slowdown in over 60 % of a 10-minute window); an alert within seconds needs more than that,
so a finding opens on either of two paths (detectors.model.sustained):
- fast: the brake in at least 80 % of the samples of the last 20 s, over at least 10 s: a steady
  brake opens 15 s after it starts at the 1 s default interval;
- slow: the brake seen in at least 6 of the last 10 minutes (gpud's 0.6 per minute), which catches
  a brake that comes and goes without ever filling the fast window.
SW power cap (0x4) is the GPU holding its own power limit: normal at full load, never a finding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from fleetwatch.detectors.counters import float_reading
from fleetwatch.detectors.model import Sustained, SustainedThresholds, Window, fmt_number
from fleetwatch.detectors.table import Condition, Rows, reasons_mask
from fleetwatch.nvml_bits import HW_POWER_BRAKE_SLOWDOWN
from fleetwatch.records import Finding


@dataclass(frozen=True, slots=True)
class PowerThresholds(SustainedThresholds):
    """The shared sustained rule's defaults (detectors.model)."""


def _braked(rows: Rows) -> np.ndarray:
    return (reasons_mask(rows) & HW_POWER_BRAKE_SLOWDOWN) != 0


# What a finding reads from its newest braked sample.
_FIELDS = ("clock_event_reasons", "power_watts", "power_limit_watts", "sm_clock_mhz", "sm_clock_max_mhz")


@dataclass(slots=True)
class PowerDetector:
    """Recent GPU samples -> a finding per GPU held in HW power brake slowdown."""

    thresholds: PowerThresholds = field(default_factory=PowerThresholds)
    id: ClassVar[str] = "power"
    # Warning: the GPU computes at half speed or less but has not failed; Azure NHC
    # (azure_gpu_clock_throttling.nhc) logs any throttle reason but idle and SW power cap as a
    # warning, never a failure.
    severity: ClassVar[str] = "warning"
    # The brake is asserted by the node's power delivery (PSU, power shelf): gpud suggests a
    # hardware inspection for sustained HW slowdown ("power supply unit (PSU) failing").
    action: ClassVar[str] = "inspect_hardware"

    @property
    def window_seconds(self) -> float:
        return self.thresholds.window_seconds

    @property
    def gpu_window_seconds(self) -> float:
        """Full samples for the fast window; the long one reads the `braked` condition's times."""
        return self.thresholds.short_seconds

    @property
    def gpu_fields(self) -> Mapping[str, float]:
        return dict.fromkeys(_FIELDS, self.thresholds.short_seconds)

    @property
    def gpu_conditions(self) -> tuple[Condition, ...]:
        return (self.braked,)

    @property
    def braked(self) -> Condition:
        """A sample shows HW power brake slowdown."""
        return Condition("power.braked", ("clock_event_reasons",), _braked, self.thresholds.long_seconds)

    def detect(self, window: Window) -> list[Finding]:
        findings = [
            self._finding(node, gpu, held) for node, gpu, _, held in self.thresholds.held_gpus(window, self.braked)
        ]
        findings.sort(key=lambda f: (f.start, f.node or "", f.gpu))
        return findings

    def _finding(self, node: str, gpu: int, held: Sustained) -> Finding:
        latest = held.latest.metrics
        power_watts = float_reading(latest, "power_watts")
        power_limit_watts = float_reading(latest, "power_limit_watts")
        sm_clock_mhz = float_reading(latest, "sm_clock_mhz")
        sm_clock_max_mhz = float_reading(latest, "sm_clock_max_mhz")

        details = []
        if sm_clock_mhz is not None:
            clock = f"SM clock {fmt_number(sm_clock_mhz)} MHz"
            if sm_clock_max_mhz is not None:
                clock += f" of {fmt_number(sm_clock_max_mhz)} MHz max"
            details.append(clock)
        if power_watts is not None:
            power = f"{fmt_number(power_watts)} W"
            if power_limit_watts is not None:
                power += f" of {fmt_number(power_limit_watts)} W limit"
            details.append(power)
        summary = f"GPU {gpu} in hardware power brake slowdown{held.how_long}" + (
            ": " + ", ".join(details) if details else ""
        )

        evidence: dict[str, object] = {
            "sustained_by": held.by,
            "braked_samples": held.recent_hits,
            "recent_samples": held.recent_samples,
            "recent_seconds": self.thresholds.recent_seconds,
            "clock_event_reasons": int(latest["clock_event_reasons"]),
        }
        if held.long_hit_buckets is not None:
            evidence["braked_minutes"] = held.long_hit_buckets
        if held.latest.job is not None:
            evidence["job"] = held.latest.job  # evidence, not identity: see thermal
        for name, value in (
            ("power_watts", power_watts),
            ("power_limit_watts", power_limit_watts),
            ("sm_clock_mhz", sm_clock_mhz),
            ("sm_clock_max_mhz", sm_clock_max_mhz),
        ):
            if value is not None:
                evidence[name] = value
        return Finding(
            detector=self.id,
            severity=self.severity,
            action=self.action,
            summary=summary,
            start=held.start,
            node=node,
            gpu=gpu,
            evidence=evidence,
        )
